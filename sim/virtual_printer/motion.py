"""The motion side of a virtual Klipper MCU: steppers, endstops, trsync in clock time.

Follows what Klipper's firmware does (src/stepper.c, src/endstop.c, src/trsync.c,
src/sched.c; see reference/klipper-mcu-protocol.md), for what klippy needs to home:

- ``queue_step oid interval count add``: the first step of a move comes ``interval``
  ticks after the previous step (or after ``reset_step_clock``), step ``i`` of the move
  at ``first + i*interval + add*i*(i+1)/2``. ``set_next_step_dir`` applies to the next
  queued move. The position counts +1 per step with dir 1 and -1 with dir 0 (what
  ``stepper_position`` reports). A move queued to an idle stepper whose first step is
  already past is a "Timer too close" shutdown, as in ``sched_add_timer``; steps queued
  after a trigger stop are dropped until ``reset_step_clock``.
- ``endstop_home``: samples the pin every ``rest_ticks`` from ``clock``; on a match it
  samples ``sample_count`` times ``sample_ticks`` apart and, if all match, triggers its
  trsync. ``endstop_state``'s ``next_clock`` is the first matching sample + rest_ticks.
- trsync: reports ``trsync_state`` every ``report_ticks``, triggers with
  ``expire_reason`` at the ``trsync_set_timeout`` clock, and on a trigger stops every
  stepper registered with ``stepper_stop_on_trigger`` at that clock.

Nothing runs per step. A stepper keeps its queued moves and computes its position at any
clock from them; an armed endstop's trigger is computed ahead from the queued moves
(recomputed when moves are added). `Motion.advance(now)` carries out what is due by
``now`` (a trigger, a report, an expiry) in clock order; `next_event` says when the next
thing is due, so the board's loop can sleep until then.

The virtual endstop: ``{"pin": "PA3", "stepper": "PA0", "trigger_at": -1600,
"side": "min"}`` reads high while the stepper on step pin PA0 is at or below step -1600
("max": at or above). Steppers start at 0 when the MCU configures them. An endstop pin
with no such entry never triggers.

Each trigger by an endstop is recorded (`Motion.homings`): the sample clock, the trigger
clock, and for each stopped stepper its position at the first matching sample (what
klippy takes as the trigger position) and where it stopped, plus the shortest lead time
of a step command during that homing move. Each trsync timeout is recorded too
(`Motion.expiries`), with how late this process sent its reports: the simulator runs in
real time on a shared machine, and a starved simulator can time out a homing a real MCU
would not. Not thread-safe; driven by one event loop.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Optional

MASK32 = 0xFFFFFFFF
# trsync reasons (klippy's MCU_trsync)
REASON_ENDSTOP_HIT = 1


class McuShutdown(Exception):
    """A condition under which the firmware shuts down (the message is its static
    string)."""


def ext64(clock32: int, ref: int) -> int:
    """The 64-bit clock congruent to ``clock32`` closest to ``ref``."""
    base = ref - ((ref - clock32) & MASK32)
    if ref - base > 1 << 31:
        base += 1 << 32
    return base


class Move:
    """One ``queue_step``: ``count`` steps from ``first`` in direction ``direction``."""

    __slots__ = ("first", "interval", "count", "add", "direction", "last")

    def __init__(self, first: int, interval: int, count: int, add: int, direction: int):
        self.first = first
        self.interval = interval
        self.count = count
        self.add = add
        self.direction = direction
        self.last = self.time(count - 1)

    def time(self, i: int) -> int:
        return self.first + i * self.interval + self.add * i * (i + 1) // 2

    def done_by(self, clock: int) -> int:
        """How many of its steps happen at or before ``clock``."""
        if clock < self.first:
            return 0
        if clock >= self.last:
            return self.count
        lo, hi = 1, self.count - 1  # time(lo-1) <= clock < time(hi)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.time(mid) <= clock:
                lo = mid + 1
            else:
                hi = mid
        return lo


class Stepper:
    """src/stepper.c: one stepper's queue and position."""

    def __init__(self, oid: int, step_pin: int, dir_pin: int) -> None:
        self.oid = oid
        self.step_pin = step_pin
        self.dir_pin = dir_pin
        self.position = 0  # after the retired moves
        self.moves: collections.deque[Move] = collections.deque()
        self.base = 0  # next_step_time: the last step, or the reset clock
        self.last_dir = 0
        self.next_dir = 0
        self.need_reset = False
        self.trsync: Optional[Trsync] = None  # stop signal registered with

    def busy(self, now: int) -> bool:
        return bool(self.moves) and self.moves[-1].last > now

    def position_at(self, clock: int) -> int:
        pos = self.position
        for m in self.moves:
            if m.first > clock:
                break
            pos += m.direction * m.done_by(clock)
        return pos

    def retire(self, clock: int) -> None:
        """Fold moves wholly done by ``clock`` into ``position``."""
        while self.moves and self.moves[0].last <= clock:
            m = self.moves.popleft()
            self.position += m.direction * m.count

    def queue_step(
        self, now: int, interval: int, count: int, add: int
    ) -> Optional[Move]:
        if not count:
            raise McuShutdown("Invalid count parameter")
        if self.next_dir != self.last_dir:
            self.last_dir = self.next_dir
        direction = 1 if self.last_dir else -1
        if self.busy(now):
            first = self.moves[-1].last + interval
        elif self.need_reset:
            return None
        else:
            first = ext64((self.base + interval) & MASK32, now)
            if first < now:
                raise McuShutdown("Timer too close")
        move = Move(first, interval, count, add, direction)
        self.moves.append(move)
        self.base = move.last
        return move

    def reset_clock(self, now: int, clock32: int) -> None:
        if self.busy(now):
            raise McuShutdown("Can't reset time when stepper active")
        self.base = ext64(clock32, now)
        self.need_reset = False

    def stop(self, clock: int) -> None:
        """stepper_stop: steps after ``clock`` never happen."""
        self.position = self.position_at(clock)
        self.moves.clear()
        self.base = 0
        self.last_dir = self.next_dir = 0
        self.need_reset = True
        self.trsync = None

    def first_match(self, clock: int, pred: Callable[[int], bool]) -> Optional[int]:
        """The earliest clock >= ``clock`` at which ``pred(position)`` holds, by the
        queued moves (``pred`` is a threshold: ``p <= at`` or ``p >= at``)."""
        pos = self.position_at(clock)
        if pred(pos):
            return clock
        for m in self.moves:
            if m.last <= clock:
                continue
            done = m.done_by(clock)  # steps of m already in `pos`
            before = pos - m.direction * done  # position before m's first step
            # Positions after step i: before + direction*(i+1); monotonic in i.
            lo, hi = done, m.count - 1
            if not pred(before + m.direction * (hi + 1)):
                pos = before + m.direction * m.count
                continue
            while lo < hi:
                mid = (lo + hi) // 2
                if pred(before + m.direction * (mid + 1)):
                    hi = mid
                else:
                    lo = mid + 1
            return m.time(lo)
        return None


class Endstop:
    """src/endstop.c: a pin sampled while homing, wired to a virtual switch."""

    def __init__(self, oid: int, pin: int, wiring: Optional[dict[str, Any]]) -> None:
        self.oid = oid
        self.pin = pin
        self.wiring = wiring
        self.stepper: Optional[Stepper] = None  # resolved when steppers are configured
        self.homing = False
        self.armed = False
        self.clock = 0  # next sample
        self.sample_ticks = self.sample_count = self.rest_ticks = 0
        self.pin_value = 1
        self.trsync: Optional[Trsync] = None
        self.reason = 0
        self.nextwake = 0

    def triggered_at(self, position: int) -> bool:
        assert self.wiring is not None
        at = int(self.wiring["trigger_at"])
        if self.wiring.get("side", "min") == "max":
            return position >= at
        return position <= at

    def level(self, clock: int) -> int:
        if self.stepper is None:
            return 0
        return int(self.triggered_at(self.stepper.position_at(clock)))

    def predict(self) -> Optional[tuple[int, int]]:
        """(first matching sample, trigger clock) by the queued moves, or None."""
        stepper = self.stepper
        if not self.armed or stepper is None:
            return None
        want = bool(self.pin_value)

        def pred(position: int) -> bool:
            return self.triggered_at(position) == want

        sample = self.clock
        for _ in range(10000):
            match = stepper.first_match(sample, pred)
            if match is None:
                return None
            steps = -(-(match - sample) // self.rest_ticks)
            sample += steps * self.rest_ticks
            if not pred(stepper.position_at(sample)):
                sample += self.rest_ticks
                continue
            extra = range(1, self.sample_count)
            if all(
                pred(stepper.position_at(sample + k * self.sample_ticks)) for k in extra
            ):
                return sample, sample + (self.sample_count - 1) * self.sample_ticks
            sample += self.rest_ticks
        return None


class Trsync:
    """src/trsync.c: triggers that stop steppers, with reports and a timeout."""

    def __init__(self, oid: int) -> None:
        self.oid = oid
        self.can_trigger = False
        self.reason = 0
        self.expire_reason = 0
        self.report_clock: Optional[int] = None
        self.report_ticks = 0
        self.expire_clock: Optional[int] = None
        self.report_due = False
        self.steppers: list[Stepper] = []
        self.min_lead: Optional[int] = None  # of step commands while armed
        self.max_report_lag = 0  # how late (ticks) this simulator sent a report

    def clear(self) -> None:
        self.report_clock = self.expire_clock = None
        for s in self.steppers:
            s.trsync = None
        self.steppers = []
        self.can_trigger = self.report_due = False
        self.reason = self.expire_reason = 0
        self.min_lead = None
        self.max_report_lag = 0


class Motion:
    """The motion objects of one MCU (by oid) and their clock-ordered events."""

    def __init__(
        self,
        freq: int,
        send: Callable[..., None],
        pins: dict[str, int],
        wiring: Optional[dict[str, Any]] = None,
    ) -> None:
        self.freq = freq
        self.send = send
        self.pin_names = {v: k for k, v in pins.items()}
        self.endstop_wiring = {
            e["pin"]: e for e in (wiring or {}).get("endstops", []) if "pin" in e
        }
        self.steppers: dict[int, Stepper] = {}
        self.endstops: dict[int, Endstop] = {}
        self.trsyncs: dict[int, Trsync] = {}
        self.outputs: dict[int, int] = {}
        self.homings: list[dict[str, Any]] = []
        self.expiries: list[dict[str, Any]] = []
        self.changed = False

    def pin_name(self, pin: int) -> str:
        return self.pin_names.get(pin, str(pin))

    # ------------------------------------------------------------- commands

    def _stepper(self, oid: int) -> Stepper:
        if oid not in self.steppers:
            raise McuShutdown("Invalid oid type")
        return self.steppers[oid]

    def _endstop(self, oid: int) -> Endstop:
        if oid not in self.endstops:
            raise McuShutdown("Invalid oid type")
        return self.endstops[oid]

    def _trsync(self, oid: int) -> Trsync:
        if oid not in self.trsyncs:
            raise McuShutdown("Invalid oid type")
        return self.trsyncs[oid]

    def _wire(self) -> None:
        by_pin = {self.pin_name(s.step_pin): s for s in self.steppers.values()}
        for e in self.endstops.values():
            wiring = e.wiring
            e.stepper = by_pin.get(wiring["stepper"]) if wiring else None

    def run(self, name: str, v: dict[str, Any], now: int) -> bool:
        """Carry out one motion command at clock ``now``; False if it is not one."""
        self.advance(now)
        if name == "config_stepper":
            self.steppers[v["oid"]] = Stepper(v["oid"], v["step_pin"], v["dir_pin"])
            self._wire()
        elif name == "config_endstop":
            pin = self.pin_name(v["pin"])
            self.endstops[v["oid"]] = Endstop(
                v["oid"], v["pin"], self.endstop_wiring.get(pin)
            )
            self._wire()
        elif name == "config_trsync":
            self.trsyncs[v["oid"]] = Trsync(v["oid"])
        elif name in ("config_digital_out", "update_digital_out"):
            self.outputs[v["oid"]] = v["value"]
        elif name == "queue_digital_out":
            self.outputs[v["oid"]] = v["on_ticks"]
        elif name == "queue_step":
            s = self._stepper(v["oid"])
            move = s.queue_step(now, v["interval"], v["count"], v["add"])
            if move is not None and s.trsync is not None and s.trsync.can_trigger:
                lead = move.first - now
                t = s.trsync
                t.min_lead = lead if t.min_lead is None else min(t.min_lead, lead)
            self.changed = True
        elif name == "set_next_step_dir":
            self._stepper(v["oid"]).next_dir = 1 if v["dir"] else 0
        elif name == "reset_step_clock":
            self._stepper(v["oid"]).reset_clock(now, v["clock"])
        elif name == "stepper_get_position":
            s = self._stepper(v["oid"])
            self.send("stepper_position", oid=s.oid, pos=s.position_at(now))
        elif name == "stepper_stop_on_trigger":
            s, t = self._stepper(v["oid"]), self._trsync(v["trsync_oid"])
            if s.trsync is not None:
                raise McuShutdown("Can't add signal that is already active")
            s.trsync = t
            t.steppers.append(s)
        elif name == "endstop_home":
            self._endstop_home(self._endstop(v["oid"]), v, now)
        elif name == "endstop_query_state":
            e = self._endstop(v["oid"])
            self.send(
                "endstop_state",
                oid=e.oid,
                homing=int(e.homing),
                next_clock=e.nextwake & MASK32,
                pin_value=e.level(now),
            )
        elif name == "trsync_start":
            t = self._trsync(v["oid"])
            t.clear()
            t.can_trigger = True
            t.report_ticks = v["report_ticks"]
            if t.report_ticks:
                t.report_clock = self._schedule(v["report_clock"], now)
            t.expire_reason = v["expire_reason"]
        elif name == "trsync_set_timeout":
            t = self._trsync(v["oid"])
            if t.can_trigger:
                t.expire_clock = self._schedule(v["clock"], now)
        elif name == "trsync_trigger":
            t = self._trsync(v["oid"])
            self._trigger(t, v["reason"], now)
            t.report_clock = t.expire_clock = None
            t.can_trigger = t.report_due = False
            self.send(
                "trsync_state",
                oid=t.oid,
                can_trigger=0,
                trigger_reason=t.reason,
                clock=0,
            )
        else:
            return False
        return True

    @staticmethod
    def _schedule(clock32: int, now: int) -> int:
        """sched_add_timer: a timer in the past is a shutdown."""
        clock = ext64(clock32, now)
        if clock < now:
            raise McuShutdown("Timer too close")
        return clock

    def _endstop_home(self, e: Endstop, v: dict[str, Any], now: int) -> None:
        e.armed = False
        e.sample_count = v["sample_count"]
        if not e.sample_count:
            e.trsync = None
            e.homing = False
            return
        e.clock = self._schedule(v["clock"], now)
        e.sample_ticks = v["sample_ticks"]
        e.rest_ticks = max(1, v["rest_ticks"])
        e.pin_value = v["pin_value"]
        e.trsync = self._trsync(v["trsync_oid"])
        e.reason = v["trigger_reason"]
        e.homing = e.armed = True

    # --------------------------------------------------------------- events

    def _events(self) -> list[tuple[int, int, str, Any]]:
        events: list[tuple[int, int, str, Any]] = []
        for e in self.endstops.values():
            if e.armed and e.trsync is not None and e.trsync.can_trigger:
                hit = e.predict()
                if hit is not None:
                    events.append((hit[1], 0, "endstop", (e, hit[0])))
        for t in self.trsyncs.values():
            if t.expire_clock is not None:
                events.append((t.expire_clock, 1, "expire", t))
            if t.report_clock is not None:
                events.append((t.report_clock, 2, "report", t))
        return events

    def next_event(self) -> Optional[int]:
        """The clock at which something is due next (None: nothing scheduled)."""
        events = self._events()
        return min(events)[0] if events else None

    def advance(self, now: int) -> None:
        """Carry out everything due at or before ``now``, in clock order."""
        while True:
            events = [ev for ev in self._events() if ev[0] <= now]
            if not events:
                break
            clock, _, kind, what = min(events, key=lambda ev: (ev[0], ev[1]))
            if kind == "endstop":
                e, sample = what
                e.armed = False
                e.nextwake = sample + e.rest_ticks
                self._record(e, sample, clock)
                self._trigger(e.trsync, e.reason, clock)
            elif kind == "expire":
                what.expire_clock = None
                if what.can_trigger:
                    self._note_expiry(what, clock, now)
                self._trigger(what, what.expire_reason, clock)
            else:
                what.report_due = True
                what.max_report_lag = max(what.max_report_lag, now - clock)
                what.report_clock += what.report_ticks
        for t in self.trsyncs.values():
            if t.report_due:
                t.report_due = False
                self.send(
                    "trsync_state",
                    oid=t.oid,
                    can_trigger=int(t.can_trigger),
                    trigger_reason=t.reason,
                    clock=now & MASK32,
                )
        # Samples up to now that did not start a trigger never will (the past does
        # not change): move armed endstops on, so predictions start near now.
        for e in self.endstops.values():
            if e.armed and e.clock <= now:
                hit = e.predict()
                if hit is not None and hit[0] <= now:
                    e.clock = hit[0]  # oversampling in progress
                else:
                    e.clock += (now - e.clock) // e.rest_ticks * e.rest_ticks
        # Keep the queues short: what is done is done (but not past an armed
        # endstop's next sample, which may still need positions from before now).
        for s in self.steppers.values():
            horizon = now
            for e in self.endstops.values():
                if e.armed and e.stepper is s:
                    horizon = min(horizon, e.clock)
            s.retire(horizon)

    def _trigger(self, t: Optional[Trsync], reason: int, clock: int) -> None:
        """trsync_do_trigger at ``clock``."""
        if t is None or not t.can_trigger:
            return
        t.can_trigger = False
        t.reason = reason
        t.report_due = True
        for s in t.steppers:
            s.stop(clock)
        t.steppers = []
        self.changed = True

    def _record(self, e: Endstop, sample: int, clock: int) -> None:
        t = e.trsync
        assert t is not None
        steppers = {
            self.pin_name(s.step_pin): {
                "trigger": s.position_at(sample),
                "stop": s.position_at(clock),
            }
            for s in t.steppers
        }
        self.homings.append(
            {
                "endstop": self.pin_name(e.pin),
                "sample_clock": sample,
                "trigger_clock": clock,
                "steppers": steppers,
                "min_step_lead_s": (
                    None if t.min_lead is None else t.min_lead / self.freq
                ),
            }
        )

    def _note_expiry(self, t: Trsync, clock: int, now: int) -> None:
        """A trsync timed out (klippy: "Communication timeout during homing"). Says
        how late this simulator itself was: a real MCU sends its reports on time, so
        an expiry after late reports is the simulator's (a starved process), not the
        host's."""
        self.expiries.append(
            {
                "trsync": t.oid,
                "clock": clock,
                "noticed_late_s": (now - clock) / self.freq,
                "max_report_lag_s": t.max_report_lag / self.freq,
            }
        )

    def shutdown(self, now: int) -> None:
        """What the firmware's shutdown handlers do: steppers stop where they are,
        trsyncs are cleared, timers (endstop sampling) are gone."""
        for s in self.steppers.values():
            s.stop(now)
        for t in self.trsyncs.values():
            t.clear()
        for e in self.endstops.values():
            e.armed = False
        self.changed = True

    def state(self, now: int) -> dict[str, Any]:
        """Positions now and the homing records (JSON-able)."""
        return {
            "steppers": {
                self.pin_name(s.step_pin): {
                    "oid": s.oid,
                    "position": s.position_at(now),
                    "moving": s.busy(now),
                }
                for s in self.steppers.values()
            },
            "homings": self.homings,
            "expiries": self.expiries,
        }
