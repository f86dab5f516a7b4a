"""What klippy's [kflash] shows of a run, and how plans and reports read, without
klippy: kflash.run_view (the extra's state machine) and kflash.render (shared
with the CLI)."""

import pytest

import kflash
from kflash import render, run_view
from kflash.run_view import RunView

REPORT = {
    "ok": True, "target_version": "v0.13.0-5-gabc", "cancelled": False,
    "service": {"stopped": True, "restarted": True, "downtime_s": 12.34,
                "stop_s": 0.5, "start_s": 1.25, "error": None},
    "devices": [
        {"key": "mcu", "method": "katapult", "action": "flash", "reason": "",
         "version_before": "v0.12.0", "version_target": "v0.13.0-5-gabc",
         "version_after": "v0.13.0-5-gabc", "build": "pass", "flash": "pass",
         "flash_s": 4.0, "verify": "pass", "error": None, "hint": None},
        {"key": "host", "method": "linux", "action": "skip",
         "reason": "already current", "version_before": "v0.13.0-5-gabc",
         "version_target": None, "version_after": None, "build": "skip",
         "flash": "skip", "flash_s": None, "verify": "skip", "error": None,
         "hint": None},
    ],
    "record": "/s/runs/R1.json",
}


def record(**over):
    rec = {"run_id": "R1", "state": "finished", "pid": 42, "ok": True,
           "exit_code": 0, "error": None, "interrupted": None,
           "finished": "2026-01-01T00:00:00Z", "report": REPORT,
           "announced": False}
    rec.update(over)
    return rec


def test_a_run_moves_through_the_states_klippy_shows():
    view = RunView("/s")
    assert view.status["state"] == "idle" and not view.active
    said = view.starting("R1", None, True)
    assert said[0][0] == "info" and "every outdated MCU" in said[0][1]
    st = view.status
    assert (st["state"], st["run_id"], st["progress"]) == ("building", "R1", 0.0)
    view.started({"method": "session", "pid": 7})
    assert view.status["launcher"] == "session"
    assert view.status is not st  # a fresh dict on every change
    said = view.apply([
        {"run_id": "R1", "stage": "build", "device": "mcu", "fraction": 0.5,
         "level": "info", "message": "Compiling src/main.c"},
        {"run_id": "R1", "stage": "build", "device": "mcu", "fraction": 1.0,
         "level": "info", "message": "built"},
        {"run_id": "R1", "stage": "build", "device": "mcu", "fraction": 1.0,
         "level": "info", "message": "built"},
        {"run_id": "OTHER", "stage": "verify", "message": "not ours"},
        {"run_id": "R1", "stage": "stop", "device": None, "level": "warning",
         "message": "slow"},
        {"run_id": "R1", "stage": "flash", "device": "mcu", "fraction": 0.0,
         "level": "error", "message": "flash failed: no answer"},
    ])
    # make's per-file lines and repeats stay out of the console
    assert said == [
        ("note", "kflash build mcu: built"),
        ("note", "warning: kflash stop: slow"),
        ("error", "kflash flash mcu: flash failed: no answer"),
    ]
    assert view.status["state"] == "flashing" and view.active
    assert view.status["progress"] == 0.5
    assert view.status["device"] == "mcu"
    said = view.finish(record())
    assert view.status["state"] == "done" and view.status["progress"] == 1.0
    assert said[0][0] == "info" and "all good" in said[0][1]
    assert view.status["last_result"]["ok"] is True
    assert [d["key"] for d in view.status["last_result"]["devices"]] == [
        "mcu", "host"]


def test_a_refused_start_goes_back_to_idle_and_says_why():
    view = RunView("/s")
    view.starting("R1", "mcu", False)
    said = view.refused(RuntimeError("cannot leave klipper.service\n- fix A\n"
                                     "Nothing was stopped."))
    assert view.status["state"] == "idle" and view.status["run_id"] is None
    assert said == [("error", "kflash: refused: cannot leave klipper.service"),
                    ("info", "- fix A\nNothing was stopped.")]


def test_summary_of_a_good_run_names_versions_outage_and_skips():
    info, errors = render.summary(record())
    assert info[0] == ("kflash: flash run finished: all good; klipper was "
                       "stopped for 12.3 s (flashing 4.0 s, stop 0.5 s, start "
                       "1.2 s)")
    assert "  target firmware: v0.13.0-5-gabc" in info
    assert ("  mcu: v0.12.0 -> v0.13.0-5-gabc (build pass, flash pass, verify "
            "pass)") in info
    assert ("  host: v0.13.0-5-gabc -> ? (build skip, flash skip, verify skip)"
            " - already current") in info
    assert errors == []


def test_the_cores_outage_sentence_is_used_when_the_report_has_one():
    rep = dict(REPORT, service=dict(REPORT["service"],
                                    outage="klipper was down 12.3 s: ..."))
    info, _ = render.summary(record(report=rep))
    assert info[0].endswith("all good; klipper was down 12.3 s: ...")
    assert "\nklipper was down 12.3 s: ...; restarted" in render.report_table(rep)


def test_summary_of_failures_and_a_restart_that_failed():
    rep = dict(REPORT, ok=False, service=dict(REPORT["service"],
                                              restarted=False))
    rep["devices"] = [dict(REPORT["devices"][0], flash="fail",
                           error="no answer", hint="power-cycle it")]
    info, errors = render.summary(record(ok=False, exit_code=4, report=rep,
                                         error=None))
    assert info[0].startswith("kflash: flash run FAILED (exit 4)")
    assert errors == [
        "kflash: klipper could NOT be restarted: start it by hand (systemctl "
        "start klipper)",
        "kflash: mcu: no answer | hint: power-cycle it",
    ]


def test_an_interrupted_run_says_why_and_what_to_do():
    # its process died: the reader says where
    died = record(state="interrupted", ok=None, exit_code=None, report=None,
                  interrupted="its process (pid 42) stopped during flash of "
                  "mcu without finishing")
    info, errors = render.summary(died)
    assert info == ["kflash: the last flash run was INTERRUPTED"]
    assert errors == [
        "kflash: the run was interrupted: its process (pid 42) stopped during "
        "flash of mcu without finishing | hint: check that every MCU is back "
        "(KFLASH_PLAN) and run KFLASH_ALL again"]
    assert render.result_summary(died)["interrupted"] is True
    # a signal: the run unwound and started klipper again
    rep = dict(REPORT, ok=False, cancelled=True)
    info, errors = render.summary(record(ok=False, exit_code=1, report=rep,
                                         interrupted="stopped by SIGTERM",
                                         error="cancelled (klipper was "
                                         "restarted)"))
    assert info[0].startswith("kflash: the last flash run was INTERRUPTED; "
                              "klipper was stopped for 12.3 s")
    assert errors == [
        "kflash: the run was interrupted (stopped by SIGTERM) | hint: klipper "
        "was started again; run KFLASH_PLAN to see where each MCU stands"]


def test_plan_dialog_lines():
    plan = {"moonraker": False, "devices": [
        {"key": "mcu", "mcu": "stm32f446xx", "version_before": None,
         "version_target": "v2", "state": "unknown", "action": "flash",
         "reason": ""},
        {"key": "host", "mcu": "linux", "version_before": "v2",
         "version_target": "v2", "state": "current", "action": "skip",
         "reason": "already current"}]}
    assert render.plan_prompt(plan) == [
        "prompt_begin kflash: MCU firmware",
        "prompt_text Moonraker is unreachable: the MCUs' current versions "
        "are unknown.",
        "prompt_text mcu (stm32f446xx): ? -> v2: unknown",
        "prompt_text host (linux): v2 -> v2: current (already current)",
        "prompt_button_group_start",
        "prompt_button Flash mcu|KFLASH DEVICE=mcu|warning",
        "prompt_button Flash host|KFLASH DEVICE=host|secondary",
        "prompt_button_group_end",
        "prompt_footer_button Update all outdated (1)|KFLASH_ALL "
        "ONLY_OUTDATED=1|primary",
        "prompt_footer_button Close|KFLASH_PLAN CLOSE=1|secondary",
        "prompt_show",
    ]
    current = {"moonraker": True, "devices": [plan["devices"][1]]}
    lines = render.plan_prompt(current)
    assert "prompt_text Every MCU runs the firmware kflash would build." in lines
    assert not any("Update all" in x for x in lines)
    empty = render.plan_prompt({"moonraker": True, "devices": []})
    assert "prompt_text No devices registered: run `kflash devices import` " \
        "on the host." in empty
    stuck = dict(plan["devices"][0], bootloader="katapult",
                 reason="mcu is in its bootloader (Katapult on /dev/ttyACM1); "
                        "flash-all flashes it first")
    lines = render.plan_prompt({"moonraker": True, "devices": [stuck]})
    assert ("prompt_text mcu (stm32f446xx): ? -> v2: unknown (mcu is in its "
            "bootloader (Katapult on /dev/ttyACM1); flash-all flashes it "
            "first)") in lines


def test_plan_and_report_tables_for_the_cli():
    plan = {"moonraker": True, "print_state": "standby", "devices": [
        {"key": "mcu", "mcu": "stm32", "method": "auto", "endpoint": "/dev/x",
         "resolved": None, "version_before": "v1", "version_target": "v2",
         "state": "outdated", "action": "flash", "reason": "v1 -> v2"}]}
    lines = render.plan_table(plan)
    assert lines[0] == "printer: standby"
    assert lines[1].splitlines()[0].split() == [
        "DEVICE", "MCU", "METHOD", "ENDPOINT", "CURRENT", "TARGET", "STATE",
        "ACTION", "WHY"]
    assert "/dev/x" in lines[1]
    lines = render.report_table(REPORT)
    assert lines[-2:] == ["run record: /s/runs/R1.json", "OK"]
    assert "host: skipped (already current)" in lines
    assert "v0.12.0 -> v0.13.0-5-gabc" in lines[0]


def test_a_request_is_checked_against_the_registry():
    bad = run_view.bad_request
    rows = [{"key": "mcu", "last_known_good": "v0.13.0"},
            {"key": "ebb", "last_known_good": None}]
    assert "no devices registered in /s" in bad("/s", [], None)
    assert bad("/s", rows, None) is None and bad("/s", rows, "ebb") is None
    for key in ("../x", "-x", ""):
        with pytest.raises(kflash.RegistryError) as core:
            kflash.validate_key(key)
        assert bad("/s", rows, key) == str(core.value)
        assert str(core.value).startswith("invalid device key")
    assert bad("/s", rows, "EBB36") == (
        "unknown device 'EBB36' (known: ebb, mcu)")


def test_a_rollback_needs_a_last_known_good_image():
    bad = run_view.bad_request
    rows = [{"key": "mcu", "last_known_good": "v0.13.0"},
            {"key": "ebb", "last_known_good": None}]
    assert bad("/s", rows, None, rollback=True) is None
    assert bad("/s", rows, "mcu", rollback=True) is None
    assert bad("/s", rows, "ebb", rollback=True) == (
        "ebb has no last-known-good firmware to roll back to: kflash keeps "
        "one when a flash is verified on the board")
    assert bad("/s", rows[1:], None, rollback=True).startswith(
        "no device has last-known-good firmware to roll back to")
    assert "unknown device" in bad("/s", rows, "nope", rollback=True)


def test_a_rollback_says_so_when_it_starts_and_ends():
    view = RunView("/s")
    said = view.starting("R1", "ebb", False, rollback=True)
    assert said[0][1].startswith("kflash: rolling back device ebb to the "
                                 "firmware last verified on it")
    assert "every MCU that has one" in RunView("/s").starting(
        "R1", None, False, rollback=True)[0][1]
    options = {"keys": ["ebb"], "only_outdated": False, "yes": True,
               "rollback": True}
    info, _ = render.summary(record(options=options))
    assert info[0].startswith("kflash: rollback finished: all good")
    info, _ = render.summary(record(options=options, ok=False, exit_code=1))
    assert info[0].startswith("kflash: rollback FAILED (exit 1)")


def test_kflash_status_lines():
    view = RunView("/s")
    assert view.lines(None) == ["kflash: no flash run yet (state dir /s)"]
    lines = view.lines(record())
    assert lines[0] == "last run R1:" and "all good" in lines[1]
    view.starting("R2", None, False)
    view.apply([{"run_id": "R2", "stage": "build", "fraction": 1.0,
                 "message": "built"}])
    running = record(run_id="R2", state="running")
    assert view.lines(running) == ["kflash: run R2: building 45%: built"]


class Gcode:
    def __init__(self):
        self.said = []

    def respond_raw(self, text):
        self.said.append(("raw", text))

    def respond_info(self, text, log=True):
        self.said.append(("info" if log else "note", text))


def test_say_posts_each_kind_as_klippy_expects():
    g = Gcode()
    run_view.say(g, [("error", "kflash: x"), ("action", "prompt_end"),
                     ("info", "summary"), ("note", "progress")])
    assert g.said == [("raw", "!! kflash: x"), ("raw", "// action:prompt_end"),
                      ("info", "summary"), ("note", "progress")]


def test_the_dialog_mark_is_kept_and_an_unwritable_state_dir_is_only_logged(
        tmp_path, caplog):
    path = tmp_path / "state" / "prompt_open"
    run_view.mark_prompt(str(path), True)
    assert path.exists()
    run_view.mark_prompt(str(path), False)
    assert not path.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    run_view.mark_prompt(str(blocker / "prompt_open"), True)
    assert "cannot record the dialog state" in caplog.text
