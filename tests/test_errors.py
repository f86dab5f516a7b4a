"""kflash's exceptions, raised for real through public calls.

Each exported class is raised here by the call and the situation a user would meet
it in (a broken build, a build that hangs, a board that does not answer, a service
that cannot be controlled, Moonraker down, a print running, bad input), and carries
what a caller needs: ``device``, ``step``, ``command``, ``exit_status``,
``output_tail``, ``hint``, ``report`` and the ``exit_code`` the CLI exits with.
"""

import inspect
import os
import pty
import tty

import pytest

import kflash
from kflash import _core

EXPORTED = sorted(
    name
    for name, obj in vars(_core).items()
    if inspect.isclass(obj) and issubclass(obj, BaseException)
)


def test_every_error_is_a_kflash_error_and_exported():
    assert EXPORTED == sorted(RAISED)
    for name in EXPORTED:
        cls = getattr(kflash, name)
        assert issubclass(cls, kflash.KflashError)
        assert cls.__module__ == "kflash._core"
        assert name in kflash.__all__


def test_timeouts_are_caught_as_what_timed_out():
    assert issubclass(kflash.BuildTimeout, kflash.BuildError)
    assert issubclass(kflash.BuildTimeout, kflash.CommandTimeout)
    assert issubclass(kflash.FlashTimeout, kflash.FlashError)
    assert issubclass(kflash.FlashTimeout, kflash.CommandTimeout)
    assert not issubclass(kflash.BuildTimeout, kflash.FlashError)
    assert issubclass(kflash.ServiceUnavailable, kflash.PreflightRefused)
    assert issubclass(kflash.ServiceUnavailable, kflash.ServiceError)
    assert issubclass(kflash.MoonrakerUnavailable, kflash.PreflightRefused)
    assert issubclass(kflash.MoonrakerUnavailable, kflash.MoonrakerError)


@pytest.fixture
def engine(sandbox, monkeypatch):
    """An Engine on the sandbox's state dir, in this process."""
    for name in ("KFLASH_DEV_ROOT", "KFLASH_SYS_ROOT", "KFLASH_TEST_SANDBOX"):
        monkeypatch.setenv(name, sandbox.env[name])
    monkeypatch.setenv("KFLASH_READY_TIMEOUT_S", "2")
    return kflash.Engine(home=str(sandbox.home))


def raised(call, cls):
    with pytest.raises(cls) as info:
        call()
    return info.value


def test_a_failing_build_raises_build_error_with_the_command(sandbox, engine):
    sandbox.add_board("octopus")
    sandbox.add_board("broken", fail_build=True)
    err = raised(engine.build, kflash.BuildError)
    assert not isinstance(err, kflash.CommandTimeout)
    assert err.device == "broken" and err.step == "build"
    assert "make" in err.command and "OUT=" in err.command
    assert err.exit_status == 2
    assert "fixture failure requested" in err.output_tail
    assert err.exit_code == 1
    # The other device built; every device's entry comes with the error.
    assert [(r["key"], r["build"]) for r in err.report] == [
        ("octopus", "pass"),
        ("broken", "fail"),
    ]
    assert err.details["command"] == err.command


def test_a_build_that_hangs_raises_build_timeout(sandbox, engine):
    sandbox.add_board("slow")
    config = sandbox.home / "configs" / "slow.config"
    config.write_text(config.read_text() + "CONFIG_FIXTURE_SLEEP=30\n")
    sandbox.settings(build_timeout_s=2)
    err = raised(engine.build, kflash.BuildTimeout)
    assert isinstance(err, kflash.BuildError)
    assert isinstance(err, kflash.CommandTimeout)
    assert err.device == "slow" and "make" in err.command
    assert "timed out" in str(err)


def test_a_board_that_does_not_answer_raises_flash_timeout():
    master, slave = pty.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        err = raised(lambda: kflash.katapult_status(path), kflash.FlashTimeout)
    finally:
        os.close(master)
        os.close(slave)
    assert isinstance(err, kflash.FlashError)
    assert isinstance(err, kflash.CommandTimeout)
    assert (err.device, err.step) == (path, "connect")
    assert err.exit_code == 1


def test_a_missing_tty_raises_flash_error(tmp_path):
    err = raised(
        lambda: kflash.katapult_flash(str(tmp_path / "ttyACM9"), "/dev/null"),
        kflash.FlashError,
    )
    assert not isinstance(err, kflash.CommandTimeout)


def test_a_service_that_cannot_be_controlled_is_refused(sandbox, engine):
    sandbox.add_board("octopus")
    sandbox.start_moonraker()
    sandbox.settings(stop_command="/nonexistent/stop-klipper")
    err = raised(engine.flash_all, kflash.ServiceUnavailable)
    assert isinstance(err, kflash.ServiceError)
    assert isinstance(err, kflash.PreflightRefused)
    assert "/nonexistent/stop-klipper" in str(err)
    assert err.step == "preflight" and err.exit_code == 3
    assert sandbox.service_events() == []


def test_unreachable_moonraker_is_refused_without_yes(sandbox, engine):
    sandbox.add_board("octopus")
    err = raised(engine.flash_all, kflash.MoonrakerUnavailable)
    assert isinstance(err, kflash.MoonrakerError)
    assert isinstance(err, kflash.PreflightRefused)
    assert "--yes" in str(err) and err.hint
    assert err.exit_code == 3
    assert sandbox.service_events() == []


def test_a_print_running_is_refused(sandbox, engine):
    sandbox.add_board("octopus")
    sandbox.start_moonraker().print_state = "printing"
    err = raised(engine.flash_all, kflash.PreflightRefused)
    assert not isinstance(err, (kflash.ServiceError, kflash.MoonrakerError))
    assert "printing" in str(err) and err.exit_code == 3


def test_bad_input_is_a_usage_error(sandbox, engine):
    sandbox.add_board("octopus")
    err = raised(lambda: engine.remove_device("nope"), kflash.DeviceNotFound)
    assert (err.device, err.exit_code) == ("nope", 2)
    err = raised(
        lambda: engine.add_device("a/b", serial="/dev/x"), kflash.RegistryError
    )
    assert (err.device, err.exit_code) == ("a/b", 2)
    (sandbox.home / "configs" / "octopus.config").unlink()
    err = raised(engine.flash_all, kflash.ConfigError)
    assert (err.device, err.step, err.exit_code) == ("octopus", "plan", 2)
    assert "kflash config octopus" in str(err)


def test_a_broken_snapshot_file_is_a_kflash_error(tmp_path):
    path = tmp_path / "not-a-snapshot"
    path.write_bytes(b"x" * 64)
    with pytest.raises(kflash.KflashError) as info:
        kflash.SnapshotReader(str(path))
    assert type(info.value) is kflash.KflashError


# Every exported class and the test above that raises it through a public call.
RAISED = {
    "KflashError": test_a_broken_snapshot_file_is_a_kflash_error,
    "BuildError": test_a_failing_build_raises_build_error_with_the_command,
    "BuildTimeout": test_a_build_that_hangs_raises_build_timeout,
    "CommandTimeout": test_a_build_that_hangs_raises_build_timeout,
    "FlashError": test_a_missing_tty_raises_flash_error,
    "FlashTimeout": test_a_board_that_does_not_answer_raises_flash_timeout,
    "ServiceError": test_a_service_that_cannot_be_controlled_is_refused,
    "ServiceUnavailable": test_a_service_that_cannot_be_controlled_is_refused,
    "MoonrakerError": test_unreachable_moonraker_is_refused_without_yes,
    "MoonrakerUnavailable": test_unreachable_moonraker_is_refused_without_yes,
    "PreflightRefused": test_a_print_running_is_refused,
    "DeviceNotFound": test_bad_input_is_a_usage_error,
    "RegistryError": test_bad_input_is_a_usage_error,
    "ConfigError": test_bad_input_is_a_usage_error,
}
