# A measuring extra for the status snapshot tests and benchmark (not for users)
#
# [snapshot_probe]
# real_print_time: False   # True: undo file-output mode's constant
#                          # estimated_print_time (0.0), so it follows the
#                          # MCU clock estimate like on a real printer
#
# Linked into klippy/extras by tests/snapshot_printer.py and benches/bench_snapshot.py.
# Endpoints on the API socket:
#   snapshot_probe/compare   served vs real get_status at one eventtime
#   snapshot_probe/timing    per-call cost of the real and the served get_status,
#                            and of a publish
#   snapshot_probe/lateness  lateness percentiles of a 10 ms reactor timer
#   snapshot_probe/serve     {"on": bool}: unwrap / re-wrap [status_snapshot]
#                            (A/B rounds in one klippy)
#   snapshot_probe/homing    klippy's trigger and halt step positions of every
#                            homing move so far (homing:homing_move_end)
"""[snapshot_probe]: measurements from inside klippy's reactor."""

import time

import kflash

LATENESS_PERIOD = 0.010


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class SnapshotProbe:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.lateness = []
        self.timer = None
        self.real_print_time = config.getboolean("real_print_time", False)
        if self.real_print_time:
            # Runs after the MCU's own identify handler, which installs the
            # constant in file-output mode; before any klippy:connect handler.
            self.printer.register_event_handler(
                "klippy:mcu_identify", self._restore_print_time
            )
        webhooks = self.printer.lookup_object("webhooks")
        webhooks.register_endpoint("snapshot_probe/compare", self._handle_compare)
        webhooks.register_endpoint("snapshot_probe/timing", self._handle_timing)
        webhooks.register_endpoint("snapshot_probe/lateness", self._handle_lateness)
        webhooks.register_endpoint("snapshot_probe/serve", self._handle_serve)
        webhooks.register_endpoint("snapshot_probe/homing", self._handle_homing)
        self.printer.register_event_handler("klippy:ready", self._handle_ready)
        self.printer.register_event_handler(
            "homing:homing_move_end", self._note_homing_move
        )
        self.homing_moves = []

    def _restore_print_time(self):
        mcu = self.printer.lookup_object("mcu")
        vars(mcu).pop("estimated_print_time", None)

    def _handle_ready(self):
        self.timer = self.reactor.register_timer(
            self._lateness_tick, self.reactor.monotonic() + LATENESS_PERIOD
        )

    def _lateness_tick(self, eventtime):
        # eventtime is when the reactor ran us; the timer asked for the waketime.
        self.lateness.append(eventtime - self._waketime)
        self._waketime = eventtime + LATENESS_PERIOD
        return self._waketime

    _waketime = 0.0

    def _real_get_status(self, name):
        snapshot = self.printer.lookup_object("status_snapshot", None)
        obj = self.printer.lookup_object(name)
        if snapshot is not None and name in snapshot.served:
            return snapshot.served[name].real_get_status
        return obj.get_status

    def _handle_compare(self, web_request):
        name = web_request.get_str("object", "toolhead")
        obj = self.printer.lookup_object(name)
        eventtime = self.reactor.monotonic()
        served = obj.get_status(eventtime)
        real = self._real_get_status(name)(eventtime)
        # A reader that changes what it got (klippy's own extruder does) changes
        # only its copy.
        mine = obj.get_status(eventtime)
        mine["__probe__"] = True
        isolated = "__probe__" not in obj.get_status(eventtime)
        toolhead = self.printer.lookup_object("toolhead")
        snapshot = self.printer.lookup_object("status_snapshot", None)
        web_request.send(
            {
                "eventtime": eventtime,
                "served": served,
                "real": real,
                "fresh_dict_per_read": obj.get_status(eventtime) is not served,
                "reader_isolated": isolated,
                "served_by_store": snapshot is not None
                and name in snapshot.served
                and getattr(obj.get_status, "__self__", None)
                is snapshot.served[name].store,
                "queuing_state": toolhead.special_queuing_state,
                "held": snapshot.held if snapshot is not None else None,
                "print_time_exact": (
                    snapshot.print_time_exact if snapshot is not None else None
                ),
            }
        )

    def _handle_timing(self, web_request):
        name = web_request.get_str("object", "toolhead")
        calls = web_request.get_int("calls", 20000)
        obj = self.printer.lookup_object(name)
        real = self._real_get_status(name)
        served = obj.get_status
        eventtime = self.reactor.monotonic()
        result = {"calls": calls}
        for label, func in (("real", real), ("served", served)):
            best = None
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(calls):
                    func(eventtime)
                took = (time.perf_counter() - start) / calls
                best = took if best is None else min(best, took)
            result[label + "_s"] = best
        # Publish cost per tick: the real get_status plus the publish, and the
        # publish alone (into a store like the extra's, and one with a mirror).
        status = real(eventtime)
        store = kflash.SnapshotStore(fallback=real, max_age=1.0)
        n = max(calls // 10, 100)
        start = time.perf_counter()
        for _ in range(n):
            store.publish(status, eventtime)
        result["publish_s"] = (time.perf_counter() - start) / n
        start = time.perf_counter()
        for _ in range(n):
            store.publish(real(eventtime), eventtime)
        result["tick_s"] = (time.perf_counter() - start) / n
        shm_path = web_request.get_str("shm_path", None)
        if shm_path:
            mirror = kflash.SnapshotStore(shm_path)
            start = time.perf_counter()
            for _ in range(n):
                mirror.publish({name: status}, eventtime)
            result["publish_mirror_s"] = (time.perf_counter() - start) / n
        web_request.send(result)

    def _handle_serve(self, web_request):
        snapshot = self.printer.lookup_object("status_snapshot")
        on = web_request.get("on")
        if on and snapshot.timer is None:
            snapshot._handle_connect()
        elif not on and snapshot.timer is not None:
            snapshot._handle_disconnect()
        web_request.send({"serving": snapshot.timer is not None})

    def _note_homing_move(self, hmove):
        self.homing_moves.append(
            {
                sp.stepper_name: {
                    "endstop": sp.endstop_name,
                    "start": sp.start_pos,
                    "trigger": sp.trig_pos,
                    "halt": sp.halt_pos,
                }
                for sp in hmove.stepper_positions
            }
        )

    def _handle_homing(self, web_request):
        web_request.send({"moves": self.homing_moves})

    def _handle_lateness(self, web_request):
        samples, self.lateness = self.lateness, []
        if web_request.get("reset", False):
            web_request.send({"samples": len(samples)})
            return
        web_request.send(
            {
                "values": samples,
                "samples": len(samples),
                "p50": percentile(samples, 0.50),
                "p99": percentile(samples, 0.99),
                "max": max(samples) if samples else None,
            }
        )


def load_config(config):
    return SnapshotProbe(config)
