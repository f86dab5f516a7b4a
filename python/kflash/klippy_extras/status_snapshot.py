# Serve printer objects' get_status() from kflash's lock-free snapshot store
#
# [status_snapshot]
# objects: toolhead          # printer objects to serve (comma or newline list)
# interval: 0.1              # seconds between snapshots (reactor timer)
# max_age: 1.0               # older snapshots are refreshed on read, except
#                            # while homing/probing
# shm_path: /dev/shm/klipper_status   # optional shared-memory mirror
#
# Copyright (C) 2026 kflash contributors
#
# This file may be distributed under the terms of the GNU GPLv3 license.
"""[status_snapshot]: get_status() of chosen printer objects in O(1).

On klippy:connect each listed object's get_status is replaced (an instance
attribute; no klippy file is edited) by the get_status of a kflash
SnapshotStore. A reactor timer calls the object's real get_status every
`interval` seconds and publishes the result. Readers (webhooks, Moonraker
queries and subscriptions, macros, other extras) get the latest published
status as a fresh dict of its fields, like the stock method returns; nested
dicts and lists in it are shared and read-only, so no reader can change what
another sees, and webhooks' field-by-field `!=` diff keeps working.

The optional shared-memory mirror (shm_path) never stops klippy once it is
configured: a failure to create or write it (a full tmpfs, the file taken
over) is logged, the mirror turns itself off and klippy keeps running.

Freshness rules:
- While the toolhead is in the "Drip" state (homing, probing) the timer
  publishes nothing and reads never call into the object: the last snapshot
  is served, however old. Homing is exactly when the reactor must not be
  loaded.
- Otherwise a snapshot older than `max_age` (by eventtime) is refreshed on
  read through the real get_status.
- Toolhead moves (toolhead.move, set_extruder) and the events that change
  position or homing state (toolhead:set_position, toolhead:manual_move,
  homing:home_rails_end, stepper_enable:motor_off,
  toolhead:update_extra_axes) mark the snapshots of the objects they change
  (toolhead, gcode_move, motion_report, stepper_enable) outdated: the next
  read refreshes them (again: not during Drip). Other objects (a system
  monitor, heaters) are never refreshed by a read for these events. So `position` and `homed_axes`
  are exact for every reader outside homing; other fields (max_velocity after
  SET_VELOCITY_LIMIT, print_time, stalls, fields of other objects) lag by at
  most `interval`.
- `estimated_print_time` is computed for the caller's eventtime on every read,
  from the primary MCU's clock estimate, as toolhead does.
- get_status() without an eventtime (gcode_move's callers) gets the object's
  own answer.
"""

import logging
import os

import kflash

# Events after which published toolhead state is outdated.
CHANGE_EVENTS = (
    "toolhead:set_position",
    "toolhead:manual_move",
    "toolhead:update_extra_axes",
    "homing:home_rails_end",
    "stepper_enable:motor_off",
)
# Objects whose status those events change (others lag by `interval`).
MOTION_OBJECTS = ("toolhead", "gcode_move", "motion_report", "stepper_enable")
# Toolhead methods that change what its get_status reports.
TOOLHEAD_MUTATORS = ("move", "set_extruder")
PRINT_TIME_FIELD = "estimated_print_time"


def parse_objects(text):
    names = []
    for line in text.replace(",", "\n").splitlines():
        name = line.strip()
        if name and name not in names:
            names.append(name)
    return names


class FixedPrintTime:
    """A clock estimate whose print time is a constant (file-output mode)."""

    def __init__(self, value):
        self.clock_est = (0.0, float(value), 0.0)
        self.mcu_freq = 1.0


class ServedObject:
    """One printer object whose get_status is served from a store."""

    def __init__(self, name, obj, store, real_get_status):
        self.name = name
        self.obj = obj
        self.store = store
        self.real_get_status = real_get_status


class StatusSnapshot:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.names = parse_objects(config.get("objects", "toolhead"))
        if not self.names:
            raise config.error("status_snapshot: objects lists no object")
        self.interval = config.getfloat("interval", 0.1, minval=0.01)
        self.max_age = config.getfloat(
            "max_age", 1.0, minval=self.interval
        )
        self.shm_path = config.get("shm_path", None)
        if self.shm_path:
            where = os.path.dirname(os.path.abspath(self.shm_path))
            if not os.path.isdir(where):
                raise config.error(
                    f"status_snapshot: shm_path {self.shm_path}: no directory"
                    f" {where}"
                )
        self.served = {}
        self.mirror = None
        self.mirror_error = None
        self.toolhead = None
        self.timer = None
        self.held = False
        self.print_time_exact = False
        self.wrapped_methods = []
        self.failures = 0
        self.printer.register_event_handler(
            "klippy:connect", self._handle_connect
        )
        self.printer.register_event_handler(
            "klippy:disconnect", self._handle_disconnect
        )
        for event in CHANGE_EVENTS:
            self.printer.register_event_handler(event, self._note_change)
        gcode = self.printer.lookup_object("gcode")
        gcode.register_command(
            "STATUS_SNAPSHOT",
            self.cmd_STATUS_SNAPSHOT,
            desc=self.cmd_STATUS_SNAPSHOT_help,
        )

    # Setup
    def _handle_connect(self):
        self.toolhead = self.printer.lookup_object("toolhead", None)
        clock, self.print_time_exact = self._choose_print_time_clock()
        for name in self.names:
            obj = self.printer.lookup_object(name, None)
            if obj is None or not hasattr(obj, "get_status"):
                raise self.printer.config_error(
                    f"status_snapshot: '{name}' is not a printer object"
                    " with a status"
                )
            real = obj.get_status
            store = kflash.SnapshotStore(
                fallback=self._make_fallback(real),
                max_age=self.max_age,
                print_time_clock=clock,
            )
            self.served[name] = ServedObject(name, obj, store, real)
        if self.shm_path:
            try:
                self.mirror = kflash.SnapshotStore(self.shm_path)
                self.mirror_error = None
            except kflash.KflashError as e:
                self._mirror_off(e)
        for served in self.served.values():
            served.obj.get_status = self._reader_for(served)
        if self.toolhead is not None and "toolhead" in self.served:
            self._wrap_toolhead_mutators()
        self._tick(self.reactor.monotonic())
        self.timer = self.reactor.register_timer(
            self._tick, self.reactor.monotonic() + self.interval
        )

    def _choose_print_time_clock(self):
        # estimated_print_time(eventtime) is int(clock + (eventtime -
        # sample_time) * freq) / mcu_freq over the primary MCU's clock
        # estimate; the store computes it in the core from that object.
        # Kept only if it agrees exactly with the MCU's own method (which a
        # file-output klippy replaces by a constant 0.0); otherwise reads
        # go through a Python wrapper that calls the MCU.
        mcu = self.printer.lookup_object("mcu", None)
        if mcu is None:
            return None, True
        now = self.reactor.monotonic()
        samples = (now, now + 1.2345, now - 0.5, now + 1000.25)
        theirs = [mcu.estimated_print_time(e) for e in samples]
        candidates = []
        clocksync = getattr(mcu, "_clocksync", None)
        if hasattr(clocksync, "clock_est") and hasattr(clocksync, "mcu_freq"):
            candidates.append(clocksync)
        if len(set(theirs)) == 1 and float(theirs[0]).is_integer():
            candidates.append(FixedPrintTime(theirs[0]))
        for clock in candidates:
            probe = kflash.SnapshotStore(print_time_clock=clock)
            probe.publish({PRINT_TIME_FIELD: None}, now)
            ours = [probe.get_status(e)[PRINT_TIME_FIELD] for e in samples]
            if ours == theirs:
                return clock, True
        logging.warning(
            "status_snapshot: estimated_print_time cannot be computed in"
            " the core (%r); reads will call the MCU",
            theirs,
        )
        return None, False

    def _make_fallback(self, real):
        def fallback(eventtime):
            if self.in_drip():
                return None
            return real(eventtime)

        return fallback

    def _reader_for(self, served):
        if self.print_time_exact:
            return served.store.get_status
        store_get = served.store.get_status
        mcu_ept = self.printer.lookup_object("mcu").estimated_print_time

        def get_status(eventtime):
            status = store_get(eventtime)  # a fresh dict: ours to change
            if PRINT_TIME_FIELD in status:
                status[PRINT_TIME_FIELD] = mcu_ept(eventtime)
            return status

        return get_status

    def _wrap_toolhead_mutators(self):
        store = self.served["toolhead"].store
        for method in TOOLHEAD_MUTATORS:
            real = getattr(self.toolhead, method, None)
            if real is None:
                continue

            def mutator(
                *args, _real=real, _invalidate=store.invalidate, **kwargs
            ):
                _invalidate()
                return _real(*args, **kwargs)

            setattr(self.toolhead, method, mutator)
            self.wrapped_methods.append((self.toolhead, method))

    def _handle_disconnect(self):
        if self.timer is not None:
            self.reactor.unregister_timer(self.timer)
            self.timer = None
        for obj, method in self.wrapped_methods:
            obj.__dict__.pop(method, None)
        self.wrapped_methods = []
        for served in self.served.values():
            served.obj.__dict__.pop("get_status", None)
        self.served = {}
        self.mirror = None

    # Publishing
    def in_drip(self):
        toolhead = self.toolhead
        return (
            toolhead is not None
            and getattr(toolhead, "special_queuing_state", "") == "Drip"
        )

    def _note_change(self, *args):
        for name in MOTION_OBJECTS:
            served = self.served.get(name)
            if served is not None:
                served.store.invalidate()

    def _tick(self, eventtime):
        if self.in_drip():
            self.held = True
            return eventtime + self.interval
        self.held = False
        combined = {} if self.mirror is not None else None
        for served in self.served.values():
            try:
                status = served.real_get_status(eventtime)
                served.store.publish(status, eventtime)
            except Exception:
                self.failures += 1
                if self.failures <= 3:
                    logging.exception(
                        "status_snapshot: get_status of '%s' failed",
                        served.name,
                    )
                continue
            if combined is not None:
                combined[served.name] = status
        if combined is not None:
            try:
                self.mirror.publish(combined, eventtime)
            except kflash.KflashError as e:
                self._mirror_off(e)
            except Exception:
                self.failures += 1
                if self.failures <= 3:
                    logging.exception("status_snapshot: mirror failed")
        return eventtime + self.interval

    def _mirror_off(self, error):
        logging.error("status_snapshot: mirror off: %s", error)
        self.mirror = None
        self.mirror_error = str(error)

    cmd_STATUS_SNAPSHOT_help = "Report what [status_snapshot] serves"

    def cmd_STATUS_SNAPSHOT(self, gcmd):
        lines = []
        for served in self.served.values():
            store = served.store
            age = "-" if store.age is None else f"{store.age:.3f}s"
            state = "current" if store.current else "outdated"
            lines.append(
                f"{served.name}: version {store.version}, age {age}, {state}"
            )
        mode = "held (homing)" if self.held else "publishing"
        ept = "in core" if self.print_time_exact else "from the MCU"
        lines.append(
            f"interval {self.interval:.3f}s, max_age {self.max_age:.3f}s,"
            f" {mode}, estimated_print_time {ept}"
        )
        if self.mirror_error:
            lines.append(f"mirror: off ({self.mirror_error})")
        elif self.shm_path:
            lines.append(f"mirror: {self.shm_path}")
        gcmd.respond_info("\n".join(lines))

    # Interfaces for other consumers
    def lookup_store(self, name):
        """The SnapshotStore serving `name` (None if not served)."""
        served = self.served.get(name)
        return served.store if served is not None else None

    def get_object_status(self, name, eventtime):
        """Latest status of a served object, O(1): a fresh dict."""
        return self.served[name].store.get_status(eventtime)

    def get_status(self, eventtime):
        first = next(iter(self.served.values()), None)
        return {
            "objects": list(self.served),
            "held": self.held,
            "version": first.store.version if first is not None else 0,
            "shm_path": self.shm_path,
            "mirror_error": self.mirror_error,
        }


def load_config(config):
    return StatusSnapshot(config)
