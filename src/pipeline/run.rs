//! The run: `flash_all` (plan -> pre-flight -> build -> stop window -> verify -> report)
//! and `build` (no stop window).
//!
//! Nothing is stopped when pre-flight refuses or when every build fails; a cancelled run
//! is recorded and returned as `Error::Cancelled` carrying its report.

use std::time::Duration;

use super::report::{self, DeviceReport, Plan, Report, ServiceReport};
use super::stop_window::stop_window;
use super::verify::verify;
use super::{
    emit, plan, select, warn, Built, Deps, DeviceInfo, Error, LockError, Options, RunLock,
};
use crate::events::{Sink, Stage};
use crate::process::Cancel;

/// Build the selected devices (no stop window). One report entry per device.
pub fn build(
    deps: &Deps,
    keys: Option<&[String]>,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Vec<DeviceReport>, Error> {
    let devices = select(deps.inventory.devices()?, keys)?;
    if let Some(bad) = devices.iter().find(|d| d.target.is_err()) {
        return Err(config_error(bad));
    }
    let _lock = RunLock::acquire(&deps.lock_path).map_err(|e| Error::Refused(e.to_string()))?;
    let results = deps.firmware.build(&devices, cancel, sink);
    if cancel.is_cancelled() {
        return Err(Error::Cancelled { report: None });
    }
    Ok(devices
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
                    r.error = Some(e);
                }
            }
            r
        })
        .collect())
}

fn config_error(dev: &DeviceInfo) -> Error {
    Error::Config(format!(
        "device `{}`: {} (fix it with `kflash config {}`)",
        dev.key,
        dev.target.as_ref().err().map_or("", String::as_str),
        dev.key
    ))
}

/// The whole run. Returns the report (also when devices failed or the restart failed:
/// see `Report::exit_code`); errors only when nothing was stopped, or when cancelled.
pub fn flash_all(
    deps: &Deps,
    opts: &Options,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Report, Error> {
    let started = report::utc_now();
    let (plan, devices) = plan(deps, opts, sink)?;
    if let Some(bad) = devices.iter().find(|d| d.target.is_err()) {
        return Err(config_error(bad));
    }
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
        return Ok(finish(deps, report, sink));
    }

    // Pre-flight: nothing is stopped if any of this refuses.
    let _lock = preflight(deps, opts, &plan, &devices, &selected, sink)?;
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
        return Err(cancelled(deps, report, sink));
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
                r.error = Some(e);
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
        return Ok(finish(deps, report, sink));
    }
    if cancel.is_cancelled() {
        return Err(cancelled(deps, report, sink));
    }

    // The stop window.
    stop_window(deps, &devices, &built, &mut report, cancel, sink);
    if report.cancelled {
        return Err(cancelled(deps, report, sink));
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
    Ok(finish(deps, report, sink))
}

/// End a cancelled run: record it and return the error carrying its report.
fn cancelled(deps: &Deps, mut report: Report, sink: &Sink) -> Error {
    report.cancelled = true;
    Error::Cancelled {
        report: Some(Box::new(finish(deps, report, sink))),
    }
}

fn preflight(
    deps: &Deps,
    opts: &Options,
    plan: &Plan,
    devices: &[DeviceInfo],
    selected: &[usize],
    sink: &Sink,
) -> Result<RunLock, Error> {
    emit(sink, Stage::Preflight, None, "pre-flight checks");
    let lock = RunLock::acquire(&deps.lock_path).map_err(|e| match e {
        LockError::Held { .. } => Error::Refused(e.to_string()),
        LockError::Io { .. } => Error::Io(e.to_string()),
    })?;
    match (&plan.print_state, &plan.moonraker_error) {
        (Some(state), _) if state == "printing" || state == "paused" => {
            return Err(Error::Refused(format!(
                "the printer is {state}; flashing would stop klipper mid-print. Try again when the print is done"
            )));
        }
        (None, Some(why)) if !opts.yes => {
            return Err(Error::Refused(format!(
                "Moonraker is unreachable ({why}), so kflash cannot tell whether the printer is printing. \
                 Make sure it is idle and pass --yes to proceed anyway"
            )));
        }
        (None, Some(why)) => warn(
            sink,
            Stage::Preflight,
            None,
            format!("Moonraker unreachable ({why}); proceeding because of --yes"),
        ),
        _ => {}
    }
    deps.service
        .check()
        .map_err(|e| Error::Refused(format!("cannot control the klipper service: {e}")))?;
    let mut missing = Vec::new();
    for &i in selected {
        if let Err(e) = deps.flasher.check(&devices[i]) {
            missing.push(format!("{}: {e}", devices[i].key));
        }
    }
    if !missing.is_empty() {
        return Err(Error::Config(format!(
            "cannot flash: {}",
            missing.join("; ")
        )));
    }
    Ok(lock)
}

fn finish(deps: &Deps, mut report: Report, sink: &Sink) -> Report {
    report.finish();
    match report::write_record(&deps.runs_dir, &report) {
        Ok(path) => report.record = Some(path),
        Err(e) => warn(
            sink,
            Stage::Report,
            None,
            format!("could not write the run record: {e}"),
        ),
    }
    report
}
