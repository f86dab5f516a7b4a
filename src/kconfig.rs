//! Klipper firmware configs (Kconfig `.config` files) and the target they describe.
//!
//! Parses `CONFIG_X=y`, `CONFIG_X="text"`, `CONFIG_X=123`, `CONFIG_X=0x8000` and
//! `# CONFIG_X is not set`; other comments and blank lines are skipped, as are lines that
//! are not Kconfig assignments. `target()` names what the config builds for: the MCU
//! (`CONFIG_MCU`, or `linux` for the linux-process MCU), the host interface, the flash
//! application address and whether it leaves room for a bootloader.
//!
//! Invariant: a `Target` always has a non-empty MCU; a config without one is refused as
//! "not a Klipper firmware config". Pure values; thread-safe.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Errors reading or checking a firmware config.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("firmware config {path} does not exist (create it with menuconfig: `make menuconfig KCONFIG_CONFIG={path}` in the Klipper tree)")]
    Missing { path: PathBuf },
    #[error("cannot read firmware config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::sync::Arc<io::Error>,
    },
    #[error(
        "{what} is not a Klipper firmware config: it sets neither CONFIG_MCU nor CONFIG_MACH_LINUX"
    )]
    NotKlipper { what: String },
}

/// How the firmware talks to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interface {
    /// USB CDC-ACM serial (`CONFIG_USBSERIAL`).
    Usb,
    /// A UART (`CONFIG_SERIAL`).
    Serial,
    /// A CAN bus node (`CONFIG_CANSERIAL`).
    Can,
    /// USB-to-CAN bridge (`CONFIG_USBCANBUS`).
    UsbCanBridge,
    /// None of the above (e.g. the linux-process MCU).
    Unknown,
}

impl Interface {
    /// `usb` | `serial` | `can` | `usb-can-bridge` | `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Interface::Usb => "usb",
            Interface::Serial => "serial",
            Interface::Can => "can",
            Interface::UsbCanBridge => "usb-can-bridge",
            Interface::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a firmware config builds for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `CONFIG_MCU` (`stm32f446xx`, `rp2040`, ...) or `linux`.
    pub mcu: String,
    /// The host interface.
    pub interface: Interface,
    /// `CONFIG_FLASH_APPLICATION_ADDRESS`, when set.
    pub flash_offset: Option<u64>,
    /// The application starts far enough past the flash start to leave room for a
    /// bootloader (more than the 256-byte rp2040 boot stage).
    pub has_bootloader_offset: bool,
    /// The first `CONFIG_MACH_*` set, without the prefix, lowercase (`stm32`, `rp2040`,
    /// `linux`, `avr`).
    pub mach: Option<String>,
    /// Where the firmware must start in flash: `CONFIG_FLASH_APPLICATION_ADDRESS`, else the
    /// flash start plus the bootloader offset chosen in menuconfig
    /// (`CONFIG_<chip>_FLASH_START_<hex>=y`). A bootloader must start the application at
    /// exactly this address.
    pub app_start: Option<u64>,
    /// The start of flash (`CONFIG_FLASH_START` / `CONFIG_FLASH_BOOT_ADDRESS`, else the
    /// chip family's, else the application address rounded down to 1 MiB).
    pub flash_start: Option<u64>,
}

/// Menuconfig's name for a bootloader offset: `No bootloader`, `8KiB bootloader`.
pub fn offset_choice(offset: u64) -> String {
    match offset {
        0 => "No bootloader".to_owned(),
        o if o % 1024 == 0 => format!("{}KiB bootloader", o / 1024),
        o => format!("{o:#x} bootloader offset"),
    }
}

/// A parsed `.config`: symbol name (with `CONFIG_`) -> raw value; `n` for "is not set".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KConfig {
    values: BTreeMap<String, String>,
    /// Symbols in file order (for "first MACH_* set").
    order: Vec<String>,
    /// Where it was read from, for errors.
    source: Option<PathBuf>,
}

/// Parse an integer the way Kconfig writes it: decimal or `0x` hex.
fn parse_int(text: &str) -> Option<u64> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

fn unquote(raw: &str) -> String {
    match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => raw.to_string(),
    }
}

impl KConfig {
    /// Read and parse a `.config`; a missing file is `Error::Missing`.
    pub fn load(path: &Path) -> Result<KConfig, Error> {
        let text = fs::read(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                Error::Missing { path: path.into() }
            } else {
                Error::Read {
                    path: path.into(),
                    source: source.into(),
                }
            }
        })?;
        let mut config = KConfig::parse(&String::from_utf8_lossy(&text));
        config.source = Some(path.into());
        Ok(config)
    }

    /// Parse `.config` text.
    pub fn parse(text: &str) -> KConfig {
        let mut config = KConfig::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# ") {
                if let Some(name) = rest.strip_suffix(" is not set") {
                    if name.starts_with("CONFIG_") && !name.contains(char::is_whitespace) {
                        config.insert(name, "n".into());
                    }
                }
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            let name = name.trim();
            if !name.starts_with("CONFIG_") || name.contains(char::is_whitespace) {
                continue;
            }
            config.insert(name, unquote(value.trim()));
        }
        config
    }

    fn insert(&mut self, name: &str, value: String) {
        if self.values.insert(name.to_string(), value).is_none() {
            self.order.push(name.to_string());
        }
    }

    fn key(name: &str) -> String {
        if name.starts_with("CONFIG_") {
            name.to_string()
        } else {
            format!("CONFIG_{name}")
        }
    }

    /// The raw value of a symbol (`CONFIG_` prefix optional); strings are unquoted; `n`
    /// when "is not set".
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(&Self::key(name)).map(String::as_str)
    }

    /// Whether a bool symbol is `y`.
    pub fn is_set(&self, name: &str) -> bool {
        self.get(name) == Some("y")
    }

    /// An integer symbol (decimal or hex).
    pub fn get_int(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(parse_int)
    }

    /// The file this config was loaded from.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// What this config builds for; refuses a config with no MCU identity.
    pub fn target(&self) -> Result<Target, Error> {
        let mcu = match self.get("MCU").filter(|m| !m.is_empty()) {
            Some(mcu) => mcu.to_string(),
            None if self.is_set("MACH_LINUX") => "linux".to_string(),
            None => {
                return Err(Error::NotKlipper {
                    what: self
                        .source
                        .as_ref()
                        .map_or_else(|| "this file".to_string(), |p| p.display().to_string()),
                })
            }
        };
        let interface = if self.is_set("USBCANBUS") {
            Interface::UsbCanBridge
        } else if self.is_set("CANSERIAL") {
            Interface::Can
        } else if self.is_set("USBSERIAL") {
            Interface::Usb
        } else if self.is_set("SERIAL") {
            Interface::Serial
        } else {
            Interface::Unknown
        };
        let flash_offset = self.get_int("FLASH_APPLICATION_ADDRESS");
        let mach = self
            .order
            .iter()
            .filter(|name| self.values.get(*name).is_some_and(|v| v == "y"))
            .find_map(|name| name.strip_prefix("CONFIG_MACH_"))
            .map(str::to_ascii_lowercase);
        // The start of flash: stated by the config, else the family's, else the
        // application address rounded down to 1 MiB (0x08008000 -> 0x08000000).
        let family_start = match mach.as_deref() {
            Some(m) if m.starts_with("stm32") => Some(0x0800_0000),
            Some(m) if m.starts_with("rp") => Some(0x1000_0000),
            _ => None,
        };
        let flash_start = self
            .get_int("FLASH_START")
            .or_else(|| self.get_int("FLASH_BOOT_ADDRESS"))
            .or(family_start)
            .or_else(|| flash_offset.map(|app| app & !0xF_FFFF));
        // The offset menuconfig chose: `CONFIG_STM32_FLASH_START_8000=y` and the like.
        let chosen_offset = self
            .order
            .iter()
            .filter(|name| self.values.get(*name).is_some_and(|v| v == "y"))
            .find_map(|name| {
                let (_, hex) = name.rsplit_once("_FLASH_START_")?;
                u64::from_str_radix(hex, 16).ok()
            });
        let app_start = flash_offset.or_else(|| Some(flash_start? + chosen_offset?));
        let has_bootloader_offset = app_start.is_some_and(|app| {
            let start = flash_start.unwrap_or(app & !0xF_FFFF);
            app.saturating_sub(start) > 0x100
        });
        Ok(Target {
            mcu,
            interface,
            flash_offset,
            has_bootloader_offset,
            mach,
            app_start,
            flash_start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OCTOPUS: &str = r#"
#
# Automatically generated file; DO NOT EDIT.
# Klipper Firmware Configuration
#
CONFIG_LOW_LEVEL_OPTIONS=y
# CONFIG_MACH_AVR is not set
CONFIG_MACH_STM32=y
# CONFIG_MACH_LINUX is not set
CONFIG_BOARD_DIRECTORY="stm32"
CONFIG_MCU="stm32f446xx"
CONFIG_CLOCK_FREQ=180000000
CONFIG_USBSERIAL=y
CONFIG_FLASH_SIZE=0x80000
CONFIG_FLASH_BOOT_ADDRESS=0x8000000
CONFIG_FLASH_APPLICATION_ADDRESS=0x8008000
CONFIG_MACH_STM32F446=y
CONFIG_USB_SERIAL_NUMBER="12345"
"#;

    #[test]
    fn reads_an_stm32_usb_config() {
        let config = KConfig::parse(OCTOPUS);
        assert_eq!(config.get("MCU"), Some("stm32f446xx"));
        assert_eq!(config.get("CONFIG_MACH_AVR"), Some("n"));
        assert_eq!(config.get_int("CLOCK_FREQ"), Some(180_000_000));
        assert!(!config.is_set("MACH_LINUX"));
        let t = config.target().unwrap();
        assert_eq!(t.mcu, "stm32f446xx");
        assert_eq!(t.interface, Interface::Usb);
        assert_eq!(t.flash_offset, Some(0x800_8000));
        assert!(t.has_bootloader_offset, "32 KiB past FLASH_BOOT_ADDRESS");
        let no_start =
            KConfig::parse("CONFIG_MCU=\"x\"\nCONFIG_FLASH_APPLICATION_ADDRESS=0x8000000\n");
        assert!(!no_start.target().unwrap().has_bootloader_offset);
        let no_start =
            KConfig::parse("CONFIG_MCU=\"x\"\nCONFIG_FLASH_APPLICATION_ADDRESS=0x8002000\n");
        assert!(no_start.target().unwrap().has_bootloader_offset);
        assert_eq!(t.mach.as_deref(), Some("stm32"));
    }

    #[test]
    fn bootloader_offset_is_relative_to_flash_start() {
        let rp = |app: &str| {
            KConfig::parse(&format!(
                "CONFIG_MACH_RP2040=y\nCONFIG_MCU=\"rp2040\"\nCONFIG_CANSERIAL=y\n\
                 CONFIG_FLASH_START=0x10000000\nCONFIG_FLASH_APPLICATION_ADDRESS={app}\n"
            ))
            .target()
            .unwrap()
        };
        let katapult = rp("0x10004000");
        assert!(katapult.has_bootloader_offset);
        assert_eq!(katapult.interface, Interface::Can);
        assert!(!rp("0x10000100").has_bootloader_offset);
        let stm = KConfig::parse(
            "CONFIG_MCU=\"stm32f103xe\"\nCONFIG_SERIAL=y\nCONFIG_FLASH_START=0x8000000\n\
             CONFIG_FLASH_APPLICATION_ADDRESS=0x8000000\n",
        )
        .target()
        .unwrap();
        assert!(!stm.has_bootloader_offset);
        assert_eq!(stm.interface, Interface::Serial);
    }

    #[test]
    fn application_start_from_the_address_or_the_chosen_offset() {
        let t = KConfig::parse(OCTOPUS).target().unwrap();
        assert_eq!(
            (t.app_start, t.flash_start),
            (Some(0x800_8000), Some(0x800_0000))
        );
        // No address written: the flash start plus the offset menuconfig chose.
        let t = KConfig::parse(
            "CONFIG_MACH_RPXXXX=y\nCONFIG_MCU=\"rp2040\"\nCONFIG_RPXXXX_FLASH_START_4000=y\n",
        )
        .target()
        .unwrap();
        assert_eq!(t.app_start, Some(0x1000_4000));
        assert!(t.has_bootloader_offset);
        assert_eq!(offset_choice(0x2000), "8KiB bootloader");
        assert_eq!(offset_choice(0), "No bootloader");
    }

    #[test]
    fn bridge_and_linux_targets() {
        let bridge =
            KConfig::parse("CONFIG_MCU=\"stm32g0b1xx\"\nCONFIG_USBCANBUS=y\nCONFIG_USBSERIAL=y\n");
        assert_eq!(bridge.target().unwrap().interface, Interface::UsbCanBridge);
        let linux = KConfig::parse("# CONFIG_MACH_STM32 is not set\nCONFIG_MACH_LINUX=y\n");
        let t = linux.target().unwrap();
        assert_eq!(t.mcu, "linux");
        assert_eq!(t.mach.as_deref(), Some("linux"));
        assert_eq!(t.interface, Interface::Unknown);
        assert_eq!(t.flash_offset, None);
    }

    #[test]
    fn a_file_without_an_mcu_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("printer.cfg");
        fs::write(&path, "[mcu]\nserial: /dev/ttyACM0\n").unwrap();
        let err = KConfig::load(&path).unwrap().target().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("not a Klipper firmware config"), "{msg}");
        assert!(msg.contains("printer.cfg"), "{msg}");
        assert!(KConfig::parse("").target().is_err());
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("EBB36.config");
        let err = KConfig::load(&path).unwrap_err();
        assert!(matches!(err, Error::Missing { .. }));
        assert!(err.to_string().contains("EBB36.config"), "{err}");
    }

    #[test]
    fn odd_lines_are_skipped() {
        let config = KConfig::parse(
            "garbage\nCONFIG_MCU=\"atmega2560\"\n  \n# comment\nNOT_CONFIG=1\nCONFIG_X=\"a \\\"q\\\"\"\n",
        );
        assert_eq!(config.get("MCU"), Some("atmega2560"));
        assert_eq!(config.get("X"), Some("a \"q\""));
        assert_eq!(config.get("NOT_CONFIG"), None);
    }
}
