"""The virtual MCU's steppers, endstops and trsync (virtual_printer.motion), driven
the way klippy drives a real MCU's, checked against Klipper's firmware rules: step
times, positions, endstop sampling, trigger stops, reports, timeouts, shutdowns."""

import pytest

from virtual_printer.motion import REASON_ENDSTOP_HIT, McuShutdown, Motion, Move, ext64

FREQ = 1_000_000  # 1 tick = 1 µs keeps the numbers readable
PINS = {"PA0": 0, "PA1": 1, "PA3": 3}
WIRING = {"endstops": [{"pin": "PA3", "stepper": "PA0", "trigger_at": -100}]}
COMMS_TIMEOUT = 4


class Sent(list):
    def __call__(self, name, **values):
        self.append((name, values))

    def named(self, name):
        return [v for n, v in self if n == name]


@pytest.fixture
def mcu():
    sent = Sent()
    motion = Motion(FREQ, sent, PINS, WIRING)
    motion.run(
        "config_stepper",
        {
            "oid": 0,
            "step_pin": 0,
            "dir_pin": 1,
            "invert_step": 0,
            "step_pulse_ticks": 2,
        },
        0,
    )
    motion.run("config_endstop", {"oid": 1, "pin": 3, "pull_up": 1}, 0)
    motion.run("config_trsync", {"oid": 2}, 0)
    return motion, sent


def queue(motion, now, interval, count, add=0, direction=None):
    if direction is not None:
        motion.run("set_next_step_dir", {"oid": 0, "dir": direction}, now)
    motion.run(
        "queue_step", {"oid": 0, "interval": interval, "count": count, "add": add}, now
    )


def position(motion, now):
    return motion.steppers[0].position_at(now)


@pytest.mark.parametrize(
    "interval, count, add", [(100, 1, 0), (1000, 50, -7), (37, 9, 3)]
)
def test_move_timing_is_what_klippys_stepcompress_assumes(interval, count, add):
    """stepcompress.c add_move: last = first + add*count*(count-1)/2 +
    interval*(count-1); each gap grows by `add` (firmware: interval += add)."""
    move = Move(5000, interval, count, add, 1)
    assert move.last - move.first == add * count * (count - 1) // 2 + interval * (
        count - 1
    )
    gaps = [move.time(i + 1) - move.time(i) for i in range(count - 1)]
    assert gaps == [interval + add * (i + 1) for i in range(count - 1)]
    for i in range(count):
        assert move.done_by(move.time(i)) == i + 1
        assert move.done_by(move.time(i) - 1) == i


def test_ext64_picks_the_nearest_64_bit_clock():
    assert ext64(5, 10) == 5
    assert ext64(0xFFFFFFF0, (1 << 32) + 5) == 0xFFFFFFF0
    assert ext64(3, (1 << 32) - 2) == (1 << 32) + 3


def test_steps_count_by_direction_and_time(mcu):
    motion, sent = mcu
    motion.run("reset_step_clock", {"oid": 0, "clock": 1000}, 0)
    queue(motion, 0, 100, 10, direction=1)  # steps at 1100..2000
    queue(motion, 0, 100, 5, direction=0)  # 2100..2500, back
    assert [position(motion, t) for t in (1099, 1100, 1550, 2000, 2300, 9999)] == [
        0,
        1,
        5,
        10,
        7,
        5,
    ]
    motion.run("stepper_get_position", {"oid": 0}, 1550)
    assert sent.named("stepper_position") == [{"oid": 0, "pos": 5}]


def test_a_move_queued_in_the_past_is_timer_too_close(mcu):
    motion, _ = mcu
    motion.run("reset_step_clock", {"oid": 0, "clock": 1000}, 0)
    with pytest.raises(McuShutdown, match="Timer too close"):
        queue(motion, 5000, 100, 3)  # first step 1100, now 5000
    queue(motion, 900, 200, 3)  # in time
    with pytest.raises(McuShutdown, match="Can't reset time when stepper active"):
        motion.run("reset_step_clock", {"oid": 0, "clock": 0}, 1300)


def home(motion, now, clock, rest=50):
    """What klippy's homing_move sends before the steps (mcu.py, stepper.py)."""
    motion.run(
        "trsync_start",
        {"oid": 2, "report_clock": clock, "report_ticks": 75000, "expire_reason": 4},
        now,
    )
    motion.run("stepper_stop_on_trigger", {"oid": 0, "trsync_oid": 2}, now)
    motion.run("trsync_set_timeout", {"oid": 2, "clock": clock + 250000}, now)
    motion.run(
        "endstop_home",
        {
            "oid": 1,
            "clock": clock,
            "sample_ticks": 15,
            "sample_count": 4,
            "rest_ticks": rest,
            "pin_value": 1,
            "trsync_oid": 2,
            "trigger_reason": REASON_ENDSTOP_HIT,
        },
        now,
    )


def test_the_endstop_stops_the_stepper_where_it_triggers(mcu):
    motion, sent = mcu
    motion.run("reset_step_clock", {"oid": 0, "clock": 10000}, 0)
    home(motion, 0, 10000)
    queue(motion, 0, 100, 500, direction=0)  # toward the endstop at -100
    # The 100th step (position -100) happens at 10000 + 100*100 = 20000; the
    # endstop samples every 50 ticks from 10000: the first matching sample is at
    # 20000, the trigger after 3 more samples 15 ticks apart.
    assert motion.endstops[1].predict() == (20000, 20045)
    assert motion.next_event() == 10000, "the first trsync report comes first"
    motion.advance(20044)
    assert [r["can_trigger"] for r in sent.named("trsync_state")] == [1]
    motion.advance(20100)
    states = sent.named("trsync_state")
    assert states[-1]["can_trigger"] == 0
    assert states[-1]["trigger_reason"] == REASON_ENDSTOP_HIT
    (record,) = motion.homings
    assert record["sample_clock"] == 20000 and record["trigger_clock"] == 20045
    assert record["steppers"]["PA0"] == {"trigger": -100, "stop": -100}
    assert position(motion, 10**6) == -100, "no step after the trigger"
    queue(motion, 20100, 100, 5)
    assert position(motion, 10**6) == -100, "steps dropped until reset_step_clock"
    motion.run("endstop_query_state", {"oid": 1}, 20100)
    assert sent.named("endstop_state")[-1] == {
        "oid": 1,
        "homing": 1,
        "next_clock": 20050,  # first matching sample + rest_ticks
        "pin_value": 1,
    }
    # klippy's stop: trsync_trigger answered with the reason; then a new start.
    motion.run("trsync_trigger", {"oid": 2, "reason": 2}, 20200)
    assert sent.named("trsync_state")[-1] == {
        "oid": 2,
        "can_trigger": 0,
        "trigger_reason": REASON_ENDSTOP_HIT,
        "clock": 0,
    }
    motion.run("reset_step_clock", {"oid": 0, "clock": 30000}, 20300)
    queue(motion, 20300, 100, 20, direction=1)
    assert position(motion, 10**6) == -80


def test_oversampling_restarts_when_the_pin_is_released(mcu):
    """A match that does not last sample_count samples is not a trigger (endstop.c
    endstop_oversample_event)."""
    motion, _ = mcu
    motion.run("reset_step_clock", {"oid": 0, "clock": 10000}, 0)
    home(motion, 0, 10000, rest=50)
    queue(motion, 0, 100, 100, direction=0)  # reaches -100 at 20000
    queue(motion, 0, 10, 1, direction=1)  # -99 at 20010: released before 20015
    queue(motion, 0, 100, 1, direction=0)  # -100 again at 20110
    hit = motion.endstops[1].predict()
    assert hit == (20150, 20195), "first lasting match on the 50-tick grid"


def test_reports_go_out_every_report_ticks_and_the_timeout_triggers(mcu):
    motion, sent = mcu
    home(motion, 0, 10000)  # no steps: the endstop never triggers
    for now in (9999, 10000, 85000, 160000):
        motion.advance(now)
    reports = sent.named("trsync_state")
    assert [(r["can_trigger"], r["clock"]) for r in reports] == [
        (1, 10000),
        (1, 85000),
        (1, 160000),
    ]
    motion.advance(240000)  # late: two report timers, one report (TSF_REPORT)
    assert len(sent.named("trsync_state")) == 4
    motion.advance(260000)
    last = sent.named("trsync_state")[-1]
    assert (last["can_trigger"], last["trigger_reason"]) == (0, COMMS_TIMEOUT)
    assert not motion.homings, "a timeout is not a homing"
    (expiry,) = motion.expiries
    assert expiry["clock"] == 260000 and expiry["trsync"] == 2
    # This simulator sent the report due at 235000 only at 240000: 5 ms late.
    assert expiry["max_report_lag_s"] == pytest.approx(0.005)


def test_the_host_extends_the_timeout_like_trdispatch(mcu):
    motion, sent = mcu
    home(motion, 0, 10000)
    for now in range(85000, 1_000_000, 75000):
        motion.advance(now)
        motion.run("trsync_set_timeout", {"oid": 2, "clock": now + 250000}, now)
    assert all(r["can_trigger"] == 1 for r in sent.named("trsync_state"))


def test_a_stepper_registered_twice_and_unknown_oids_shut_down(mcu):
    motion, _ = mcu
    home(motion, 0, 10000)
    with pytest.raises(McuShutdown, match="already active"):
        motion.run("stepper_stop_on_trigger", {"oid": 0, "trsync_oid": 2}, 0)
    with pytest.raises(McuShutdown, match="Invalid oid"):
        motion.run("queue_step", {"oid": 9, "interval": 1, "count": 1, "add": 0}, 0)
    with pytest.raises(McuShutdown, match="Invalid count"):
        queue(motion, 0, 100, 0)


def test_a_shutdown_stops_steppers_where_they_are(mcu):
    motion, _ = mcu
    motion.run("reset_step_clock", {"oid": 0, "clock": 0}, 0)
    queue(motion, 0, 100, 100, direction=1)
    motion.shutdown(5050)
    assert position(motion, 10**6) == 50
