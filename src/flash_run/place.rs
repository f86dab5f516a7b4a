//! Where this process runs, as far as stopping klipper is concerned.
//!
//! On a systemd host every service is a cgroup, and stock `klipper.service` (default
//! `KillMode=control-group`) kills every process of its cgroup when it stops: a child of
//! klippy, `setsid` or double-forked, dies with it. `Place::detect` reads whether systemd is
//! the init system (`/run/systemd/system` exists) and which service unit's cgroup holds
//! this process (`/proc/self/cgroup`; cgroup v2 `0::/system.slice/klipper.service` or v1
//! `1:name=systemd:/...`). `$KFLASH_SYSTEMD_DIR` and `$KFLASH_CGROUP_FILE` replace both
//! paths (tests). The user's own manager (`user@1000.service`) is not a service that
//! `stop klipper` takes down.
//!
//! kflash's own units (`kflash-helper`, `kflash-run`, `kflash-watchdog`) run with
//! `KillMode=process`: a process they hold outlives the unit's main process, so from
//! inside them a new session is a way out, as it is outside any service.
//!
//! Plain values; thread-safe.

use std::path::Path;

/// The transient unit `sudo systemd-run` makes for the helper. Not `INSTALLED_UNIT`: a
/// transient unit cannot take the name of a unit file.
pub const HELPER_UNIT: &str = "kflash-helper";
/// The unit `scripts/install.sh` installs and Moonraker starts; its command is
/// `python -m kflash.helper --home <state> --pending`.
pub const INSTALLED_UNIT: &str = "kflash-run";
/// The transient unit `sudo systemd-run` makes for a watchdog that must leave a service.
pub const WATCHDOG_UNIT: &str = "kflash-watchdog";

/// kflash's own units: all `KillMode=process`.
const OWN_UNITS: [&str; 3] = [HELPER_UNIT, INSTALLED_UNIT, WATCHDOG_UNIT];

/// Where a process runs: under systemd or not, and inside which service unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// systemd is the init system.
    pub systemd: bool,
    /// The service unit (without `.service`) whose cgroup holds the process.
    pub unit: Option<String>,
}

impl Place {
    /// This process's place (see the module doc for the paths and their overrides).
    pub fn detect() -> Place {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let systemd_dir = var("KFLASH_SYSTEMD_DIR").unwrap_or_else(|| "/run/systemd/system".into());
        let cgroup_file = var("KFLASH_CGROUP_FILE").unwrap_or_else(|| "/proc/self/cgroup".into());
        let cgroup = std::fs::read_to_string(&cgroup_file).unwrap_or_default();
        Place {
            systemd: Path::new(&systemd_dir).is_dir(),
            unit: service_of(&cgroup),
        }
    }

    /// The service whose stop (or whose main process's death) would kill a child of this
    /// process: a service unit under systemd that is not one of kflash's own.
    pub fn trap(&self) -> Option<&str> {
        self.unit
            .as_deref()
            .filter(|unit| self.systemd && !OWN_UNITS.contains(unit))
    }

    /// Whether this process runs inside `klipper` itself (the unit kflash stops): `unit`
    /// is the configured unit name; empty means "whatever Moonraker calls klipper", so any
    /// `klipper`, `klipper-1`, `klipper_2`.
    pub fn inside_klipper(&self, unit: &str) -> bool {
        let Some(here) = self.trap() else {
            return false;
        };
        let unit = unit.trim().trim_end_matches(".service");
        if !unit.is_empty() {
            return here == unit;
        }
        here.strip_prefix("klipper").is_some_and(|rest| {
            let digits = rest.strip_prefix(['-', '_']).unwrap_or(rest);
            digits.chars().all(|c| c.is_ascii_digit())
        })
    }
}

/// The service unit in a `/proc/<pid>/cgroup` text, if any.
fn service_of(cgroup: &str) -> Option<String> {
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !matches!(controllers, "" | "name=systemd") {
            continue;
        }
        let found = path
            .trim()
            .rsplit('/')
            .find_map(|part| part.strip_suffix(".service"));
        if let Some(unit) = found {
            // user@1000.service is the user's manager, not a service `stop klipper` ends.
            return (!unit.starts_with("user@")).then(|| unit.to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(cgroup: &str) -> Place {
        Place {
            systemd: true,
            unit: service_of(cgroup),
        }
    }

    #[test]
    fn reads_the_service_of_a_cgroup() {
        assert_eq!(
            service_of("0::/system.slice/klipper.service\n").as_deref(),
            Some("klipper")
        );
        assert_eq!(
            service_of("12:cpu:/\n1:name=systemd:/system.slice/klipper-1.service\n").as_deref(),
            Some("klipper-1")
        );
        assert_eq!(
            service_of("0::/user.slice/user-1000.slice/session-3.scope\n"),
            None
        );
        assert_eq!(
            service_of("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x\n"),
            None
        );
        assert_eq!(service_of(""), None);
    }

    #[test]
    fn only_a_foreign_service_is_a_trap() {
        assert_eq!(
            at("0::/system.slice/klipper.service").trap(),
            Some("klipper")
        );
        assert_eq!(at("0::/system.slice/kflash-helper.service").trap(), None);
        assert_eq!(at("0::/system.slice/kflash-run.service").trap(), None);
        assert_eq!(
            at("0::/user.slice/user-1000.slice/session-3.scope").trap(),
            None
        );
        let no_systemd = Place {
            systemd: false,
            unit: Some("klipper".into()),
        };
        assert_eq!(no_systemd.trap(), None);
    }

    #[test]
    fn knows_klipper_by_its_configured_or_default_names() {
        let klipper = at("0::/system.slice/klipper.service");
        assert!(klipper.inside_klipper("klipper"));
        assert!(klipper.inside_klipper(""));
        assert!(!klipper.inside_klipper("klipper-2"));
        assert!(at("0::/system.slice/klipper_2.service").inside_klipper(""));
        assert!(!at("0::/system.slice/klipper_mcu.service").inside_klipper(""));
        assert!(!at("0::/system.slice/moonraker.service").inside_klipper(""));
    }
}
