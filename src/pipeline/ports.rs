//! The pipeline's ports: what a run needs from the outside world, as traits, and `Deps`
//! that bundles them.
//!
//! The real implementations live in `crate::commands::printer`; the tests use recording
//! fakes. Every member of `Deps` is `Send + Sync`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::Error;
use crate::events::Sink;
use crate::flash::{self, Endpoint, Method};
use crate::process::Cancel;

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
