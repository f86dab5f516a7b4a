//! The run: `flash_all` (plan -> pre-flight -> build -> stop window -> verify -> report)
//! and `build` (no stop window).
//!
//! Nothing is stopped when pre-flight refuses or when every build fails; a cancelled run
//! is returned as `Error::Cancelled` carrying its report. The caller holds the run lock and
//! records the run (`crate::flash_run`).

use std::time::Duration;

use super::report::{self, DeviceReport, Report, ServiceReport};
use super::stop_window::stop_window;
use super::verify::verify;
use super::{emit, plan, select, warn, Built, Deps, DeviceInfo, Error, Options, Planned, Refusal};
use crate::events::{Sink, Stage};
use crate::moonraker;
use crate::process::Cancel;

/// Build the selected devices (no stop window). One report entry per device; when a
/// build failed, `Error::Build` carries the first failure and every entry.
pub fn build(
    deps: &Deps,
    keys: Option<&[String]>,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Vec<DeviceReport>, Error> {
    let devices = select(deps.inventory.devices()?, keys)?;
    check_configs(&devices)?;
    let results = deps.firmware.build(&devices, cancel, sink);
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

    // Build everything selected.
    let to_build: Vec<DeviceInfo> = selected.iter().map(|&i| devices[i].clone()).collect();
    emit(
        sink,
        Stage::Build,
        None,
        format!("building {} firmware(s)", to_build.len()),
    );
    let results = deps.firmware.build(&to_build, cancel, sink);
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
    stop_window(deps, &devices, &built, &mut report, cancel, sink);
    if report.cancelled {
        return Err(cancelled(report));
    }
    if report.service.restarted {
        // Moonraker was unreachable before the run: do not wait long for it now.
        let ready_timeout = if plan.moonraker {
            deps.ready_timeout
        } else {
            deps.ready_timeout.min(Duration::from_secs(2))
        };
        verify(
            deps,
            &devices,
            &built,
            &mut report,
            ready_timeout,
            cancel,
            sink,
        );
    }
    Ok(finish(report))
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
