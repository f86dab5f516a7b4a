//! Flash-all: plan -> pre-flight -> build all -> ONE stop window -> restart once ->
//! verify -> report.
//!
//! Owns the order of a run and its invariants (DESIGN.md "Flash-all"):
//! - `plan` has no side effects: it reads the registry, configs, the device tree and
//!   Moonraker, and writes nothing.
//! - Nothing is stopped when pre-flight refuses (printing/paused, no service control,
//!   Moonraker unreachable without `yes`, no watchdog) or when every build fails; devices whose
//!   build failed are reported failed and the ones that built are still flashed.
//! - The service is stopped at most once and restarted exactly once on every path out of
//!   the stop window (the `Stopped` guard restarts on drop: errors, panics, cancel).
//! - Devices are flashed in safe order: CAN nodes, USB/UART boards, USB-CAN bridges, the
//!   linux-process MCU; with `flash_parallel`, groups that share nothing flash at the
//!   same time and keep that order inside (`flash_order`). A failing device never stops
//!   the others.
//! - klippy is pre-warmed (`crate::prewarm`) next to the build, before the stop; a
//!   failed pre-warm is one warning, never the end of a run.
//! - Downtime is the outage the user lives: from the stop until klippy is `ready` again
//!   (or until kflash stopped waiting, and the report says so), with its parts.
//! - Cancellation is checked between steps and passed into every command; cancelled inside
//!   the stop window => the board being written is finished (a second cancel abandons
//!   it), the rest skipped, restart, report, `Error::Cancelled` carrying the report.
//! - Before the stop, the pending record (`pending`) holds each board's image and stable
//!   identity; a run that did not finish is recovered first by the next one (and by the
//!   watchdog through `commands::Context::recover`).
//! - A board that verifies keeps its image as last-known-good (`rollback` writes it back).
//!
//! Everything outside is reached through the traits in `Deps` (dependency injection), so
//! the whole run is unit-testable with recording fakes; `crate::commands::printer` builds
//! the real ones. The run lock and the run record belong to the caller
//! (`crate::flash_run`): a run is locked and recorded around the pipeline.
//! Thread-safety: a run blocks its thread; `Deps` members are `Send + Sync`.

mod finish;
mod flash_order;
pub mod pending;
mod plan;
mod ports;
pub mod report;
mod rollback;
mod run;
mod stop_window;
mod verify;

use crate::events::{Event, Level, Sink, Stage};
use crate::{firmware, flash, moonraker, registry, service};

pub use crate::flash_run::{LockError, RunLock};
pub use pending::{recover, Recovered};
pub use plan::{plan, select, Planned};
pub use ports::{
    Bootloader, Built, ConfigError, Deps, DeviceInfo, Firmware, Flash, InterfaceState, Inventory,
    Klippy, Link, Prewarm, Service, Stopped, Target, Watchdog,
};
pub use report::{DeviceReport, Plan, PlanEntry, PrewarmReport, Report, ServiceReport};
pub use rollback::rollback;
pub use run::{build, flash_all, recover_first};

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Device keys or glob patterns (`*`, `?`); `None` = every device.
    pub keys: Option<Vec<String>>,
    /// Skip devices whose MCU already runs the target version (or a newer one).
    pub only_outdated: bool,
    /// Proceed without Moonraker (the print state cannot be checked).
    pub yes: bool,
}

/// Errors that end a run before (or instead of) a report. Every variant keeps the
/// domain error that caused it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(
        "no device matches `{pattern}`; registered devices: {}",
        list(candidates)
    )]
    NoMatch {
        pattern: String,
        candidates: Vec<String>,
    },
    /// A selected device's config cannot build its firmware (nothing was stopped).
    #[error("device `{device}`: {source} (fix it with `kflash config {device}`)")]
    Config {
        device: String,
        #[source]
        source: ConfigError,
    },
    /// No method can flash these devices (no flash tool, no Klipper tree).
    #[error("cannot flash: {}", unflashable.iter().map(|(k, e)| format!("{k}: {e}")).collect::<Vec<_>>().join("; "))]
    CannotFlash {
        unflashable: Vec<(String, flash::Error)>,
    },
    #[error("refused before stopping anything: {0}")]
    Refused(#[from] Refusal),
    /// The run lock could not be taken for another reason than another run holding it.
    #[error(transparent)]
    Lock(LockError),
    /// `build`: a device's firmware did not build (the first failure; `results` has all).
    #[error("{source}")]
    Build {
        #[source]
        source: Box<firmware::Error>,
        results: Vec<DeviceReport>,
    },
    #[error("cancelled{}", if report.as_ref().is_some_and(|r| r.service.stopped) { " (klipper was restarted)" } else { " (nothing was stopped)" })]
    Cancelled { report: Option<Box<Report>> },
}

/// Why pre-flight refused to stop klipper.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the printer is {state}; flashing would stop klipper mid-print. Try again when the \
         print is done"
    )]
    Printing { state: String },
    #[error(
        "Moonraker is unreachable ({0}), so kflash cannot tell whether the printer is \
         printing. Make sure it is idle and pass --yes to proceed anyway"
    )]
    NoMoonraker(moonraker::Error),
    /// Another kflash run holds the state dir's lock.
    #[error(transparent)]
    LockHeld(LockError),
    #[error("cannot control the klipper service: {0}")]
    NoServiceControl(service::Error),
    /// The watchdog that starts klipper again if kflash is killed could not be launched.
    #[error("no watchdog to start klipper again if kflash is killed: {0}")]
    NoWatchdog(service::Error),
    /// A selected CAN device's interface is missing or down.
    #[error(
        "`{device}` is reached through {interface}, which {}; bring it up first (e.g. \
         `sudo ip link set {interface} up type can bitrate 1000000`, with your bus's bitrate)",
        if *missing { "does not exist" } else { "is down" }
    )]
    CanInterface {
        device: String,
        interface: String,
        missing: bool,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}

fn emit(sink: &Sink, stage: Stage, device: Option<&str>, msg: impl Into<String>) {
    sink(&Event::info(stage, device, msg));
}

fn warn(sink: &Sink, stage: Stage, device: Option<&str>, msg: impl Into<String>) {
    sink(&Event::info(stage, device, msg).with_level(Level::Warning));
}

#[cfg(test)]
mod tests;
