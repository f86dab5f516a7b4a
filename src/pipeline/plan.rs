//! The plan: which devices a run selects, and per device what it would do and why.
//!
//! No side effects: reads the registry, configs, the device tree and Moonraker, and
//! writes nothing. A board sitting in its bootloader is found by its stable identity and
//! said so; a config for another chip than the board reports (Moonraker's
//! `mcu_constants`, else the firmware last flashed) becomes a configuration error.

use std::collections::BTreeMap;

use super::{emit, Bootloader, ConfigError, Deps, DeviceInfo, Error, Options, Plan, PlanEntry};
use crate::discovery::glob_match;
use crate::events::{Sink, Stage};
use crate::moonraker;
use crate::versions::{self, DictChange, VersionState};

/// A plan and what it was made from: the selected devices and klippy's print state.
#[derive(Debug)]
pub struct Planned {
    pub plan: Plan,
    /// The selected devices, in registry order (the plan's order).
    pub devices: Vec<DeviceInfo>,
    /// `print_stats.state`, or why Moonraker could not be asked.
    pub print_state: Result<String, moonraker::Error>,
}

/// The devices `keys` selects, in registry order. Each pattern must match something.
pub fn select(all: Vec<DeviceInfo>, keys: Option<&[String]>) -> Result<Vec<DeviceInfo>, Error> {
    let Some(keys) = keys.filter(|k| !k.is_empty()) else {
        return Ok(all);
    };
    for pattern in keys {
        if !all.iter().any(|d| glob_match(pattern, &d.key)) {
            return Err(Error::NoMatch {
                pattern: pattern.clone(),
                candidates: all.iter().map(|d| d.key.clone()).collect(),
            });
        }
    }
    Ok(all
        .into_iter()
        .filter(|d| keys.iter().any(|p| glob_match(p, &d.key)))
        .collect())
}

/// Why an outdated device needs flashing: a protocol change (must flash) or only the
/// version string, when kflash knows what it flashed last and what it would build.
fn outdated_reason(deps: &Deps, dev: &DeviceInfo, before: Option<&str>) -> String {
    let flashed = flashed_dict(deps, &dev.key);
    let last_matches = flashed
        .as_ref()
        .and_then(|d| d.get("version").and_then(serde_json::Value::as_str))
        .zip(before)
        .is_some_and(|(flashed, before)| (deps.compare)(before, flashed) == VersionState::Current);
    match (
        flashed.filter(|_| last_matches),
        deps.firmware.target_dict(dev),
    ) {
        (Some(old), Some(new)) => match versions::compare_dicts(&old, &new) {
            DictChange::Protocol { detail } => {
                format!("outdated; protocol changed, must flash ({detail})")
            }
            DictChange::VersionOnly | DictChange::Identical => {
                "outdated; version string only (protocol unchanged)".into()
            }
        },
        _ => "outdated".into(),
    }
}

/// The dictionary of the firmware kflash last flashed to a device.
fn flashed_dict(deps: &Deps, key: &str) -> Option<serde_json::Value> {
    std::fs::read(deps.flashed_dir.join(format!("{key}.dict")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The chip the board is, and where that was read: Moonraker's `mcu_constants`, else the
/// firmware kflash last flashed to it.
fn board_mcu(
    deps: &Deps,
    dev: &DeviceInfo,
    chips: &BTreeMap<String, String>,
) -> Option<(String, &'static str)> {
    if let Some(chip) = chips.get(&dev.mcu_section).filter(|c| !c.is_empty()) {
        return Some((chip.clone(), "as klippy reports it"));
    }
    let dict = flashed_dict(deps, &dev.key)?;
    let chip = dict.get("config")?.get("MCU")?.as_str()?.to_owned();
    Some((chip, "as the firmware kflash last flashed to it says"))
}

/// A config for another chip than the board is: a configuration error before anything.
fn check_mcu(
    deps: &Deps,
    dev: &mut DeviceInfo,
    chips: &BTreeMap<String, String>,
) -> Option<String> {
    let (board, from) = board_mcu(deps, dev, chips)?;
    let Ok(target) = &dev.target else {
        return Some(board);
    };
    if target.mcu != board && target.mcu != "linux" {
        dev.target = Err(ConfigError::WrongMcu {
            config: dev.config.clone(),
            builds: target.mcu.clone(),
            board: board.clone(),
            from,
        });
    }
    Some(board)
}

/// What to do with a board that cannot build, sits in a bootloader, or was not found.
fn not_running(
    deps: &Deps,
    dev: &DeviceInfo,
    resolved: &Result<String, crate::discovery::Error>,
    bootloader: Option<&Bootloader>,
) -> (&'static str, String, Option<String>) {
    match (&dev.target, resolved, bootloader) {
        (Err(problem), _, _) => (
            "error",
            problem.to_string(),
            Some(format!("Fix its config:\n  kflash config {}", dev.key)),
        ),
        (Ok(_), _, Some(Bootloader::Katapult { path })) => (
            "flash",
            format!(
                "{} is in its bootloader (Katapult on {path}); flash-all flashes it first",
                dev.key
            ),
            None,
        ),
        (Ok(_), _, Some(Bootloader::RomLoader(rom))) => (
            "error",
            format!(
                "{} is in its bootloader ({}): kflash cannot flash it there",
                dev.key,
                rom.describe()
            ),
            deps.flasher.hint(dev, None, Some(rom.loader)),
        ),
        (Ok(_), Err(problem), None) => (
            "error",
            problem.to_string(),
            Some(crate::flash::unreached_hint(&dev.key)),
        ),
        (Ok(_), Ok(path), None) => ("flash", format!("found at {path}"), None),
    }
}

/// What to do with a board that runs its firmware, by its version state.
fn by_version(
    deps: &Deps,
    dev: &DeviceInfo,
    opts: &Options,
    state: VersionState,
    before: Option<&str>,
    moonraker_unreachable: bool,
) -> (&'static str, String) {
    match state {
        VersionState::Current if opts.only_outdated => {
            ("skip", "already runs the target version".to_owned())
        }
        VersionState::Newer if opts.only_outdated => (
            "skip",
            "runs a newer version than this build (not downgrading)".to_owned(),
        ),
        VersionState::Current => ("flash", "current; flashing anyway (all selected)".into()),
        VersionState::Newer => (
            "flash",
            "WARNING: runs a newer version; this is a downgrade".into(),
        ),
        VersionState::Outdated => ("flash", outdated_reason(deps, dev, before)),
        VersionState::Unknown if moonraker_unreachable => (
            "flash",
            "current version unknown (Moonraker unreachable)".into(),
        ),
        VersionState::Unknown if before.is_none() => (
            "flash",
            "current version unknown (MCU did not identify)".into(),
        ),
        VersionState::Unknown => ("flash", "version not comparable".into()),
    }
}

/// Compute the plan. No side effects.
pub fn plan(deps: &Deps, opts: &Options, sink: &Sink) -> Result<Planned, Error> {
    let mut devices = select(deps.inventory.devices()?, opts.keys.as_deref())?;
    emit(
        sink,
        Stage::Plan,
        None,
        format!("planning {} device(s)", devices.len()),
    );
    let print_state = deps.klippy.print_state();
    let versions = match &print_state {
        Ok(_) => deps.klippy.mcu_versions().ok(),
        Err(_) => None,
    };
    let chips = match &print_state {
        Ok(_) => deps.klippy.mcu_chips(),
        Err(_) => BTreeMap::new(),
    };
    let moonraker_error = print_state.as_ref().err().map(ToString::to_string);
    let mut entries = Vec::new();
    for dev in &mut devices {
        let board_mcu = check_mcu(deps, dev, &chips);
        let dev = &*dev;
        let resolved = deps.inventory.resolve(dev);
        let bootloader = match &dev.target {
            Ok(_) => deps.inventory.bootloader(dev),
            Err(_) => None,
        };
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
            _ => VersionState::Unknown,
        };
        let (action, reason, hint) = match (&dev.target, &resolved, &bootloader) {
            (Ok(_), Ok(_), None) => {
                let (action, reason) = by_version(
                    deps,
                    dev,
                    opts,
                    state,
                    version_before.as_deref(),
                    moonraker_error.is_some(),
                );
                (action, reason, None)
            }
            _ => not_running(deps, dev, &resolved, bootloader.as_ref()),
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
            bootloader: bootloader.as_ref().map(Bootloader::describe),
            board_mcu,
            hint,
        });
    }
    Ok(Planned {
        plan: Plan {
            devices: entries,
            moonraker: moonraker_error.is_none(),
            moonraker_error,
            print_state: print_state.as_ref().ok().cloned(),
        },
        devices,
        print_state,
    })
}
