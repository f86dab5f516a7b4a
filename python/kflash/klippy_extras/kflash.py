# [kflash]: flash every MCU from klippy, with Mainsail/Fluidd dialogs.
#
# KFLASH_ALL, KFLASH DEVICE=<key>, KFLASH_PLAN and KFLASH_STATUS. klippy
# cannot flash its own MCUs (it holds their ttys, and stopping klipper
# kills klippy), so KFLASH_ALL validates, answers at once and starts the
# detached helper (`python -m kflash.helper`) out of klipper's reach; the
# helper builds while klipper keeps running, then stops klipper, flashes,
# starts klipper again and verifies. While klippy is up its progress is
# relayed to the console; when klippy is back the final report is posted.
#
# Portable: Python 3, the standard library and the kflash package only;
# nothing is imported from klippy. Slow work (the plan, the launch) runs on
# a thread that reports back through reactor.register_async_callback.
#
# This file is part of kflash. GPL-3.0-or-later.
import logging
import os
import re
import sys
import threading

try:
    import kflash
    from kflash import helper as kflash_helper
    from kflash import launcher as kflash_launcher
except ImportError as _e:  # reported as a config error in load_config
    kflash = None
    _IMPORT_ERROR = _e
else:
    _IMPORT_ERROR = None

# Run states shown by get_status()["state"].
IDLE, BUILDING, STOPPING, FLASHING = "idle", "building", "stopping", "flashing"
RESTARTING, VERIFYING, DONE, FAILED = (
    "restarting", "verifying", "done", "failed")
ACTIVE = (BUILDING, STOPPING, FLASHING, RESTARTING, VERIFYING)

# Engine stage -> (run state, overall progress at stage start, stage width)
STAGES = {
    "helper": (BUILDING, 0.0, 0.0),
    "plan": (BUILDING, 0.0, 0.02),
    "preflight": (BUILDING, 0.02, 0.03),
    "build": (BUILDING, 0.05, 0.40),
    "stop": (STOPPING, 0.45, 0.05),
    "flash": (FLASHING, 0.50, 0.35),
    "restart": (RESTARTING, 0.85, 0.05),
    "verify": (VERIFYING, 0.90, 0.08),
    "report": (VERIFYING, 0.98, 0.02),
}

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# make's per-file lines (Compiling, Linking, ...) stay in the helper's
# progress file; the console gets the per-device milestones.
MAKE_LINE_RE = re.compile(
    r"^\s*(Compiling|Linking|Building|Preprocessing|Creating|Generating"
    r"|Assembling|Copying|Version:)\b")
PLAN_STATES = ("outdated", "unknown", "newer", "current")
LAUNCHERS = ("auto", "systemd-run", "moonraker", "session")
# How long to wait for a console subscriber (Moonraker) after klippy:ready
# before posting the last run's report anyway.
ANNOUNCE_TIMEOUT = 5.0
# How long a helper started through systemd may take to write its status.
START_TIMEOUT = 60


def _text(value, default="?"):
    if value is None or value == "":
        return default
    return str(value).replace("\n", " ")


class KflashExtra:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        home = config.get("home", None)
        if home is None:
            home = kflash_helper.default_home()
        self.home = os.path.abspath(os.path.expanduser(home))
        self.python = config.get("python", sys.executable)
        self.launcher = config.getchoice(
            "launcher", {m: m for m in LAUNCHERS}, "auto")
        self.moonraker_url = config.get(
            "moonraker_url", "http://127.0.0.1:7125")
        self.poll_interval = config.getfloat(
            "poll_interval", 0.5, minval=0.05, maxval=10.0)
        self.files = kflash_helper.RunFiles(self.home)
        self.gcode = self.printer.lookup_object("gcode")
        self.print_stats = None
        self.idle_timeout = None
        # Run tracking
        self.state = IDLE
        self.progress = 0.0
        self.device = None
        self.stage = None
        self.message = ""
        self.run_id = None
        self.method = None
        self.process = None
        self.exit_code = None
        self.launched_at = None
        self.close_stale_prompt = False
        self.launching = False
        self.cursor = None
        self.last_relayed = None
        self.posted_ids = set()
        self.last_result = None
        self.status = {}
        self.timer = None
        # Plan dialog
        self.planning = False
        self.announce_base = self._subscriber_count()
        self.announce_deadline = None
        self.announced = False
        try:
            self._load_state()
        except Exception:
            logging.exception("kflash: reading the helper's state failed")
            self._publish()
        self.reactor.register_timer(self._check_startup,
                                    self.reactor.monotonic() + 1.0)
        for name, fn in (("KFLASH_ALL", self.cmd_KFLASH_ALL),
                         ("KFLASH", self.cmd_KFLASH),
                         ("KFLASH_PLAN", self.cmd_KFLASH_PLAN),
                         ("KFLASH_STATUS", self.cmd_KFLASH_STATUS)):
            self.gcode.register_command(
                name, fn, desc=getattr(self, f"cmd_{name}_help"))
        self.printer.register_event_handler("klippy:connect",
                                            self._handle_connect)
        self.printer.register_event_handler("klippy:ready",
                                            self._handle_ready)

    # -- Status -----------------------------------------------------------
    def _publish(self):
        # A fresh dict on every change: webhooks compares by !=, so the
        # published object is never mutated.
        self.status = {
            "state": self.state,
            "progress": round(self.progress, 3),
            "device": self.device,
            "stage": self.stage,
            "message": self.message,
            "run_id": self.run_id,
            "launcher": self.method,
            "home": self.home,
            "last_result": self.last_result,
        }

    def get_status(self, eventtime):
        return self.status

    # -- Events -----------------------------------------------------------
    def _handle_connect(self):
        self.print_stats = self.printer.lookup_object("print_stats", None)
        self.idle_timeout = self.printer.lookup_object("idle_timeout", None)
        self.announce_base = self._subscriber_count()

    def _handle_ready(self):
        try:
            self._announce_start()
        except Exception:
            logging.exception("kflash: reading the helper's state failed")

    def _check_startup(self, eventtime):
        # klippy may never get ready (an MCU left in its bootloader): the
        # console (Moonraker subscribes in the error state too) must still
        # hear about the last run.
        try:
            category = self.printer.get_state_message()[1]
        except Exception:
            return self.reactor.NEVER
        if category == "startup":
            return eventtime + 1.0
        if category != "ready" and not self.announced:
            try:
                self._announce_start()
            except Exception:
                logging.exception("kflash: reading the helper's state "
                                  "failed")
        return self.reactor.NEVER

    def _subscriber_count(self):
        return len(getattr(self.gcode, "output_callbacks", ()))

    def _load_state(self):
        """The last run and a run still going, from the state dir."""
        rep = self.files.read_report()
        if rep is not None:
            self.last_result = self._result_summary(rep)
        st = self.files.read_status()
        if (st and st.get("state") == "running"
                and self.files.interrupted_run() is None):
            # klippy was started again by a helper that is still verifying
            self.run_id = st.get("run_id")
            events, self.cursor = self.files.read_events(None)
            for ev in events:
                self._apply_event(ev)
            if self.state not in ACTIVE:
                self.state = VERIFYING
        else:
            # an old run's events are history: the summary covers them
            self.cursor = self.files.end_cursor()
        self._publish()

    def _announce_start(self):
        """Post what happened while klippy was down, close a stale dialog."""
        if self.announced:
            return
        self.announced = True
        self.close_stale_prompt = True
        # Everything said now must reach Moonraker's console, which only
        # subscribes after it sees klippy ready: wait for the subscriber.
        self.announce_deadline = self.reactor.monotonic() + ANNOUNCE_TIMEOUT
        self._start_timer(self.reactor.NOW)

    def _start_timer(self, when):
        if self.timer is None:
            self.timer = self.reactor.register_timer(self._poll, when)
        else:
            self.reactor.update_timer(self.timer, when)

    def _announce_ready(self, eventtime):
        if self.announce_deadline is None:
            return True
        if (self._subscriber_count() > (self.announce_base or 0)
                or eventtime >= self.announce_deadline):
            self.announce_deadline = None
            return True
        return False

    def _poll(self, eventtime):
        try:
            return self._poll_once(eventtime)
        except Exception:
            logging.exception("kflash: polling the helper failed")
            return eventtime + max(self.poll_interval, 1.0)

    def _poll_once(self, eventtime):
        if not self._announce_ready(eventtime):
            return eventtime + 0.1
        if self.close_stale_prompt:
            # a dialog left open when klippy went down
            self.close_stale_prompt = False
            if os.path.exists(self.files.prompt_open):
                self._prompt_end()
        if self.process is not None:
            code = self.process.poll()
            if code is not None:
                self.process = None
                self.exit_code = code
        events, self.cursor = self.files.read_events(self.cursor)
        for ev in events:
            if self.run_id and ev.get("run_id") not in (None, self.run_id):
                continue
            self._apply_event(ev)
            self._relay(ev)
        if events:
            self._publish()
        rep = self.files.read_report()
        if (rep is not None and rep.get("run_id")
                and not self._posted(rep.get("run_id"))
                and self.run_id in (None, rep.get("run_id"))):
            self._finish(rep)
            self._post_report(rep)
            self._mark_posted(rep.get("run_id"))
            return self.reactor.NEVER
        if self.launching:
            return eventtime + self.poll_interval
        stale = self.files.interrupted_run()
        if (stale is not None and self.process is None
                and stale.get("run_id") not in self.posted_ids):
            ours = self.run_id in (None, stale.get("run_id"))
            self._post_interrupted(stale, ours)
            if ours:
                return self.reactor.NEVER
        if self.state in ACTIVE:
            why = self._helper_never_started(eventtime)
            if why:
                self._fail_start(why)
                return self.reactor.NEVER
            return eventtime + self.poll_interval
        return self.reactor.NEVER

    def _helper_never_started(self, eventtime):
        st = self.files.read_status()
        if st and st.get("run_id") == self.run_id:
            return None
        if self.exit_code is not None:
            return (f"the helper exited (status {self.exit_code}) before "
                    "starting the run")
        if (self.process is None and self.launched_at is not None
                and eventtime - self.launched_at > START_TIMEOUT):
            return (f"the helper did not start within {START_TIMEOUT} s "
                    f"({self.method})")
        return None

    def _fail_start(self, why):
        self.state = FAILED
        self.message = why
        self.last_result = {
            "run_id": self.run_id, "ok": False, "exit_code": self.exit_code,
            "interrupted": False, "finished": None, "error": why,
            "devices": []}
        self._publish()
        self.gcode.respond_raw(f"!! kflash: {why}; see {self.files.log}")

    def _apply_event(self, ev):
        stage = ev.get("stage")
        if stage not in STAGES:
            return
        state, base, width = STAGES[stage]
        if stage != "helper" or self.state not in ACTIVE:
            self.state = state
        self.stage = stage
        if ev.get("device"):
            self.device = ev.get("device")
        frac = ev.get("fraction")
        if not isinstance(frac, (int, float)):
            frac = 0.0
        self.progress = max(self.progress,
                            min(1.0, base + width * float(frac)))
        if ev.get("message"):
            self.message = _text(ev.get("message"), "")

    def _relay(self, ev):
        msg = ev.get("message")
        if not msg:
            return
        if ev.get("level") == "info" and MAKE_LINE_RE.match(msg):
            return
        dev = ev.get("device")
        # progress-only repeats (same stage, device and message) stay quiet
        key = (ev.get("stage"), dev, msg)
        if key == self.last_relayed:
            return
        self.last_relayed = key
        text = "kflash {}{}: {}".format(ev.get("stage") or "",
                                    " " + dev if dev else "", _text(msg))
        if ev.get("level") == "error" and ev.get("stage") != "helper":
            # the helper's own end is in the summary that follows
            self.gcode.respond_raw("!! " + text)
        elif ev.get("level") == "warning":
            self.gcode.respond_info("warning: " + text, log=False)
        else:
            self.gcode.respond_info(text, log=False)

    # -- The end of a run -------------------------------------------------
    def _finish(self, rep):
        self.last_result = self._result_summary(rep)
        self.state = DONE if rep.get("ok") else FAILED
        if rep.get("ok"):
            self.progress = 1.0
        self.process = None
        self._publish()

    def _post_interrupted(self, st, ours):
        """Report a run whose helper died without a report (once)."""
        where = ""
        events, _ = self.files.read_events(None)
        for ev in events:
            if (ev.get("run_id") == st.get("run_id")
                    and ev.get("stage") not in (None, "helper")):
                dev = ev.get("device")
                where = f" during {ev['stage']}" + (f" of {dev}"
                                                   if dev else "")
        rep = {
            "version": 1, "run_id": st.get("run_id"), "ok": False,
            "exit_code": 1, "interrupted": True,
            "started": st.get("started"), "finished": None,
            "options": st.get("options"), "result": None,
            "error": f"the helper (pid {st.get('pid')}) stopped{where} "
                     "without a report: the run was interrupted",
            "hint": "check that every MCU is back (KFLASH_PLAN) and run "
                    "KFLASH_ALL again; the details are in "
                    f"{self.files.progress}",
        }
        if ours:
            kflash_helper.write_json_atomic(self.files.report, rep)
            self.run_id = rep["run_id"]
            self._finish(rep)
        self._post_report(rep)
        self._mark_posted(rep["run_id"])

    def _posted(self, run_id):
        return (run_id in self.posted_ids
                or self.files.read_posted() == run_id)

    def _mark_posted(self, run_id):
        # in memory first: an unwritable state dir must not repeat reports
        self.posted_ids.add(run_id)
        try:
            self.files.mark_posted(run_id)
        except OSError:
            logging.exception("kflash: cannot record the posted report")

    def _result_summary(self, rep):
        result = rep.get("result") or {}
        devices = []
        for d in result.get("devices") or []:
            if not isinstance(d, dict):
                continue
            devices.append({k: d.get(k) for k in (
                "key", "action", "build", "flash", "verify",
                "version_before", "version_after", "error")})
        return {
            "run_id": rep.get("run_id"),
            "ok": bool(rep.get("ok")),
            "exit_code": rep.get("exit_code"),
            "interrupted": bool(rep.get("interrupted")),
            "finished": rep.get("finished"),
            "error": rep.get("error"),
            "devices": devices,
        }

    def _report_lines(self, rep):
        """(info lines, error lines) summarising a final report."""
        info, errors = [], []
        result = rep.get("result") or {}
        devices = [d for d in result.get("devices") or []
                   if isinstance(d, dict)]
        if rep.get("interrupted"):
            head = "kflash: the last flash run was INTERRUPTED"
        elif rep.get("ok"):
            head = "kflash: flash run finished: all good"
        else:
            code = rep.get("exit_code")
            head = f"kflash: flash run FAILED (exit {code})"
        svc = result.get("service") or {}
        if svc.get("stopped"):
            down = svc.get("downtime_s")
            down = (f"{down:.1f}" if isinstance(down, (int, float))
                    else "?")
            head += f"; klipper was stopped for {down} s"
            if not svc.get("restarted"):
                errors.append("kflash: klipper could NOT be restarted: "
                              "start it by hand (systemctl start klipper)")
        info.append(head)
        if result.get("target_version"):
            info.append(f"  target firmware: {result['target_version']}")
        for d in devices:
            steps = ", ".join(f"{k} {d.get(k)}" for k in (
                "build", "flash", "verify") if d.get(k))
            info.append("  {}: {} -> {} ({}){}".format(
                _text(d.get("key")), _text(d.get("version_before")),
                _text(d.get("version_after") or d.get("version_target")),
                steps or _text(d.get("action")),
                " - " + _text(d.get("reason")) if d.get("action") == "skip"
                and d.get("reason") else ""))
            if d.get("error"):
                err = "kflash: {}: {}".format(_text(d.get("key")),
                                          _text(d.get("error")))
                if d.get("hint"):
                    err += " | hint: {}".format(_text(d.get("hint")))
                errors.append(err)
        if rep.get("error"):
            err = "kflash: {}".format(_text(rep["error"]))
            if rep.get("hint"):
                err += " | hint: {}".format(_text(rep["hint"]))
            errors.append(err)
        return info, errors

    def _post_report(self, rep):
        info, errors = self._report_lines(rep)
        self.gcode.respond_info("\n".join(info))
        for line in errors:
            self.gcode.respond_raw("!! " + line)

    # -- Starting a run ---------------------------------------------------
    def _refusal(self, eventtime):
        if self.print_stats is not None:
            st = self.print_stats.get_status(eventtime).get("state")
            if st in ("printing", "paused"):
                return (f"the printer is {st}: flashing would stop klipper "
                        "mid-print. Finish or cancel the print first.")
        if self.idle_timeout is not None:
            st = self.idle_timeout.get_status(eventtime).get("state")
            if st == "Printing":
                return ("the printer is busy (idle_timeout: Printing): "
                        "wait until it is idle")
        if self.launching or self.state in ACTIVE:
            return f"a flash run is already in progress ({self.state})"
        busy = self.files.busy()
        if busy:
            return f"a flash run is already in progress: {busy}"
        return None

    def _registered_keys(self):
        """Device keys of the registry (the engine reads devices.json)."""
        devices = kflash.Engine(home=self.home).devices()
        return sorted(d["key"] for d in devices)

    def _start_run(self, gcmd, only_outdated, device):
        why = self._refusal(self.reactor.monotonic())
        if why:
            raise gcmd.error("kflash: refused: " + why)
        try:
            keys = self._registered_keys()
        except kflash.KflashError as e:
            raise gcmd.error(f"kflash: {e}") from e
        if not keys:
            raise gcmd.error(
                f"kflash: no devices registered in {self.home}: add them with "
                "`kflash devices import ~/printer_data/config/printer.cfg`"
                " or `kflash devices add`")
        if device is not None:
            if not KEY_RE.match(device):
                raise gcmd.error(f"kflash: invalid device key {device!r}")
            if device not in keys:
                known = ", ".join(keys) or "none"
                raise gcmd.error(f"kflash: unknown device {device!r} "
                                 f"(known: {known})")
        if os.path.exists(self.files.prompt_open):
            self._prompt_end()
        run_id = kflash_helper.new_run_id()
        self.launching = True
        self.run_id = run_id
        self.state = BUILDING
        self.stage = None
        self.progress = 0.0
        self.device = device
        self.message = "starting the helper"
        self.cursor = self.files.end_cursor()
        self._publish()
        what = (f"device {device}" if device else
                "every outdated MCU" if only_outdated else "every MCU")
        gcmd.respond_info(
            f"kflash: flashing {what}. Firmware builds while klipper keeps "
            "running; then klipper stops, the boards are flashed and "
            "klipper starts again. Progress follows here; the summary is "
            "posted when klipper is back.")
        self.files.ensure_dir()
        args = dict(python=self.python, home=self.home,
                    only_outdated=only_outdated, device=device,
                    method=self.launcher, moonraker_url=self.moonraker_url,
                    log_path=self.files.log, run_id=run_id)
        threading.Thread(target=self._launch_thread, args=(args,),
                         name="kflash-launch", daemon=True).start()

    def _launch_thread(self, args):
        try:
            got = kflash_launcher.launch(**args)
            res = (got, None)
        except Exception as e:
            res = (None, e)
        self.reactor.register_async_callback(
            lambda et: self._launched(et, res))

    def _launched(self, eventtime, res):
        got, err = res
        self.launching = False
        if err is not None:
            self.state = IDLE
            self.message = ""
            self.run_id = None
            self._publish()
            lines = str(err).splitlines() or ["helper launch failed"]
            self.gcode.respond_raw("!! kflash: refused: " + lines[0])
            if lines[1:]:
                self.gcode.respond_info("\n".join(lines[1:]))
            return
        self.method = got.method
        self.process = got.process
        self.exit_code = None
        self.launched_at = eventtime
        self.message = f"helper started ({got.method})"
        self._publish()
        self._start_timer(self.reactor.NOW)

    # -- Commands ---------------------------------------------------------
    cmd_KFLASH_ALL_help = ("Build and flash every MCU's firmware (klipper "
                           "restarts); ONLY_OUTDATED=1 for outdated only")

    def cmd_KFLASH_ALL(self, gcmd):
        only = gcmd.get_int("ONLY_OUTDATED", 0, minval=0, maxval=1)
        self._start_run(gcmd, bool(only), None)

    cmd_KFLASH_help = "Build and flash one MCU: KFLASH DEVICE=<key>"

    def cmd_KFLASH(self, gcmd):
        device = gcmd.get("DEVICE", "").strip()
        if not device:
            raise gcmd.error("kflash: KFLASH needs DEVICE=<key> (KFLASH_PLAN "
                             "lists the keys)")
        self._start_run(gcmd, False, device)

    cmd_KFLASH_STATUS_help = "Show the current or last kflash run"

    def cmd_KFLASH_STATUS(self, gcmd):
        lines = []
        if self.state in ACTIVE or self.launching:
            dev = f" ({self.device})" if self.device else ""
            msg = ": " + self.message if self.message else ""
            pct = int(self.progress * 100)
            lines.append(f"kflash: run {self.run_id}: {self.state} "
                         f"{pct}%{dev}{msg}")
        rep = self.files.read_report()
        if rep is None:
            if not lines:
                lines.append("kflash: no flash run yet (state dir "
                             f"{self.home})")
            gcmd.respond_info("\n".join(lines))
            return
        info, errors = self._report_lines(rep)
        lines.append("last run {}:".format(rep.get("run_id")))
        gcmd.respond_info("\n".join(lines + info + errors))

    cmd_KFLASH_PLAN_help = ("Show each MCU's firmware and what kflash "
                            "would do (a dialog); CLOSE=1 closes it")

    def cmd_KFLASH_PLAN(self, gcmd):
        if gcmd.get_int("CLOSE", 0, minval=0, maxval=1):
            self._prompt_end()
            return
        if self.planning:
            gcmd.respond_info("kflash: the plan is being computed")
            return
        self.planning = True
        gcmd.respond_info("kflash: computing the plan...")
        threading.Thread(target=self._plan_thread, name="kflash-plan",
                         daemon=True).start()

    # -- The plan dialog --------------------------------------------------
    def _plan_thread(self):
        try:
            plan = kflash.Engine(home=self.home).plan()
            res = (plan, None)
        except Exception as e:
            res = (None, e)
        self.reactor.register_async_callback(
            lambda et: self._plan_done(res))

    def _plan_devices(self, plan):
        if isinstance(plan, dict):
            devs = plan.get("devices") or []
        else:
            devs = plan or []
        out = []
        for d in devs:
            if not isinstance(d, dict) or not d.get("key"):
                continue
            cur = d.get("version_before", d.get("current_version",
                                                 d.get("current")))
            tgt = d.get("version_target", d.get("target_version",
                                                d.get("target")))
            state = d.get("state") or d.get("version_state")
            if state not in PLAN_STATES:
                try:
                    state = kflash.compare_versions(cur or "", tgt or "")
                except Exception:
                    state = "unknown"
            out.append({"key": str(d["key"]), "mcu": d.get("mcu"),
                        "current": cur, "target": tgt, "state": state,
                        "action": d.get("action"),
                        "reason": d.get("reason")})
        return out

    def _plan_done(self, res):
        self.planning = False
        plan, err = res
        if err is not None:
            self.gcode.respond_raw(f"!! kflash: the plan failed: {_text(err)}")
            return
        devices = self._plan_devices(plan)
        lines = ["prompt_begin kflash: MCU firmware"]
        if isinstance(plan, dict) and plan.get("target_version"):
            target = _text(plan["target_version"])
            lines.append(f"prompt_text Firmware kflash builds: {target}")
        if isinstance(plan, dict) and plan.get("moonraker") is False:
            lines.append("prompt_text Moonraker is unreachable: the MCUs' "
                         "current versions are unknown.")
        if not devices:
            lines.append("prompt_text No devices registered: run `kflash "
                         "devices import` on the host.")
        todo = 0
        for d in devices:
            mcu = f" ({d['mcu']})" if d.get("mcu") else ""
            why = ""
            if d.get("reason") and d.get("action") not in (None, "flash"):
                why = f" ({_text(d['reason'])})"
            lines.append(f"prompt_text {d['key']}{mcu}: "
                         f"{_text(d['current'])} -> {_text(d['target'])}: "
                         f"{d['state']}{why}")
            if d["state"] in ("outdated", "unknown"):
                todo += 1
        if devices:
            lines.append("prompt_button_group_start")
            for d in devices:
                color = ("warning" if d["state"] in ("outdated", "unknown")
                         else "secondary")
                key = d["key"]
                lines.append(f"prompt_button Flash {key}|"
                             f"KFLASH DEVICE={key}|{color}")
            lines.append("prompt_button_group_end")
        if todo:
            lines.append(f"prompt_footer_button Update all outdated "
                         f"({todo})|KFLASH_ALL ONLY_OUTDATED=1|primary")
        elif devices:
            lines.append("prompt_text Every MCU runs the firmware kflash "
                         "would build.")
        lines.append("prompt_footer_button Close|KFLASH_PLAN CLOSE=1|"
                     "secondary")
        lines.append("prompt_show")
        self._mark_prompt(True)
        for line in lines:
            self.gcode.respond_raw("// action:" + line)

    def _mark_prompt(self, is_open):
        try:
            if is_open:
                self.files.ensure_dir()
                with open(self.files.prompt_open, "w") as f:
                    f.write("1\n")
            elif os.path.exists(self.files.prompt_open):
                os.unlink(self.files.prompt_open)
        except OSError:
            logging.exception("kflash: cannot record the dialog state")

    def _prompt_end(self):
        self.gcode.respond_raw("// action:prompt_end")
        self._mark_prompt(False)


def load_config(config):
    if kflash is None:
        raise config.error(
            "[kflash]: the kflash Python package is not installed in "
            f"klippy's Python ({sys.executable}): {_IMPORT_ERROR}. "
            "Run kflash's scripts/install.sh.")
    return KflashExtra(config)
