//! Flash-all: plan -> pre-flight -> build all -> ONE stop window -> restart once ->
//! verify -> report.
//!
//! Owns the order of a run and its invariants (DESIGN.md "Flash-all"):
//! - `plan` has no side effects: it reads the registry, configs, the device tree and
//!   Moonraker, and writes nothing.
//! - Nothing is stopped when pre-flight refuses (printing/paused, lock held, no service
//!   control, Moonraker unreachable without `yes`) or when every build fails; devices whose
//!   build failed are reported failed and the ones that built are still flashed.
//! - The service is stopped at most once and restarted exactly once on every path out of
//!   the stop window (the `Stopped` guard restarts on drop: errors, panics, cancel).
//! - Devices are flashed in safe order: CAN nodes, USB/UART boards, USB-CAN bridges, the
//!   linux-process MCU. A failing device never stops the others.
//! - Cancellation is checked between steps and passed into every command; cancelled inside
//!   the stop window => restart, report, `Error::Cancelled` carrying the report.
//!
//! Everything outside is reached through the traits in `Deps` (dependency injection), so
//! the whole run is unit-testable with recording fakes; `crate::commands::printer` builds the real ones.
//! Thread-safety: a run blocks its thread; `Deps` members are `Send + Sync`.

pub mod lock;
pub mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::events::{Event, Level, Sink, Stage};
use crate::flash::{self, Endpoint, Method};
use crate::process::Cancel;

pub use lock::{LockError, RunLock};
pub use report::{DeviceReport, Plan, PlanEntry, Report, ServiceReport};

/// How a device talks to the host: decides the flash order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    Can,
    Serial,
    UsbCanBridge,
    Linux,
}

impl Link {
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Can => "can",
            Link::Serial => "serial",
            Link::UsbCanBridge => "usb_can_bridge",
            Link::Linux => "linux",
        }
    }
}

/// What a device's config builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `CONFIG_MCU` ("linux" for the linux-process MCU).
    pub mcu: String,
    pub link: Link,
}

/// One registered device, with its config read.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub key: String,
    pub name: Option<String>,
    pub method: Method,
    pub endpoint: Endpoint,
    /// The printer.cfg section whose Moonraker status carries `mcu_version` (`mcu`,
    /// `mcu EBB36`).
    pub mcu_section: String,
    pub config: PathBuf,
    /// The config's target, or why it is unusable (missing, invalid, wrong MCU).
    pub target: Result<Target, String>,
}

/// The result of building one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    /// `klipper.dict`'s version: what the MCU will report.
    pub version: String,
    pub out_dir: PathBuf,
    /// The image to flash.
    pub image: PathBuf,
    /// Nothing changed since the last build: not rebuilt.
    pub cached: bool,
}

/// Version relation of an MCU to the firmware that would be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Current,
    Outdated,
    Newer,
    Unknown,
}

impl Freshness {
    pub fn as_str(self) -> &'static str {
        match self {
            Freshness::Current => "current",
            Freshness::Outdated => "outdated",
            Freshness::Newer => "newer",
            Freshness::Unknown => "unknown",
        }
    }
}

/// The registry and the device tree.
pub trait Inventory: Send + Sync {
    /// Every registered device, configs read. Fails on an unreadable registry.
    fn devices(&self) -> Result<Vec<DeviceInfo>, Error>;
    /// Where the device is now (`Err` says why it cannot be found).
    fn resolve(&self, dev: &DeviceInfo) -> Result<String, String>;
    /// Forget cached device state (after the service stopped, ttys may have moved).
    fn rescan(&self);
}

/// Building firmware.
pub trait Firmware: Send + Sync {
    /// The version a build would have (cached build's dictionary if the cache is valid,
    /// else the source tree's version). No side effects.
    fn target_version(&self, dev: &DeviceInfo) -> Option<String>;
    /// The data dictionary a build would have, when known without building (a valid
    /// cached build). No side effects.
    fn target_dict(&self, _dev: &DeviceInfo) -> Option<serde_json::Value> {
        None
    }
    /// Build these devices (in parallel); one result per device, same order.
    fn build(
        &self,
        devs: &[DeviceInfo],
        cancel: &Cancel,
        sink: &Sink,
    ) -> Vec<Result<Built, String>>;
}

/// Klippy through Moonraker.
pub trait Printer: Send + Sync {
    /// `print_stats.state` (`standby`, `printing`, `paused`, ...); `Err` when unreachable.
    fn print_state(&self) -> Result<String, String>;
    /// `mcu_version` per section (`mcu`, `mcu EBB36`).
    fn mcu_versions(&self) -> Result<BTreeMap<String, String>, String>;
    /// Wait until klippy is `ready`.
    fn wait_ready(&self, timeout: Duration, cancel: &Cancel) -> Result<(), String>;
}

/// A stopped service. Dropping it without `restart` restarts the service (and only logs).
pub trait Stopped: Send {
    /// Start the service again; returns how long it was down.
    fn restart(self: Box<Self>) -> Result<Duration, String>;
}

/// The klipper service.
pub trait Service: Send + Sync {
    /// Check, without stopping anything, that the real stop/start path works.
    fn check(&self) -> Result<(), String>;
    /// Stop the service; the guard restarts it.
    fn stop(&self) -> Result<Box<dyn Stopped>, String>;
}

/// The watchdog outside the runner that restarts the service if the runner dies.
pub trait Watchdog: Send + Sync {
    fn arm(&self) -> Result<(), String>;
    fn disarm(&self);
}

/// Flashing one device (the real one is `flash::Flasher`).
pub trait Flash: Send + Sync {
    /// Before any downtime: can some method flash this device?
    fn check(&self, dev: &DeviceInfo) -> Result<(), String>;
    fn flash(
        &self,
        dev: &DeviceInfo,
        built: &Built,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<flash::Flashed, flash::Failure>;
}

/// Everything a run talks to.
#[derive(Clone)]
pub struct Deps {
    pub inventory: Arc<dyn Inventory>,
    pub firmware: Arc<dyn Firmware>,
    pub printer: Arc<dyn Printer>,
    pub service: Arc<dyn Service>,
    pub flasher: Arc<dyn Flash>,
    pub watchdog: Arc<dyn Watchdog>,
    /// `compare(mcu_version, target_version)`.
    pub compare: fn(&str, &str) -> Freshness,
    /// `<state>/lock`.
    pub lock_path: PathBuf,
    /// `<state>/runs`.
    pub runs_dir: PathBuf,
    /// `<state>/flashed`: the dictionary of the firmware last flashed to each device
    /// (`<key>.dict`), to tell a protocol change from a version-string-only one.
    pub flashed_dir: PathBuf,
    /// Pause between two devices in the stop window.
    pub stagger: Duration,
    /// How long to wait for klippy after the restart.
    pub ready_timeout: Duration,
}

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

/// Errors that end a run before (or instead of) a report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Registry(#[from] crate::registry::Error),
    #[error(
        "no device matches `{pattern}`; registered devices: {}",
        list(candidates)
    )]
    NoMatch {
        pattern: String,
        candidates: Vec<String>,
    },
    #[error("{0}")]
    Config(String),
    #[error("refused before stopping anything: {0}")]
    Refused(String),
    #[error("cancelled{}", if report.as_ref().is_some_and(|r| r.service.stopped) { " (klipper was restarted)" } else { " (nothing was stopped)" })]
    Cancelled { report: Option<Box<Report>> },
    #[error("{0}")]
    Io(String),
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

/// `*` and `?` glob match.
fn glob(pattern: &str, text: &str) -> bool {
    fn m(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some('*'), _) => m(&p[1..], t) || (!t.is_empty() && m(p, &t[1..])),
            (Some('?'), Some(_)) => m(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &t[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    m(&p, &t)
}

/// The devices `keys` selects, in registry order. Each pattern must match something.
pub fn select(all: Vec<DeviceInfo>, keys: Option<&[String]>) -> Result<Vec<DeviceInfo>, Error> {
    let Some(keys) = keys.filter(|k| !k.is_empty()) else {
        return Ok(all);
    };
    for pattern in keys {
        if !all.iter().any(|d| glob(pattern, &d.key)) {
            return Err(Error::NoMatch {
                pattern: pattern.clone(),
                candidates: all.iter().map(|d| d.key.clone()).collect(),
            });
        }
    }
    Ok(all
        .into_iter()
        .filter(|d| keys.iter().any(|p| glob(p, &d.key)))
        .collect())
}

/// Why an outdated device needs flashing: a protocol change (must flash) or only the
/// version string, when kflash knows what it flashed last and what it would build.
fn outdated_reason(deps: &Deps, dev: &DeviceInfo, before: Option<&str>) -> String {
    let flashed = std::fs::read(deps.flashed_dir.join(format!("{}.dict", dev.key)))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let last_matches = flashed
        .as_ref()
        .and_then(|d| d.get("version").and_then(serde_json::Value::as_str))
        .zip(before)
        .is_some_and(|(flashed, before)| (deps.compare)(before, flashed) == Freshness::Current);
    match (
        flashed.filter(|_| last_matches),
        deps.firmware.target_dict(dev),
    ) {
        (Some(old), Some(new)) => match crate::versions::compare_dicts(&old, &new) {
            crate::versions::DictChange::Protocol { detail } => {
                format!("outdated; protocol changed, must flash ({detail})")
            }
            crate::versions::DictChange::VersionOnly | crate::versions::DictChange::Identical => {
                "outdated; version string only (protocol unchanged)".into()
            }
        },
        _ => "outdated".into(),
    }
}

/// Keep the dictionary of what was just flashed to a device (best effort).
fn record_flashed(deps: &Deps, key: &str, built: &Built, sink: &Sink) {
    let dict = built.image.with_file_name("klipper.dict");
    let result = std::fs::read(&dict).and_then(|bytes| {
        std::fs::create_dir_all(&deps.flashed_dir)?;
        crate::registry::write_atomic(&deps.flashed_dir.join(format!("{key}.dict")), &bytes)
    });
    if let Err(e) = result {
        warn(
            sink,
            Stage::Flash,
            Some(key),
            format!(
                "could not keep the flashed dictionary {}: {e}",
                dict.display()
            ),
        );
    }
}

/// Compute the plan. No side effects.
pub fn plan(deps: &Deps, opts: &Options, sink: &Sink) -> Result<(Plan, Vec<DeviceInfo>), Error> {
    let devices = select(deps.inventory.devices()?, opts.keys.as_deref())?;
    emit(
        sink,
        Stage::Plan,
        None,
        format!("planning {} device(s)", devices.len()),
    );
    let print_state = deps.printer.print_state();
    let versions = match &print_state {
        Ok(_) => deps.printer.mcu_versions().ok(),
        Err(_) => None,
    };
    let moonraker_error = print_state.as_ref().err().cloned();
    let mut entries = Vec::new();
    for dev in &devices {
        let resolved = deps.inventory.resolve(dev);
        let version_target = match &dev.target {
            Ok(_) => deps.firmware.target_version(dev),
            Err(_) => None,
        };
        let version_before = versions
            .as_ref()
            .and_then(|v| v.get(&dev.mcu_section))
            .filter(|v| !v.is_empty())
            .cloned();
        let state = match (&version_before, &version_target) {
            (Some(before), Some(target)) => (deps.compare)(before, target),
            _ => Freshness::Unknown,
        };
        let (action, reason) = match (&dev.target, &resolved) {
            (Err(problem), _) | (Ok(_), Err(problem)) => ("error", problem.clone()),
            (Ok(_), Ok(_)) => match state {
                Freshness::Current if opts.only_outdated => {
                    ("skip", "already runs the target version".to_owned())
                }
                Freshness::Newer if opts.only_outdated => (
                    "skip",
                    "runs a newer version than this build (not downgrading)".to_owned(),
                ),
                Freshness::Current => ("flash", "current; flashing anyway (all selected)".into()),
                Freshness::Newer => (
                    "flash",
                    "WARNING: runs a newer version; this is a downgrade".into(),
                ),
                Freshness::Outdated => (
                    "flash",
                    outdated_reason(deps, dev, version_before.as_deref()),
                ),
                Freshness::Unknown if moonraker_error.is_some() => (
                    "flash",
                    "current version unknown (Moonraker unreachable)".into(),
                ),
                Freshness::Unknown if version_before.is_none() => (
                    "flash",
                    "current version unknown (MCU did not identify)".into(),
                ),
                Freshness::Unknown => ("flash", "version not comparable".into()),
            },
        };
        entries.push(PlanEntry {
            key: dev.key.clone(),
            name: dev.name.clone(),
            method: dev.method.as_str().into(),
            endpoint: dev.endpoint.describe(),
            resolved: resolved.ok(),
            mcu: dev.target.as_ref().ok().map(|t| t.mcu.clone()),
            interface: dev.target.as_ref().ok().map(|t| t.link.as_str().into()),
            config: dev.config.display().to_string(),
            version_before,
            version_target,
            state: state.as_str().into(),
            action: action.into(),
            reason,
        });
    }
    Ok((
        Plan {
            devices: entries,
            moonraker: moonraker_error.is_none(),
            moonraker_error,
            print_state: print_state.ok(),
        },
        devices,
    ))
}

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

fn stop_window(
    deps: &Deps,
    devices: &[DeviceInfo],
    built: &[(usize, Built)],
    report: &mut Report,
    cancel: &Cancel,
    sink: &Sink,
) {
    if let Err(e) = deps.watchdog.arm() {
        warn(sink, Stage::Stop, None, format!("watchdog not armed: {e}"));
    }
    emit(sink, Stage::Stop, None, "stopping klipper");
    let stopped_at = Instant::now();
    let guard = match deps.service.stop() {
        Ok(guard) => guard,
        Err(e) => {
            // A failed stop may have half-stopped it: make sure it runs.
            report.service.error = Some(format!("could not stop klipper: {e}"));
            for (i, _) in built {
                report.devices[*i].flash = "fail".into();
                report.devices[*i].error = Some("klipper could not be stopped".into());
            }
            deps.watchdog.disarm();
            return;
        }
    };
    report.service.stopped = true;
    report.service.stop_s = tenths(stopped_at.elapsed());
    // Everything below runs with the guard alive: any early exit or panic restarts.
    deps.inventory.rescan();
    let mut order: Vec<&(usize, Built)> = built.iter().collect();
    order.sort_by_key(|(i, _)| devices[*i].target.as_ref().map_or(Link::Serial, |t| t.link));
    let total = order.len();
    for (n, (i, b)) in order.into_iter().enumerate() {
        let dev = &devices[*i];
        if cancel.is_cancelled() {
            report.cancelled = true;
            report.devices[*i].reason = "cancelled before flashing".into();
            continue;
        }
        if n > 0 && !deps.stagger.is_zero() {
            std::thread::sleep(deps.stagger);
        }
        sink(
            &Event::info(
                Stage::Flash,
                Some(&dev.key),
                format!("flashing ({}/{total})", n + 1),
            )
            .with_fraction(n as f64 / total as f64),
        );
        let r = &mut report.devices[*i];
        let started = std::time::Instant::now();
        let result = deps.flasher.flash(dev, b, cancel, sink);
        r.flash_s = Some((started.elapsed().as_secs_f64() * 100.0).round() / 100.0);
        match result {
            Ok(done) => {
                record_flashed(deps, &dev.key, b, sink);
                r.flash = "pass".into();
                r.method = done.method.as_str().into();
                emit(sink, Stage::Flash, Some(&dev.key), "flashed");
            }
            Err(failure) => {
                if matches!(failure.error, flash::Error::Cancelled) {
                    report.cancelled = true;
                }
                r.flash = "fail".into();
                if let Some(last) = failure.tried.last() {
                    r.method = last.as_str().into();
                }
                r.error = Some(failure.error.to_string());
                r.hint = failure.hint;
                sink(
                    &Event::info(
                        Stage::Flash,
                        Some(&dev.key),
                        format!("flash failed: {}", failure.error),
                    )
                    .with_level(Level::Error),
                );
            }
        }
    }
    emit(sink, Stage::Restart, None, "starting klipper");
    let starting_at = Instant::now();
    let restarted = guard.restart();
    report.service.start_s = tenths(starting_at.elapsed());
    match restarted {
        Ok(_) => {
            report.service.restarted = true;
            deps.watchdog.disarm();
        }
        Err(e) => {
            // Leave the watchdog armed: it keeps trying after we are gone.
            report.service.error = Some(e.clone());
            sink(
                &Event::info(
                    Stage::Restart,
                    None,
                    format!("KLIPPER COULD NOT BE RESTARTED: {e}"),
                )
                .with_level(Level::Error),
            );
        }
    }
    report.service.downtime_s = tenths(stopped_at.elapsed());
}

/// Seconds rounded to a tenth, as reports show them.
fn tenths(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

fn verify(
    deps: &Deps,
    devices: &[DeviceInfo],
    built: &[(usize, Built)],
    report: &mut Report,
    ready_timeout: Duration,
    cancel: &Cancel,
    sink: &Sink,
) {
    let flashed: Vec<&(usize, Built)> = built
        .iter()
        .filter(|(i, _)| report.devices[*i].flash == "pass")
        .collect();
    if flashed.is_empty() {
        return;
    }
    // A board that failed to flash usually keeps klippy from getting ready: do not wait
    // the full time for it, and do not blame the boards that did flash.
    let another_failed = report.devices.iter().any(|d| d.flash == "fail");
    let ready_timeout = if another_failed {
        ready_timeout.min(Duration::from_secs(10))
    } else {
        ready_timeout
    };
    emit(sink, Stage::Verify, None, "waiting for klippy to be ready");
    let ready = deps.printer.wait_ready(ready_timeout, cancel);
    let versions = deps.printer.mcu_versions();
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
            (Some(v), _, _) if (deps.compare)(v, &b.version) == Freshness::Current => {
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
        }
    }
}

/// The real flasher behind the pipeline's `Flash` port.
impl Flash for flash::Flasher {
    fn check(&self, dev: &DeviceInfo) -> Result<(), String> {
        let mcu = dev.target.as_ref().map_or("", |t| t.mcu.as_str());
        let job = flash::Job {
            key: &dev.key,
            method: dev.method,
            endpoint: &dev.endpoint,
            mcu,
            out_dir: std::path::Path::new(""),
            image: std::path::Path::new(""),
            kconfig: &dev.config,
        };
        flash::Flasher::check(self, &job)
    }
    fn flash(
        &self,
        dev: &DeviceInfo,
        built: &Built,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<flash::Flashed, flash::Failure> {
        let mcu = dev.target.as_ref().map_or("", |t| t.mcu.as_str());
        let job = flash::Job {
            key: &dev.key,
            method: dev.method,
            endpoint: &dev.endpoint,
            mcu,
            out_dir: &built.out_dir,
            image: &built.image,
            kconfig: &dev.config,
        };
        flash::Flasher::flash(self, &job, cancel, sink)
    }
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

#[cfg(test)]
mod tests;
