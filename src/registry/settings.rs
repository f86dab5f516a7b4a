//! Host-wide settings: where Klipper and Katapult live, how the klipper service is
//! controlled, and the time limits of builds and flashes.
//!
//! Settings are stored in devices.json next to the devices. `get`/`set` address them by the
//! names users type (`kflash settings set KEY VALUE`); `set` validates before changing
//! anything, so a rejected value leaves the settings as they were.
//!
//! Thread-safety: a plain value type.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

use super::Error;

/// How kflash stops and starts the klipper service: the `service` setting. Also what
/// the watchdog process is told (`"backend"` in its JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Moonraker's `/machine/services/*` endpoints (no sudo needed).
    #[default]
    Moonraker,
    /// `sudo -n systemctl stop|start <klipper_service>`.
    Systemd,
    /// The user's own `stop_command` / `start_command`.
    Command,
}

impl Backend {
    /// The name as stored and typed by users.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Moonraker => "moonraker",
            Backend::Systemd => "systemd",
            Backend::Command => "command",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "moonraker" => Ok(Backend::Moonraker),
            "systemd" => Ok(Backend::Systemd),
            "command" => Ok(Backend::Command),
            _ => Err(Error::BadValue {
                key: "service".into(),
                value: s.into(),
                reason: "expected one of: moonraker, systemd, command".into(),
            }),
        }
    }
}

/// The settings block of devices.json. Missing fields take their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The Klipper (or Kalico) source tree firmware is built from.
    pub klipper_dir: PathBuf,
    /// The Katapult source tree (for flashtool.py fallbacks).
    pub katapult_dir: PathBuf,
    /// How the klipper service is stopped and started.
    pub service: Backend,
    /// The systemd unit / Moonraker service name of klipper.
    pub klipper_service: String,
    /// Shell command that stops klipper (service = command).
    pub stop_command: Option<String>,
    /// Shell command that starts klipper (service = command).
    pub start_command: Option<String>,
    /// Moonraker's base URL, in the normal form of `moonraker::parse_url` (the one URL rule:
    /// `http://HOST[:PORT][/PREFIX]`).
    pub moonraker_url: String,
    /// Where the linux-process MCU binary is installed.
    pub linux_mcu_binary: PathBuf,
    /// Time limit of one firmware build, seconds.
    pub build_timeout_s: u64,
    /// Time limit of flashing one device, seconds.
    pub flash_timeout_s: u64,
    /// Who speaks Katapult to serial boards: kflash itself (`native`, falling back to
    /// flashtool.py) or only Katapult's `flashtool` script.
    pub katapult_flasher: KatapultFlasher,
    /// Flash boards that share nothing at the same time in the stop window: each USB/UART
    /// board on its own port and the linux MCU; CAN nodes and their bridge keep their
    /// order. Off by default: some USB hubs brown out when several boards reboot at once.
    /// (Settings added later are written only when changed, so devices.json stays as
    /// earlier kflash wrote it.)
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub flash_parallel: bool,
    /// Pre-warm klippy before the stop (build its C helper, byte-compile its Python for
    /// the updated tree) while klipper keeps running.
    #[serde(skip_serializing_if = "is_true")]
    pub prewarm: bool,
    /// The klippy the klipper service runs (`None`: the one klippy reports through
    /// Moonraker, else `<klipper_dir>/klippy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub klippy_dir: Option<PathBuf>,
    /// The Python that runs klippy (`None`: the one klippy reports through Moonraker,
    /// else `~/klippy-env/bin/python`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub klippy_python: Option<PathBuf>,
    /// Reflash a board's last-known-good image when its new firmware fails verify.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub auto_rollback: bool,
    /// The linux-process MCU's service; `None`: whichever of `klipper-mcu` (Klipper's unit)
    /// and `klipper_mcu` (KIAUH's) exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linux_mcu_service: Option<String>,
}

// serde's skip_serializing_if hands the field by reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_true(value: &bool) -> bool {
    *value
}

/// Who flashes serial boards that run Katapult.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KatapultFlasher {
    /// kflash's own flasher first, flashtool.py as the fallback.
    #[default]
    Native,
    /// Katapult's flashtool.py only.
    Flashtool,
}

impl KatapultFlasher {
    pub fn as_str(self) -> &'static str {
        match self {
            KatapultFlasher::Native => "native",
            KatapultFlasher::Flashtool => "flashtool",
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            klipper_dir: expand_home("~/klipper"),
            katapult_dir: expand_home("~/katapult"),
            service: Backend::Moonraker,
            klipper_service: "klipper".into(),
            stop_command: None,
            start_command: None,
            moonraker_url: "http://127.0.0.1:7125".into(),
            linux_mcu_binary: PathBuf::from("/usr/local/bin/klipper_mcu"),
            build_timeout_s: 600,
            flash_timeout_s: 180,
            katapult_flasher: KatapultFlasher::Native,
            flash_parallel: false,
            prewarm: true,
            klippy_dir: None,
            klippy_python: None,
            auto_rollback: false,
            linux_mcu_service: None,
        }
    }
}

const KEYS: &[&str] = &[
    "klipper_dir",
    "katapult_dir",
    "service",
    "klipper_service",
    "stop_command",
    "start_command",
    "moonraker_url",
    "linux_mcu_binary",
    "build_timeout_s",
    "flash_timeout_s",
    "katapult_flasher",
    "flash_parallel",
    "prewarm",
    "klippy_dir",
    "klippy_python",
    "auto_rollback",
    "linux_mcu_service",
];

/// A yes/no setting as typed: true/false, on/off, yes/no, 1/0.
fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Some(true),
        "false" | "off" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Expand a leading `~` or `~/` to `$HOME` (left as is when HOME is unset).
pub fn expand_home(path: &str) -> PathBuf {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    match (path, home) {
        ("~", Some(home)) => PathBuf::from(home),
        (p, Some(home)) if p.starts_with("~/") => Path::new(&home).join(&p[2..]),
        (p, _) => PathBuf::from(p),
    }
}

impl Settings {
    /// Every setting name, in display order.
    pub fn keys() -> &'static [&'static str] {
        KEYS
    }

    /// The value of a setting as text (`""` for an unset command).
    pub fn get(&self, key: &str) -> Result<String, Error> {
        Ok(match key {
            "klipper_dir" => self.klipper_dir.display().to_string(),
            "katapult_dir" => self.katapult_dir.display().to_string(),
            "service" => self.service.to_string(),
            "klipper_service" => self.klipper_service.clone(),
            "stop_command" => self.stop_command.clone().unwrap_or_default(),
            "start_command" => self.start_command.clone().unwrap_or_default(),
            "moonraker_url" => self.moonraker_url.clone(),
            "linux_mcu_binary" => self.linux_mcu_binary.display().to_string(),
            "build_timeout_s" => self.build_timeout_s.to_string(),
            "flash_timeout_s" => self.flash_timeout_s.to_string(),
            "katapult_flasher" => self.katapult_flasher.as_str().to_string(),
            "flash_parallel" => self.flash_parallel.to_string(),
            "prewarm" => self.prewarm.to_string(),
            "klippy_dir" => optional_path(self.klippy_dir.as_deref()),
            "klippy_python" => optional_path(self.klippy_python.as_deref()),
            "auto_rollback" => self.auto_rollback.to_string(),
            "linux_mcu_service" => self.linux_mcu_service.clone().unwrap_or_default(),
            _ => return Err(unknown(key)),
        })
    }

    /// Change a setting after validating `value`; on error nothing changes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), Error> {
        let bad = |reason: &str| Error::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = value.trim();
        match key {
            "klipper_dir" | "katapult_dir" | "linux_mcu_binary" => {
                if trimmed.is_empty() {
                    return Err(bad("a path is required"));
                }
                let path = expand_home(trimmed);
                match key {
                    "klipper_dir" => self.klipper_dir = path,
                    "katapult_dir" => self.katapult_dir = path,
                    _ => self.linux_mcu_binary = path,
                }
            }
            "service" => {
                self.service = trimmed.parse()?;
            }
            "klipper_service" => {
                if trimmed.is_empty() || !is_unit_name(trimmed) {
                    return Err(bad(
                        "a service name is letters, digits and - _ . @ (e.g. klipper)",
                    ));
                }
                self.klipper_service = trimmed.to_string();
            }
            "stop_command" | "start_command" => {
                let v = (!trimmed.is_empty()).then(|| trimmed.to_string());
                if key == "stop_command" {
                    self.stop_command = v;
                } else {
                    self.start_command = v;
                }
            }
            "moonraker_url" => {
                self.moonraker_url = crate::moonraker::parse_url(trimmed).map_err(|r| bad(&r))?;
            }
            "build_timeout_s" | "flash_timeout_s" => {
                let secs: u64 = trimmed
                    .parse()
                    .ok()
                    .filter(|s| (1..=86_400).contains(s))
                    .ok_or_else(|| bad("expected whole seconds between 1 and 86400"))?;
                if key == "build_timeout_s" {
                    self.build_timeout_s = secs;
                } else {
                    self.flash_timeout_s = secs;
                }
            }
            "linux_mcu_service" => {
                if !is_unit_name(trimmed) {
                    return Err(bad(
                        "a service name is letters, digits and - _ . @ (e.g. klipper-mcu); \
                         empty: whichever of klipper-mcu / klipper_mcu exists",
                    ));
                }
                self.linux_mcu_service = (!trimmed.is_empty()).then(|| trimmed.to_string());
            }
            "katapult_flasher" => {
                self.katapult_flasher = match trimmed {
                    "native" => KatapultFlasher::Native,
                    "flashtool" => KatapultFlasher::Flashtool,
                    _ => return Err(bad("expected native or flashtool")),
                };
            }
            "flash_parallel" | "prewarm" | "auto_rollback" => {
                let on = parse_bool(trimmed).ok_or_else(|| bad("expected true or false"))?;
                match key {
                    "flash_parallel" => self.flash_parallel = on,
                    "prewarm" => self.prewarm = on,
                    _ => self.auto_rollback = on,
                }
            }
            "klippy_dir" | "klippy_python" => {
                // Empty: found again (klippy's own report, else the default).
                let path = (!trimmed.is_empty()).then(|| expand_home(trimmed));
                if key == "klippy_dir" {
                    self.klippy_dir = path;
                } else {
                    self.klippy_python = path;
                }
            }
            _ => return Err(unknown(key)),
        }
        Ok(())
    }
}

/// A systemd unit name as a setting may hold it (letters, digits and `-_.@`).
fn is_unit_name(name: &str) -> bool {
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

fn optional_path(path: Option<&Path>) -> String {
    path.map(|p| p.display().to_string()).unwrap_or_default()
}

fn unknown(key: &str) -> Error {
    Error::UnknownSetting {
        key: key.to_string(),
        valid: KEYS.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::default();
        assert_eq!(s.get("service").unwrap(), "moonraker");
        assert_eq!(s.get("klipper_service").unwrap(), "klipper");
        assert_eq!(s.get("moonraker_url").unwrap(), "http://127.0.0.1:7125");
        assert_eq!(s.get("build_timeout_s").unwrap(), "600");
        assert_eq!(s.get("flash_timeout_s").unwrap(), "180");
        assert_eq!(s.get("katapult_flasher").unwrap(), "native");
        assert_eq!(s.get("stop_command").unwrap(), "");
        assert_eq!(s.get("flash_parallel").unwrap(), "false");
        assert_eq!(s.get("prewarm").unwrap(), "true");
        assert_eq!(s.get("klippy_dir").unwrap(), "");
        assert_eq!(s.get("klippy_python").unwrap(), "");
        assert!(s.klipper_dir.ends_with("klipper"));
        for key in Settings::keys() {
            s.get(key).unwrap();
        }
    }

    #[test]
    fn set_then_get_round_trips() {
        let mut s = Settings::default();
        s.set("service", "command").unwrap();
        s.set("stop_command", "supervisorctl stop klipper").unwrap();
        s.set("klipper_dir", "/opt/kalico").unwrap();
        s.set("build_timeout_s", "900").unwrap();
        s.set("moonraker_url", "http://localhost:7125/").unwrap();
        assert_eq!(s.service, Backend::Command);
        assert_eq!(
            s.stop_command.as_deref(),
            Some("supervisorctl stop klipper")
        );
        assert_eq!(s.get("klipper_dir").unwrap(), "/opt/kalico");
        assert_eq!(s.build_timeout_s, 900);
        assert_eq!(s.moonraker_url, "http://localhost:7125");
        s.set("stop_command", "").unwrap();
        assert_eq!(s.stop_command, None);
        s.set("flash_parallel", "on").unwrap();
        s.set("prewarm", "False").unwrap();
        assert!(s.flash_parallel && !s.prewarm);
        s.set("klippy_dir", "/home/pi/klipper/klippy").unwrap();
        s.set("klippy_python", "/home/pi/klippy-env/bin/python")
            .unwrap();
        assert_eq!(s.get("klippy_dir").unwrap(), "/home/pi/klipper/klippy");
        s.set("klippy_python", " ").unwrap();
        assert_eq!(s.klippy_python, None);
        s.set("auto_rollback", "true").unwrap();
        assert!(s.auto_rollback);
        s.set("linux_mcu_service", "klipper_mcu").unwrap();
        assert_eq!(s.get("linux_mcu_service").unwrap(), "klipper_mcu");
        s.set("linux_mcu_service", "").unwrap();
        assert_eq!(s.linux_mcu_service, None);
    }

    #[test]
    fn unknown_key_lists_valid_keys() {
        let mut s = Settings::default();
        let err = s.set("klipper_path", "/x").unwrap_err().to_string();
        assert!(err.contains("klipper_path"), "{err}");
        assert!(
            err.contains("klipper_dir") && err.contains("moonraker_url"),
            "{err}"
        );
        assert!(s.get("nope").is_err());
    }

    #[test]
    fn bad_values_are_rejected_and_change_nothing() {
        let mut s = Settings::default();
        let before = s.clone();
        for (key, value) in [
            ("service", "initd"),
            ("build_timeout_s", "ten"),
            ("flash_timeout_s", "0"),
            ("katapult_flasher", "dfu-util"),
            ("moonraker_url", "localhost:7125"),
            ("moonraker_url", "https://printer.local"),
            ("moonraker_url", "http://pi:raspberry@printer.local"),
            ("moonraker_url", "http://printer.local:7125/?x=1"),
            ("klipper_service", "klipper; rm -rf /"),
            ("klipper_dir", "  "),
            ("flash_parallel", "sometimes"),
            ("prewarm", ""),
            ("auto_rollback", "sometimes"),
            ("linux_mcu_service", "klipper-mcu; reboot"),
        ] {
            let err = s.set(key, value).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        assert_eq!(s, before);
    }

    #[test]
    fn moonraker_url_follows_the_clients_rule() {
        let mut s = Settings::default();
        s.set("moonraker_url", " http://Printer.local:7125/ ")
            .unwrap();
        assert_eq!(s.moonraker_url, "http://printer.local:7125");
        // A non-ASCII host is kept in the form name resolution uses, and the client
        // accepts exactly what the setting stored.
        s.set("moonraker_url", "http://éx:7125").unwrap();
        assert_eq!(s.moonraker_url, "http://xn--x-9fa:7125");
        crate::moonraker::Client::new(&s.moonraker_url, std::time::Duration::from_secs(1)).unwrap();
        let err = s
            .set("moonraker_url", "https://éx")
            .unwrap_err()
            .to_string();
        assert!(err.contains("https is not supported"), "{err}");
    }
}
