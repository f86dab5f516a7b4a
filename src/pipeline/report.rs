//! The plan and the report: what a run will do and what it did, as the contract's JSON.
//!
//! Owns the serialisable shapes (`Plan`, `Report`), what `ok` means, and UTC timestamps.
//! (The run record that holds a report is `crate::flash_run::record`'s.)
//! Plain data: `Send + Sync`, no interior mutability.

use std::path::PathBuf;
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

/// The service part of the report: the outage the user lives through, and its parts.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct ServiceReport {
    pub stopped: bool,
    pub restarted: bool,
    /// The outage: from asking klipper to stop until klippy is `ready` again; when
    /// `ready` is false, until kflash stopped waiting (so at least this long).
    pub downtime_s: f64,
    /// The parts of the outage, in order. `stop_s` and `start_s` are the service
    /// manager's stop and start commands (the same for any tool).
    pub stop_s: f64,
    /// Flashing: from the confirmed stop until the start command (every device,
    /// re-scans, pauses between boards; devices flashed at once count once).
    pub flash_s: f64,
    pub start_s: f64,
    /// klippy start-up: from the start command's return until klippy is `ready`, or
    /// until kflash stopped waiting; `None` when kflash did not wait (not restarted,
    /// cancelled).
    pub startup_s: Option<f64>,
    /// klippy reported `ready` after the restart.
    pub ready: bool,
    /// The outage in words, for every front end to print as is (`None` when klipper
    /// was not stopped): "the printer was unavailable for 27.4 s (stop 1.8, flashing
    /// 1.9, start 0.4, klippy start-up 23.3)".
    pub outage: Option<String>,
    /// Set when stopping or restarting failed.
    pub error: Option<String>,
}

impl ServiceReport {
    /// The outage in words, from the numbers (`None` when klipper was not stopped).
    fn describe_outage(&self) -> Option<String> {
        if !self.stopped {
            return None;
        }
        let total = self.downtime_s;
        let parts = format!(
            "stop {:.1}, flashing {:.1}, start {:.1}",
            self.stop_s, self.flash_s, self.start_s
        );
        Some(match (self.restarted, self.ready, self.startup_s) {
            (false, _, _) => format!(
                "KLIPPER IS NOT RUNNING: kflash stopped it and could not start it again \
                 ({total:.1} s after the stop: {parts})"
            ),
            (true, true, Some(up)) => format!(
                "the printer was unavailable for {total:.1} s ({parts}, klippy start-up \
                 {up:.1})"
            ),
            (true, _, Some(up)) => format!(
                "the printer was unavailable for at least {total:.1} s ({parts}; klippy was \
                 still not ready {up:.1} s after the start, when kflash stopped waiting)"
            ),
            (true, _, None) => format!(
                "the printer was unavailable for at least {total:.1} s ({parts}; kflash did \
                 not wait for klippy to be ready)"
            ),
        })
    }
}

/// Pre-warming klippy before the stop window (what klippy would otherwise do at its
/// next start because the host code changed).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PrewarmReport {
    /// `warmed` (something was built), `current` (nothing needed), `skipped` (not the
    /// klippy the service runs, or none found), `failed` (klippy will do it itself).
    pub state: String,
    /// The klippy directory that was pre-warmed (when one was found).
    pub klippy: Option<String>,
    /// What happened, in one line.
    pub message: String,
    pub seconds: f64,
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
    /// Pre-warming klippy while klipper kept running (`None`: not attempted, the
    /// setting `prewarm` is off or nothing was flashed).
    pub prewarm: Option<PrewarmReport>,
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
        self.service.outage = self.service.describe_outage();
        self.finished = utc_now();
    }
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

    fn service(restarted: bool, ready: bool, startup_s: Option<f64>) -> ServiceReport {
        ServiceReport {
            stopped: true,
            restarted,
            downtime_s: 27.4,
            stop_s: 1.8,
            flash_s: 1.9,
            start_s: 0.4,
            startup_s,
            ready,
            ..ServiceReport::default()
        }
    }

    #[test]
    fn the_outage_in_words_names_its_parts_and_says_when_kflash_gave_up() {
        assert_eq!(ServiceReport::default().describe_outage(), None);
        assert_eq!(
            service(true, true, Some(23.3)).describe_outage().unwrap(),
            "the printer was unavailable for 27.4 s (stop 1.8, flashing 1.9, start 0.4, \
             klippy start-up 23.3)"
        );
        let gave_up = service(true, false, Some(23.3)).describe_outage().unwrap();
        assert!(gave_up.contains("at least 27.4 s"), "{gave_up}");
        assert!(
            gave_up.contains("still not ready 23.3 s after the start"),
            "{gave_up}"
        );
        let not_waited = service(true, false, None).describe_outage().unwrap();
        assert!(not_waited.contains("did not wait"), "{not_waited}");
        let down = service(false, false, None).describe_outage().unwrap();
        assert!(down.starts_with("KLIPPER IS NOT RUNNING"), "{down}");
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }
}
