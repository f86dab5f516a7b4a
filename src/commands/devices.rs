//! `kflash devices ...` and `kflash config KEY`'s path: listing, adding, removing and
//! importing devices, and turning registry devices into the pipeline's `DeviceInfo`.
//!
//! A rejected input changes nothing: everything is validated before the registry is
//! saved (atomically) or a config is copied in (atomically).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Context, Error};
use crate::firmware::kept;
use crate::pipeline::{DeviceInfo, Target};
use crate::registry::{self, Device, Endpoint, FlashMethod, Registry};

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

/// One row of `kflash devices list`: a registered device and its config's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRow {
    pub key: String,
    pub name: Option<String>,
    pub mcu_section: String,
    /// Where the device is reached, as devices.json stores it.
    pub identity: Endpoint,
    /// The same, as text (`serial /dev/...`, `can 0a1b... on can0`).
    pub endpoint: String,
    pub method: FlashMethod,
    pub baud: Option<u32>,
    /// `configs/<key>.config`.
    pub config: String,
    pub config_present: bool,
    pub mcu: Option<String>,
    /// `can`, `serial`, `usb_can_bridge`, `linux`.
    pub interface: Option<&'static str>,
    /// Why the config cannot build this device's firmware.
    pub problem: Option<String>,
    /// The version of its last-known-good image (the one last flashed to it and verified
    /// there: what a rollback writes), or `None` when kflash keeps none.
    pub last_known_good: Option<String>,
}

/// A printer.cfg MCU that `devices import` left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub key: String,
    pub reason: String,
}

/// What `kflash devices import` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Imported {
    pub added: Vec<DeviceRow>,
    pub skipped: Vec<Skipped>,
}

impl Context {
    /// `kflash devices list`: every device with its config status.
    pub fn devices(&self) -> Result<Vec<DeviceRow>, Error> {
        let reg = self.registry()?;
        Ok(reg.devices.iter().map(|d| self.device_row(d)).collect())
    }

    fn device_row(&self, d: &Device) -> DeviceRow {
        let config = self.state.config_path(&d.key);
        let target = Target::read(&config, &d.endpoint);
        DeviceRow {
            key: d.key.clone(),
            name: d.name.clone(),
            mcu_section: d.mcu_section.clone(),
            identity: d.endpoint.clone(),
            endpoint: d.endpoint.to_string(),
            method: d.method,
            baud: d.baud,
            config: config.display().to_string(),
            config_present: config.is_file(),
            mcu: target.as_ref().ok().map(|t| t.mcu.clone()),
            interface: target.as_ref().ok().map(|t| t.link.as_str()),
            problem: target.err().map(|e| e.to_string()),
            last_known_good: kept::kept(&self.state.good_dir(&d.key)).map(|good| good.version),
        }
    }

    /// `kflash devices add`: register a device (and copy its config in, when given).
    pub fn add_device(&self, new: &NewDevice) -> Result<DeviceRow, Error> {
        let given = [&new.serial, &new.can_uuid, &new.linux]
            .iter()
            .filter(|x| x.is_some())
            .count();
        if given != 1 {
            return Err(Error::EndpointCount);
        }
        let endpoint = if let Some(path) = &new.serial {
            Endpoint::Serial { path: path.clone() }
        } else if let Some(uuid) = &new.can_uuid {
            Endpoint::can(uuid, new.interface.as_deref().unwrap_or("can0"))?
        } else {
            Endpoint::Linux {
                path: new.linux.clone().unwrap_or_default(),
            }
        };
        let mut device = Device::new(&new.key, endpoint)?;
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
            self.copy_config(&new.key, src)?;
        }
        reg.save(&self.state)?;
        Ok(self.device_row(&device))
    }

    fn copy_config(&self, key: &str, src: &Path) -> Result<(), Error> {
        let text = std::fs::read(src).map_err(|source| Error::ReadConfig {
            path: src.to_path_buf(),
            source,
        })?;
        if !String::from_utf8_lossy(&text).contains("CONFIG_") {
            return Err(Error::NotAConfig {
                path: src.to_path_buf(),
                key: key.to_owned(),
            });
        }
        let dest = self.state.config_path(key);
        std::fs::create_dir_all(self.state.configs_dir())
            .and_then(|()| registry::write_atomic(&dest, &text))
            .map_err(|source| Error::WriteConfig { path: dest, source })
    }

    /// `kflash devices remove`: forget a device (its config file is kept).
    pub fn remove_device(&self, key: &str) -> Result<DeviceRow, Error> {
        let mut reg = self.registry()?;
        let removed = reg.remove(key)?;
        reg.save(&self.state)?;
        Ok(self.device_row(&removed))
    }

    /// `kflash devices import`: register every `[mcu ...]` of printer.cfg not registered
    /// yet.
    pub fn import_printer_cfg(&self, path: &Path) -> Result<Imported, Error> {
        let found = registry::import_printer_cfg_file(path)?;
        let mut reg = self.registry()?;
        let report = reg.add_imported(&found);
        reg.save(&self.state)?;
        // Where `kflash config KEY` puts each board's config next.
        let configs = self.state.configs_dir();
        std::fs::create_dir_all(&configs).map_err(|source| Error::WriteConfig {
            path: configs,
            source,
        })?;
        let added = report
            .added
            .iter()
            .filter_map(|key| reg.get(key).ok())
            .map(|d| self.device_row(d))
            .collect();
        let skipped = report
            .skipped
            .into_iter()
            .map(|(key, reason)| Skipped { key, reason })
            .collect();
        Ok(Imported { added, skipped })
    }

    /// `kflash config KEY`: where a device's config lives (the device must exist).
    pub fn config_path(&self, key: &str) -> Result<PathBuf, Error> {
        let reg = self.registry()?;
        reg.get(key)?;
        Ok(self.state.config_path(key))
    }

    /// `kflash config KEY --from FILE`: attach an existing Klipper `.config` to a device
    /// (copied in atomically; a file that is not a Klipper config changes nothing).
    pub fn set_config(&self, key: &str, src: &Path) -> Result<DeviceRow, Error> {
        let reg = self.registry()?;
        let device = reg.get(key)?.clone();
        self.copy_config(key, src)?;
        Ok(self.device_row(&device))
    }

    /// `kflash config KEY`: the menuconfig command for a device's config, run in the
    /// Klipper tree. `OUT=` points into the device's build directory, so nothing lands in
    /// the tree's own `out/`.
    pub fn menuconfig_command(&self, key: &str) -> Result<Vec<String>, Error> {
        let config = self.config_path(key)?;
        let out = self.state.builds_dir().join(key).join("menuconfig");
        std::fs::create_dir_all(self.state.configs_dir())
            .and_then(|()| std::fs::create_dir_all(&out))
            .map_err(|source| Error::WriteConfig {
                path: out.clone(),
                source,
            })?;
        Ok(vec![
            "make".into(),
            "menuconfig".into(),
            format!("KCONFIG_CONFIG={}", config.display()),
            format!("OUT={}/", out.display()),
        ])
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
                    endpoint: d.endpoint.clone(),
                    baud: d.baud,
                    mcu_section: d.mcu_section.clone(),
                    target: Target::read(&config, &d.endpoint),
                    config,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{ConfigError, Link};

    fn context() -> (tempfile::TempDir, Context) {
        let dir = tempfile::tempdir().unwrap();
        let context = Context::open(Some(dir.path().join("state"))).unwrap();
        (dir, context)
    }

    #[test]
    fn add_copies_config_and_bad_input_changes_nothing() {
        let (dir, context) = context();
        let cfg = dir.path().join("octopus.config");
        std::fs::write(&cfg, "CONFIG_MCU=\"stm32f446xx\"\nCONFIG_USBSERIAL=y\n").unwrap();
        let dev = context
            .add_device(&NewDevice {
                key: "octopus".into(),
                serial: Some("/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00".into()),
                config: Some(cfg.clone()),
                ..NewDevice::default()
            })
            .unwrap();
        assert_eq!(dev.mcu.as_deref(), Some("stm32f446xx"));
        assert_eq!(dev.interface, Some("serial"));
        let before = std::fs::read(context.state.devices_json()).unwrap();
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
            assert!(context.add_device(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(std::fs::read(context.state.devices_json()).unwrap(), before);
    }

    #[test]
    fn a_row_names_the_last_known_good_version_kept_for_the_board() {
        let (dir, context) = context();
        let row = context
            .add_device(&NewDevice {
                key: "ebb".into(),
                serial: Some("/dev/serial/by-id/usb-Klipper_rp2040_1-if00".into()),
                ..NewDevice::default()
            })
            .unwrap();
        assert_eq!(row.last_known_good, None);
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("klipper.uf2"), b"image").unwrap();
        std::fs::write(
            out.join("klipper.dict"),
            br#"{"version": "v0.13.0-7-gabc"}"#,
        )
        .unwrap();
        let good = context.state.good_dir("ebb");
        kept::keep(&out.join("klipper.uf2"), &good, "2026-01-01T00:00:00Z").unwrap();
        let rows = context.devices().unwrap();
        assert_eq!(rows[0].last_known_good.as_deref(), Some("v0.13.0-7-gabc"));
        // an image that no longer matches what was kept is no way back
        std::fs::write(good.join("klipper.uf2"), b"changed").unwrap();
        assert_eq!(context.devices().unwrap()[0].last_known_good, None);
    }

    #[test]
    fn target_must_match_how_the_device_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c");
        std::fs::write(&cfg, "CONFIG_MCU=\"stm32g0b1xx\"\nCONFIG_USBCANBUS=y\n").unwrap();
        let serial = Endpoint::Serial {
            path: "/dev/x".into(),
        };
        let can = Endpoint::Can {
            uuid: "aabbccddeeff".into(),
            interface: "can0".into(),
        };
        assert_eq!(
            Target::read(&cfg, &serial).unwrap().link,
            Link::UsbCanBridge
        );
        let err = Target::read(&cfg, &can).unwrap_err();
        assert!(matches!(err, ConfigError::NotCan { .. }), "{err}");
        assert!(err.to_string().contains("CAN"));
        std::fs::write(&cfg, "CONFIG_MACH_LINUX=y\n").unwrap();
        let linux = Endpoint::Linux {
            path: "/tmp/klipper_host_mcu".into(),
        };
        assert_eq!(Target::read(&cfg, &linux).unwrap().mcu, "linux");
        let missing = Target::read(&dir.path().join("missing"), &serial).unwrap_err();
        assert!(matches!(missing, ConfigError::Unreadable(_)), "{missing}");
        assert!(missing.to_string().contains("menuconfig"));
    }

    #[test]
    fn a_devices_json_written_by_earlier_kflash_still_loads() {
        // devices.json as kflash wrote it before the registry's and the flasher's
        // endpoint types became one: `identity` tagged by `type`, `baud` beside it.
        let (_dir, context) = context();
        std::fs::create_dir_all(context.state.root()).unwrap();
        let text = r#"{
  "version": 1,
  "settings": {
    "klipper_dir": "/home/pi/klipper",
    "katapult_dir": "/home/pi/katapult",
    "service": "systemd",
    "klipper_service": "klipper",
    "stop_command": null,
    "start_command": null,
    "moonraker_url": "http://127.0.0.1:7125",
    "linux_mcu_binary": "/usr/local/bin/klipper_mcu",
    "build_timeout_s": 600,
    "flash_timeout_s": 180,
    "katapult_flasher": "native"
  },
  "devices": [
    {
      "key": "octopus",
      "mcu_section": "mcu",
      "identity": {
        "type": "serial",
        "path": "/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00"
      },
      "method": "auto"
    },
    {
      "key": "uart",
      "mcu_section": "mcu uart",
      "identity": {
        "type": "serial",
        "path": "/dev/ttyAMA0"
      },
      "method": "make",
      "baud": 250000
    },
    {
      "key": "EBB36",
      "name": "toolhead",
      "mcu_section": "mcu EBB36",
      "identity": {
        "type": "can",
        "uuid": "0a1b2c3d4e5f",
        "interface": "can0"
      },
      "method": "katapult"
    },
    {
      "key": "host",
      "mcu_section": "mcu host",
      "identity": {
        "type": "linux",
        "path": "/tmp/klipper_host_mcu"
      },
      "method": "linux"
    }
  ]
}
"#;
        std::fs::write(context.state.devices_json(), text).unwrap();
        let rows = context.devices().unwrap();
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["octopus", "uart", "EBB36", "host"]);
        assert_eq!(rows[1].baud, Some(250_000));
        assert_eq!(
            rows[2].identity,
            Endpoint::Can {
                uuid: "0a1b2c3d4e5f".into(),
                interface: "can0".into()
            }
        );
        let reg = context.registry().unwrap();
        assert_eq!(reg.settings.service, crate::registry::Backend::Systemd);
        let infos = context.device_infos(&reg);
        assert_eq!(infos[1].baud, Some(250_000));
        assert_eq!(infos[2].endpoint.describe(), "can0:0a1b2c3d4e5f");
        // Saving writes the same form back.
        reg.save(&context.state).unwrap();
        assert_eq!(
            std::fs::read_to_string(context.state.devices_json()).unwrap(),
            text
        );
    }
}
