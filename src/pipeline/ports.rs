//! The pipeline's ports: what a run needs from the outside world, as traits, and `Deps`
//! that bundles them.
//!
//! Every port returns its domain's error type, never a string: the registry's, discovery's,
//! the firmware builder's, Moonraker's, the service's, the flasher's. The real
//! implementations live in `crate::commands::printer`; the tests use recording fakes.
//! Every member of `Deps` is `Send + Sync`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::events::Sink;
use crate::flash::{self, Endpoint, Method};
use crate::kconfig::{self, Interface, KConfig};
use crate::process::Cancel;
use crate::versions::VersionState;
use crate::{discovery, firmware, moonraker, prewarm, registry, service};

/// How a device talks to the host: decides the flash order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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

/// Why a device's config cannot build firmware for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// Missing, unreadable, or not a Klipper config.
    #[error(transparent)]
    Unreadable(#[from] kconfig::Error),
    #[error("{} builds {mcu} firmware, but the device is the linux-process MCU", config.display())]
    NotLinux { config: PathBuf, mcu: String },
    #[error("{} builds the linux-process MCU, but the device is a board", config.display())]
    Linux { config: PathBuf },
    #[error(
        "{} builds {mcu} firmware for USB/serial, but the device is on CAN (choose CAN bus as \
         the communication interface in menuconfig)",
        config.display()
    )]
    NotCan { config: PathBuf, mcu: String },
    #[error(
        "{} builds {mcu} firmware for CAN, but the device is registered by serial path",
        config.display()
    )]
    Can { config: PathBuf, mcu: String },
    /// The board is another chip than the config builds for (nothing is stopped).
    #[error(
        "{} builds {builds} firmware, but the board is a {board} ({from}); flashing it would \
         fail or brick it. Choose {board} as the processor model in menuconfig",
        config.display()
    )]
    WrongMcu {
        config: PathBuf,
        builds: String,
        board: String,
        /// Where the board's chip was read: `Moonraker's mcu_constants`, `the firmware
        /// last flashed`.
        from: &'static str,
    },
}

/// What a device's config builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `CONFIG_MCU` ("linux" for the linux-process MCU).
    pub mcu: String,
    pub link: Link,
}

impl Target {
    /// Read a device's config: its MCU and link, checked against how the device is reached.
    pub fn read(config: &Path, endpoint: &Endpoint) -> Result<Target, ConfigError> {
        let target = KConfig::load(config)?.target()?;
        let mcu = target.mcu;
        let link = if mcu == "linux" {
            Link::Linux
        } else {
            match target.interface {
                Interface::UsbCanBridge => Link::UsbCanBridge,
                Interface::Can => Link::Can,
                Interface::Usb | Interface::Serial | Interface::Unknown => Link::Serial,
            }
        };
        let config = config.to_path_buf();
        match (endpoint, link) {
            (Endpoint::Linux { .. }, Link::Linux)
            | (Endpoint::Can { .. }, Link::Can)
            | (Endpoint::Serial { .. }, Link::Serial | Link::UsbCanBridge) => {
                Ok(Target { mcu, link })
            }
            (Endpoint::Linux { .. }, _) => Err(ConfigError::NotLinux { config, mcu }),
            (_, Link::Linux) => Err(ConfigError::Linux { config }),
            (Endpoint::Can { .. }, _) => Err(ConfigError::NotCan { config, mcu }),
            (Endpoint::Serial { .. }, _) => Err(ConfigError::Can { config, mcu }),
        }
    }
}

/// One registered device, with its config read.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub key: String,
    pub name: Option<String>,
    pub method: Method,
    pub endpoint: Endpoint,
    /// UART baud rate (serial boards on a UART).
    pub baud: Option<u32>,
    /// The printer.cfg section whose Moonraker status carries `mcu_version` (`mcu`,
    /// `mcu EBB36`).
    pub mcu_section: String,
    pub config: PathBuf,
    /// The config's target, or why it is unusable (missing, invalid, wrong MCU).
    pub target: Result<Target, ConfigError>,
}

impl DeviceInfo {
    /// The flasher's job for this device and a build (`None`: only checking).
    pub fn job<'a>(&'a self, built: Option<&'a Built>) -> flash::Job<'a> {
        flash::Job {
            key: &self.key,
            method: self.method,
            endpoint: &self.endpoint,
            baud: self.baud,
            mcu: self.target.as_ref().map_or("", |t| t.mcu.as_str()),
            out_dir: built.map_or(Path::new(""), |b| b.out_dir.as_path()),
            image: built.map_or(Path::new(""), |b| b.image.as_path()),
            kconfig: &self.config,
        }
    }
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

/// A registered board found sitting in a bootloader instead of running its firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootloader {
    /// In Katapult, at this tty path: kflash can flash it there.
    Katapult { path: String },
    /// In its chip's ROM loader (STM32 DFU, RP2040 BOOTSEL): it needs the user.
    RomLoader(discovery::RomBoard),
}

impl Bootloader {
    /// `Katapult on <path>` / `STM32 DFU (0483:df11) at <sysfs path>`.
    pub fn describe(&self) -> String {
        match self {
            Bootloader::Katapult { path } => format!("Katapult on {path}"),
            Bootloader::RomLoader(rom) => rom.describe(),
        }
    }
}

/// The state of a network interface a CAN device is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterfaceState {
    Up,
    Down,
    Missing,
}

/// The registry and the device tree.
pub trait Inventory: Send + Sync {
    /// Every registered device, configs read. Fails on an unreadable registry.
    fn devices(&self) -> Result<Vec<DeviceInfo>, registry::Error>;
    /// Where the device is now.
    fn resolve(&self, dev: &DeviceInfo) -> Result<String, discovery::Error>;
    /// The bootloader a registered board sits in, found by its stable identity; `None`
    /// when it runs its firmware, is not found, or is not a serial board.
    fn bootloader(&self, _dev: &DeviceInfo) -> Option<Bootloader> {
        None
    }
    /// The board's stable identity as seen now (serial boards), to keep for later runs.
    fn identity(&self, _dev: &DeviceInfo) -> Option<discovery::Identity> {
        None
    }
    /// Whether a network interface (`can0`) exists and is up.
    fn interface(&self, _name: &str) -> InterfaceState {
        InterfaceState::Up
    }
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
    ) -> Vec<Result<Built, firmware::Error>>;
}

/// Klippy, asked through Moonraker.
pub trait Klippy: Send + Sync {
    /// `print_stats.state` (`standby`, `printing`, `paused`, ...).
    fn print_state(&self) -> Result<String, moonraker::Error>;
    /// `mcu_version` per section (`mcu`, `mcu EBB36`).
    fn mcu_versions(&self) -> Result<BTreeMap<String, String>, moonraker::Error>;
    /// The chip each MCU reports (`mcu_constants.MCU`) per section; empty when unknown.
    fn mcu_chips(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// Wait until klippy is `ready`.
    fn wait_ready(&self, timeout: Duration, cancel: &Cancel) -> Result<(), moonraker::Error>;
}

/// A stopped service. Dropping it without `restart` restarts the service (and only logs).
pub trait Stopped: Send {
    /// Start the service again; returns how long it was down.
    fn restart(self: Box<Self>) -> Result<Duration, service::Error>;
}

/// The klipper service.
pub trait Service: Send + Sync {
    /// Check, without stopping anything, that the real stop/start path works.
    fn check(&self) -> Result<(), service::Error>;
    /// Stop the service; the guard restarts it.
    fn stop(&self) -> Result<Box<dyn Stopped>, service::Error>;
}

/// The watchdog outside the runner that restarts the service if the runner dies.
pub trait Watchdog: Send + Sync {
    /// Pre-flight: start the watchdog where neither the runner's death nor the stop can
    /// reach it; an error refuses the run (nothing is stopped).
    fn launch(&self) -> Result<(), service::Error>;
    /// Right before the stop: from now on, if the run ends, the watchdog starts klipper.
    /// An error means klipper must not be stopped.
    fn arm(&self) -> Result<(), service::Error>;
    /// The service runs again: the watchdog stands down.
    fn disarm(&self);
}

/// Flashing one device (the real one is `flash::Flasher`).
pub trait Flash: Send + Sync {
    /// Before any downtime: can some method flash this device?
    fn check(&self, dev: &DeviceInfo) -> Result<(), flash::Error>;
    fn flash(
        &self,
        dev: &DeviceInfo,
        built: &Built,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<flash::Flashed, flash::Failure>;
    /// What to tell the user about a board that did not end up running Klipper (in
    /// `loader` when known).
    fn hint(
        &self,
        _dev: &DeviceInfo,
        _built: Option<&Built>,
        _loader: Option<discovery::RomLoader>,
    ) -> Option<String> {
        None
    }
    /// How long a board being written may take to finish after an interrupt.
    fn finish_timeout(&self) -> Duration {
        Duration::from_secs(300)
    }
}

/// Pre-warming klippy before the stop (the real one is `crate::prewarm` with the settings
/// and Moonraker's word on which klippy the service runs).
pub trait Prewarm: Send + Sync {
    /// The klippy the service runs, or why none is pre-warmed (one line).
    fn locate(&self) -> Result<prewarm::Klippy, prewarm::Skip>;
    /// Build what klippy would build at its next start, while klipper keeps running.
    fn warm(
        &self,
        klippy: &prewarm::Klippy,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<prewarm::Warmed, prewarm::Error>;
}

/// Everything a run talks to.
#[derive(Clone)]
pub struct Deps {
    pub inventory: Arc<dyn Inventory>,
    pub firmware: Arc<dyn Firmware>,
    pub klippy: Arc<dyn Klippy>,
    pub service: Arc<dyn Service>,
    pub flasher: Arc<dyn Flash>,
    pub watchdog: Arc<dyn Watchdog>,
    /// Pre-warming klippy during the build (`None`: the setting `prewarm` is off).
    pub prewarm: Option<Arc<dyn Prewarm>>,
    /// Flash boards that share nothing at the same time (setting `flash_parallel`).
    pub flash_parallel: bool,
    /// `compare(mcu_version, target_version)`.
    pub compare: fn(&str, &str) -> VersionState,
    /// The state directory (pending record, identities, last-known-good images).
    pub state: registry::StateDir,
    /// `<state>/flashed`: the dictionary of the firmware last flashed to each device
    /// (`<key>.dict`), to tell a protocol change from a version-string-only one.
    pub flashed_dir: PathBuf,
    /// Pause between two devices in the stop window.
    pub stagger: Duration,
    /// How long to wait for klippy after the restart.
    pub ready_timeout: Duration,
    /// Setting `auto_rollback`: reflash a board's last-known-good image when its new
    /// firmware fails verify.
    pub auto_rollback: bool,
}
