//! The run: `flash_all` (plan -> pre-flight -> build and pre-warm -> stop window ->
//! verify -> report) and `build` (build and pre-warm, no stop window).
//!
//! Nothing is stopped when pre-flight refuses or when every build fails; a cancelled run
//! is returned as `Error::Cancelled` carrying its report. The caller holds the run lock and
//! records the run (`crate::flash_run`).

use std::time::{Duration, Instant};

use super::report::{self, DeviceReport, PrewarmReport, Report, ServiceReport};
use super::stop_window::{stop_window, tenths};
use super::verify::{verify, ReadyWait};
use super::{
    emit, plan, select, warn, Built, Deps, DeviceInfo, Error, Options, Planned, Prewarm, Refusal,
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
pub fn flash_all(
    deps: &Deps,
    opts: &Options,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Report, Error> {
    let started = report::utc_now();
    let Planned {
        plan,
        devices,
        print_state,
    } = plan(deps, opts, sink)?;
    check_configs(&devices)?;
    let mut report = Report {
        ok: false,
        target_version: None,
        service: ServiceReport::default(),
        devices: plan.devices.iter().map(DeviceReport::from_plan).collect(),
        cancelled: false,
        prewarm: None,
        started,
        finished: String::new(),
        record: None,
    };
    for (r, entry) in report.devices.iter_mut().zip(&plan.devices) {
        if entry.action == "error" {
            r.flash = "fail".into();
            r.error = Some(entry.reason.clone());
            r.hint = Some("is the board plugged in and powered? `kflash devices list` shows the registered path".into());
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

    // Build everything selected, and pre-warm klippy next to it.
    let to_build: Vec<DeviceInfo> = selected.iter().map(|&i| devices[i].clone()).collect();
    let (results, prewarmed) = build_and_prewarm(deps, &to_build, cancel, sink);
    report.prewarm = prewarmed;
    if cancel.is_cancelled() {
        return Err(cancelled(report));
    }
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
                r.hint = Some(
                    "see the build output above; `kflash build KEY` rebuilds one device".into(),
                );
            }
        }
    }
    report.target_version = built.first().map(|(_, b)| b.version.clone());
    if built.is_empty() {
        warn(
            sink,
            Stage::Build,
            None,
            "no firmware built: klipper was not stopped",
        );
        return Ok(finish(report));
    }
    if cancel.is_cancelled() {
        return Err(cancelled(report));
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
    }
    Ok(finish(report))
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

fn finish(mut report: Report) -> Report {
    report.finish();
    report
}
