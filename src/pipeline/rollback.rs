//! The way back: `rollback` flashes each selected board's last-known-good image (the one
//! last flashed to THAT board and verified there, kept by `verify` in `good/<key>/`) with
//! the same pre-flight, stop window, verify and report as flash-all; `auto_rollback`
//! does it after a flash-all for the boards whose new firmware failed verify (setting
//! `auto_rollback`), in a second stop window, and the report says so per device.
//!
//! Never `builds/<key>/firmware/previous`: that is the last different successful build,
//! which may never have been on the board (and may be built for another offset).
//!
//! Thread-safety: like the run, blocks its thread.

use std::time::{Duration, Instant};

use super::report::{Report, ServiceReport};
use super::run::{run_planned, Images, Run};
use super::stop_window::stop_window;
use super::verify::{verify, ReadyWait};
use super::{plan, warn, Built, Deps, DeviceInfo, Error, Options};
use crate::events::{Sink, Stage};
use crate::firmware::kept::{self, KeptImage};
use crate::process::Cancel;
use crate::versions::VersionState;

/// The reason a board has no way back.
const NO_GOOD_IMAGE: &str =
    "no last-known-good image: kflash keeps one when a flash is verified on the board";

fn as_built(good: KeptImage) -> Built {
    Built {
        version: good.version,
        out_dir: good
            .image
            .parent()
            .map_or_else(Default::default, ToOwned::to_owned),
        image: good.image,
        cached: true,
    }
}

/// `kflash rollback [KEY...]`: flash each selected board's last-known-good image inside
/// one stop window, restart, verify, report.
pub fn rollback(
    deps: &Deps,
    opts: &Options,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Report, Error> {
    let run = Run::begin(deps, cancel, sink)?;
    let opts = Options {
        only_outdated: false,
        ..opts.clone()
    };
    let mut planned = plan(deps, &opts, sink)?;
    let explicit = opts.keys.as_ref().is_some_and(|k| !k.is_empty());
    for (entry, dev) in planned.plan.devices.iter_mut().zip(&planned.devices) {
        if entry.action == "error" {
            continue;
        }
        if let Some(good) = kept::kept(&deps.state.good_dir(&dev.key)) {
            entry.action = "flash".into();
            entry.state = match &entry.version_before {
                Some(before) => (deps.compare)(before, &good.version),
                None => VersionState::Unknown,
            }
            .as_str()
            .into();
            entry.reason = format!(
                "roll back to {} (verified on it {})",
                good.version, good.recorded
            );
            entry.version_target = Some(good.version);
        } else {
            entry.action = if explicit { "error" } else { "skip" }.into();
            entry.reason = NO_GOOD_IMAGE.into();
            entry.version_target = None;
        }
    }
    run_planned(
        deps,
        &opts,
        planned,
        Images::LastKnownGood,
        run,
        cancel,
        sink,
    )
}

/// The selected boards' last-known-good images (a board without one fails).
pub(super) fn good_images(
    deps: &Deps,
    devices: &[DeviceInfo],
    selected: &[usize],
    report: &mut Report,
) -> Vec<(usize, Built)> {
    let mut out = Vec::new();
    for &i in selected {
        let r = &mut report.devices[i];
        if let Some(good) = kept::kept(&deps.state.good_dir(&devices[i].key)) {
            r.version_target = Some(good.version.clone());
            out.push((i, as_built(good)));
        } else {
            r.flash = "fail".into();
            r.error = Some(NO_GOOD_IMAGE.into());
        }
    }
    out
}

/// After verify: boards whose new firmware failed verify get their last-known-good image
/// back in a second stop window (setting `auto_rollback`); the report says what happened.
pub(super) fn auto_rollback(
    deps: &Deps,
    devices: &[DeviceInfo],
    built: &[(usize, Built)],
    report: &mut Report,
    timeout: Duration,
    cancel: &Cancel,
    sink: &Sink,
) {
    let mut back: Vec<(usize, Built)> = Vec::new();
    for (i, b) in built {
        let r = &mut report.devices[*i];
        if r.flash != "pass" || r.verify != "fail" {
            continue;
        }
        match kept::kept(&deps.state.good_dir(&devices[*i].key)) {
            Some(good) if good.version != b.version => back.push((*i, as_built(good))),
            Some(_) => {
                r.rollback =
                    Some("not rolled back: its last-known-good image is this same version".into());
            }
            None => r.rollback = Some(format!("not rolled back: {NO_GOOD_IMAGE}")),
        }
    }
    if back.is_empty() || cancel.is_cancelled() {
        return;
    }
    for (i, good) in &back {
        warn(
            sink,
            Stage::Verify,
            Some(&report.devices[*i].key),
            format!(
                "verify failed: rolling back to its last-known-good firmware {} (auto_rollback)",
                good.version
            ),
        );
    }
    let mut second = Report {
        service: ServiceReport::default(),
        cancelled: false,
        ..report.clone()
    };
    for (i, _) in &back {
        let s = &mut second.devices[*i];
        s.flash = "skip".into();
        s.verify = "skip".into();
        s.error = None;
        s.hint = None;
        s.version_after = None;
    }
    let stopped_at = stop_window(deps, devices, &back, &mut second, cancel, sink);
    let start_returned = Instant::now();
    if let (true, false, Some(stopped_at)) =
        (second.service.restarted, second.cancelled, stopped_at)
    {
        let wait = ReadyWait {
            stopped_at,
            start_returned,
            timeout,
        };
        verify(deps, devices, &back, &mut second, wait, cancel, sink);
    }
    for (i, good) in &back {
        let (r, s) = (&mut report.devices[*i], &second.devices[*i]);
        let ok = s.flash == "pass" && s.verify == "pass";
        r.rollback = Some(if ok {
            format!("rolled back to {} (verified)", good.version)
        } else {
            format!(
                "rollback to {} failed: {}",
                good.version,
                s.error.as_deref().unwrap_or("not verified")
            )
        });
        if s.version_after.is_some() {
            r.version_after.clone_from(&s.version_after);
        }
        if !ok {
            r.hint.clone_from(&s.hint);
        }
    }
    let (svc, more) = (&mut report.service, &second.service);
    if more.stopped {
        let sum = |a: f64, b: f64| ((a + b) * 10.0).round() / 10.0;
        svc.downtime_s = sum(svc.downtime_s, more.downtime_s);
        svc.stop_s = sum(svc.stop_s, more.stop_s);
        svc.flash_s = sum(svc.flash_s, more.flash_s);
        svc.start_s = sum(svc.start_s, more.start_s);
        svc.startup_s = match (svc.startup_s, more.startup_s) {
            (Some(a), Some(b)) => Some(sum(a, b)),
            (a, b) => b.or(a),
        };
        svc.restarted = more.restarted;
        svc.ready = more.ready;
        if more.error.is_some() {
            svc.error.clone_from(&more.error);
        }
    }
    report.cancelled |= second.cancelled;
}
