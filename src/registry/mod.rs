//! The device registry: the user's MCUs and kflash's settings, kept in `devices.json`.
//!
//! Schema (version 1): `{"version": 1, "settings": {...}, "devices": [...]}`. A device is
//! `{"key", "name"?, "mcu_section", "identity": {"type": "serial"|"can"|"linux", ...},
//! "method", "baud"?}`.
//!
//! Invariants: a loaded or saved registry has valid, unique keys and normalised CAN uuids.
//! A malformed or future-version file is reported (file, line, column) and never
//! overwritten; saving is atomic (`write_atomic`), so a failed save leaves the old file.
//!
//! Thread-safety: plain values; concurrent runs are serialised by the state-dir lock, not here.

mod import;
mod settings;
mod state;

pub use import::{import_printer_cfg, import_printer_cfg_file, ImportedMcu};
pub use settings::{expand_home, Backend, KatapultFlasher, Settings};
pub(crate) use state::write_atomic_with;
pub use state::{write_atomic, StateDir};

use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs;
use std::io;
use std::path::PathBuf;

/// The schema version this kflash writes and understands.
pub const SCHEMA_VERSION: u32 = 1;
/// Longest device key accepted.
pub const MAX_KEY_LEN: usize = 64;

/// Everything that can go wrong with the registry, settings and imports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source} (the previous file is unchanged)")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid kflash registry JSON (line {line}, column {column}): {message}; fix or move the file, kflash will not overwrite it")]
    Malformed {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path} has schema version {version}: written by a newer kflash (this one understands version {SCHEMA_VERSION}); upgrade kflash")]
    NewerVersion { path: PathBuf, version: u64 },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("invalid device key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("a device named {0:?} already exists")]
    DuplicateKey(String),
    #[error("no device named {key:?} (known devices: {known})")]
    UnknownDevice { key: String, known: String },
    #[error("unknown setting {key:?}; valid settings: {valid}")]
    UnknownSetting { key: String, valid: String },
    #[error("bad value {value:?} for {key}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("invalid CAN uuid {uuid:?}: expected 12 hex digits, e.g. 0a1b2c3d4e5f")]
    InvalidUuid { uuid: String },
    #[error("{path}:{line}: {message}")]
    Import {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("cannot find the kflash state directory: neither KFLASH_HOME nor HOME is set")]
    NoStateDir,
}

/// How a device is flashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlashMethod {
    /// Katapult when present, else `make flash`.
    #[default]
    Auto,
    /// Katapult's protocol (serial or CAN).
    Katapult,
    /// Klipper's `make flash FLASH_DEVICE=...`.
    Make,
    /// The linux-process MCU: install the binary and restart its service.
    Linux,
}

impl FlashMethod {
    /// The name as stored and typed by users.
    pub fn as_str(self) -> &'static str {
        match self {
            FlashMethod::Auto => "auto",
            FlashMethod::Katapult => "katapult",
            FlashMethod::Make => "make",
            FlashMethod::Linux => "linux",
        }
    }

    /// Parse `auto|katapult|make|linux`.
    pub fn parse(text: &str) -> Result<FlashMethod, Error> {
        match text.trim() {
            "auto" => Ok(FlashMethod::Auto),
            "katapult" => Ok(FlashMethod::Katapult),
            "make" => Ok(FlashMethod::Make),
            "linux" => Ok(FlashMethod::Linux),
            _ => Err(Error::BadValue {
                key: "method".into(),
                value: text.into(),
                reason: "expected one of: auto, katapult, make, linux".into(),
            }),
        }
    }
}

impl fmt::Display for FlashMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a device is reached: the one type the registry stores (devices.json's
/// `"identity"`: `{"type": "serial"|"can"|"linux", ...}`) and the flasher uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Endpoint {
    /// A USB/UART device: a /dev/serial/by-id or by-path path, or a glob such as
    /// `usb-Klipper_stm32*`.
    Serial { path: String },
    /// A CAN node: 12 lowercase hex digits on an interface (`can0`).
    Can { uuid: String, interface: String },
    /// The linux-process MCU's pseudo-tty, e.g. `/tmp/klipper_host_mcu`.
    Linux { path: String },
}

impl Endpoint {
    /// A CAN endpoint with the uuid validated and normalised to lowercase.
    pub fn can(uuid: &str, interface: &str) -> Result<Endpoint, Error> {
        let interface = interface.trim();
        Ok(Endpoint::Can {
            uuid: normalise_uuid(uuid)?,
            interface: if interface.is_empty() {
                "can0".into()
            } else {
                interface.into()
            },
        })
    }

    /// Where, in short, for plans and messages: the path, or `can0:<uuid>`.
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Serial { path } | Endpoint::Linux { path } => path.clone(),
            Endpoint::Can { interface, uuid } => format!("{interface}:{uuid}"),
        }
    }
}

/// With its kind, for device lists: `serial /dev/...`, `can 0a1b... on can0`.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Serial { path } => write!(f, "serial {path}"),
            Endpoint::Can { uuid, interface } => write!(f, "can {uuid} on {interface}"),
            Endpoint::Linux { path } => write!(f, "linux {path}"),
        }
    }
}

/// Validate a CAN uuid (12 hex digits, optional `0x`) and return it lowercase.
pub fn normalise_uuid(uuid: &str) -> Result<String, Error> {
    let trimmed = uuid.trim();
    let digits = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
        .unwrap_or(trimmed);
    if digits.len() == 12 && digits.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(digits.to_ascii_lowercase())
    } else {
        Err(Error::InvalidUuid { uuid: uuid.into() })
    }
}

fn default_mcu_section() -> String {
    "mcu".into()
}

/// One MCU the user registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// The user's short name: file names (`configs/<key>.config`) and CLI arguments.
    pub key: String,
    /// Optional longer description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The printer.cfg section (`mcu` or `mcu EBB36`), to match Moonraker/klippy objects.
    #[serde(default = "default_mcu_section")]
    pub mcu_section: String,
    /// Where the device is found (`"identity"` in devices.json).
    #[serde(rename = "identity")]
    pub endpoint: Endpoint,
    /// How it is flashed.
    #[serde(default)]
    pub method: FlashMethod,
    /// UART baud rate, when the device is on a UART.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baud: Option<u32>,
}

impl Device {
    /// A device with defaults: section derived from the key, method `auto` (or `linux` for a
    /// linux identity), no name, no baud.
    pub fn new(key: &str, endpoint: Endpoint) -> Result<Device, Error> {
        validate_key(key)?;
        let method = if matches!(endpoint, Endpoint::Linux { .. }) {
            FlashMethod::Linux
        } else {
            FlashMethod::Auto
        };
        Ok(Device {
            key: key.into(),
            name: None,
            mcu_section: if key == "mcu" {
                "mcu".into()
            } else {
                format!("mcu {key}")
            },
            endpoint,
            method,
            baud: None,
        })
    }
}

impl Device {
    /// The identity is usable: a non-empty path, or a normalised uuid on a named interface.
    fn check_identity(&self) -> Result<(), Error> {
        let bad = |reason: &str| Error::BadValue {
            key: format!("identity of {}", self.key),
            value: self.endpoint.to_string(),
            reason: reason.into(),
        };
        match &self.endpoint {
            Endpoint::Serial { path } | Endpoint::Linux { path } if path.trim().is_empty() => {
                Err(bad("the serial path is empty"))
            }
            Endpoint::Can { uuid, interface } => {
                if normalise_uuid(uuid)? != *uuid {
                    return Err(Error::InvalidUuid { uuid: uuid.clone() });
                }
                if interface.trim().is_empty() {
                    return Err(bad("the CAN interface is empty"));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Check a device key — the ONE rule for the CLI, `devices import`, the registry and the
/// klippy extra: non-empty, at most 64 ASCII characters from `[A-Za-z0-9_.-]`, starting
/// with a letter or a digit (a key starting with `-` reads as an option on a command line;
/// `_` and `.` start hidden macros and files). The error says which rule was broken.
pub fn validate_key(key: &str) -> Result<(), Error> {
    let fail = |reason: &str| {
        Err(Error::InvalidKey {
            key: key.into(),
            reason: reason.into(),
        })
    };
    if key.is_empty() {
        return fail("a key cannot be empty");
    }
    if key.contains('/') || key.contains('\\') {
        return fail("a key cannot contain path separators");
    }
    if key == "." || key == ".." {
        return fail("a key cannot be . or ..");
    }
    if !key.is_ascii() {
        return fail("use only ASCII letters, digits, '_', '.' and '-'");
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
    {
        return fail(&format!(
            "{c:?} is not allowed; use letters, digits, '_', '.' and '-'"
        ));
    }
    if key.len() > MAX_KEY_LEN {
        return fail(&format!("longer than {MAX_KEY_LEN} characters"));
    }
    if !key.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return fail("a key must start with a letter or a digit");
    }
    Ok(())
}

/// The registry: settings and devices, in the order the user added them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Registry {
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub devices: Vec<Device>,
}

/// What `Registry::add_imported` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Keys added.
    pub added: Vec<String>,
    /// Keys skipped, with the reason.
    pub skipped: Vec<(String, String)>,
}

#[derive(Serialize)]
struct OnDisk<'a> {
    version: u32,
    settings: &'a Settings,
    devices: &'a [Device],
}

impl Registry {
    /// Load devices.json; a missing file is an empty registry with default settings.
    pub fn load(dir: &StateDir) -> Result<Registry, Error> {
        let path = dir.devices_json();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Registry::default()),
            Err(source) => return Err(Error::Read { path, source }),
        };
        Self::parse(&text, &path)
    }

    /// Parse the text of a devices.json (`path` is only used in errors).
    pub fn parse(text: &str, path: &std::path::Path) -> Result<Registry, Error> {
        let malformed = |err: &serde_json::Error| Error::Malformed {
            path: path.into(),
            line: err.line(),
            column: err.column(),
            // serde_json appends " at line L column C"; the position is shown separately.
            message: {
                let text = err.to_string();
                match text.rfind(" at line ") {
                    Some(i) => text[..i].to_string(),
                    None => text,
                }
            },
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| malformed(&e))?;
        let invalid = |message: String| Error::Invalid {
            path: path.into(),
            message,
        };
        let obj = value
            .as_object()
            .ok_or_else(|| invalid("expected a JSON object at the top level".into()))?;
        match obj.get("version") {
            Some(v) => match v.as_u64() {
                Some(1) => {}
                Some(version) if version > u64::from(SCHEMA_VERSION) => {
                    return Err(Error::NewerVersion {
                        path: path.into(),
                        version,
                    })
                }
                _ => return Err(invalid(format!("unsupported \"version\": {v}"))),
            },
            None => return Err(invalid("missing \"version\"".into())),
        }
        // Deserialise from the text (not the Value) so errors carry line and column.
        let mut registry: Registry = serde_json::from_str(text).map_err(|e| malformed(&e))?;
        // Hand-edited uuids may be uppercase or 0x-prefixed: normalise what is valid.
        for device in &mut registry.devices {
            if let Endpoint::Can { uuid, .. } = &mut device.endpoint {
                if let Ok(normal) = normalise_uuid(uuid) {
                    *uuid = normal;
                }
            }
        }
        registry.check().map_err(|e| invalid(e.to_string()))?;
        Ok(registry)
    }

    fn check(&self) -> Result<(), Error> {
        let mut seen = std::collections::HashSet::new();
        for device in &self.devices {
            validate_key(&device.key)?;
            if !seen.insert(device.key.as_str()) {
                return Err(Error::DuplicateKey(device.key.clone()));
            }
            device.check_identity()?;
        }
        Ok(())
    }

    /// The devices.json text of this registry.
    pub fn to_json(&self) -> String {
        let doc = OnDisk {
            version: SCHEMA_VERSION,
            settings: &self.settings,
            devices: &self.devices,
        };
        // Invariant: these types serialise to JSON infallibly (string keys, no maps of
        // non-string keys, no custom Serialize that can fail).
        let mut text = serde_json::to_string_pretty(&doc).expect("registry serialises");
        text.push('\n');
        text
    }

    /// Save atomically, creating the state directory if needed.
    pub fn save(&self, dir: &StateDir) -> Result<(), Error> {
        let path = dir.devices_json();
        self.check().map_err(|e| Error::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        fs::create_dir_all(dir.root()).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, self.to_json().as_bytes())
            .map_err(|source| Error::Write { path, source })
    }

    /// Add a device; its key must be valid and unused.
    pub fn add(&mut self, mut device: Device) -> Result<(), Error> {
        validate_key(&device.key)?;
        if self.devices.iter().any(|d| d.key == device.key) {
            return Err(Error::DuplicateKey(device.key));
        }
        if let Endpoint::Can { uuid, interface } = &device.endpoint {
            device.endpoint = Endpoint::can(uuid, interface)?;
        }
        device.check_identity()?;
        self.devices.push(device);
        Ok(())
    }

    /// Add the MCUs found in printer.cfg. An MCU whose key, printer.cfg section or
    /// endpoint is already registered is skipped with the reason; nothing already
    /// registered changes.
    pub fn add_imported(&mut self, mcus: &[ImportedMcu]) -> ImportReport {
        let mut report = ImportReport::default();
        for mcu in mcus {
            let device = mcu.to_device();
            let known = self
                .devices
                .iter()
                .any(|d| d.key == device.key || d.mcu_section == device.mcu_section);
            if known {
                report
                    .skipped
                    .push((device.key, "already registered".into()));
                continue;
            }
            if let Some(existing) = self.devices.iter().find(|d| d.endpoint == device.endpoint) {
                report.skipped.push((
                    device.key,
                    format!(
                        "{} is already registered as {}",
                        device.endpoint, existing.key
                    ),
                ));
                continue;
            }
            let key = device.key.clone();
            match self.add(device) {
                Ok(()) => report.added.push(key),
                Err(err) => report.skipped.push((key, err.to_string())),
            }
        }
        report
    }

    /// Remove and return a device; an unknown key lists the known ones.
    pub fn remove(&mut self, key: &str) -> Result<Device, Error> {
        match self.devices.iter().position(|d| d.key == key) {
            Some(i) => Ok(self.devices.remove(i)),
            None => Err(self.unknown(key)),
        }
    }

    /// The device with this key; an unknown key lists the known ones.
    pub fn get(&self, key: &str) -> Result<&Device, Error> {
        self.devices
            .iter()
            .find(|d| d.key == key)
            .ok_or_else(|| self.unknown(key))
    }

    fn unknown(&self, key: &str) -> Error {
        let known = if self.devices.is_empty() {
            "none registered yet; see `kflash devices add` or `kflash devices import`".into()
        } else {
            self.devices
                .iter()
                .map(|d| d.key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        Error::UnknownDevice {
            key: key.into(),
            known,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial(path: &str) -> Endpoint {
        Endpoint::Serial { path: path.into() }
    }

    fn sample() -> Registry {
        let mut reg = Registry::default();
        reg.add(
            Device::new(
                "mcu",
                serial("/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00"),
            )
            .unwrap(),
        )
        .unwrap();
        let mut ebb = Device::new("EBB36", Endpoint::can("0A1B2C3D4E5F", "can0").unwrap()).unwrap();
        ebb.method = FlashMethod::Katapult;
        reg.add(ebb).unwrap();
        reg.add(
            Device::new(
                "host",
                Endpoint::Linux {
                    path: "/tmp/klipper_host_mcu".into(),
                },
            )
            .unwrap(),
        )
        .unwrap();
        reg
    }

    #[test]
    fn save_and_load_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::at(tmp.path().join("state"));
        let mut reg = sample();
        reg.settings.set("service", "systemd").unwrap();
        reg.save(&dir).unwrap();
        let loaded = Registry::load(&dir).unwrap();
        assert_eq!(loaded, reg);
        let text = fs::read_to_string(dir.devices_json()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["devices"][1]["identity"]["type"], "can");
        assert_eq!(json["devices"][1]["identity"]["uuid"], "0a1b2c3d4e5f");
        assert_eq!(json["devices"][1]["mcu_section"], "mcu EBB36");
        assert_eq!(json["devices"][2]["method"], "linux");
    }

    #[test]
    fn missing_file_is_an_empty_registry() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::load(&StateDir::at(tmp.path())).unwrap();
        assert!(reg.devices.is_empty());
        assert_eq!(reg.settings, Settings::default());
    }

    #[test]
    fn malformed_json_names_file_and_position_and_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::at(tmp.path());
        let broken = "{\n  \"version\": 1,\n  \"devices\": [,]\n}\n";
        fs::write(dir.devices_json(), broken).unwrap();
        let err = Registry::load(&dir).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("devices.json"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(matches!(err, Error::Malformed { line: 3, .. }));
        assert_eq!(msg.matches("line 3").count(), 1, "{msg}");
        assert_eq!(fs::read_to_string(dir.devices_json()).unwrap(), broken);
    }

    #[test]
    fn wrong_field_types_report_the_position() {
        let text = "{\"version\": 1,\n\"devices\": [{\"key\": 5}]}";
        let err = Registry::parse(text, std::path::Path::new("/x/devices.json")).unwrap_err();
        assert!(matches!(err, Error::Malformed { line: 2, .. }), "{err}");
    }

    #[test]
    fn newer_version_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::at(tmp.path());
        let text = "{\"version\": 2, \"devices\": [], \"future\": true}";
        fs::write(dir.devices_json(), text).unwrap();
        let msg = Registry::load(&dir).unwrap_err().to_string();
        assert!(msg.contains("written by a newer kflash"), "{msg}");
        assert!(msg.contains("devices.json"), "{msg}");
        assert_eq!(fs::read_to_string(dir.devices_json()).unwrap(), text);
    }

    #[test]
    fn invalid_keys_in_the_file_are_reported() {
        let text = r#"{"version": 1, "devices": [{"key": "../evil", "identity": {"type": "serial", "path": "/dev/x"}}]}"#;
        let msg = Registry::parse(text, std::path::Path::new("devices.json"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("path separators"), "{msg}");
    }

    #[test]
    fn unwritable_state_dir_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        // A regular file where the state directory should be: creating it must fail.
        let blocker = tmp.path().join("state");
        fs::write(&blocker, "not a dir").unwrap();
        let err = sample().save(&StateDir::at(&blocker)).unwrap_err();
        assert!(matches!(err, Error::Write { .. }));
        assert!(err.to_string().contains("cannot write"), "{err}");
        assert_eq!(fs::read_to_string(&blocker).unwrap(), "not a dir");
    }

    #[test]
    fn keys_are_validated() {
        for ok in ["mcu", "EBB36", "octopus-pro_1.1", "a", "1st"] {
            validate_key(ok).unwrap();
        }
        let long = "x".repeat(65);
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "separator"),
            ("a\\b", "separator"),
            ("..", ". or .."),
            (".", ". or .."),
            ("tête", "ASCII"),
            ("my board", "not allowed"),
            (long.as_str(), "longer than 64"),
            ("-x", "start with a letter or a digit"),
            ("_probe", "start with a letter or a digit"),
            (".hidden", "start with a letter or a digit"),
        ] {
            let msg = validate_key(bad).unwrap_err().to_string();
            assert!(msg.contains(why), "{bad:?}: {msg}");
        }
    }

    #[test]
    fn add_remove_get() {
        let mut reg = sample();
        let err = reg
            .add(Device::new("mcu", serial("/dev/ttyACM9")).unwrap())
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateKey(_)));
        assert_eq!(reg.get("EBB36").unwrap().method, FlashMethod::Katapult);
        let msg = reg.remove("nope").unwrap_err().to_string();
        assert!(msg.contains("mcu, EBB36, host"), "{msg}");
        assert_eq!(reg.remove("host").unwrap().key, "host");
        assert!(reg.get("host").is_err());
        assert_eq!(reg.devices.len(), 2);
    }

    #[test]
    fn can_uuids_are_validated_and_normalised() {
        assert_eq!(normalise_uuid("0xAABBCCDDEEFF").unwrap(), "aabbccddeeff");
        for bad in ["", "abc", "0a1b2c3d4e5g", "0a1b2c3d4e5f00"] {
            assert!(normalise_uuid(bad).is_err(), "{bad}");
        }
        let mut reg = Registry::default();
        let mut dev = Device::new("tool", serial("x")).unwrap();
        dev.endpoint = Endpoint::Can {
            uuid: "AABBCCDDEEFF".into(),
            interface: "can1".into(),
        };
        reg.add(dev).unwrap();
        assert_eq!(
            reg.get("tool").unwrap().endpoint,
            Endpoint::Can {
                uuid: "aabbccddeeff".into(),
                interface: "can1".into()
            }
        );
    }

    #[test]
    fn empty_serial_paths_are_refused() {
        let mut reg = Registry::default();
        let err = reg
            .add(Device::new("mcu", serial(" ")).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("serial path is empty"), "{err}");
        let can = |uuid: &str| {
            format!(
                r#"{{"version": 1, "devices": [{{"key": "t", "identity": {{"type": "can", "uuid": "{uuid}", "interface": "can0"}}}}]}}"#
            )
        };
        let path = std::path::Path::new("devices.json");
        let reg = Registry::parse(&can("0xAABBCCDDEEFF"), path).unwrap();
        assert_eq!(
            reg.devices[0].endpoint,
            Endpoint::can("aabbccddeeff", "can0").unwrap()
        );
        let msg = Registry::parse(&can("12345"), path)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("devices.json") && msg.contains("12345"),
            "{msg}"
        );
    }

    #[test]
    fn import_adds_new_mcus_and_skips_known_ones() {
        let mut reg = sample();
        let mcus = import_printer_cfg(
            "[mcu]\nserial: /dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00\n\
             [mcu EBB36]\ncanbus_uuid: 112233445566\n\
             [mcu nozzle]\ncanbus_uuid: 0a1b2c3d4e5f\n\
             [mcu sb2040]\ncanbus_uuid: 665544332211\n",
        )
        .unwrap();
        let report = reg.add_imported(&mcus);
        assert_eq!(report.added, ["sb2040"]);
        let skipped: Vec<&str> = report.skipped.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(skipped, ["mcu", "EBB36", "nozzle"]);
        assert!(report.skipped[2].1.contains("already registered as EBB36"));
        assert_eq!(report.skipped[1].1, "already registered");
        assert_eq!(reg.get("sb2040").unwrap().mcu_section, "mcu sb2040");
    }

    #[test]
    fn flash_method_parses() {
        assert_eq!(
            FlashMethod::parse("katapult").unwrap(),
            FlashMethod::Katapult
        );
        assert!(FlashMethod::parse("dfu")
            .unwrap_err()
            .to_string()
            .contains("auto, katapult"));
    }
}
