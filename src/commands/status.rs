//! `kflash status`: klippy's print state, each device's current and target version, a
//! board sitting in its bootloader, and the last run (its record,
//! `crate::flash_run::record`). Reads only.

use serde::Serialize;

use super::{Context, Error};
use crate::flash_run::{record, RunState};
use crate::versions::VersionState;

/// One device in `kflash status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceStatus {
    pub key: String,
    pub mcu_section: String,
    /// What the MCU reports now.
    pub version: Option<String>,
    /// What kflash would build.
    pub target_version: Option<String>,
    /// `current`, `outdated`, `newer`, `unknown`.
    pub state: &'static str,
    /// Why the device's config cannot build its firmware.
    pub problem: Option<String>,
    /// The bootloader the board sits in (`Katapult on ...`, `STM32 DFU ...`), found by its
    /// stable identity; `kflash flash-all` flashes a board in Katapult first.
    pub bootloader: Option<String>,
}

/// The newest run record (`<state>/runs/<run id>.json`): running, finished, or
/// interrupted (its process went away) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastRun {
    pub run_id: String,
    pub state: RunState,
    pub ok: Option<bool>,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub cancelled: Option<bool>,
    pub interrupted: Option<String>,
}

/// `kflash status --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub state_dir: String,
    pub moonraker: bool,
    pub moonraker_error: Option<String>,
    pub print_state: Option<String>,
    pub devices: Vec<DeviceStatus>,
    pub last_run: Option<LastRun>,
}

impl Context {
    /// Klippy's state, each device's current and target version, and the last run.
    pub fn status(&self) -> Result<Status, Error> {
        let reg = self.registry()?;
        let deps = self.deps()?;
        let state = deps.klippy.print_state();
        let versions = deps.klippy.mcu_versions().unwrap_or_default();
        let devices = self
            .device_infos(&reg)
            .iter()
            .map(|d| {
                let version = versions.get(&d.mcu_section).cloned();
                let target_version = d
                    .target
                    .as_ref()
                    .ok()
                    .and_then(|_| deps.firmware.target_version(d));
                let state = match (&version, &target_version) {
                    (Some(b), Some(t)) => (deps.compare)(b, t),
                    _ => VersionState::Unknown,
                };
                DeviceStatus {
                    key: d.key.clone(),
                    mcu_section: d.mcu_section.clone(),
                    version,
                    target_version,
                    state: state.as_str(),
                    problem: d.target.as_ref().err().map(ToString::to_string),
                    bootloader: deps.inventory.bootloader(d).map(|b| b.describe()),
                }
            })
            .collect();
        Ok(Status {
            state_dir: self.state.root().display().to_string(),
            moonraker: state.is_ok(),
            moonraker_error: state.as_ref().err().map(ToString::to_string),
            print_state: state.ok(),
            devices,
            last_run: record::latest(&self.state.runs_dir()).map(|r| LastRun {
                cancelled: r
                    .report
                    .as_ref()
                    .and_then(|rep| rep.get("cancelled"))
                    .and_then(serde_json::Value::as_bool),
                run_id: r.run_id,
                state: r.state,
                ok: r.ok,
                started: Some(r.started),
                finished: r.finished,
                interrupted: r.interrupted,
            }),
        })
    }
}
