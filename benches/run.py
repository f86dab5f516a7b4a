"""`make bench`: run every benches/bench_*.py and write BENCHMARKS.md.

Each bench script prints one Markdown section on stdout (its figures, the ratios
against the alternative measured in the same run, and how to re-run it). This runner
only collects them, so a figure in BENCHMARKS.md always comes from the run that wrote
the file.
"""

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine():
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def previous_sections():
    """The sections of the current BENCHMARKS.md, by bench name."""
    try:
        text = (ROOT / "BENCHMARKS.md").read_text()
    except OSError:
        return {}
    found = {}
    for part in text.split("\n## ")[1:]:
        name = part.split()[0].rstrip(":")
        found[name] = "## " + part.strip() + "\n"
    return found


def main(argv):
    only = set(argv[1:])
    scripts = sorted((ROOT / "benches").glob("bench_*.py"))
    kept = previous_sections() if only else {}
    sections = []
    failed = []
    for script in scripts:
        if only and script.stem not in only:
            if script.stem in kept:  # re-running some sections keeps the others
                sections.append(kept[script.stem])
            continue
        print(f"== {script.name}", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        if proc.returncode != 0:
            failed.append(script.name)
            sections.append(
                f"## {script.stem}\n\nFAILED (exit {proc.returncode}); "
                f"re-run `python benches/{script.name}` to see why.\n"
            )
        else:
            sections.append(proc.stdout.strip() + "\n")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        "# Benchmarks\n\n"
        f"Written by `make bench` on {stamp}; {machine()}.\n"
        "Every figure is a ratio against the alternative measured in the same run;\n"
        "re-run one section with `python benches/run.py bench_<name>`.\n"
    )
    (ROOT / "BENCHMARKS.md").write_text(header + "\n" + "\n".join(sections))
    print("wrote BENCHMARKS.md", file=sys.stderr)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
