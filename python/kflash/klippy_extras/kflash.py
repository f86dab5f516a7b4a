# [kflash]: KFLASH_ALL, KFLASH DEVICE=, KFLASH_ROLLBACK [DEVICE=], KFLASH_PLAN,
# KFLASH_STATUS. klippy cannot flash its own MCUs (stopping klipper kills it):
# a run is validated, answered at once and handed to the core's detached
# helper, outside klipper's reach; its progress is relayed while klippy is up,
# its summary posted when klippy is back. The state machine and the text are
# kflash.run_view and kflash.render; slow work runs on a thread that reports
# back through reactor.register_async_callback.
#
# This file is part of kflash. GPL-3.0-or-later.
import logging
import os
import sys
import threading

# The kflash package this extra belongs to: load_config refuses any other.
VERSION = "0.1.0"

try:
    import kflash
except ImportError as _e:  # reported as a config error in load_config
    kflash = None
    _IMPORT_ERROR = _e
else:
    _IMPORT_ERROR = None

LAUNCHERS = ("auto", "systemd-run", "moonraker", "session")
# How long to wait for a console subscriber (Moonraker) after klippy:ready
# before posting the last run's summary anyway.
ANNOUNCE_TIMEOUT = 5.0


class KflashExtra:
    def __init__(self, config, render, run_view):
        self.render, self.run_view = render, run_view
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.gcode = self.printer.lookup_object("gcode")
        home = config.get("home", None)
        home = os.path.abspath(os.path.expanduser(home)) if home else None
        self.runs = kflash.Runs(home)
        self.home = self.runs.state_dir
        self.python = config.get("python", sys.executable)
        self.launcher = config.getchoice(
            "launcher", {m: m for m in LAUNCHERS}, "auto")
        self.moonraker_url = config.get(
            "moonraker_url", "http://127.0.0.1:7125")
        self.poll_interval = config.getfloat(
            "poll_interval", 0.5, minval=0.05, maxval=10.0)
        self.prompt_file = os.path.join(self.home, "prompt_open")
        self.view = run_view.RunView(self.home)
        self.print_stats = self.idle_timeout = self.timer = None
        self.launching = self.planning = self.announced = False
        self.offset, self.posted = 0, set()
        self.announce_base, self.announce_deadline = self._subscribers(), None
        try:
            self._load()
        except Exception:
            logging.exception("kflash: reading the last run failed")
        self.reactor.register_timer(self._check_startup,
                                    self.reactor.monotonic() + 1.0)
        for name in ("KFLASH_ALL", "KFLASH", "KFLASH_ROLLBACK", "KFLASH_PLAN",
                     "KFLASH_STATUS"):
            self.gcode.register_command(
                name, getattr(self, "cmd_" + name),
                desc=getattr(self, f"cmd_{name}_help"))
        self.printer.register_event_handler("klippy:connect",
                                            self._handle_connect)
        self.printer.register_event_handler("klippy:ready", self._announce)

    def get_status(self, eventtime):
        return self.view.status

    def _say(self, lines):
        self.run_view.say(self.gcode, lines)

    # -- Start-up: a run still going, or one to report --------------------
    def _handle_connect(self):
        self.print_stats = self.printer.lookup_object("print_stats", None)
        self.idle_timeout = self.printer.lookup_object("idle_timeout", None)
        self.announce_base = self._subscribers()

    def _subscribers(self):
        return len(getattr(self.gcode, "output_callbacks", ()))

    def _load(self):
        rec = self.runs.latest()
        if rec is None:
            return
        if rec["state"] == "running":
            # klipper was started again by a run that is still verifying
            self.view.follow(rec)
            events, self.offset = self.runs.events(rec["run_id"], 0)
            self.view.apply(events)  # history: the state only
        elif rec["announced"]:
            self.view.remember(rec)

    def _check_startup(self, eventtime):
        # klippy may never get ready (an MCU left in its bootloader): the
        # console (Moonraker subscribes then too) must hear about the run.
        try:
            category = self.printer.get_state_message()[1]
        except Exception:
            return self.reactor.NEVER
        if category == "startup":
            return eventtime + 1.0
        if category != "ready":
            self._announce()
        return self.reactor.NEVER

    def _announce(self):
        # What happened while klippy was down, and a stale dialog closed,
        # once Moonraker's console subscribes (it does when it sees klippy).
        if self.announced:
            return
        self.announced = True
        self.announce_deadline = self.reactor.monotonic() + ANNOUNCE_TIMEOUT
        self._start_timer(self.reactor.NOW)

    def _start_timer(self, when):
        if self.timer is None:
            self.timer = self.reactor.register_timer(self._poll, when)
        else:
            self.reactor.update_timer(self.timer, when)

    # -- Following a run ---------------------------------------------------
    def _poll(self, eventtime):
        try:
            return self._poll_once(eventtime)
        except Exception:
            logging.exception("kflash: following the run failed")
            return eventtime + max(self.poll_interval, 1.0)

    def _poll_once(self, eventtime):
        if self.announce_deadline is not None:
            if (self._subscribers() <= self.announce_base
                    and eventtime < self.announce_deadline):
                return eventtime + 0.1
            self.announce_deadline = None
            if os.path.exists(self.prompt_file):
                self._prompt_end()  # a dialog left open when klippy went down
        if self.launching:
            return eventtime + self.poll_interval
        run_id = self.view.run_id if self.view.active else None
        rec = self.runs.get(run_id) if run_id else self.runs.latest()
        if rec is None:
            return self.reactor.NEVER
        if run_id:
            events, self.offset = self.runs.events(run_id, self.offset)
            self._say(self.view.apply(events))
        if rec["state"] == "running":
            return eventtime + self.poll_interval
        if rec["announced"] or rec["run_id"] in self.posted:
            self.view.remember(rec)
            return self.reactor.NEVER
        self._say(self.view.finish(rec))
        # in memory first: an unwritable state dir must not repeat it
        self.posted.add(rec["run_id"])
        try:
            self.runs.announce(rec["run_id"])
        except OSError:
            logging.exception("kflash: cannot note the posted summary")
        return self.reactor.NEVER

    # -- Starting a run ----------------------------------------------------
    def _refusal(self, eventtime):
        for obj, busy in ((self.print_stats, ("printing", "paused")),
                          (self.idle_timeout, ("Printing",))):
            st = obj.get_status(eventtime).get("state") if obj else None
            if st in busy:
                return (f"the printer is {st}: flashing would stop klipper "
                        "mid-print. Finish or cancel the print first.")
        if self.launching or self.view.active:
            return (f"a flash run is already in progress "
                    f"({self.view.state})")
        return self.runs.busy()

    def _start_run(self, gcmd, only_outdated, device, rollback=False):
        why = self._refusal(self.reactor.monotonic())
        if why:
            raise gcmd.error("kflash: refused: " + why)
        try:
            devices = kflash.Engine(home=self.home).devices()
        except kflash.KflashError as e:
            raise gcmd.error(f"kflash: {e}") from e
        why = self.run_view.bad_request(self.home, devices, device, rollback)
        if why:
            raise gcmd.error("kflash: " + why)
        if os.path.exists(self.prompt_file):
            self._prompt_end()
        run_id, self.launching, self.offset = kflash.Runs.new_id(), True, 0
        self._say(self.view.starting(run_id, device, only_outdated, rollback))
        threading.Thread(target=self._launch, name="kflash-launch",
                         args=(run_id, only_outdated, device, rollback),
                         daemon=True).start()

    def _launch(self, run_id, only_outdated, device, rollback):
        try:
            got = (self.runs.start_helper(
                run_id, only_outdated=only_outdated, device=device,
                rollback=rollback, launcher=self.launcher,
                python=self.python, moonraker_url=self.moonraker_url), None)
        except Exception as e:
            got = (None, e)
        self.reactor.register_async_callback(lambda et: self._launched(*got))

    def _launched(self, got, err):
        self.launching = False
        if err is not None:
            self._say(self.view.refused(err))
            return
        self.view.started(got)
        self._start_timer(self.reactor.NOW)

    # -- Commands ----------------------------------------------------------
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

    cmd_KFLASH_ROLLBACK_help = ("Flash the firmware last verified on each MCU "
                                "back (klipper restarts); DEVICE=<key> for "
                                "one MCU")

    def cmd_KFLASH_ROLLBACK(self, gcmd):
        device = gcmd.get("DEVICE", None)
        self._start_run(gcmd, False, device and device.strip(), rollback=True)

    cmd_KFLASH_STATUS_help = "Show the current or last kflash run"

    def cmd_KFLASH_STATUS(self, gcmd):
        gcmd.respond_info("\n".join(self.view.lines(self.runs.latest())))

    cmd_KFLASH_PLAN_help = ("Show each MCU's firmware and what kflash "
                            "would do (a dialog); CLOSE=1 closes it")

    def cmd_KFLASH_PLAN(self, gcmd):
        if gcmd.get_int("CLOSE", 0, minval=0, maxval=1):
            self._prompt_end()
        elif self.planning:
            gcmd.respond_info("kflash: the plan is being computed")
        else:
            self.planning = True
            gcmd.respond_info("kflash: computing the plan...")
            threading.Thread(target=self._plan, name="kflash-plan",
                             daemon=True).start()

    def _plan(self):
        try:
            got = (kflash.Engine(home=self.home).plan(), None)
        except Exception as e:
            got = (None, e)
        self.reactor.register_async_callback(lambda et: self._planned(*got))

    def _planned(self, plan, err):
        self.planning = False
        if err is not None:
            self._say([("error", "kflash: the plan failed: "
                        + self.render.text(err))])
            return
        self.run_view.mark_prompt(self.prompt_file, True)
        self._say(("action", line) for line in self.render.plan_prompt(plan))

    def _prompt_end(self):
        self.gcode.respond_raw("// action:prompt_end")
        self.run_view.mark_prompt(self.prompt_file, False)


def load_config(config):
    if kflash is None:
        raise config.error(
            "[kflash]: the kflash Python package is not installed in "
            f"klippy's Python ({sys.executable}): {_IMPORT_ERROR}. "
            "Run kflash's scripts/install.sh.")
    found = getattr(kflash, "__version__", "unknown")
    if found != VERSION:
        raise config.error(
            f"[kflash]: this extra is kflash {VERSION} but klippy's Python "
            f"({sys.executable}) has kflash {found}: run kflash's "
            "scripts/install.sh again (it installs the matching package and "
            "links this extra), then restart klipper.")
    from kflash import render, run_view

    return KflashExtra(config, render, run_view)
