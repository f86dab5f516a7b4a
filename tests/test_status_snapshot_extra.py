"""[status_snapshot] against stand-ins for klippy's objects: the homing (Drip) rules.

A file-output klippy homes in an instant, so the "never call the slow path while
homing" rule is checked here, with a toolhead whose queuing state the test sets.
The MCU's clock is klippy's own ClockSync class.
"""

import importlib.util

import pytest
from klippy.clocksync import ClockSync

from snapshot_printer import REPO

spec = importlib.util.spec_from_file_location(
    "status_snapshot", REPO / "python/kflash/klippy_extras/status_snapshot.py"
)
status_snapshot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(status_snapshot)


class ConfigError(Exception):
    pass


class FakeReactor:
    NEVER = 9999999999999999.0

    def __init__(self):
        self.now = 100.0
        self.timers = []

    def monotonic(self):
        return self.now

    def register_timer(self, callback, waketime=NEVER):
        timer = [callback, waketime]
        self.timers.append(timer)
        return timer

    def unregister_timer(self, timer):
        self.timers.remove(timer)

    def run_timers(self, until):
        """Advance the clock to `until`, firing due timers in order."""
        while True:
            due = [t for t in self.timers if t[1] <= until]
            if not due:
                break
            timer = min(due, key=lambda t: t[1])
            self.now = timer[1]
            timer[1] = timer[0](self.now)
        self.now = until


class FakeMcu:
    def __init__(self, reactor):
        self._clocksync = ClockSync(reactor)
        self._clocksync.clock_est = (50.0, 3_600_000_000, 72_000_010.5)
        self._clocksync.mcu_freq = 72e6

    def estimated_print_time(self, eventtime):
        return self._clocksync.estimated_print_time(eventtime)


class FakeToolhead:
    def __init__(self, mcu):
        self.mcu = mcu
        self.special_queuing_state = "NeedPrime"
        self.commanded_pos = [0.0, 0.0, 0.0, 0.0]
        self.homed = ""
        self.real_calls = 0

    def get_status(self, eventtime):
        self.real_calls += 1
        return {
            "homed_axes": self.homed,
            "position": tuple(self.commanded_pos),
            "estimated_print_time": self.mcu.estimated_print_time(eventtime),
        }

    def move(self, newpos, speed):
        self.commanded_pos[:] = newpos

    def set_extruder(self, extruder, extrude_pos):
        self.commanded_pos[3] = extrude_pos


class FakeMonitor:
    """A system-monitor-like object: its status is unrelated to motion."""

    def __init__(self):
        self.real_calls = 0

    def get_status(self, eventtime):
        self.real_calls += 1
        return {"load": self.real_calls}


class FakeGcode:
    def __init__(self):
        self.commands = {}

    def register_command(self, name, func, desc=None):
        self.commands[name] = func


class FakePrinter:
    config_error = ConfigError

    def __init__(self):
        self.reactor = FakeReactor()
        self.handlers = {}
        self.mcu = FakeMcu(self.reactor)
        self.toolhead = FakeToolhead(self.mcu)
        self.monitor = FakeMonitor()
        self.objects = {
            "mcu": self.mcu,
            "toolhead": self.toolhead,
            "gcode": FakeGcode(),
            "monitor": self.monitor,
        }

    def get_reactor(self):
        return self.reactor

    def register_event_handler(self, event, callback):
        self.handlers.setdefault(event, []).append(callback)

    def send_event(self, event, *args):
        for callback in self.handlers.get(event, []):
            callback(*args)

    def lookup_object(self, name, default=None):
        return self.objects.get(name, default)


class FakeConfig:
    error = ConfigError

    def __init__(self, printer, options):
        self.printer = printer
        self.options = dict(options)

    def get_printer(self):
        return self.printer

    def get(self, name, default=None):
        return self.options.pop(name, default)

    def getfloat(self, name, default=None, minval=None):
        value = float(self.options.pop(name, default))
        if minval is not None and value < minval:
            raise ConfigError(f"{name} below {minval}")
        return value


def connected(**options):
    printer = FakePrinter()
    config = FakeConfig(printer, options)
    extra = status_snapshot.load_config(config)
    assert not config.options, "every option is read in __init__"
    printer.send_event("klippy:connect")
    return printer, extra


def test_reads_are_served_from_the_snapshot_without_calling_the_toolhead():
    printer, extra = connected()
    toolhead = printer.toolhead
    assert extra.print_time_exact
    calls = toolhead.real_calls
    for i in range(100):
        status = toolhead.get_status(printer.reactor.now + i * 0.001)
        assert status["position"] == (0.0, 0.0, 0.0, 0.0)
    assert toolhead.real_calls == calls
    # The timer publishes every interval.
    printer.reactor.run_timers(printer.reactor.now + 1.0)
    assert 9 <= extra.served["toolhead"].store.version <= 12


def test_moves_and_homing_events_make_the_next_read_exact():
    printer, extra = connected()
    toolhead = printer.toolhead
    toolhead.move([10.0, 20.0, 5.0, 0.0], 100.0)
    assert toolhead.get_status(printer.reactor.now)["position"] == (10, 20, 5, 0)
    toolhead.homed = "xyz"
    printer.send_event("homing:home_rails_end", None, [])
    assert toolhead.get_status(printer.reactor.now)["homed_axes"] == "xyz"
    toolhead.set_extruder(None, 3.5)
    assert toolhead.get_status(printer.reactor.now)["position"][3] == 3.5


def test_motion_events_do_not_refresh_unrelated_objects():
    """A slow monitor served beside the toolhead is not read again because the
    toolhead moved or homed: only the timer reads it."""
    printer, extra = connected(objects="toolhead, monitor")
    monitor = printer.monitor
    calls = monitor.real_calls
    printer.toolhead.move([1.0, 2.0, 3.0, 0.0], 10.0)
    for event in status_snapshot.CHANGE_EVENTS:
        printer.send_event(event)
        monitor.get_status(printer.reactor.now)
    assert monitor.real_calls == calls
    assert not extra.served["toolhead"].store.current
    assert extra.served["monitor"].store.current


def test_while_homing_nothing_calls_the_toolhead_and_print_time_stays_exact():
    printer, extra = connected(interval="0.1", max_age="0.5")
    toolhead = printer.toolhead
    reactor = printer.reactor
    toolhead.special_queuing_state = "Drip"
    calls = toolhead.real_calls
    version = extra.served["toolhead"].store.version
    toolhead.move([1.0, 1.0, 1.0, 0.0], 10.0)  # outdated now...
    reactor.run_timers(reactor.now + 3.0)  # ...and far older than max_age
    assert extra.held
    for dt in (0.0, 0.37, 1.25):
        eventtime = reactor.now + dt
        status = toolhead.get_status(eventtime)
        assert status["position"] == (0.0, 0.0, 0.0, 0.0), "last snapshot"
        assert status["estimated_print_time"] == printer.mcu.estimated_print_time(
            eventtime
        )
    assert toolhead.real_calls == calls, "the slow path ran during homing"
    assert extra.served["toolhead"].store.version == version
    # Homing over: the next read refreshes, the timer publishes again.
    toolhead.special_queuing_state = ""
    assert toolhead.get_status(reactor.now)["position"] == (1.0, 1.0, 1.0, 0.0)
    reactor.run_timers(reactor.now + 0.35)
    assert not extra.held
    assert extra.served["toolhead"].store.version >= version + 3


def test_disconnect_gives_the_toolhead_its_own_methods_back():
    printer, extra = connected()
    toolhead = printer.toolhead
    assert "get_status" in vars(toolhead) and "move" in vars(toolhead)
    printer.send_event("klippy:disconnect")
    assert "get_status" not in vars(toolhead) and "move" not in vars(toolhead)
    calls = toolhead.real_calls
    toolhead.get_status(1.0)
    assert toolhead.real_calls == calls + 1
    assert all(t[0] != extra._tick for t in printer.reactor.timers)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"objects": " , \n"}, "lists no object"),
        ({"interval": "0.001"}, "interval"),
        ({"interval": "0.5", "max_age": "0.2"}, "max_age"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    printer = FakePrinter()
    with pytest.raises(ConfigError, match=message):
        status_snapshot.load_config(FakeConfig(printer, options))


def test_an_unknown_object_is_named_at_connect():
    printer = FakePrinter()
    status_snapshot.load_config(FakeConfig(printer, {"objects": "toolhead, nope"}))
    with pytest.raises(ConfigError, match="'nope'"):
        printer.send_event("klippy:connect")
