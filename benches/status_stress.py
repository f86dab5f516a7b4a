# STATUS_STRESS: status readers inside klippy, for the homing benchmark (not for
# users: it loads the reactor on purpose)
#
# [status_stress]
#
# STATUS_STRESS OBJECTS=toolhead,slow_monitor HZ=25   read them HZ times a second
#                                                     from a reactor timer
# STATUS_STRESS STOP=1                                stop and report
#
# Linked into klippy/extras by benches/bench_homing.py (tests/snapshot_printer.py).
"""[status_stress]: the in-klippy readers of a monitoring load (a display, macros,
other extras), as the seed's stress test asked for. Each tick calls every listed
object's get_status(eventtime) once, the way those readers do, and counts the time
it took; the status (running, ticks, read_s, max_read_s) says what it cost."""

import time


class StatusStress:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.timer = None
        self.objects = []
        self.period = 0.04
        self._reset()
        gcode = self.printer.lookup_object("gcode")
        gcode.register_command(
            "STATUS_STRESS",
            self.cmd_STATUS_STRESS,
            desc=self.cmd_STATUS_STRESS_help,
        )

    def _reset(self):
        self.ticks = 0
        self.read_s = 0.0
        self.max_read_s = 0.0
        self.started = None

    def _stop(self):
        if self.timer is not None:
            self.reactor.unregister_timer(self.timer)
            self.timer = None

    cmd_STATUS_STRESS_help = (
        "Read printer objects' status from a reactor timer (benchmark load)"
    )

    def cmd_STATUS_STRESS(self, gcmd):
        if gcmd.get_int("STOP", 0):
            self._stop()
            gcmd.respond_info(self._summary())
            return
        objects = []
        for name in gcmd.get("OBJECTS", "toolhead").split(","):
            name = name.strip()
            obj = self.printer.lookup_object(name, None)
            if obj is None or not hasattr(obj, "get_status"):
                raise gcmd.error(f"STATUS_STRESS: '{name}' has no status")
            objects.append(obj)
        hz = gcmd.get_float("HZ", 25.0, above=0.0, maxval=1000.0)
        self._stop()
        self._reset()
        self.objects = objects
        self.period = 1.0 / hz
        self.started = self.reactor.monotonic()
        self.timer = self.reactor.register_timer(self._tick, self.reactor.NOW)
        gcmd.respond_info(
            f"STATUS_STRESS: reading {len(objects)} objects {hz:g} times a second"
        )

    def _tick(self, eventtime):
        start = time.perf_counter()
        for obj in self.objects:
            obj.get_status(eventtime)
        took = time.perf_counter() - start
        self.ticks += 1
        self.read_s += took
        self.max_read_s = max(self.max_read_s, took)
        return eventtime + self.period

    def _summary(self):
        status = self.get_status(self.reactor.monotonic())
        return (
            f"STATUS_STRESS: {status['ticks']} ticks, {status['read_s']:.3f} s"
            f" reading ({status['busy_fraction']:.1%} of the reactor),"
            f" longest tick {status['max_read_s'] * 1e3:.2f} ms"
        )

    def get_status(self, eventtime):
        elapsed = eventtime - self.started if self.started is not None else 0.0
        return {
            "running": self.timer is not None,
            "ticks": self.ticks,
            "read_s": self.read_s,
            "max_read_s": self.max_read_s,
            "busy_fraction": self.read_s / elapsed if elapsed > 0 else 0.0,
        }


def load_config(config):
    return StatusStress(config)
