"""What klippy shows of a flash run: the state machine behind the ``[kflash]``
extra, with no klippy in it (unit-tested on its own).

``RunView`` turns a run's record and progress events (read through the core's
``kflash.Runs``) into the ``kflash`` printer object's fields (``status``) and the
console lines the extra posts (``Say``: ``(kind, text)`` where kind is
``note`` (progress, not logged), ``info``, ``error`` (a red ``!!`` line) or
``action`` (a Mainsail ``// action:`` line)). Every change publishes a fresh
``status`` dict: klippy's webhooks compare status objects with ``!=``.
"""

import logging
import os
import re

from kflash import RegistryError, render, validate_key

__all__ = ["ACTIVE", "RunView", "STAGES", "bad_request", "mark_prompt", "say"]

IDLE, BUILDING, STOPPING, FLASHING = "idle", "building", "stopping", "flashing"
RESTARTING, VERIFYING, DONE, FAILED = ("restarting", "verifying", "done",
                                       "failed")
ACTIVE = (BUILDING, STOPPING, FLASHING, RESTARTING, VERIFYING)

#: Engine stage -> (run state, overall progress at its start, its width).
STAGES = {
    "plan": (BUILDING, 0.0, 0.02),
    "preflight": (BUILDING, 0.02, 0.03),
    "build": (BUILDING, 0.05, 0.40),
    "stop": (STOPPING, 0.45, 0.05),
    "flash": (FLASHING, 0.50, 0.35),
    "restart": (RESTARTING, 0.85, 0.05),
    "verify": (VERIFYING, 0.90, 0.08),
    "report": (VERIFYING, 0.98, 0.02),
}

# make's per-file lines (Compiling, Linking, ...) stay in the run's progress
# file; the console gets the per-device milestones.
MAKE_LINE = re.compile(
    r"^\s*(Compiling|Linking|Building|Preprocessing|Creating|Generating"
    r"|Assembling|Copying|Version:)\b")


def say(gcode, lines):
    """Post ``Say`` lines through klippy's gcode object."""
    for kind, text in lines:
        if kind == "error":
            gcode.respond_raw("!! " + text)
        elif kind == "action":
            gcode.respond_raw("// action:" + text)
        else:
            gcode.respond_info(text, log=kind == "info")


def mark_prompt(path, is_open):
    """Note whether the plan dialog is open (a file at ``path``), so a dialog
    left open when klippy went down is closed when it is back."""
    try:
        if is_open:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").close()
        elif os.path.exists(path):
            os.unlink(path)
    except OSError:
        logging.exception("kflash: cannot record the dialog state")


def bad_request(home, devices, device, rollback=False):
    """Why a run (``rollback``: of the last-known-good images) of ``device``
    (None: every device) cannot start with these registered ``devices``
    (``Engine.devices()``), or None. Keys follow the core's one rule."""
    keys = sorted(d["key"] for d in devices)
    if not keys:
        return (f"no devices registered in {home}: add them with `kflash "
                "devices import ~/printer_data/config/printer.cfg` or "
                "`kflash devices add`")
    if device is not None:
        try:
            validate_key(device)
        except RegistryError as e:
            return str(e)
        if device not in keys:
            return f"unknown device {device!r} (known: {', '.join(keys)})"
    if rollback and not any(d.get("last_known_good") for d in devices
                            if device in (None, d["key"])):
        who = f"{device} has no" if device else "no device has"
        return (f"{who} last-known-good firmware to roll back to: kflash "
                "keeps one when a flash is verified on the board")
    return None


class RunView:
    """The current (or last) run as klippy shows it."""

    def __init__(self, home):
        self.home = home
        self.state = IDLE
        self.progress = 0.0
        self.device = self.stage = self.run_id = self.method = None
        self.message = ""
        self.last_result = None
        self._relayed = None
        self.publish()

    @property
    def active(self):
        return self.state in ACTIVE

    def publish(self):
        self.status = {
            "state": self.state, "progress": round(self.progress, 3),
            "device": self.device, "stage": self.stage,
            "message": self.message, "run_id": self.run_id,
            "launcher": self.method, "home": self.home,
            "last_result": self.last_result,
        }

    # -- a run klippy starts ------------------------------------------------
    def starting(self, run_id, device, only_outdated, rollback=False):
        """KFLASH_ALL (or KFLASH, KFLASH_ROLLBACK) was accepted: the helper is
        being started."""
        self.run_id, self.device = run_id, device
        self.state, self.stage, self.progress = BUILDING, None, 0.0
        self.message = "starting the helper"
        self._relayed = None
        self.publish()
        if rollback:
            what = f"device {device}" if device else "every MCU that has one"
            return [("info", f"kflash: rolling back {what} to the firmware "
                     "last verified on it: klipper stops, the boards are "
                     "flashed and klipper starts again. Progress follows "
                     "here; the summary is posted when klipper is back.")]
        what = (f"device {device}" if device else
                "every outdated MCU" if only_outdated else "every MCU")
        return [("info", f"kflash: flashing {what}. Firmware builds while "
                 "klipper keeps running; then klipper stops, the boards are "
                 "flashed and klipper starts again. Progress follows here; the "
                 "summary is posted when klipper is back.")]

    def started(self, got):
        """The helper began the run (``Runs.start_helper``'s answer)."""
        self.method = got.get("method")
        self.message = f"helper started ({self.method}, pid {got.get('pid')})"
        self.publish()

    def refused(self, error):
        """The helper could not be started: back to idle, say why."""
        self.state, self.run_id, self.message = IDLE, None, ""
        self.publish()
        lines = str(error).splitlines() or ["the helper could not be started"]
        out = [("error", "kflash: refused: " + lines[0])]
        if lines[1:]:
            out.append(("info", "\n".join(lines[1:])))
        return out

    # -- following a run ----------------------------------------------------
    def follow(self, record):
        """A run still going when klippy started (it restarted klipper)."""
        self.run_id = record["run_id"]
        self.state = VERIFYING
        self.publish()

    def apply(self, events):
        """Progress events of the followed run -> console lines."""
        out = []
        for ev in events:
            if ev.get("run_id") not in (None, self.run_id):
                continue
            stage = ev.get("stage")
            if stage in STAGES:
                self.state, base, width = STAGES[stage]
                self.stage = stage
                frac = ev.get("fraction")
                frac = float(frac) if isinstance(frac, (int, float)) else 0.0
                self.progress = max(self.progress,
                                    min(1.0, base + width * frac))
            if ev.get("device"):
                self.device = ev["device"]
            if ev.get("message"):
                self.message = render.text(ev["message"], "")
            out += self._relay(ev)
        if events:
            self.publish()
        return out

    def _relay(self, ev):
        msg, level, dev = ev.get("message"), ev.get("level"), ev.get("device")
        if not msg or (level == "info" and MAKE_LINE.match(msg)):
            return []
        # progress-only repeats (same stage, device and message) stay quiet
        key = (ev.get("stage"), dev, msg)
        if key == self._relayed:
            return []
        self._relayed = key
        line = "kflash {}{}: {}".format(ev.get("stage") or "",
                                    " " + dev if dev else "", render.text(msg))
        if level == "error":
            return [("error", line)]
        if level == "warning":
            return [("note", "warning: " + line)]
        return [("note", line)]

    def finish(self, record):
        """The followed (or an unannounced) run ended: its summary."""
        self.remember(record)
        self.run_id = record.get("run_id")
        self.state = DONE if record.get("ok") else FAILED
        if record.get("ok"):
            self.progress = 1.0
        self.publish()
        info, errors = render.summary(record)
        return [("info", "\n".join(info))] + [("error", e) for e in errors]

    def remember(self, record):
        """The last run, already reported: only ``last_result``."""
        self.last_result = render.result_summary(record)
        self.publish()

    def lines(self, record):
        """KFLASH_STATUS: the run going on and the last run's summary."""
        out = []
        if self.active:
            dev = f" ({self.device})" if self.device else ""
            msg = f": {self.message}" if self.message else ""
            out.append(f"kflash: run {self.run_id}: {self.state} "
                       f"{int(self.progress * 100)}%{dev}{msg}")
        if record is None:
            return out or [f"kflash: no flash run yet (state dir {self.home})"]
        if record.get("state") == "running":
            return out or [f"kflash: run {record['run_id']} is running "
                           f"(pid {record.get('pid')})"]
        info, errors = render.summary(record)
        return out + [f"last run {record.get('run_id')}:"] + info + errors
