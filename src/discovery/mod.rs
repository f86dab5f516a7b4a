//! Finding serial devices under the device root and sysfs, and finding them again after
//! they re-enumerate.
//!
//! Owns the view of `<dev_root>/serial/by-id`, `<dev_root>/serial/by-path` and
//! `<sys_root>/class/tty/*/device` (USB ids, serial, manufacturer). The roots come from
//! `$KFLASH_DEV_ROOT` (default `/dev`) and `$KFLASH_SYS_ROOT` (default `/sys`), so tests and
//! the virtual printer bench use sandboxes.
//!
//! Invariants: a port's `tty` is the file name of ONE `read_link` hop of its by-id/by-path
//! link (the bench's `ttyACM<n>` links are not followed further); every scan reads the file
//! system afresh (nothing is cached, a board may have re-enumerated since the last call).
//! `StableId` survives re-enumeration (bootloader entry changes by-id and the tty number,
//! not by-path nor the USB serial number).
//!
//! Thread-safety: stateless apart from the roots; every function may be called from any
//! thread.

mod glob;

pub use glob::{glob_match, has_wildcard};

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::process::Cancel;

/// How often `wait_for` looks for the device.
pub const POLL: Duration = Duration::from_millis(50);

/// Errors finding a device. Each lists what is present, so the user can correct a pattern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no serial device matches {pattern:?}; present: {present}")]
    NotFound { pattern: String, present: String },
    #[error("{pattern:?} matches several devices, use a more specific one: {candidates}")]
    Ambiguous { pattern: String, candidates: String },
    #[error("device {id} did not appear within {after:?}; present: {present}")]
    Timeout {
        id: String,
        after: Duration,
        present: String,
    },
    #[error("stopped while waiting for device {id}")]
    Cancelled { id: String },
}

/// The device root (`$KFLASH_DEV_ROOT`, default `/dev`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevRoot(pub PathBuf);

/// The sysfs root (`$KFLASH_SYS_ROOT`, default `/sys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysRoot(pub PathBuf);

fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

impl DevRoot {
    /// `$KFLASH_DEV_ROOT`, default `/dev`.
    pub fn from_env() -> DevRoot {
        DevRoot(env_path("KFLASH_DEV_ROOT", "/dev"))
    }
    /// `<root>/serial/by-id`.
    pub fn by_id_dir(&self) -> PathBuf {
        self.0.join("serial/by-id")
    }
    /// `<root>/serial/by-path`.
    pub fn by_path_dir(&self) -> PathBuf {
        self.0.join("serial/by-path")
    }
}

impl SysRoot {
    /// `$KFLASH_SYS_ROOT`, default `/sys`.
    pub fn from_env() -> SysRoot {
        SysRoot(env_path("KFLASH_SYS_ROOT", "/sys"))
    }
}

/// What sysfs says about the USB device behind a tty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbInfo {
    pub vendor: u16,
    pub product: u16,
    pub serial: Option<String>,
    pub manufacturer: Option<String>,
    pub product_name: Option<String>,
    /// The sysfs USB device's name (`1-1.2`): the port it is plugged into. A board in a
    /// ROM loader (no tty) shows up under the same name.
    pub port: Option<String>,
}

/// One serial device as seen now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialPort {
    /// `<dev_root>/serial/by-id/<name>`, when present.
    pub by_id: Option<PathBuf>,
    /// `<dev_root>/serial/by-path/<name>`, when present.
    pub by_path: Option<PathBuf>,
    /// The tty name (`ttyACM0`): one read_link hop of the link.
    pub tty: String,
    /// USB details from sysfs, when the tty is a USB device.
    pub usb: Option<UsbInfo>,
}

fn file_name(path: &Path) -> Option<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}

impl SerialPort {
    /// The path to open: by-id, else by-path, else `<dev_root>/<tty>` is the caller's job.
    pub fn path(&self) -> Option<&Path> {
        self.by_id.as_deref().or(self.by_path.as_deref())
    }

    /// The by-id link's file name.
    pub fn by_id_name(&self) -> Option<String> {
        self.by_id.as_deref().and_then(file_name)
    }

    /// The by-path link's file name.
    pub fn by_path_name(&self) -> Option<String> {
        self.by_path.as_deref().and_then(file_name)
    }

    /// The USB serial number: from sysfs, else from a by-id name
    /// `usb-<maker>_<product>_<serial>-ifNN`.
    pub fn usb_serial(&self) -> Option<String> {
        if let Some(serial) = self.usb.as_ref().and_then(|u| u.serial.clone()) {
            return Some(serial);
        }
        let name = self.by_id_name()?;
        let body = name.strip_prefix("usb-")?;
        let body = match body.rfind("-if") {
            Some(i) => &body[..i],
            None => body,
        };
        let (_, serial) = body.rsplit_once('_')?;
        (!serial.is_empty()).then(|| serial.to_string())
    }

    /// A short description for lists: the by-id name, else by-path, else the tty.
    pub fn label(&self) -> String {
        self.by_id_name()
            .or_else(|| self.by_path_name())
            .unwrap_or_else(|| self.tty.clone())
    }
}

/// An identity that survives re-enumeration (bootloader entry, reset).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StableId {
    /// The by-path link name (USB topology).
    ByPath(String),
    /// The USB serial number.
    UsbSerial(String),
    /// A plain tty name (UARTs: stable because they never re-enumerate).
    Tty(String),
}

impl StableId {
    /// The most stable identity of a port: by-path, else USB serial, else the tty.
    pub fn of(port: &SerialPort) -> StableId {
        if let Some(name) = port.by_path_name() {
            StableId::ByPath(name)
        } else if let Some(serial) = port.usb_serial() {
            StableId::UsbSerial(serial)
        } else {
            StableId::Tty(port.tty.clone())
        }
    }

    /// Whether `port` is the device this identity names.
    pub fn matches(&self, port: &SerialPort) -> bool {
        match self {
            StableId::ByPath(name) => port.by_path_name().as_deref() == Some(name),
            StableId::UsbSerial(serial) => port.usb_serial().as_deref() == Some(serial),
            StableId::Tty(tty) => port.tty == *tty,
        }
    }
}

impl fmt::Display for StableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StableId::ByPath(name) => write!(f, "by-path {name}"),
            StableId::UsbSerial(serial) => write!(f, "USB serial {serial}"),
            StableId::Tty(tty) => write!(f, "tty {tty}"),
        }
    }
}

/// Everything known about where a serial board is plugged in, kept between runs
/// (`<state>/identities.json`) so that a board is found again while it sits in a
/// bootloader, where its by-id name (`usb-katapult_...`) and tty differ from the ones
/// printer.cfg names, or in a ROM loader, where it has no tty at all.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Identity {
    /// The by-path link name (USB topology).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_path: Option<String>,
    /// The USB serial number (Klipper and Katapult report the same, from the chip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb_serial: Option<String>,
    /// The sysfs USB device name (`1-1.2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb_port: Option<String>,
    /// The tty of a board that is not on USB (a UART never re-enumerates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<String>,
}

impl Identity {
    /// What identifies `port` across re-enumeration.
    pub fn of(port: &SerialPort) -> Identity {
        let usb = port.usb.as_ref();
        Identity {
            by_path: port.by_path_name(),
            usb_serial: port.usb_serial(),
            usb_port: usb.and_then(|u| u.port.clone()),
            tty: usb.is_none().then(|| port.tty.clone()),
        }
    }

    /// Whether `port` is this board: by-path first, else the USB serial, else the tty of
    /// a non-USB board.
    pub fn matches(&self, port: &SerialPort) -> bool {
        if let (Some(a), Some(b)) = (&self.by_path, port.by_path_name()) {
            return *a == b;
        }
        if let (Some(a), Some(b)) = (&self.usb_serial, port.usb_serial()) {
            return *a == b;
        }
        match &self.tty {
            Some(tty) => port.usb.is_none() && port.tty == *tty,
            None => false,
        }
    }

    /// The `StableId` to wait for this board by.
    pub fn stable(&self) -> Option<StableId> {
        self.by_path
            .clone()
            .map(StableId::ByPath)
            .or_else(|| self.usb_serial.clone().map(StableId::UsbSerial))
            .or_else(|| self.tty.clone().map(StableId::Tty))
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self == &Identity::default()
    }
}

/// The by-id name the same board (same chip and serial) has in the other mode:
/// `.../usb-Klipper_<mcu>_<serial>-if00` <-> `.../usb-katapult_<mcu>_<serial>-if00`.
/// printer.cfg names the first; a board sitting in Katapult shows the second.
pub fn by_id_counterpart(path: &str) -> Option<String> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, path),
    };
    let other = if let Some(rest) = name.strip_prefix("usb-Klipper_") {
        format!("usb-katapult_{rest}")
    } else {
        format!("usb-Klipper_{}", name.strip_prefix("usb-katapult_")?)
    };
    Some(match dir {
        Some(dir) => format!("{dir}/{other}"),
        None => other,
    })
}

/// The state of a network interface (`<sys>/class/net/<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetState {
    Up,
    Down,
    Missing,
}

/// What a USB serial device is running, from its USB id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsbMode {
    /// Klipper firmware (1d50:614e).
    Klipper,
    /// Katapult bootloader (1d50:6177).
    Katapult,
    /// Klipper as a USB-to-CAN bridge (1d50:606f).
    UsbCanBridge,
    /// Anything else (a USB-UART adapter, unknown firmware).
    Other,
}

/// The USB mode of a port: from its USB id, else from its by-id name.
pub fn usb_mode(port: &SerialPort) -> UsbMode {
    if let Some(usb) = &port.usb {
        return match (usb.vendor, usb.product) {
            (0x1d50, 0x614e) => UsbMode::Klipper,
            (0x1d50, 0x6177) => UsbMode::Katapult,
            (0x1d50, 0x606f) => UsbMode::UsbCanBridge,
            _ => UsbMode::Other,
        };
    }
    match port.by_id_name() {
        Some(n) if n.starts_with("usb-Klipper_") => UsbMode::Klipper,
        Some(n) if n.starts_with("usb-katapult_") || n.starts_with("usb-CanBoot_") => {
            UsbMode::Katapult
        }
        _ => UsbMode::Other,
    }
}

/// A ROM bootloader a board can fall into instead of Klipper or Katapult (no tty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RomLoader {
    /// STM32 system DFU (0483:df11).
    StmDfu,
    /// RP2040/RP2350 BOOTSEL mass storage (2e8a:0003 / 2e8a:000f).
    RpBootsel,
}

impl RomLoader {
    /// The loader a USB id belongs to.
    pub fn of_usb_id(vendor: u16, product: u16) -> Option<RomLoader> {
        match (vendor, product) {
            (0x0483, 0xdf11) => Some(RomLoader::StmDfu),
            (0x2e8a, 0x0003 | 0x000f) => Some(RomLoader::RpBootsel),
            _ => None,
        }
    }

    /// What a user does next to get the board flashed.
    pub fn recovery(self) -> &'static str {
        match self {
            RomLoader::StmDfu => {
                "The board is in STM32 DFU mode (Katapult is not installed or was bypassed): \
                 flash it with `make flash FLASH_DEVICE=0483:df11` (dfu-util), or install \
                 Katapult; then power-cycle the board without BOOT0 held."
            }
            RomLoader::RpBootsel => {
                "The board is in RP2040 BOOTSEL mode (Katapult is not installed or was \
                 bypassed): copy klipper.uf2 to the RPI-RP2 drive or run \
                 `make flash FLASH_DEVICE=2e8a:0003`; then power-cycle the board."
            }
        }
    }
}

impl fmt::Display for RomLoader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RomLoader::StmDfu => "STM32 DFU",
            RomLoader::RpBootsel => "RP2040 BOOTSEL",
        })
    }
}

/// A board sitting in its ROM loader, as seen on the USB bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RomBoard {
    pub loader: RomLoader,
    /// `vvvv:pppp`, e.g. `0483:df11`.
    pub usb_id: String,
    /// The sysfs USB device directory.
    pub path: PathBuf,
}

impl RomBoard {
    /// `STM32 DFU (0483:df11) at <sysfs path>`.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}) at {}",
            self.loader,
            self.usb_id,
            self.path.display()
        )
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn read_hex16(path: &Path) -> Option<u16> {
    u16::from_str_radix(&read_trimmed(path)?, 16).ok()
}

fn usb_ids(dir: &Path) -> Option<(u16, u16)> {
    Some((
        read_hex16(&dir.join("idVendor"))?,
        read_hex16(&dir.join("idProduct"))?,
    ))
}

/// Device discovery under a device root and a sysfs root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub dev: DevRoot,
    pub sys: SysRoot,
}

impl Discovery {
    /// Roots from `$KFLASH_DEV_ROOT` / `$KFLASH_SYS_ROOT`.
    pub fn from_env() -> Discovery {
        Discovery {
            dev: DevRoot::from_env(),
            sys: SysRoot::from_env(),
        }
    }

    /// Explicit roots (tests, the bench).
    pub fn at(dev_root: impl Into<PathBuf>, sys_root: impl Into<PathBuf>) -> Discovery {
        Discovery {
            dev: DevRoot(dev_root.into()),
            sys: SysRoot(sys_root.into()),
        }
    }

    /// Links in a directory as (link path, tty name), sorted by name.
    fn links(dir: &Path) -> Vec<(PathBuf, String)> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<(PathBuf, String)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let path = e.path();
                let target = fs::read_link(&path).ok()?;
                let tty = file_name(&target)?;
                Some((path, tty))
            })
            .collect();
        out.sort();
        out
    }

    /// USB details of a tty from `<sys>/class/tty/<tty>/device` and its ancestors.
    pub fn usb_info(&self, tty: &str) -> Option<UsbInfo> {
        let device = self.sys.0.join("class/tty").join(tty).join("device");
        let mut dir = fs::canonicalize(device).ok()?;
        for _ in 0..4 {
            if let Some((vendor, product)) = usb_ids(&dir) {
                return Some(UsbInfo {
                    vendor,
                    product,
                    serial: read_trimmed(&dir.join("serial")),
                    manufacturer: read_trimmed(&dir.join("manufacturer")),
                    product_name: read_trimmed(&dir.join("product")),
                    port: file_name(&dir),
                });
            }
            dir = dir.parent()?.to_path_buf();
        }
        None
    }

    /// Every serial device with a by-id or by-path link, by-id and by-path joined by tty.
    pub fn scan(&self) -> Vec<SerialPort> {
        let mut ports: Vec<SerialPort> = Vec::new();
        for (path, tty) in Self::links(&self.dev.by_id_dir()) {
            if ports.iter().any(|p| p.tty == tty) {
                continue;
            }
            ports.push(SerialPort {
                by_id: Some(path),
                by_path: None,
                tty,
                usb: None,
            });
        }
        for (path, tty) in Self::links(&self.dev.by_path_dir()) {
            match ports.iter_mut().find(|p| p.tty == tty) {
                Some(port) if port.by_path.is_none() => port.by_path = Some(path),
                Some(_) => {}
                None => ports.push(SerialPort {
                    by_id: None,
                    by_path: Some(path),
                    tty,
                    usb: None,
                }),
            }
        }
        for port in &mut ports {
            port.usb = self.usb_info(&port.tty);
        }
        ports
    }

    fn present(ports: &[SerialPort], dev: &DevRoot) -> String {
        if ports.is_empty() {
            format!("none (nothing under {})", dev.0.join("serial").display())
        } else {
            ports
                .iter()
                .map(SerialPort::label)
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    /// A port for a path outside by-id/by-path (a UART such as /dev/ttyAMA0).
    fn plain_port(&self, path: &Path) -> Option<SerialPort> {
        let candidates = [
            Some(path.to_path_buf()),
            path.strip_prefix("/dev")
                .ok()
                .map(|rest| self.dev.0.join(rest)),
        ];
        for candidate in candidates.into_iter().flatten() {
            if fs::symlink_metadata(&candidate).is_err() {
                continue;
            }
            let tty = fs::read_link(&candidate)
                .ok()
                .and_then(|t| file_name(&t))
                .or_else(|| file_name(&candidate))?;
            let usb = self.usb_info(&tty);
            return Some(SerialPort {
                by_id: None,
                by_path: None,
                tty,
                usb,
            });
        }
        None
    }

    /// Exactly one port for a pattern: a full path, a by-id/by-path file name, a tty name,
    /// or a glob of any of these (`usb-Klipper_stm32*`, `/dev/serial/by-id/*rp2040*`).
    pub fn resolve(&self, pattern: &str) -> Result<SerialPort, Error> {
        let pattern_trimmed = pattern.trim();
        let ports = self.scan();
        let (dir_hint, name) = match pattern_trimmed.rsplit_once('/') {
            Some((dir, name)) => (Some(dir), name),
            None => (None, pattern_trimmed),
        };
        let want_id = dir_hint.is_none_or(|d| !d.ends_with("by-path"));
        let want_path = dir_hint.is_none_or(|d| !d.ends_with("by-id"));
        let hits: Vec<&SerialPort> = ports
            .iter()
            .filter(|p| {
                let id = want_id && p.by_id_name().is_some_and(|n| glob_match(name, &n));
                let by_path = want_path && p.by_path_name().is_some_and(|n| glob_match(name, &n));
                let tty = dir_hint.is_none() && glob_match(name, &p.tty);
                id || by_path || tty
            })
            .collect();
        match hits.len() {
            1 => Ok(hits[0].clone()),
            0 => {
                if dir_hint.is_some() && !has_wildcard(pattern_trimmed) {
                    if let Some(port) = self.plain_port(Path::new(pattern_trimmed)) {
                        return Ok(port);
                    }
                }
                Err(Error::NotFound {
                    pattern: pattern.into(),
                    present: Self::present(&ports, &self.dev),
                })
            }
            _ => Err(Error::Ambiguous {
                pattern: pattern.into(),
                candidates: hits
                    .iter()
                    .map(|p| p.label())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The port with this stable identity, if present now.
    pub fn find(&self, stable: &StableId) -> Option<SerialPort> {
        self.scan().into_iter().find(|p| stable.matches(p))
    }

    /// The port of a board known by its kept identity, if present now (in any mode).
    pub fn find_identity(&self, identity: &Identity) -> Option<SerialPort> {
        if identity.is_empty() {
            return None;
        }
        self.scan().into_iter().find(|p| identity.matches(p))
    }

    /// The ROM loader a board known by its kept identity fell into: one on the same USB
    /// port.
    pub fn rom_loader_of(&self, identity: &Identity) -> Option<RomBoard> {
        let port = identity.usb_port.as_deref()?;
        self.find_rom_loaders()
            .into_iter()
            .find(|r| r.path.file_name().is_some_and(|n| n == port))
    }

    /// Wait (polling every 50 ms) until the device appears, e.g. after a bootloader entry.
    pub fn wait_for(
        &self,
        stable: &StableId,
        timeout: Duration,
        cancel: &Cancel,
    ) -> Result<SerialPort, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(port) = self.find(stable) {
                return Ok(port);
            }
            if cancel.is_cancelled() {
                return Err(Error::Cancelled {
                    id: stable.to_string(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    id: stable.to_string(),
                    after: timeout,
                    present: Self::present(&self.scan(), &self.dev),
                });
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
    }

    /// Whether a network interface (a CAN interface such as `can0`) exists and is up:
    /// `<sys>/class/net/<name>/flags` has IFF_UP, and `operstate` is not `down` (a CAN
    /// interface whose bus is off or whose adapter is gone reads `down`).
    pub fn net_interface(&self, name: &str) -> NetState {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return NetState::Missing;
        }
        let dir = self.sys.0.join("class/net").join(name);
        if !dir.exists() {
            return NetState::Missing;
        }
        let flags = read_trimmed(&dir.join("flags"))
            .and_then(|f| u32::from_str_radix(f.trim_start_matches("0x"), 16).ok());
        let oper = read_trimmed(&dir.join("operstate"));
        let up = flags.is_some_and(|f| f & 0x1 != 0) && oper.as_deref() != Some("down");
        if up {
            NetState::Up
        } else {
            NetState::Down
        }
    }

    /// Boards sitting in a ROM loader, from `<sys>/bus/usb/devices/*/idVendor|idProduct`.
    pub fn find_rom_loaders(&self) -> Vec<RomBoard> {
        let Ok(entries) = fs::read_dir(self.sys.0.join("bus/usb/devices")) else {
            return Vec::new();
        };
        let mut out: Vec<RomBoard> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let path = e.path();
                let (vendor, product) = usb_ids(&path)?;
                Some(RomBoard {
                    loader: RomLoader::of_usb_id(vendor, product)?,
                    usb_id: format!("{vendor:04x}:{product:04x}"),
                    path,
                })
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }
}

#[cfg(test)]
mod tests;
