//! The flash run on a real host: where it runs, how its helper and its watchdog get out of
//! klipper's reach, its lock, and its record and progress.
//!
//! A flash run stops klipper. On a systemd host, stopping klipper.service (default
//! `KillMode=control-group`) kills every process of its cgroup, so whatever must outlive
//! the stop — the detached helper klippy's `[kflash]` starts, and the watchdog that starts
//! klipper again if the run's process is killed — must not be in it. Parts:
//! - `place`: which service's cgroup holds this process (and whether systemd runs at all).
//! - `detach`: the one way to start a process out of reach (`sudo -n systemd-run` unit,
//!   Moonraker's `kflash-run` unit, or a new session), used for the helper and the
//!   watchdog alike, refusing with the missing piece named when none can protect it.
//! - `helper`: starting the helper for a run and handing it its options.
//! - `lock`: one run at a time per state dir.
//! - `record`: the single run record and JSON-lines progress in `<state>/runs/`, written for
//!   every run (CLI or helper), read by `kflash status` and the klippy extra.
//! - `watchdog`: launching it (runner side) and being it (`watch`).
//!
//! Invariants: a run holds the lock from before its record exists until after its record
//! says how it ended; nothing here stops klipper, and every refusal happens before anything
//! is stopped.
//!
//! Thread-safety: see each part; `record::Run` is shared between the run's threads.

pub mod detach;
pub mod helper;
pub mod lock;
pub mod place;
pub mod record;
pub mod watchdog;

pub use detach::{Launcher, Refusal, Route};
pub use helper::{start_helper, take_pending, HelperRequest, HelperStarted, Pending, StartError};
pub use lock::{LockError, RunLock};
pub use place::Place;
pub use record::{Outcome, Record, RecordError, Run, RunOptions, RunState};
pub use watchdog::{watch, LiveWatchdog};

use crate::registry::StateDir;

/// Why a new run cannot start now, or `None`: a run holds the lock (or the watchdog of
/// an interrupted one, while it starts klipper), or the newest run's process still runs.
pub fn busy(state: &StateDir) -> Option<String> {
    let latest = record::latest(&state.runs_dir());
    if let Some(held) = RunLock::is_held(&state.lock_path()) {
        return Some(match latest {
            Some(run)
                if run.state == RunState::Interrupted
                    && run.watchdog == record::WatchdogState::Armed =>
            {
                format!(
                    "kflash's watchdog is starting klipper again after run {} was \
                     interrupted; try again in a moment",
                    run.run_id
                )
            }
            _ => held.to_string(),
        });
    }
    let latest = latest?;
    (latest.state == RunState::Running).then(|| {
        format!(
            "a flash run is in progress (run {}, pid {})",
            latest.run_id, latest.pid
        )
    })
}
