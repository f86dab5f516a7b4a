"""A printer host in the bed, driven the way its user drives it.

`Host` wraps one booted `Container` of the printer root (`host_bed.printer`) with
kflash's checkout in ``~/kflash``: `install()` runs ``scripts/install.sh`` as pi in a
login shell exactly as the README says, `register()` is the README's one-time set-up
(``kflash devices import``, settings, a config per board), `allow_sudo()` sets what pi
may do with sudo, `reboot()` reboots and waits until Moonraker reports klippy ready.
The rest is what a user (or Mainsail) sees: G-code through Moonraker's HTTP API, the
console, MCU versions, klipper's unit state and its stop/start jobs in the journal, the
run records and progress in the state dir (``runs/``).
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from host_bed import printer as bed
from host_bed.container import Container, Result, wait_for

KFLASH = f"{bed.HOME}/klippy-env/bin/kflash"
STATE = f"{bed.HOME}/printer_data/kflash"
RUNS = f"{STATE}/runs"
SAMPLE = {"mcu": "stm32f446", "mcu toolhead": "rp2040", "mcu host": "linux"}

#: What pi may run with ``sudo -n``: the Raspberry Pi OS default (everything), the
#: commands kflash uses (systemd-run and systemctl), or nothing.
SUDO = {
    "all": "pi ALL=(ALL) NOPASSWD: ALL\n",
    "systemd": "pi ALL=(root) NOPASSWD: /usr/bin/systemd-run, /usr/bin/systemctl\n",
    "none": None,
}


class Host:
    def __init__(self, c: Container, wheel: str) -> None:
        self.c = c
        self.wheel = wheel  # its path inside

    # ------------------------------------------------------ as the user

    def pi(self, script: str, check: bool = True, timeout: float = 300) -> Result:
        """``script`` in pi's login shell."""
        return self.c.login("pi", script, check=check, timeout=timeout)

    def install(self) -> Result:
        """The README: ``scripts/install.sh --wheel FILE`` from the checkout, as pi."""
        return self.pi(f"cd ~/kflash && scripts/install.sh --wheel {self.wheel}")

    def uninstall(self) -> Result:
        return self.pi("cd ~/kflash && scripts/install.sh --uninstall")

    def kflash(self, *args: str, check: bool = True, timeout: float = 300) -> Result:
        return self.pi(" ".join([KFLASH, *(f"'{a}'" for a in args)]), check=check,
                       timeout=timeout)

    def register(self, service: str) -> None:
        """The README's once: import printer.cfg, settings, a config per board."""
        self.kflash("devices", "import")
        for key, value in (("klipper_dir", f"{bed.HOME}/klipper"),
                           ("service", service),
                           ("moonraker_url", bed.MOONRAKER_URL),
                           ("linux_mcu_binary", f"{bed.BENCH}/bin/klipper_mcu")):
            self.kflash("settings", "set", key, value)
        devices = json.loads(self.kflash("devices", "list", "--json").out)
        for d in devices:
            sample = f"{bed.HOME}/klipper/config/{SAMPLE[d['mcu_section']]}.config"
            dest = d.get("config") or f"{STATE}/configs/{d['key']}.config"
            self.pi(f"mkdir -p \"$(dirname '{dest}')\" && cp '{sample}' '{dest}'")

    def plan_targets(self) -> dict[str, str]:
        """printer.cfg section -> the version kflash would build (``kflash plan``)."""
        sections = {d["key"]: d["mcu_section"]
                    for d in json.loads(self.kflash("devices", "list", "--json").out)}
        plan = json.loads(self.kflash("plan", "--json").out)
        return {sections[d["key"]]: d["version_target"] for d in plan["devices"]}

    # ---------------------------------------------------------- as root

    def allow_sudo(self, profile: str) -> None:
        rule = SUDO[profile]
        if rule is None:
            self.c.run(["rm", "-f", bed.PI_SUDO])
        else:
            self.c.sh(f"printf '%s' '{rule}' > {bed.PI_SUDO} && chmod 440 {bed.PI_SUDO}"
                      f" && visudo -cq")

    def reboot(self) -> dict[str, Any]:
        self.c.reboot()
        return bed.wait_ready(self.c, 120)

    # ------------------------------------------------- what a user sees

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return bed.moonraker(self.c, method, path, body)

    def gcode(self, script: str) -> tuple[int, Any]:
        """``POST /printer/gcode/script`` (what Mainsail's console sends)."""
        return self.api("POST", "/printer/gcode/script", {"script": script})

    def console(self) -> list[str]:
        status, doc = self.api("GET", "/server/gcode_store?count=1000")
        assert status == 200, doc
        return [m["message"] for m in doc["result"]["gcode_store"]]

    def kflash_status(self) -> Optional[dict[str, Any]]:
        got = bed.query(self.c, "kflash")
        return None if got is None else got.get("kflash")

    def versions(self) -> dict[str, Any]:
        return bed.mcu_versions(self.c)

    def services(self) -> list[str]:
        status, doc = self.api("GET", "/machine/system_info")
        assert status == 200, doc
        return doc["result"]["system_info"]["available_services"]

    def unit(self, name: str, prop: str) -> str:
        r = self.c.run(["systemctl", "show", "-p", prop, "--value", name])
        return r.out.strip()

    def now(self) -> float:
        return time.time()

    def jobs(self, unit: str, since: float) -> list[str]:
        """The finished stop/start jobs of ``unit`` since ``since`` (journal)."""
        r = self.c.run(["journalctl", "--no-pager", "-o", "json", "-u", unit,
                        f"--since=@{since:.6f}"])
        out = []
        for line in r.out.splitlines():
            e = json.loads(line)
            if e.get("JOB_RESULT") == "done" and e.get("JOB_TYPE") in ("stop", "start"):
                out.append(e["JOB_TYPE"])
        return out

    def cgroup(self, pid: int) -> str:
        """The unified cgroup of a process inside (``0::`` line)."""
        text = self.c.run(["cat", f"/proc/{pid}/cgroup"]).out
        return next(line[3:] for line in text.splitlines() if line.startswith("0::"))

    def run_record(self, run_id: str) -> Optional[dict[str, Any]]:
        """The run's record as its writers left it (``runs/<run id>.json``)."""
        path = f"{RUNS}/{run_id}.json"
        if not self.c.exists(path):
            return None
        try:
            return json.loads(self.c.read(path))
        except ValueError:
            return None

    def progress(self, run_id: str) -> list[dict[str, Any]]:
        path = f"{RUNS}/{run_id}.jsonl"
        if not self.c.exists(path):
            return []
        out = []
        for line in self.c.read(path).splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("run_id") == run_id:
                out.append(ev)
        return out

    def wait_report(self, run_id: str, timeout: float = 600) -> dict[str, Any]:
        """The run's record once it has ended."""
        def done() -> Optional[dict[str, Any]]:
            rec = self.run_record(run_id)
            return rec if rec and rec.get("state") != "running" else None

        try:
            return wait_for(done, timeout, f"the report of run {run_id}", 0.5)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.diagnostics()}") from None

    def diagnostics(self) -> str:
        out = [bed.diagnostics(self.c)]
        names = self.c.run(["ls", RUNS], check=False).out.split()
        for name in sorted(names)[-4:]:
            path = f"{RUNS}/{name}"
            out.append(f"--- {path}\n{self.c.read(path)[-3000:]}")
        if self.c.exists(f"{STATE}/watchdog.log"):
            dog = self.c.read(f"{STATE}/watchdog.log")
            out.append(f"--- watchdog.log\n{dog[-2000:]}")
        out.append(self.c.journal_tail(40))
        return "\n".join(out)
