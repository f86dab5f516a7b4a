//! Klipper/Kalico version strings and firmware dictionaries: is an MCU up to date?
//!
//! Version strings come from `git describe --always --tags --long --dirty` at build time:
//! Klipper `v0.13.0-730-g84104bbbd`, Kalico `v2026.07.00-30-gf2532ee34`, optionally followed
//! by `-dirty` and a `-YYYYMMDD_HHMMSS-<hostname>` suffix (dirty or non-git trees); a tree
//! without tags yields a bare hash, and a tree without any version yields `?`.
//!
//! `compare(mcu, target)` compares what an MCU reports with what kflash would build. The
//! `-dirty` flag and the date-host suffix never make two builds of the same commit differ.
//! An MCU that reports nothing usable is `Unknown`, which the plan flashes.
//!
//! `compare_dicts` compares two firmware data dictionaries (`klipper.dict`) to tell a
//! must-flash protocol change from a version-string-only difference.
//!
//! Pure functions; thread-safe.

use serde_json::{Map, Value};
use std::cmp::Ordering;
use std::fmt;

/// An MCU's firmware relative to the firmware kflash would build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VersionState {
    /// Same commit: nothing to flash.
    Current,
    /// Older than (or different from) the target: flash it.
    Outdated,
    /// Newer than the target: flashing would be a downgrade (warn).
    Newer,
    /// The MCU did not identify (empty, `?`, unparseable): flash it.
    Unknown,
}

impl VersionState {
    /// `current` | `outdated` | `newer` | `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Current => "current",
            VersionState::Outdated => "outdated",
            VersionState::Newer => "newer",
            VersionState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for VersionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed version string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The tag as written (`v0.13.0`), `None` for a bare hash.
    pub tag: Option<String>,
    /// Commits since the tag (0 for a bare tag).
    pub count: u64,
    /// The abbreviated commit hash, lowercase, when known.
    pub hash: Option<String>,
    /// `-dirty` was present.
    pub dirty: bool,
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Strip a `-YYYYMMDD_HHMMSS-<host>` suffix (the host may itself contain dashes): the
/// one rule for Klipper's date-host suffix, also used by the firmware builder.
pub fn strip_date_suffix(s: &str) -> &str {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(pos) = s[i..].find('-') {
        let start = i + pos;
        let rest = &bytes[start + 1..];
        let is_stamp = rest.len() > 16
            && rest[..8].iter().all(u8::is_ascii_digit)
            && rest[8] == b'_'
            && rest[9..15].iter().all(u8::is_ascii_digit)
            && rest[15] == b'-';
        if is_stamp {
            return &s[..start];
        }
        i = start + 1;
    }
    s
}

/// Remove `-dirty` and the date-host suffix, and surrounding whitespace.
pub fn normalise(version: &str) -> String {
    let s = strip_date_suffix(version.trim());
    s.strip_suffix("-dirty").unwrap_or(s).to_string()
}

/// Parse a version string; `None` for empty, `?` or garbage.
pub fn parse(version: &str) -> Option<Version> {
    let raw = version.trim();
    let no_date = strip_date_suffix(raw);
    let (body, dirty) = match no_date.strip_suffix("-dirty") {
        Some(b) => (b, true),
        None => (no_date, false),
    };
    if body.is_empty() || body == "?" || body.contains(char::is_whitespace) {
        return None;
    }
    // tag-count-ghash
    let parts: Vec<&str> = body.rsplitn(3, '-').collect();
    if let [hash, count, tag] = parts[..] {
        if let (Some(h), Ok(n)) = (hash.strip_prefix('g'), count.parse::<u64>()) {
            if is_hex(h) && h.len() >= 4 && !tag.is_empty() {
                return Some(Version {
                    tag: Some(tag.to_string()),
                    count: n,
                    hash: Some(h.to_ascii_lowercase()),
                    dirty,
                });
            }
        }
    }
    // bare hash (git describe --always without tags)
    if is_hex(body) && (7..=40).contains(&body.len()) {
        return Some(Version {
            tag: None,
            count: 0,
            hash: Some(body.to_ascii_lowercase()),
            dirty,
        });
    }
    // bare tag: v1.2.3
    if tag_numbers(body).is_some() {
        return Some(Version {
            tag: Some(body.to_string()),
            count: 0,
            hash: None,
            dirty,
        });
    }
    None
}

/// `v0.13.0` -> [0, 13, 0]; `v2026.07.00` -> [2026, 7, 0]; None when not numeric.
fn tag_numbers(tag: &str) -> Option<Vec<u64>> {
    let t = tag.strip_prefix(['v', 'V']).unwrap_or(tag);
    if t.is_empty() {
        return None;
    }
    t.split('.').map(|p| p.parse::<u64>().ok()).collect()
}

fn same_hash(a: &str, b: &str) -> bool {
    let n = a.len().min(b.len());
    n >= 4 && a[..n] == b[..n]
}

fn cmp_numbers(a: &[u64], b: &[u64]) -> Ordering {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            a.get(i)
                .copied()
                .unwrap_or(0)
                .cmp(&b.get(i).copied().unwrap_or(0))
        })
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

/// Compare the version an MCU reports with the version of the firmware kflash would build.
pub fn compare(mcu: &str, target: &str) -> VersionState {
    let (Some(m), Some(t)) = (parse(mcu), parse(target)) else {
        return VersionState::Unknown;
    };
    if let (Some(mh), Some(th)) = (&m.hash, &t.hash) {
        if same_hash(mh, th) {
            return VersionState::Current;
        }
    }
    let by_order = |o: Ordering| match o {
        Ordering::Greater => VersionState::Newer,
        // Older, or the same position on another branch: flash to match the host.
        Ordering::Less | Ordering::Equal => VersionState::Outdated,
    };
    match (&m.tag, &t.tag) {
        (Some(mt), Some(tt)) if mt == tt => {
            // Without a hash on one side, the same count on the same tag is the same commit.
            if (m.hash.is_none() || t.hash.is_none()) && m.count == t.count {
                VersionState::Current
            } else {
                by_order(m.count.cmp(&t.count))
            }
        }
        (Some(mt), Some(tt)) => match (tag_numbers(mt), tag_numbers(tt)) {
            (Some(a), Some(b)) => by_order(cmp_numbers(&a, &b).then(m.count.cmp(&t.count))),
            _ => VersionState::Outdated,
        },
        // A bare hash cannot be ordered: different commit => flash.
        _ => VersionState::Outdated,
    }
}

/// How two firmware data dictionaries differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DictChange {
    /// Byte-for-byte the same protocol and version.
    Identical,
    /// Only `version` / `build_versions` (or `app`/`license`) differ: the protocol is the same.
    VersionOnly,
    /// Commands, responses, config constants or enumerations differ: must flash.
    Protocol {
        /// What differs, for the plan (e.g. `commands added: ...; config CLOCK_FREQ: a -> b`).
        detail: String,
    },
}

/// Keys of a dictionary that carry no protocol meaning.
const COSMETIC_KEYS: &[&str] = &["version", "build_versions", "app", "license"];

fn names(keys: &[&String]) -> String {
    const SHOWN: usize = 3;
    let mut out: Vec<String> = keys.iter().take(SHOWN).map(|k| (*k).clone()).collect();
    if keys.len() > SHOWN {
        out.push(format!("and {} more", keys.len() - SHOWN));
    }
    out.join(", ")
}

fn short(v: Option<&Value>) -> String {
    const MAX: usize = 40;
    let s = match v {
        None => return "absent".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    if s.chars().count() > MAX {
        s.chars().take(MAX).chain("...".chars()).collect()
    } else {
        s
    }
}

fn diff_section(name: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<String>) {
    if old == new {
        return;
    }
    let empty = Map::new();
    match (old, new) {
        (o, n) if o.is_none_or(Value::is_object) && n.is_none_or(Value::is_object) => {
            let o = old.and_then(Value::as_object).unwrap_or(&empty);
            let n = new.and_then(Value::as_object).unwrap_or(&empty);
            let added: Vec<&String> = n.keys().filter(|k| !o.contains_key(*k)).collect();
            let removed: Vec<&String> = o.keys().filter(|k| !n.contains_key(*k)).collect();
            let changed: Vec<&String> = o
                .keys()
                .filter(|k| n.get(*k).is_some_and(|v| Some(v) != o.get(*k)))
                .collect();
            if name == "config" {
                for k in changed.iter().take(3) {
                    out.push(format!(
                        "config {k}: {} -> {}",
                        short(o.get(*k)),
                        short(n.get(*k))
                    ));
                }
                if changed.len() > 3 {
                    out.push(format!("config: {} more changed", changed.len() - 3));
                }
            } else if !changed.is_empty() {
                out.push(format!("{name} changed: {}", names(&changed)));
            }
            if !added.is_empty() {
                out.push(format!("{name} added: {}", names(&added)));
            }
            if !removed.is_empty() {
                out.push(format!("{name} removed: {}", names(&removed)));
            }
        }
        _ => out.push(format!("{name}: {} -> {}", short(old), short(new))),
    }
}

/// Compare the dictionary of the firmware last flashed (`old`) with a new build's (`new`).
pub fn compare_dicts(old: &Value, new: &Value) -> DictChange {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return DictChange::Protocol {
            detail: "a dictionary is not a JSON object (not a firmware dictionary)".into(),
        };
    };
    let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut details = Vec::new();
    let mut cosmetic = false;
    for key in keys {
        let (ov, nv) = (o.get(key), n.get(key));
        if COSMETIC_KEYS.contains(&key.as_str()) {
            cosmetic |= ov != nv;
            continue;
        }
        diff_section(key, ov, nv, &mut details);
    }
    if !details.is_empty() {
        DictChange::Protocol {
            detail: details.join("; "),
        }
    } else if cosmetic {
        DictChange::VersionOnly
    } else {
        DictChange::Identical
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use VersionState::{Current, Newer, Outdated, Unknown};

    #[test]
    fn parses_klipper_and_kalico_forms() {
        let v = parse("v0.13.0-730-g84104bbbd").unwrap();
        assert_eq!(v.tag.as_deref(), Some("v0.13.0"));
        assert_eq!(v.count, 730);
        assert_eq!(v.hash.as_deref(), Some("84104bbbd"));
        assert!(!v.dirty);
        let v = parse("v2026.07.00-30-gf2532ee34").unwrap();
        assert_eq!(v.tag.as_deref(), Some("v2026.07.00"));
        assert_eq!(v.count, 30);
        let v = parse("v0.13.0-730-g84104bbbd-dirty-20260801_120102-my-pi").unwrap();
        assert!(v.dirty);
        assert_eq!(v.hash.as_deref(), Some("84104bbbd"));
        let v = parse("84104bbbd").unwrap();
        assert_eq!(v.tag, None);
        assert_eq!(parse("v0.13.0").unwrap().count, 0);
        // A tag containing dashes.
        let v = parse("v0.12.0-beta-5-gabcdef1").unwrap();
        assert_eq!(v.tag.as_deref(), Some("v0.12.0-beta"));
    }

    #[test]
    fn odd_strings_are_unparseable() {
        for s in [
            "",
            "?",
            "  ",
            "hello world",
            "garbage",
            "-dirty",
            "v",
            "v0.13.0-x-gzz",
        ] {
            assert_eq!(parse(s), None, "{s:?}");
        }
    }

    #[test]
    fn normalise_strips_dirty_and_date_host() {
        let base = "v0.13.0-730-g84104bbbd";
        for s in [
            "v0.13.0-730-g84104bbbd-dirty",
            "v0.13.0-730-g84104bbbd-20260801_120102-hostname",
            "v0.13.0-730-g84104bbbd-dirty-20260801_120102-host-with-dashes",
            " v0.13.0-730-g84104bbbd\n",
        ] {
            assert_eq!(normalise(s), base, "{s:?}");
        }
        assert_eq!(normalise("?"), "?");
    }

    #[test]
    fn compares_like_a_user_expects() {
        let t = "v0.13.0-730-g84104bbbd";
        assert_eq!(compare(t, t), Current);
        assert_eq!(compare("v0.13.0-730-g84104bbbd-dirty", t), Current);
        assert_eq!(
            compare(
                "v0.13.0-730-g84104bbbd-20260801_120102-pi",
                "v0.13.0-730-g84104bbbd-dirty"
            ),
            Current
        );
        assert_eq!(compare("v0.13.0-700-gaaaaaaaaa", t), Outdated);
        assert_eq!(compare("v0.13.0-731-gbbbbbbbbb", t), Newer);
        assert_eq!(compare("v0.12.0-900-gccccccccc", t), Outdated);
        assert_eq!(compare("v0.13.1-2-gccccccccc", t), Newer);
        // Numeric, not lexical: 0.9 < 0.13.
        assert_eq!(compare("v0.9.0-5-gddddddd", t), Outdated);
        assert_eq!(
            compare("v2026.07.00-30-gf2532ee34", "v2026.08.00-1-g0123456"),
            Outdated
        );
        assert_eq!(
            compare("v2026.07.00-30-gf2532ee34", "v2026.07.00-12-g0123456"),
            Newer
        );
        // Same count, different commit: another branch => flash to match.
        assert_eq!(compare("v0.13.0-730-gfffffffff", t), Outdated);
        // Bare hashes: equal (prefix) => current; different => flash.
        assert_eq!(compare("84104bbbd", t), Current);
        assert_eq!(compare("84104bb", "84104bbbd12"), Current);
        assert_eq!(compare("0123456", t), Outdated);
        // Bare tags.
        assert_eq!(compare("v0.13.0", "v0.13.0-0-gabcdef1"), Current);
        assert_eq!(compare("v0.13.0", t), Outdated);
        assert_eq!(compare("v0.14.0", t), Newer);
    }

    #[test]
    fn unidentified_mcus_are_unknown() {
        let t = "v0.13.0-730-g84104bbbd";
        for mcu in ["", "?", "  ", "garbage here"] {
            assert_eq!(compare(mcu, t), Unknown, "{mcu:?}");
        }
        assert_eq!(compare(t, "?"), Unknown);
    }

    fn dict(version: &str) -> Value {
        json!({
            "app": "Klipper",
            "version": version,
            "build_versions": "gcc: 12 binutils: 2.40",
            "license": "GNU GPLv3",
            "commands": {"get_uptime": 5, "get_clock": 6},
            "responses": {"uptime high=%u clock=%u": 80},
            "config": {"MCU": "stm32f446xx", "CLOCK_FREQ": 180_000_000},
            "enumerations": {"pin": {"PA0": [0, 16]}},
        })
    }

    #[test]
    fn dictionary_changes_are_classified() {
        let old = dict("v0.13.0-730-g84104bbbd");
        assert_eq!(compare_dicts(&old, &old.clone()), DictChange::Identical);
        let new = dict("v0.13.0-731-gaaaaaaaa");
        assert_eq!(compare_dicts(&old, &new), DictChange::VersionOnly);

        let mut cmd = new.clone();
        cmd["commands"]["set_digital_out pin=%u value=%c"] = json!(7);
        cmd["commands"].as_object_mut().unwrap().remove("get_clock");
        let DictChange::Protocol { detail } = compare_dicts(&old, &cmd) else {
            panic!("commands differ");
        };
        assert!(
            detail.contains("commands added: set_digital_out"),
            "{detail}"
        );
        assert!(detail.contains("commands removed: get_clock"), "{detail}");

        let mut cfg = old.clone();
        cfg["config"]["CLOCK_FREQ"] = json!(168_000_000);
        let DictChange::Protocol { detail } = compare_dicts(&old, &cfg) else {
            panic!("config differs");
        };
        assert!(
            detail.contains("config CLOCK_FREQ: 180000000 -> 168000000"),
            "{detail}"
        );

        let mut en = old.clone();
        en["enumerations"]["pin"]["PA1"] = json!([1, 1]);
        assert!(matches!(
            compare_dicts(&old, &en),
            DictChange::Protocol { .. }
        ));
        let mut resp = old.clone();
        resp["responses"] = json!({"uptime high=%u clock=%u": 81});
        let DictChange::Protocol { detail } = compare_dicts(&old, &resp) else {
            panic!("responses differ");
        };
        assert!(detail.contains("responses changed"), "{detail}");
        assert!(matches!(
            compare_dicts(&json!("garbage"), &old),
            DictChange::Protocol { .. }
        ));
    }
}
