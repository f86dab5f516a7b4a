//! The run: `flash_all` (recover what an earlier run left -> plan -> pre-flight -> build
//! and pre-warm -> stop window -> verify (and the automatic rollback) -> report), `build`
//! (build and pre-warm, no stop window) and, through `run_planned`, `rollback`.
//!
//! Nothing is stopped when pre-flight refuses or when every build fails; a cancelled run
//! is returned as `Error::Cancelled` carrying its report. The caller holds the run lock and
//! records the run (`crate::flash_run`).

use std::time::{Duration, Instant};

use super::report::{self, DeviceReport, PrewarmReport, Report, ServiceReport};
use super::stop_window::{stop_window, tenths};
use super::verify::{verify, ReadyWait};
use super::{
    emit, pending, plan, rollback, select, warn, Built, Deps, DeviceInfo, Error, InterfaceState,
    Options, Planned, Prewarm, Recovered, Refusal,
};
use crate::events::{Sink, Stage};
use crate::moonraker;
use crate::process::Cancel;

/// Build the selected devices (no stop window) and pre-warm klippy. One report entry per
/// device; when a build failed, `Error::Build` carries the first failure and every
/// entry.
pub fn build(
    deps: &Deps,
    keys: Option<&[String]>,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Vec<DeviceReport>, Error> {
    let devices = select(deps.inventory.devices()?, keys)?;
    check_configs(&devices)?;
    // klippy is prepared for the update too (nothing stops).
    let (results, _prewarmed) = build_and_prewarm(deps, &devices, cancel, sink);
    if cancel.is_cancelled() {
        return Err(Error::Cancelled { report: None });
    }
    let mut first_failure = None;
    let reports: Vec<DeviceReport> = devices
        .iter()
        .zip(results)
        .map(|(dev, result)| {
            let mut r = DeviceReport::new(&dev.key, dev.method.as_str(), "build");
            match result {
                Ok(b) => {
                    r.build = if b.cached { "cached" } else { "pass" }.into();
                    r.version_target = Some(b.version);
                }
                Err(e) => {
                    r.build = "fail".into();
                    r.error = Some(e.to_string());
                    first_failure.get_or_insert(e);
                }
            }
            r
        })
        .collect();
    match first_failure {
        None => Ok(reports),
        Some(source) => Err(Error::Build {
            source: Box::new(source),
            results: reports,
        }),
    }
}

/// Every selected device's config must build its firmware before anything starts.
fn check_configs(devices: &[DeviceInfo]) -> Result<(), Error> {
    for dev in devices {
        if let Err(source) = &dev.target {
            return Err(Error::Config {
                device: dev.key.clone(),
                source: source.clone(),
            });
        }
    }
    Ok(())
}

/// The whole run. Returns the report (also when devices failed or the restart failed:
/// see `commands::ExitStatus`); errors only when nothing was stopped, or when cancelled.
/// Boards an earlier run left behind (the pending record) are recovered first.
pub fn flash_all(
    deps: &Deps,
    opts: &Options,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Report, Error> {
    let run = Run::begin(deps, cancel, sink)?;
    let planned = plan(deps, opts, sink)?;
    run_planned(deps, opts, planned, Images::Build, run, cancel, sink)
}

/// Where a run's images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Images {
    /// Build every selected device (flash-all).
    Build,
    /// Each board's last-known-good image (rollback).
    LastKnownGood,
}

/// What a run carries from before its plan.
pub(super) struct Run {
    pub started: String,
    pub recovered: Vec<Recovered>,
}

impl Run {
    /// A run starts: when, and the boards an earlier run left behind, finished first.
    pub(super) fn begin(deps: &Deps, cancel: &Cancel, sink: &Sink) -> Result<Run, Error> {
        let started = report::utc_now();
        let recovered = recover_first(deps, cancel, sink)?;
        Ok(Run { started, recovered })
    }
}

/// A pending record means an earlier run left boards behind: finish them before anything
/// else. The caller holds the run lock: flash-all and rollback (`crate::flash_run::Run`),
/// or the watchdog after the runner died (`crate::flash_run::watch`).
pub fn recover_first(deps: &Deps, cancel: &Cancel, sink: &Sink) -> Result<Vec<Recovered>, Error> {
    if pending::load(&deps.state).is_none() {
        return Ok(Vec::new());
    }
    Ok(pending::recover(deps, cancel, sink))
}

/// The run after its plan: pre-flight, images, stop window, verify (and the automatic
/// rollback), report.
pub(super) fn run_planned(
    deps: &Deps,
    opts: &Options,
    planned: Planned,
    images: Images,
    run: Run,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Report, Error> {
    let Planned {
        plan,
        devices,
        print_state,
    } = planned;
    check_configs(&devices)?;
    let mut report = Report {
        ok: false,
        target_version: None,
        service: ServiceReport::default(),
        devices: plan.devices.iter().map(DeviceReport::from_plan).collect(),
        cancelled: false,
        prewarm: None,
        started: run.started,
        finished: String::new(),
        record: None,
        recovered: run.recovered,
    };
    for (r, entry) in report.devices.iter_mut().zip(&plan.devices) {
        if entry.action == "error" {
            r.flash = "fail".into();
            r.error = Some(entry.reason.clone());
            r.hint.clone_from(&entry.hint);
        }
    }
    let selected: Vec<usize> = (0..devices.len())
        .filter(|&i| plan.devices[i].action == "flash")
        .collect();
    if selected.is_empty() {
        emit(sink, Stage::Report, None, "nothing to do");
        return Ok(finish(report));
    }

    // Pre-flight: nothing is stopped if any of this refuses.
    preflight(deps, opts, print_state, &devices, &selected, sink)?;
    if cancel.is_cancelled() {
        return Err(Error::Cancelled { report: None });
    }

    let built = match images {
        Images::Build => build_selected(deps, &devices, &selected, &mut report, cancel, sink),
        Images::LastKnownGood => rollback::good_images(deps, &devices, &selected, &mut report),
    };
    if cancel.is_cancelled() {
        return Err(cancelled(report));
    }
    report.target_version = built.first().map(|(_, b)| b.version.clone());
    if built.is_empty() {
        warn(
            sink,
            Stage::Build,
            None,
            "no firmware to flash: klipper was not stopped",
        );
        return Ok(finish(report));
    }

    // The stop window.
    let stopped_at = stop_window(deps, &devices, &built, &mut report, cancel, sink);
    let start_returned = Instant::now();
    if report.cancelled {
        return Err(cancelled(report));
    }
    if let (true, Some(stopped_at)) = (report.service.restarted, stopped_at) {
        // Moonraker was unreachable before the run: do not wait long for it now.
        let timeout = if plan.moonraker {
            deps.ready_timeout
        } else {
            deps.ready_timeout.min(Duration::from_secs(2))
        };
        let wait = ReadyWait {
            stopped_at,
            start_returned,
            timeout,
        };
        verify(deps, &devices, &built, &mut report, wait, cancel, sink);
        if deps.auto_rollback && images == Images::Build && !report.cancelled {
            rollback::auto_rollback(deps, &devices, &built, &mut report, timeout, cancel, sink);
        }
        if report.cancelled {
            return Err(cancelled(report));
        }
    }
    Ok(finish(report))
}

/// Build every selected device (klippy pre-warmed next to it); the ones that built, with
/// their results.
fn build_selected(
    deps: &Deps,
    devices: &[DeviceInfo],
    selected: &[usize],
    report: &mut Report,
    cancel: &Cancel,
    sink: &Sink,
) -> Vec<(usize, Built)> {
    let to_build: Vec<DeviceInfo> = selected.iter().map(|&i| devices[i].clone()).collect();
    let (results, prewarmed) = build_and_prewarm(deps, &to_build, cancel, sink);
    report.prewarm = prewarmed;
    let mut built: Vec<(usize, Built)> = Vec::new();
    for (&i, result) in selected.iter().zip(results) {
        let r = &mut report.devices[i];
        match result {
            Ok(b) => {
                r.build = if b.cached { "cached" } else { "pass" }.into();
                r.version_target = Some(b.version.clone());
                built.push((i, b));
            }
            Err(e) => {
                r.build = "fail".into();
                r.error = Some(e.to_string());
                r.hint = Some(format!(
                    "See the build output above; to rebuild it alone:\n  kflash build {}",
                    r.key
                ));
            }
        }
    }
    built
}

/// Build the devices and, at the same time, pre-warm klippy (when the setting is on).
fn build_and_prewarm(
    deps: &Deps,
    to_build: &[DeviceInfo],
    cancel: &Cancel,
    sink: &Sink,
) -> (
    Vec<Result<Built, crate::firmware::Error>>,
    Option<PrewarmReport>,
) {
    std::thread::scope(|scope| {
        let prewarmed = deps
            .prewarm
            .as_ref()
            .map(|p| scope.spawn(|| prewarm(p.as_ref(), cancel, sink)));
        emit(
            sink,
            Stage::Build,
            None,
            format!("building {} firmware(s)", to_build.len()),
        );
        let results = deps.firmware.build(to_build, cancel, sink);
        let prewarmed = prewarmed.map(|handle| match handle.join() {
            Ok(report) => report,
            Err(payload) => std::panic::resume_unwind(payload),
        });
        (results, prewarmed)
    })
}

/// Pre-warm klippy (next to the build, klipper still running): its report, with one
/// line of progress for the outcome.
fn prewarm(port: &dyn Prewarm, cancel: &Cancel, sink: &Sink) -> PrewarmReport {
    let started = Instant::now();
    let located = port.locate();
    let (state, klippy, message) = match &located {
        Err(skip) => ("skipped", None, skip.to_string()),
        Ok(klippy) => {
            emit(
                sink,
                Stage::Prewarm,
                None,
                format!(
                    "pre-warming klippy at {} while klipper runs",
                    klippy.dir.display()
                ),
            );
            let dir = Some(klippy.dir.display().to_string());
            match port.warm(klippy, cancel, sink) {
                Ok(warmed) if warmed.built_anything() => ("warmed", dir, warmed.describe()),
                Ok(warmed) => ("current", dir, warmed.describe()),
                Err(e) => (
                    "failed",
                    dir,
                    format!("{e} (klippy will do it at its start)"),
                ),
            }
        }
    };
    let done = matches!(state, "warmed" | "current");
    let report = PrewarmReport {
        state: state.into(),
        klippy,
        message: if done {
            format!("klippy pre-warmed: {message}")
        } else {
            format!("klippy not pre-warmed: {message}")
        },
        seconds: tenths(started.elapsed()),
    };
    if done {
        emit(sink, Stage::Prewarm, None, report.message.clone());
    } else {
        warn(sink, Stage::Prewarm, None, report.message.clone());
    }
    report
}

/// End a cancelled run: the error carrying its report.
fn cancelled(mut report: Report) -> Error {
    report.cancelled = true;
    Error::Cancelled {
        report: Some(Box::new(finish(report))),
    }
}

fn preflight(
    deps: &Deps,
    opts: &Options,
    print_state: Result<String, moonraker::Error>,
    devices: &[DeviceInfo],
    selected: &[usize],
    sink: &Sink,
) -> Result<(), Error> {
    emit(sink, Stage::Preflight, None, "pre-flight checks");
    match print_state {
        Ok(state) if state == "printing" || state == "paused" => {
            return Err(Refusal::Printing { state }.into());
        }
        Err(why) if !opts.yes => return Err(Refusal::NoMoonraker(why).into()),
        Err(why) => warn(
            sink,
            Stage::Preflight,
            None,
            format!("Moonraker unreachable ({why}); proceeding because of --yes"),
        ),
        Ok(_) => {}
    }
    deps.service.check().map_err(Refusal::NoServiceControl)?;
    check_can_interfaces(deps, devices, selected)?;
    let unflashable: Vec<(String, crate::flash::Error)> = selected
        .iter()
        .filter_map(|&i| {
            let dev = &devices[i];
            deps.flasher.check(dev).err().map(|e| (dev.key.clone(), e))
        })
        .collect();
    if !unflashable.is_empty() {
        return Err(Error::CannotFlash { unflashable });
    }
    // Last: the most expensive check, and it leaves a process behind.
    deps.watchdog.launch().map_err(Refusal::NoWatchdog)?;
    Ok(())
}

/// Every selected CAN device's interface must exist and be up: a node behind a missing
/// or down interface cannot be flashed, and klippy could not reach it afterwards.
fn check_can_interfaces(
    deps: &Deps,
    devices: &[DeviceInfo],
    selected: &[usize],
) -> Result<(), Error> {
    for &i in selected {
        if let crate::flash::Endpoint::Can { interface, .. } = &devices[i].endpoint {
            let state = deps.inventory.interface(interface);
            if state != InterfaceState::Up {
                return Err(Refusal::CanInterface {
                    device: devices[i].key.clone(),
                    interface: interface.clone(),
                    missing: state == InterfaceState::Missing,
                }
                .into());
            }
        }
    }
    Ok(())
}

fn finish(mut report: Report) -> Report {
    report.finish();
    report
}
