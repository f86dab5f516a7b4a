//! `Home`: one state directory and the operations the front ends call on it.
//!
//! Owns the glue between the registry (devices.json, configs/) and the pipeline: listing
//! and editing devices, reading each device's config target, and turning registry devices
//! into the pipeline's `DeviceInfo`. The Python `Engine` is a thin wrapper over this.
//!
//! Invariants: every edit validates first and saves the registry atomically, so a
//! rejected input never changes devices.json; a device's config is copied into
//! `configs/<key>.config` atomically and never modified afterwards except by the user
//! (`kflash config KEY`).
//!
//! Thread-safety: `Home` is an immutable value; concurrent runs are serialised by the run
//! lock, concurrent edits are last-writer-wins on an atomic file.

pub mod printer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::flash::Endpoint;
use crate::kconfig::{Interface, KConfig};
use crate::pipeline::{DeviceInfo, Error, Link, Target};
use crate::registry::{self, Device, FlashMethod, Identity, Registry, StateDir};

/// A device to add (the CLI's `devices add`).
#[derive(Debug, Clone, Default)]
pub struct NewDevice {
    pub key: String,
    pub serial: Option<String>,
    pub can_uuid: Option<String>,
    pub interface: Option<String>,
    pub linux: Option<String>,
    pub method: Option<String>,
    pub config: Option<PathBuf>,
    pub name: Option<String>,
    pub mcu_section: Option<String>,
    pub baud: Option<u32>,
}

/// A state directory and what can be done with it.
#[derive(Clone)]
pub struct Home {
    pub state: StateDir,
    /// The Python interpreter that runs `kflash.watchdog` (the host's `sys.executable`).
    pub python: Option<PathBuf>,
    /// The native Katapult serial flasher (used unless the setting `katapult_flasher` is
    /// `flashtool`; tests may swap it).
    pub native_katapult: Option<crate::flash::NativeKatapult>,
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Home")
            .field("state", &self.state)
            .field("python", &self.python)
            .field("native_katapult", &self.native_katapult.is_some())
            .finish()
    }
}

impl Home {
    /// Open `home`, or the default state dir (`$KFLASH_HOME`, `~/printer_data/kflash`, ...).
    pub fn open(home: Option<PathBuf>) -> Result<Home, Error> {
        let state = match home {
            Some(path) => StateDir::at(path),
            None => StateDir::resolve().ok_or(registry::Error::NoStateDir)?,
        };
        Ok(Home {
            state,
            python: None,
            native_katapult: Some(printer::native_katapult()),
        })
    }

    pub fn registry(&self) -> Result<Registry, Error> {
        Ok(Registry::load(&self.state)?)
    }

    /// Every setting as text.
    pub fn settings(&self) -> Result<BTreeMap<String, String>, Error> {
        let reg = self.registry()?;
        settings_map(&reg)
    }

    /// Change one setting (validated) and save.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<BTreeMap<String, String>, Error> {
        let mut reg = self.registry()?;
        reg.settings.set(key, value)?;
        reg.save(&self.state)?;
        settings_map(&reg)
    }

    /// Every device with its config status.
    pub fn devices(&self) -> Result<Vec<Value>, Error> {
        let reg = self.registry()?;
        Ok(reg.devices.iter().map(|d| self.device_json(d)).collect())
    }

    fn device_json(&self, d: &Device) -> Value {
        let config = self.state.config_path(&d.key);
        let target = read_target(&config, &d.identity);
        json!({
            "key": d.key,
            "name": d.name,
            "mcu_section": d.mcu_section,
            "identity": d.identity,
            "endpoint": d.identity.describe(),
            "method": d.method.as_str(),
            "baud": d.baud,
            "config": config.display().to_string(),
            "config_present": config.is_file(),
            "mcu": target.as_ref().ok().map(|t| t.mcu.clone()),
            "interface": target.as_ref().ok().map(|t| t.link.as_str()),
            "problem": target.err(),
        })
    }

    /// Register a device (and copy its config in, when given).
    pub fn add_device(&self, new: &NewDevice) -> Result<Value, Error> {
        let given = [&new.serial, &new.can_uuid, &new.linux]
            .iter()
            .filter(|x| x.is_some())
            .count();
        if given != 1 {
            return Err(Error::Config(
                "give exactly one of --serial PATH, --can-uuid UUID or --linux PATH".into(),
            ));
        }
        let identity = if let Some(path) = &new.serial {
            Identity::Serial { path: path.clone() }
        } else if let Some(uuid) = &new.can_uuid {
            Identity::can(uuid, new.interface.as_deref().unwrap_or("can0"))?
        } else {
            Identity::Linux {
                path: new.linux.clone().unwrap_or_default(),
            }
        };
        let mut device = Device::new(&new.key, identity)?;
        if let Some(m) = &new.method {
            device.method = FlashMethod::parse(m)?;
        }
        device.name.clone_from(&new.name);
        if let Some(section) = &new.mcu_section {
            device.mcu_section.clone_from(section);
        }
        device.baud = new.baud;
        let mut reg = self.registry()?;
        reg.add(device.clone())?;
        if let Some(src) = &new.config {
            let text = std::fs::read(src)
                .map_err(|e| Error::Config(format!("cannot read config {}: {e}", src.display())))?;
            if !String::from_utf8_lossy(&text).contains("CONFIG_") {
                return Err(Error::Config(format!(
                    "{} does not look like a Klipper .config (no CONFIG_ lines); create one with `kflash config {}`",
                    src.display(),
                    new.key
                )));
            }
            let dest = self.state.config_path(&new.key);
            std::fs::create_dir_all(self.state.configs_dir())
                .and_then(|()| registry::write_atomic(&dest, &text))
                .map_err(|e| Error::Io(format!("cannot write {}: {e}", dest.display())))?;
        }
        reg.save(&self.state)?;
        Ok(self.device_json(&device))
    }

    /// Forget a device (its config file is kept).
    pub fn remove_device(&self, key: &str) -> Result<Value, Error> {
        let mut reg = self.registry()?;
        let removed = reg.remove(key)?;
        reg.save(&self.state)?;
        Ok(self.device_json(&removed))
    }

    /// Register every `[mcu ...]` of printer.cfg not registered yet.
    pub fn import_printer_cfg(&self, path: &Path) -> Result<Value, Error> {
        let found = registry::import_printer_cfg_file(path)?;
        let mut reg = self.registry()?;
        let mut added = Vec::new();
        let mut skipped = Vec::new();
        for mcu in found {
            let known = reg
                .devices
                .iter()
                .any(|d| d.key == mcu.key || d.mcu_section == mcu.mcu_section);
            if known {
                skipped.push(json!({"key": mcu.key, "reason": "already registered"}));
                continue;
            }
            let device = mcu.to_device();
            reg.add(device.clone())?;
            added.push(device);
        }
        reg.save(&self.state)?;
        Ok(json!({
            "added": added.iter().map(|d| self.device_json(d)).collect::<Vec<_>>(),
            "skipped": skipped,
        }))
    }

    /// Where a device's config lives (the device must exist).
    pub fn config_path(&self, key: &str) -> Result<PathBuf, Error> {
        let reg = self.registry()?;
        reg.get(key)?;
        Ok(self.state.config_path(key))
    }

    /// The registry's devices as the pipeline sees them.
    pub fn device_infos(&self, reg: &Registry) -> Vec<DeviceInfo> {
        reg.devices
            .iter()
            .map(|d| {
                let config = self.state.config_path(&d.key);
                DeviceInfo {
                    key: d.key.clone(),
                    name: d.name.clone(),
                    method: d.method,
                    endpoint: endpoint_of(d),
                    mcu_section: d.mcu_section.clone(),
                    target: read_target(&config, &d.identity),
                    config,
                }
            })
            .collect()
    }
}

fn settings_map(reg: &Registry) -> Result<BTreeMap<String, String>, Error> {
    registry::Settings::keys()
        .iter()
        .map(|k| Ok(((*k).to_owned(), reg.settings.get(k)?)))
        .collect()
}

/// The pipeline endpoint of a registry device.
pub fn endpoint_of(d: &Device) -> Endpoint {
    match &d.identity {
        Identity::Serial { path } => Endpoint::Serial {
            path: PathBuf::from(path),
            baud: d.baud,
        },
        Identity::Can { uuid, interface } => Endpoint::Can {
            interface: interface.clone(),
            uuid: uuid.clone(),
        },
        Identity::Linux { path } => Endpoint::Linux {
            path: PathBuf::from(path),
        },
    }
}

/// Read a device's config: its MCU and interface, checked against how it is registered.
pub fn read_target(config: &Path, identity: &Identity) -> Result<Target, String> {
    let target = KConfig::load(config)
        .and_then(|k| k.target())
        .map_err(|e| e.to_string())?;
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
    match (identity, link) {
        (Identity::Linux { .. }, Link::Linux)
        | (Identity::Can { .. }, Link::Can)
        | (Identity::Serial { .. }, Link::Serial | Link::UsbCanBridge) => Ok(Target { mcu, link }),
        (Identity::Linux { .. }, _) => Err(format!(
            "{} builds {mcu} firmware, but the device is the linux-process MCU",
            config.display()
        )),
        (_, Link::Linux) => Err(format!(
            "{} builds the linux-process MCU, but the device is a board",
            config.display()
        )),
        (Identity::Can { .. }, _) => Err(format!(
            "{} builds {mcu} firmware for USB/serial, but the device is on CAN (enable CAN in `kflash config KEY`)",
            config.display()
        )),
        (Identity::Serial { .. }, _) => Err(format!(
            "{} builds {mcu} firmware for CAN, but the device is registered by serial path",
            config.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home() -> (tempfile::TempDir, Home) {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(Some(dir.path().join("state"))).unwrap();
        (dir, home)
    }

    #[test]
    fn add_copies_config_and_bad_input_changes_nothing() {
        let (dir, home) = home();
        let cfg = dir.path().join("octopus.config");
        std::fs::write(&cfg, "CONFIG_MCU=\"stm32f446xx\"\nCONFIG_USBSERIAL=y\n").unwrap();
        let dev = home
            .add_device(&NewDevice {
                key: "octopus".into(),
                serial: Some("/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00".into()),
                config: Some(cfg.clone()),
                ..NewDevice::default()
            })
            .unwrap();
        assert_eq!(dev["mcu"], "stm32f446xx");
        assert_eq!(dev["interface"], "serial");
        let before = std::fs::read(home.state.devices_json()).unwrap();
        for bad in [
            NewDevice {
                key: "a/b".into(),
                serial: Some("/dev/x".into()),
                ..NewDevice::default()
            },
            NewDevice {
                key: "octopus".into(),
                serial: Some("/dev/x".into()),
                ..NewDevice::default()
            },
            NewDevice {
                key: "ebb".into(),
                can_uuid: Some("xyz".into()),
                ..NewDevice::default()
            },
            NewDevice {
                key: "ebb".into(),
                ..NewDevice::default()
            },
        ] {
            assert!(home.add_device(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(std::fs::read(home.state.devices_json()).unwrap(), before);
    }

    #[test]
    fn target_must_match_how_the_device_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c");
        std::fs::write(&cfg, "CONFIG_MCU=\"stm32g0b1xx\"\nCONFIG_USBCANBUS=y\n").unwrap();
        let serial = Identity::Serial {
            path: "/dev/x".into(),
        };
        let can = Identity::Can {
            uuid: "aabbccddeeff".into(),
            interface: "can0".into(),
        };
        assert_eq!(read_target(&cfg, &serial).unwrap().link, Link::UsbCanBridge);
        assert!(read_target(&cfg, &can).unwrap_err().contains("CAN"));
        std::fs::write(&cfg, "CONFIG_MACH_LINUX=y\n").unwrap();
        let linux = Identity::Linux {
            path: "/tmp/klipper_host_mcu".into(),
        };
        assert_eq!(read_target(&cfg, &linux).unwrap().mcu, "linux");
        assert!(read_target(&dir.path().join("missing"), &serial)
            .unwrap_err()
            .contains("kflash config"));
    }
}
