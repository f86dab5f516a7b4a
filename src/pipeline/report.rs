//! The plan and the report: what a run will do and what it did, as the contract's JSON.
//!
//! Owns the serialisable shapes (`Plan`, `Report`), what `ok` means, the run record
//! written atomically to `<state>/runs/<timestamp>.json`, and UTC timestamps.
//! Plain data: `Send + Sync`, no interior mutability.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One device in the plan.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlanEntry {
    pub key: String,
    pub name: Option<String>,
    pub method: String,
    /// The registered endpoint (serial path, `can0:uuid`, linux path).
    pub endpoint: String,
    /// Where the device is now, when it could be found.
    pub resolved: Option<String>,
    pub mcu: Option<String>,
    /// `can`, `serial`, `usb_can_bridge`, `linux`.
    pub interface: Option<String>,
    pub config: String,
    pub version_before: Option<String>,
    pub version_target: Option<String>,
    /// `current`, `outdated`, `newer`, `unknown`.
    pub state: String,
    /// `flash`, `skip` or `error` (config missing/invalid, device not found).
    pub action: String,
    pub reason: String,
    /// The bootloader the board sits in (`Katapult on ...`, `STM32 DFU ...`), found by its
    /// stable identity.
    pub bootloader: Option<String>,
    /// The chip the board reports (Moonraker's `mcu_constants.MCU`, else the firmware
    /// kflash last flashed to it).
    pub board_mcu: Option<String>,
    /// What to do about an `error`.
    pub hint: Option<String>,
}

/// The plan: per device what would happen and why. Computing it changes nothing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Plan {
    pub devices: Vec<PlanEntry>,
    pub moonraker: bool,
    /// Why Moonraker could not be asked (when it could not).
    pub moonraker_error: Option<String>,
    pub print_state: Option<String>,
}

/// The service part of the report.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct ServiceReport {
    pub stopped: bool,
    pub restarted: bool,
    /// From asking klipper to stop until it runs again (what the user lives through).
    pub downtime_s: f64,
    /// How long the service manager took to confirm the stop, and the start: part of the
    /// downtime, but the service manager's own latency (the same for any tool).
    pub stop_s: f64,
    pub start_s: f64,
    /// Set when stopping or restarting failed.
    pub error: Option<String>,
}

/// One device in the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceReport {
    pub key: String,
    pub method: String,
    pub action: String,
    pub reason: String,
    pub version_before: Option<String>,
    pub version_target: Option<String>,
    pub version_after: Option<String>,
    /// `pass`, `fail`, `cached`, `skip`.
    pub build: String,
    /// `pass`, `fail`, `skip`.
    pub flash: String,
    /// How long flashing took, including the wait for the board to come back (seconds).
    pub flash_s: Option<f64>,
    /// `pass`, `fail`, `skip`.
    pub verify: String,
    pub error: Option<String>,
    pub hint: Option<String>,
    /// Set when the automatic rollback ran for this device: what it did.
    pub rollback: Option<String>,
}

impl DeviceReport {
    /// A device nothing has happened to yet: every stage `skip`.
    pub(super) fn new(key: &str, method: &str, action: &str) -> Self {
        Self {
            key: key.to_owned(),
            method: method.to_owned(),
            action: action.to_owned(),
            reason: String::new(),
            version_before: None,
            version_target: None,
            version_after: None,
            build: "skip".into(),
            flash: "skip".into(),
            flash_s: None,
            verify: "skip".into(),
            error: None,
            hint: None,
            rollback: None,
        }
    }

    pub(super) fn from_plan(entry: &PlanEntry) -> Self {
        Self {
            reason: entry.reason.clone(),
            version_before: entry.version_before.clone(),
            version_target: entry.version_target.clone(),
            ..Self::new(&entry.key, &entry.method, &entry.action)
        }
    }
    /// Whether this device ended in a failure.
    pub fn failed(&self) -> bool {
        self.action == "error"
            || self.build == "fail"
            || self.flash == "fail"
            || self.verify == "fail"
    }
}

/// The report of a run (flash-all JSON of the contract, plus a few extras).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub ok: bool,
    pub target_version: Option<String>,
    pub service: ServiceReport,
    pub devices: Vec<DeviceReport>,
    pub cancelled: bool,
    pub started: String,
    pub finished: String,
    /// Where the run record was written.
    pub record: Option<PathBuf>,
    /// Boards an earlier, unfinished run left behind, found and finished (or not) before
    /// this run's plan.
    pub recovered: Vec<super::Recovered>,
}

impl Report {
    pub(super) fn finish(&mut self) {
        self.ok = !self.cancelled
            && !self.devices.iter().any(DeviceReport::failed)
            && (!self.service.stopped || self.service.restarted)
            && self.service.error.is_none();
        self.finished = utc_now();
    }
}

/// Write the run record atomically; returns its path.
pub(super) fn write_record(runs_dir: &Path, report: &Report) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(runs_dir)?;
    let stamp = report
        .started
        .replace([':', '-'], "")
        .replace('T', "-")
        .trim_end_matches('Z')
        .to_owned();
    let mut path = runs_dir.join(format!("{stamp}.json"));
    let mut n = 1;
    while path.exists() {
        path = runs_dir.join(format!("{stamp}-{n}.json"));
        n += 1;
    }
    let mut bytes = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    crate::registry::write_atomic(&path, &bytes)?;
    Ok(path)
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc(secs)
}

fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }
}
