"""The JSON shapes kflash's calls return (DESIGN.md's contract), for type
checkers: ``Engine.plan`` -> ``Plan``, ``Engine.flash_all`` -> ``Report``,
``Engine.devices`` -> ``list[DeviceRow]``, and so on. Plain ``TypedDict``s: at
run time the results are ordinary dicts and lists."""

from typing import Callable, List, Literal, Optional, TypedDict

Stage = Literal[
    "plan", "preflight", "build", "prewarm", "stop", "flash", "restart", "verify",
    "report",
]
Level = Literal["info", "warning", "error"]
VersionState = Literal["current", "outdated", "newer", "unknown"]
Step = Literal["pass", "fail", "cached", "skip"]


class Event(TypedDict):
    """One progress event, as ``on_event`` receives it."""

    stage: Stage
    device: Optional[str]
    fraction: Optional[float]
    level: Level
    message: str


class PlanEntry(TypedDict):
    key: str
    name: Optional[str]
    method: str
    endpoint: str
    resolved: Optional[str]
    mcu: Optional[str]
    interface: Optional[str]
    config: str
    version_before: Optional[str]
    version_target: Optional[str]
    state: VersionState
    action: Literal["flash", "skip", "error"]
    reason: str
    bootloader: Optional[str]
    board_mcu: Optional[str]
    hint: Optional[str]


class Plan(TypedDict):
    """``kflash plan --json``."""

    devices: List[PlanEntry]
    moonraker: bool
    moonraker_error: Optional[str]
    print_state: Optional[str]


class ServiceReport(TypedDict):
    """The outage the user lives: ``downtime_s`` from the stop until klippy is
    ready (``ready``; when false, until kflash stopped waiting), its parts, and
    ``outage``, the same in words for front ends to print as is."""

    stopped: bool
    restarted: bool
    downtime_s: float
    stop_s: float
    flash_s: float
    start_s: float
    startup_s: Optional[float]
    ready: bool
    outage: Optional[str]
    error: Optional[str]


class PrewarmReport(TypedDict):
    """klippy pre-warmed before the stop (its C helper, its byte-code)."""

    state: Literal["warmed", "current", "skipped", "failed"]
    klippy: Optional[str]
    message: str
    seconds: float


class DeviceReport(TypedDict):
    """One device of a run's report (also one entry of ``Engine.build``)."""

    key: str
    method: str
    action: str
    reason: str
    version_before: Optional[str]
    version_target: Optional[str]
    version_after: Optional[str]
    build: Step
    flash: Step
    flash_s: Optional[float]
    verify: Step
    error: Optional[str]
    hint: Optional[str]
    rollback: Optional[str]


class Report(TypedDict):
    """``kflash flash-all --json``: the run's report."""

    ok: bool
    target_version: Optional[str]
    service: ServiceReport
    devices: List[DeviceReport]
    cancelled: bool
    prewarm: Optional[PrewarmReport]
    started: str
    finished: str
    record: Optional[str]
    recovered: List["Recovered"]


class Recovered(TypedDict):
    """A board an unfinished run left behind, and what the recovery did with it."""

    key: str
    outcome: Literal["flashed", "running", "left"]
    version: str
    detail: str
    hint: Optional[str]


class _EndpointKind(TypedDict):
    type: Literal["serial", "can", "linux"]


class Endpoint(_EndpointKind, total=False):
    """Where a device is reached, as devices.json stores it (``identity``):
    ``path`` for serial and linux, ``uuid`` and ``interface`` for CAN."""

    path: str
    uuid: str
    interface: str


class DeviceRow(TypedDict):
    """One row of ``kflash devices list --json``."""

    key: str
    name: Optional[str]
    mcu_section: str
    identity: Endpoint
    endpoint: str
    method: Literal["auto", "katapult", "make", "linux"]
    baud: Optional[int]
    config: str
    config_present: bool
    mcu: Optional[str]
    interface: Optional[str]
    problem: Optional[str]
    last_known_good: Optional[str]


class Skipped(TypedDict):
    key: str
    reason: str


class Imported(TypedDict):
    """``kflash devices import --json``."""

    added: List[DeviceRow]
    skipped: List[Skipped]


class DeviceStatus(TypedDict):
    key: str
    mcu_section: str
    version: Optional[str]
    target_version: Optional[str]
    state: VersionState
    problem: Optional[str]
    bootloader: Optional[str]


RunState = Literal["running", "finished", "interrupted"]


class LastRun(TypedDict):
    """The newest run record, in ``kflash status --json``."""

    run_id: str
    state: RunState
    ok: Optional[bool]
    started: Optional[str]
    finished: Optional[str]
    cancelled: Optional[bool]
    interrupted: Optional[str]


class Status(TypedDict):
    """``kflash status --json``."""

    state_dir: str
    moonraker: bool
    moonraker_error: Optional[str]
    print_state: Optional[str]
    devices: List[DeviceStatus]
    last_run: Optional[LastRun]


class RunOptions(TypedDict):
    keys: Optional[List[str]]
    only_outdated: bool
    yes: bool
    rollback: bool


class ServiceSettings(TypedDict):
    """The service settings a run (and its watchdog) control klipper with."""

    backend: Literal["moonraker", "systemd", "command"]
    unit: str
    moonraker_url: str
    stop_command: Optional[str]
    start_command: Optional[str]


class RunRecord(TypedDict):
    """A run's record (``<state>/runs/<run id>.json``) as ``Runs`` reads it:
    ``state`` is ``interrupted`` when its process went away without finishing
    (``interrupted`` then says where); ``announced`` once klippy's ``[kflash]``
    posted its summary."""

    version: int
    run_id: str
    state: RunState
    pid: int
    pid_start: Optional[int]
    started: str
    finished: Optional[str]
    options: RunOptions
    service: Optional[ServiceSettings]
    watchdog: Literal["none", "launched", "armed", "disarmed"]
    exit_code: Optional[int]
    ok: Optional[bool]
    error: Optional[str]
    interrupted: Optional[str]
    report: Optional[Report]
    announced: bool


class ProgressLine(Event):
    """One line of a run's progress (``<state>/runs/<run id>.jsonl``)."""

    t: float
    run_id: str


class HelperStarted(TypedDict):
    """``Runs.start_helper``: the helper began the run."""

    run_id: str
    method: Literal["systemd-run", "moonraker", "session"]
    pid: int
    unit: Optional[str]


class Pending(TypedDict):
    """The run the installed ``kflash-run`` unit is to run."""

    version: int
    run_id: str
    only_outdated: bool
    device: Optional[str]
    rollback: bool


class ErrorDetails(TypedDict):
    """What every kflash exception carries (``details``; also its attributes)."""

    device: Optional[str]
    step: Optional[str]
    command: Optional[str]
    exit_status: Optional[int]
    output_tail: Optional[str]
    hint: Optional[str]


class KatapultFlash(TypedDict):
    """``katapult_flash``'s result."""

    device: str
    bytes: int
    blocks: int
    block_size: int
    app_start: int
    mcu: str
    bootloader_version: Optional[str]
    firmware_version: Optional[str]
    pages: int
    completed: bool
    duration_s: float
    retries: int
    rate_bps: float


class KatapultStatus(TypedDict):
    """``katapult_status``'s result."""

    device: str
    mcu: str
    bootloader_version: Optional[str]
    proto_version: str
    app_start: int
    block_size: int


OnEvent = Callable[[Event], object]
