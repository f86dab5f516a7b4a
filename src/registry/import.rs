//! Import MCUs from Klipper's printer.cfg.
//!
//! Reads the INI-like format Klipper uses: `[section]` headers, `key: value` or
//! `key = value` options, `#`/`;` comments (whole-line, or inline after whitespace),
//! indented continuation lines, and `[include PATH]` (relative to the including file, `*`
//! and `?` in the file name; includes are followed by `import_printer_cfg_file` only, with
//! cycles refused). Later definitions of a section's option override earlier ones, as in
//! Klipper. Only `[mcu]` and `[mcu NAME]` sections are reported.
//!
//! Pure functions; thread-safe.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::{normalise_uuid, Device, Endpoint, Error, FlashMethod, MAX_KEY_LEN};
use crate::discovery::{glob_match, has_wildcard};

/// An MCU found in printer.cfg, ready to become a `Device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedMcu {
    /// Proposed device key (`mcu`, or the section's name sanitised).
    pub key: String,
    /// The section name as written (`mcu`, `mcu EBB36`).
    pub mcu_section: String,
    /// Where it is found.
    pub endpoint: Endpoint,
    /// `linux` for the host MCU, else `auto`.
    pub method: FlashMethod,
    /// `baud:` when given.
    pub baud: Option<u32>,
}

impl ImportedMcu {
    /// The registry device for this MCU.
    pub fn to_device(&self) -> Device {
        Device {
            key: self.key.clone(),
            name: None,
            mcu_section: self.mcu_section.clone(),
            endpoint: self.endpoint.clone(),
            method: self.method,
            baud: self.baud,
        }
    }
}

/// One option as read: value (continuations joined with '\n') and where it was set.
#[derive(Debug, Clone)]
struct Opt {
    value: String,
    path: PathBuf,
    line: usize,
}

/// Sections in first-seen order with their options.
#[derive(Default)]
struct Parsed {
    order: Vec<String>,
    sections: BTreeMap<String, BTreeMap<String, Opt>>,
    /// Where each section header was first seen (file, line).
    headers: BTreeMap<String, (PathBuf, usize)>,
}

impl Parsed {
    fn section(&mut self, name: &str) -> &mut BTreeMap<String, Opt> {
        if !self.sections.contains_key(name) {
            self.order.push(name.to_string());
        }
        self.sections.entry(name.to_string()).or_default()
    }
}

/// Parse printer.cfg text (includes are not followed: use `import_printer_cfg_file`).
pub fn import_printer_cfg(text: &str) -> Result<Vec<ImportedMcu>, Error> {
    let mut parsed = Parsed::default();
    parse_into(text, Path::new("printer.cfg"), &mut parsed, None)?;
    collect(&parsed)
}

/// Parse a printer.cfg file, following `[include ...]` relative to each file.
pub fn import_printer_cfg_file(path: &Path) -> Result<Vec<ImportedMcu>, Error> {
    let mut parsed = Parsed::default();
    let mut stack = Vec::new();
    parse_file(path, None, &mut parsed, &mut stack)?;
    collect(&parsed)
}

/// The largest config file read (Klipper's own configs are a few hundred KiB at most).
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Read a config file: a regular file only (a FIFO or a device such as /dev/zero would
/// hang or never end), at most `MAX_CONFIG_BYTES`.
fn read_config(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let meta = fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "{} is not a regular file (a FIFO, device or directory): not read",
            path.display()
        ));
    }
    let file = fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!(
            "{} is larger than {} MiB: not a printer config",
            path.display(),
            MAX_CONFIG_BYTES >> 20
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))
}

/// Parse one file; `from` is the including file and line (`None` for printer.cfg itself),
/// where errors about this file are reported.
fn parse_file(
    path: &Path,
    from: Option<(&Path, usize)>,
    parsed: &mut Parsed,
    stack: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    let at = |message: String| match from {
        Some((file, line)) => Error::Import {
            path: file.into(),
            line,
            message,
        },
        None => Error::Import {
            path: path.into(),
            line: 0,
            message,
        },
    };
    let canonical = fs::canonicalize(path).map_err(|source| match from {
        Some(_) => at(format!("cannot read {}: {source}", path.display())),
        None => Error::Read {
            path: path.into(),
            source,
        },
    })?;
    if stack.contains(&canonical) {
        return Err(at(format!(
            "include cycle: {} is already being read (it includes itself, directly or \
             through other includes); remove this [include]",
            path.display()
        )));
    }
    let text = read_config(path).map_err(at)?;
    stack.push(canonical);
    let result = parse_into(&text, path, parsed, Some(stack));
    stack.pop();
    result
}

fn strip_comment(line: &str) -> &str {
    // Klipper: inline comments start at '#' or ';' preceded by whitespace.
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if (b == b'#' || b == b';') && (i == 0 || bytes[i - 1].is_ascii_whitespace()) {
            return &line[..i];
        }
    }
    line
}

fn parse_into(
    text: &str,
    path: &Path,
    parsed: &mut Parsed,
    mut stack: Option<&mut Vec<PathBuf>>,
) -> Result<(), Error> {
    let err = |line: usize, message: String| Error::Import {
        path: path.into(),
        line,
        message,
    };
    let mut section: Option<String> = None;
    let mut last_key: Option<String> = None;
    for (idx, raw) in text.lines().enumerate() {
        let lineno = idx + 1;
        let content = strip_comment(raw);
        if content.trim().is_empty() {
            continue;
        }
        let indented = raw.starts_with([' ', '\t']);
        if indented {
            if let (Some(sec), Some(key)) = (&section, &last_key) {
                if let Some(opt) = parsed.section(sec).get_mut(key) {
                    opt.value.push('\n');
                    opt.value.push_str(content.trim());
                }
                continue;
            }
        }
        let trimmed = content.trim();
        if let Some(rest) = trimmed.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| err(lineno, format!("section header without ']': {trimmed}")))?;
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            last_key = None;
            if let Some(target) = name.strip_prefix("include ") {
                section = None;
                if let Some(stack) = stack.as_deref_mut() {
                    include(path, target.trim(), lineno, parsed, stack)?;
                }
                continue;
            }
            parsed.section(&name);
            parsed
                .headers
                .entry(name.clone())
                .or_insert_with(|| (path.to_path_buf(), lineno));
            section = Some(name);
            continue;
        }
        let Some(sec) = &section else {
            // Options outside a section (or under an include) are ignored, like Klipper's
            // parser rejects them; we only care about mcu sections.
            continue;
        };
        let split = trimmed
            .find([':', '='])
            .ok_or_else(|| err(lineno, format!("expected 'option: value', got {trimmed:?}")))?;
        let key = trimmed[..split].trim().to_ascii_lowercase();
        let value = trimmed[split + 1..].trim().to_string();
        parsed.section(sec).insert(
            key.clone(),
            Opt {
                value,
                path: path.into(),
                line: lineno,
            },
        );
        last_key = Some(key);
    }
    Ok(())
}

fn include(
    from: &Path,
    target: &str,
    line: usize,
    parsed: &mut Parsed,
    stack: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    let base = from.parent().unwrap_or(Path::new("."));
    let full = base.join(target);
    let name = full
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !has_wildcard(&name) {
        if !full.exists() {
            return Err(Error::Import {
                path: from.into(),
                line,
                message: format!("include file {} does not exist", full.display()),
            });
        }
        return parse_file(&full, Some((from, line)), parsed, stack);
    }
    let dir = full.parent().unwrap_or(Path::new("."));
    let mut matches: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| glob_match(&name, &e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .filter(|p| !p.is_dir())
            .collect(),
        Err(_) => Vec::new(),
    };
    matches.sort();
    for file in matches {
        parse_file(&file, Some((from, line)), parsed, stack)?;
    }
    Ok(())
}

/// The device key proposed for a section: `mcu` stays `mcu`, `mcu EBB36` becomes `EBB36`;
/// characters a key cannot hold become `_`.
pub fn key_for_section(section: &str) -> String {
    let name = section.strip_prefix("mcu").map_or(section, str::trim);
    let name = if name.is_empty() { "mcu" } else { name };
    let mut key: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(MAX_KEY_LEN)
        .collect();
    // A key starts with a letter or a digit (`validate_key`): `mcu -x` becomes `mcu_-x`.
    if !key.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        key = "mcu_".to_string() + &key;
        key.truncate(MAX_KEY_LEN);
    }
    key
}

fn collect(parsed: &Parsed) -> Result<Vec<ImportedMcu>, Error> {
    let mut out = Vec::new();
    for name in &parsed.order {
        if name != "mcu" && !name.starts_with("mcu ") {
            continue;
        }
        let opts = &parsed.sections[name];
        let get = |k: &str| opts.get(k).filter(|o| !o.value.is_empty());
        let bad = |opt: &Opt, message: String| Error::Import {
            path: opt.path.clone(),
            line: opt.line,
            message,
        };
        let (endpoint, method) = if let Some(serial) = get("serial") {
            let path = serial.value.clone();
            if path.starts_with("/tmp/klipper_host_") {
                (Endpoint::Linux { path }, FlashMethod::Linux)
            } else {
                (Endpoint::Serial { path }, FlashMethod::Auto)
            }
        } else if let Some(uuid) = get("canbus_uuid") {
            let uuid = normalise_uuid(&uuid.value).map_err(|e| bad(uuid, e.to_string()))?;
            let interface =
                get("canbus_interface").map_or_else(|| "can0".into(), |o| o.value.clone());
            (Endpoint::Can { uuid, interface }, FlashMethod::Auto)
        } else {
            let (path, line) = parsed
                .headers
                .get(name)
                .cloned()
                .unwrap_or_else(|| (PathBuf::from("printer.cfg"), 0));
            return Err(Error::Import {
                path,
                line,
                message: format!("[{name}] has neither serial: nor canbus_uuid:"),
            });
        };
        let baud_rate = match get("baud") {
            Some(opt) => Some(
                opt.value
                    .parse::<u32>()
                    .map_err(|_| bad(opt, format!("baud: {:?} is not a number", opt.value)))?,
            ),
            None => None,
        };
        out.push(ImportedMcu {
            key: key_for_section(name),
            mcu_section: name.clone(),
            endpoint,
            method,
            baud: baud_rate,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "\
# My printer
[mcu]
serial: /dev/serial/by-id/usb-Klipper_stm32f446xx_12345-if00  # octopus
restart_method: command

[mcu EBB36]
canbus_uuid: 0A1B2C3D4E5F
canbus_interface = can1

[mcu host]
serial: /tmp/klipper_host_mcu

[mcu toolboard]
serial: /dev/ttyAMA0
baud: 250000

[stepper_x]
step_pin: PF13
gcode:
  G28
  ; not an option: value
[mcuish]
serial: /dev/nope
";

    #[test]
    fn finds_every_mcu_section() {
        let mcus = import_printer_cfg(CFG).unwrap();
        let keys: Vec<_> = mcus.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["mcu", "EBB36", "host", "toolboard"]);
        assert_eq!(
            mcus[0].endpoint,
            Endpoint::Serial {
                path: "/dev/serial/by-id/usb-Klipper_stm32f446xx_12345-if00".into()
            }
        );
        assert_eq!(
            mcus[1].endpoint,
            Endpoint::Can {
                uuid: "0a1b2c3d4e5f".into(),
                interface: "can1".into()
            }
        );
        assert_eq!(mcus[1].mcu_section, "mcu EBB36");
        assert_eq!(mcus[2].method, FlashMethod::Linux);
        assert!(matches!(mcus[2].endpoint, Endpoint::Linux { .. }));
        assert_eq!(mcus[3].baud, Some(250_000));
        assert_eq!(mcus[0].to_device().mcu_section, "mcu");
    }

    #[test]
    fn bad_values_name_the_line() {
        let msg = import_printer_cfg("[mcu x]\ncanbus_uuid: 1234\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains(":2:") && msg.contains("1234"), "{msg}");
        let msg = import_printer_cfg("[mcu]\nserial: /dev/x\nbaud: fast\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains(":3:") && msg.contains("fast"), "{msg}");
        let msg = import_printer_cfg("# x\n[mcu]\nrestart_method: command\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(":2:") && msg.contains("neither serial"),
            "{msg}"
        );
    }

    #[test]
    fn keys_are_sanitised() {
        assert_eq!(key_for_section("mcu"), "mcu");
        assert_eq!(key_for_section("mcu EBB36"), "EBB36");
        assert_eq!(key_for_section("mcu my board"), "my_board");
        assert_eq!(key_for_section("mcu ../x"), "mcu____x");
        assert_eq!(key_for_section("mcu -probe"), "mcu_-probe");
        assert_eq!(key_for_section("mcu _probe"), "mcu__probe");
        for section in ["mcu ../x", "mcu ..", "mcu -probe", "mcu _probe"] {
            super::super::validate_key(&key_for_section(section)).unwrap();
        }
    }

    #[test]
    fn includes_are_followed_with_globs_and_later_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir(root.join("boards")).unwrap();
        fs::write(
            root.join("printer.cfg"),
            "[include boards/*.cfg]\n[mcu]\nserial: /dev/serial/by-id/main\n",
        )
        .unwrap();
        fs::write(
            root.join("boards/a_ebb.cfg"),
            "[mcu EBB]\ncanbus_uuid: aabbccddeeff\n",
        )
        .unwrap();
        fs::write(
            root.join("boards/b_override.cfg"),
            "[mcu EBB]\ncanbus_interface: can2\n[include ../extra/host.cfg]\n",
        )
        .unwrap();
        fs::create_dir(root.join("extra")).unwrap();
        fs::write(
            root.join("extra/host.cfg"),
            "[mcu rpi]\nserial: /tmp/klipper_host_mcu\n",
        )
        .unwrap();
        let mcus = import_printer_cfg_file(&root.join("printer.cfg")).unwrap();
        let keys: Vec<_> = mcus.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["EBB", "rpi", "mcu"]);
        assert_eq!(
            mcus[0].endpoint,
            Endpoint::Can {
                uuid: "aabbccddeeff".into(),
                interface: "can2".into()
            }
        );
    }

    #[test]
    fn include_cycles_and_missing_includes_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::write(root.join("a.cfg"), "[include b.cfg]\n").unwrap();
        fs::write(root.join("b.cfg"), "# b\n\n[include a.cfg]\n").unwrap();
        let msg = import_printer_cfg_file(&root.join("a.cfg"))
            .unwrap_err()
            .to_string();
        // Named at the line that closes the cycle.
        assert!(msg.contains("cycle") && msg.contains("b.cfg:3:"), "{msg}");
        fs::write(root.join("c.cfg"), "[include missing.cfg]\n").unwrap();
        let msg = import_printer_cfg_file(&root.join("c.cfg"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("missing.cfg") && msg.contains("does not exist"),
            "{msg}"
        );
        // A glob matching nothing is fine (as in Klipper).
        fs::write(
            root.join("d.cfg"),
            "[include none/*.cfg]\n[mcu]\nserial: /dev/x\n",
        )
        .unwrap();
        assert_eq!(
            import_printer_cfg_file(&root.join("d.cfg")).unwrap().len(),
            1
        );
    }

    #[test]
    fn only_regular_files_are_read_and_reads_are_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let fifo = root.join("pipe.cfg");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        for (target, why) in [
            ("/dev/zero", "not a regular file"),
            ("pipe.cfg", "not a regular file"),
            ("*.cfg", "not a regular file"),
            ("big.data", "larger than"),
        ] {
            fs::write(
                root.join("printer.cfg"),
                format!("[mcu]\nserial: /dev/x\n[include {target}]\n"),
            )
            .unwrap();
            let big = fs::File::create(root.join("big.data")).unwrap();
            big.set_len(MAX_CONFIG_BYTES + 1).unwrap();
            let started = std::time::Instant::now();
            let msg = import_printer_cfg_file(&root.join("printer.cfg"))
                .unwrap_err()
                .to_string();
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{target}"
            );
            assert!(
                msg.contains(why) && msg.contains("printer.cfg:3:"),
                "{target}: {msg}"
            );
        }
        // printer.cfg itself may not be a FIFO either.
        let msg = import_printer_cfg_file(&fifo).unwrap_err().to_string();
        assert!(msg.contains("not a regular file"), "{msg}");
    }
}
