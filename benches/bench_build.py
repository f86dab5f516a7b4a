"""Firmware builds for 4 devices: the peers' way against kflash's build engine.

Peers build board after board in the source tree: ``make clean; make -j$(nproc)``
with each board's config copied to ``.config``. kflash builds every device at once,
each in its own OUT with its own KCONFIG_CONFIG, keeps OUT between runs and skips a
device whose cache key (config, source version, toolchain) is unchanged.

The source tree is the bench's Klipper-like tree (sim/virtual_printer/firmware: real
make, real gcc) with generated sources added under src/extra/ to size the compile work,
so absolute times are smaller than with Klipper; the ratios are the point.
Prints one Markdown section on stdout (collected by ``make bench``).

    python benches/bench_build.py [--sources N] [--work W] [--release]
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virtual_printer import tree as bench_tree

ROOT = Path(__file__).resolve().parent.parent

DEVICES = {
    "octopus": 'CONFIG_MACH_STM32=y\nCONFIG_MCU="stm32f446xx"\n',
    "ebb36": 'CONFIG_MACH_STM32=y\nCONFIG_MCU="stm32f103xe"\n',
    "pico": 'CONFIG_MACH_RPXXXX=y\nCONFIG_MCU="rp2040"\n',
    "host": "CONFIG_MACH_LINUX=y\n",
}


def source_c(i, work):
    """One generated source: `work` small functions, enough for the compiler to chew."""
    body = []
    for j in range(work):
        body.append(
            f"static int f{i}_{j}(int x) {{ int s = 0; for (int k = 0; k < x; k++)"
            f" s += (k * {j + 1}) ^ (s >> 3); return s; }}"
        )
    calls = " + ".join(f"f{i}_{j}(n)" for j in range(work)) or "0"
    body.append(f"int work_{i}(int n) {{ return {calls}; }}")
    return "\n".join(body) + "\n"


def make_tree(dest, sources, work):
    """The bench tree at its tag, plus `sources` generated files in src/extra/."""
    bench_tree.materialise(str(dest), commits_after_tag=0)
    extra = dest / "src" / "extra"
    extra.mkdir()
    for i in range(sources):
        (extra / f"mod{i:02d}.c").write_text(source_c(i, work))
    bench_tree.git(str(dest), "add", "-A")
    bench_tree.git(str(dest), "commit", "-q", "-m", "generated sources")
    return dest


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build_tool(release):
    cmd = ["cargo", "build", "--quiet", "--example", "build_firmware"]
    if release:
        cmd.append("--release")
    subprocess.run(cmd, cwd=ROOT, check=True)
    profile = "release" if release else "debug"
    return ROOT / "target" / profile / "examples" / "build_firmware"


def peers(tree, configs, jobs):
    """make clean; make -jN, board after board, in the tree."""
    started = time.monotonic()
    for config in configs.values():
        shutil.copyfile(config, tree / ".config")
        quiet = {"cwd": tree, "check": True, "stdout": subprocess.DEVNULL}
        subprocess.run(["make", "-s", "olddefconfig"], **quiet)
        subprocess.run(["make", "-s", "clean"], cwd=tree, check=True)
        subprocess.run(["make", "-s", f"-j{jobs}"], **quiet)
    return time.monotonic() - started


def kflash(tool, tree, builds, configs, jobs=None):
    cmd = [str(tool), "--klipper", str(tree), "--builds", str(builds)]
    if jobs is not None:
        cmd += ["--jobs", str(jobs)]
    cmd += [f"{key}={path}" for key, path in configs.items()]
    started = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    wall = time.monotonic() - started
    report = json.loads(proc.stdout)
    failed = [d for d in report["devices"] if not d["ok"]]
    if proc.returncode != 0 or failed:
        raise SystemExit(f"kflash build failed: {failed}")
    return wall, report


def cpu_seconds():
    """CPU time of finished child processes (make, gcc, the build tool)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def describe(tree):
    return subprocess.run(
        ["git", "describe", "--always", "--tags", "--long", "--dirty"],
        cwd=tree,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.strip()


def check(report, version, cached):
    for device in report["devices"]:
        if device["version"] != version or device["cached"] != cached:
            raise SystemExit(f"unexpected build result {device} (want {version})")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The tree alone compiles about as long per board as Klipper does here (5-7 s);
    # generated sources add more.
    parser.add_argument("--sources", type=int, default=0)
    parser.add_argument("--work", type=int, default=40)
    parser.add_argument("--release", action="store_true")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating cold rounds (median)"
    )
    args = parser.parse_args(argv)
    jobs = os.cpu_count() or 1
    tool = build_tool(args.release)
    with tempfile.TemporaryDirectory(prefix="kflash-bench-build-") as tmp:
        tmp = Path(tmp)
        tree = make_tree(tmp / "klipper", args.sources, args.work)
        configs = {}
        for key, text in DEVICES.items():
            configs[key] = tmp / "configs" / f"{key}.config"
            configs[key].parent.mkdir(exist_ok=True)
            configs[key].write_text(text)
        builds = tmp / "builds"

        # Cold builds alternate between the three ways so machine noise hits each alike.
        peers_runs, seq_runs, cold_runs, cpu_runs = [], [], [], []
        for n in range(args.rounds):
            log(f"round {n + 1}: peers: make clean; make -j per board")
            peers_runs.append(peers(tree, configs, jobs))
            for jobs_arg, runs in ((1, seq_runs), (None, cold_runs)):
                shutil.rmtree(builds, ignore_errors=True)
                log(f"round {n + 1}: kflash cold, jobs={jobs_arg or jobs}")
                before = cpu_seconds()
                wall, report = kflash(tool, tree, builds, configs, jobs_arg)
                cpu_runs.append(cpu_seconds() - before)
                check(report, describe(tree), cached=False)
                runs.append(wall)
        t_peers = statistics.median(peers_runs)
        t_seq = statistics.median(seq_runs)
        t_cold = statistics.median(cold_runs)
        floor = statistics.median(cpu_runs) / jobs  # the CPU work spread on every core
        log("kflash: fully cached")
        cached_runs = []
        for _ in range(5):
            wall, report = kflash(tool, tree, builds, configs)
            check(report, describe(tree), cached=True)
            cached_runs.append(wall)
        t_cached = statistics.median(cached_runs)
        log("kflash: one source changed")
        src = tree / "src" / "stepper.c"
        src.write_text(src.read_text() + "int bench_extra(void) { return 1; }\n")
        bench_tree.git(str(tree), "commit", "-qam", "change one source")
        t_incr, report = kflash(tool, tree, builds, configs)
        check(report, describe(tree), cached=False)

    def ratio(t):
        if t <= 0:
            return "-"
        if t <= t_peers:
            return f"{t_peers / t:.1f}x faster"
        return f"{t / t_peers:.2f}x slower"

    rows = [
        (
            f"peers: `make clean; make -j{jobs}` board after board",
            t_peers,
            "1.0x",
        ),
        ("kflash: one device at a time, cold (jobs=1)", t_seq, ratio(t_seq)),
        ("kflash: all 4 in parallel, cold (empty OUTs)", t_cold, ratio(t_cold)),
        ("kflash: one source changed (incremental)", t_incr, ratio(t_incr)),
        ("kflash: nothing changed (fully cached)", t_cached, ratio(t_cached)),
    ]
    profile = "release" if args.release else "debug"
    out = [
        "## bench_build",
        "",
        f"Firmware for 4 devices (stm32f446, stm32f103, rp2040, linux) from the "
        f"bench's Klipper-like tree plus {args.sources} generated sources x "
        f"{args.work} functions (real gcc), {jobs} cores. kflash = `build_all` "
        f"(examples/build_firmware, "
        f"{profile} profile), jobs = {jobs}; cold figures are medians of "
        f"{args.rounds} alternating rounds, the cached one of {len(cached_runs)} runs.",
        "",
        "| scenario | wall (s) | vs peers |",
        "|---|---:|---:|",
    ]
    out += [f"| {name} | {t:.2f} | {r} |" for name, t, r in rows]
    target = "met" if t_cold <= 0.6 * t_seq else "missed"
    out += [
        "",
        f"- Parallel vs one at a time: {t_cold / t_seq:.2f}x (target <= 0.6x: "
        f"**{target}**). The cold build's CPU work is {floor * jobs:.1f} CPU-seconds, "
        f"so no schedule on {jobs} cores beats {floor:.2f} s "
        f"({floor / t_seq:.2f}x of one at a time); parallel is within "
        f"{(t_cold / floor - 1) * 100:.0f} % of that floor. "
        "A cold build is CPU-bound: two cores are busy either way "
        "(each build gets `-j` = cores / concurrent builds), so parallelism only "
        "fills the serial steps (config, link, dictionary). Klipper measured on this "
        "machine class shows the same floor (four boards: 20-25 s one after another "
        "with -j2, 21-22 s all at once). kflash's gain is in the rows below: kept OUTs "
        "and the cache.",
        "- The peers rebuild everything every time, so their clean figure is the "
        "comparator for every row.",
        "Re-run: `python benches/bench_build.py` "
        "(`--sources N --work W` to size the tree).",
    ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
