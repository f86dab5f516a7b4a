//! Verify: after the restart, wait until klippy is `ready` (the end of the outage: the
//! report's `downtime_s` and `startup_s`), then each flashed MCU must report the version
//! that was built. A board that verifies gets the image just flashed kept as its
//! last-known-good (`good/<key>/`): what `rollback` writes back.

use std::time::{Duration, Instant};

use super::stop_window::tenths;
use super::{emit, report, warn, Built, Deps, DeviceInfo, Report};
use crate::events::{Sink, Stage};
use crate::firmware::kept;
use crate::moonraker;
use crate::process::Cancel;
use crate::versions::VersionState;

/// The wait for klippy after the restart.
#[derive(Clone, Copy)]
pub(super) struct ReadyWait {
    /// When the stop was asked for: the outage's start.
    pub stopped_at: Instant,
    /// When the start command returned: klippy's start-up from there.
    pub start_returned: Instant,
    /// How long to wait for `ready`.
    pub timeout: Duration,
}

pub(super) fn verify(
    deps: &Deps,
    devices: &[DeviceInfo],
    built: &[(usize, Built)],
    report: &mut Report,
    wait: ReadyWait,
    cancel: &Cancel,
    sink: &Sink,
) {
    let flashed: Vec<&(usize, Built)> = built
        .iter()
        .filter(|(i, _)| report.devices[*i].flash == "pass")
        .collect();
    let another_failed = report.devices.iter().any(|d| d.flash == "fail");
    let ready = wait_ready(deps, report, &wait, another_failed, cancel, sink);
    if cancel.is_cancelled() {
        // Interrupted while waiting: klipper runs; nothing was verified.
        for (i, _) in flashed {
            let r = &mut report.devices[*i];
            r.verify = "skip".into();
            r.hint = Some(
                "Not verified: the run was interrupted while klippy started. To see the \
                 versions:\n  kflash status"
                    .into(),
            );
        }
        report.cancelled = true;
        return;
    }
    if flashed.is_empty() {
        return;
    }
    let versions = deps.klippy.mcu_versions();
    for (i, b) in flashed {
        let r = &mut report.devices[*i];
        let after = versions
            .as_ref()
            .ok()
            .and_then(|v| v.get(&devices[*i].mcu_section))
            .filter(|v| !v.is_empty())
            .cloned();
        r.version_after.clone_from(&after);
        match (&after, &ready, &versions) {
            (Some(v), _, _) if (deps.compare)(v, &b.version) == VersionState::Current => {
                r.verify = "pass".into();
            }
            (Some(v), _, _) => {
                r.verify = "fail".into();
                r.error = Some(format!(
                    "the MCU reports {v}, but {} was flashed",
                    b.version
                ));
                r.hint.get_or_insert_with(|| {
                    "run FIRMWARE_RESTART, then `kflash status`; flash again if it persists".into()
                });
            }
            (None, Err(e), _) | (None, Ok(()), Err(e)) if another_failed => {
                r.verify = "skip".into();
                r.hint = Some(format!(
                    "not verified: klippy is not ready ({e}), most likely because another \
                     MCU failed to flash; run `kflash status` once that one is fixed"
                ));
            }
            (None, Err(e), _) | (None, Ok(()), Err(e)) => {
                r.verify = "fail".into();
                r.error = Some(format!("cannot read the MCU version after restart: {e}"));
            }
            (None, Ok(()), Ok(_)) => {
                r.verify = "fail".into();
                r.error = Some("klippy is ready but this MCU reports no version".into());
            }
        }
        if r.verify == "skip" {
            warn(
                sink,
                Stage::Verify,
                Some(&r.key),
                r.hint.clone().unwrap_or_default(),
            );
        } else if r.verify == "fail" {
            warn(
                sink,
                Stage::Verify,
                Some(&r.key),
                r.error.clone().unwrap_or_default(),
            );
        } else {
            emit(sink, Stage::Verify, Some(&r.key), "verified");
            keep_good(deps, &devices[*i].key, b, sink);
        }
    }
}

/// Wait until klippy is `ready`: the end of the outage, recorded in the report.
fn wait_ready(
    deps: &Deps,
    report: &mut Report,
    wait: &ReadyWait,
    another_failed: bool,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<(), moonraker::Error> {
    // A board that failed to flash usually keeps klippy from getting ready: do not wait
    // the full time for it, and do not blame the boards that did flash.
    let ready_timeout = if another_failed {
        wait.timeout.min(Duration::from_secs(10))
    } else {
        wait.timeout
    };
    emit(sink, Stage::Verify, None, "waiting for klippy to be ready");
    let ready = deps.klippy.wait_ready(ready_timeout, cancel);
    let svc = &mut report.service;
    svc.ready = ready.is_ok();
    svc.startup_s = Some(tenths(wait.start_returned.elapsed()));
    svc.downtime_s = tenths(wait.stopped_at.elapsed());
    match &ready {
        Ok(()) => emit(
            sink,
            Stage::Verify,
            None,
            format!("klippy is ready, {:.1} s after the stop", svc.downtime_s),
        ),
        Err(e) => warn(
            sink,
            Stage::Verify,
            None,
            format!("klippy is not ready: {e}"),
        ),
    }
    ready
}

/// The image just verified on a board becomes its last-known-good (best effort).
fn keep_good(deps: &Deps, key: &str, built: &Built, sink: &Sink) {
    let dir = deps.state.good_dir(key);
    if built.image.starts_with(&dir) {
        return; // a rollback: it is the last-known-good already
    }
    if let Err(e) = kept::keep(&built.image, &dir, &report::utc_now()) {
        warn(
            sink,
            Stage::Verify,
            Some(key),
            format!(
                "could not keep {} as its last-known-good image in {}: {e}",
                built.image.display(),
                dir.display()
            ),
        );
    }
}
