//! The `systemd` backend: `sudo -n systemctl stop|start <unit>`.
//!
//! Owns: running systemctl through `sudo -n` (never prompting; skipped when already root),
//! recognising sudo's "a password is required" refusal and explaining how to allow exactly
//! the commands kflash needs, and a non-destructive `check` that exercises the real path:
//! `sudo -n -l <systemctl> stop|start <unit>` (would sudo allow exactly these?) and
//! `sudo -n <systemctl> show -p LoadState -p ActiveState <unit>` (does the unit exist?).
//! `is_active` asks `systemctl is-active` directly: reading state needs no privilege.
//!
//! Thread-safety: immutable after construction; `Send + Sync`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Error, ServiceControl};
use crate::process::{self, Cmd, Output};

/// Deadline of `systemctl stop|start` (klippy may take a while to shut down).
const ACTION_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of the quick queries.
const QUERY_TIMEOUT: Duration = Duration::from_secs(20);

/// Controls a systemd unit with `sudo -n systemctl`.
#[derive(Debug, Clone)]
pub struct SystemdService {
    unit: String,
    /// `None`: run systemctl directly (we are root).
    sudo: Option<PathBuf>,
    /// `None`: look `systemctl` up on PATH when needed.
    systemctl: Option<PathBuf>,
}

impl SystemdService {
    /// Control `unit` with the `sudo` and `systemctl` found on PATH (no sudo when root).
    pub fn new(unit: &str) -> Self {
        let root = rustix::process::geteuid().is_root();
        SystemdService {
            unit: unit.to_owned(),
            sudo: if root { None } else { Some("sudo".into()) },
            systemctl: None,
        }
    }

    /// Control `unit` with explicit programs (`sudo: None` = run systemctl directly).
    pub fn with_programs(unit: &str, sudo: Option<PathBuf>, systemctl: PathBuf) -> Self {
        SystemdService {
            unit: unit.to_owned(),
            sudo,
            systemctl: Some(systemctl),
        }
    }

    /// The absolute systemctl path (sudoers rules name absolute paths).
    fn systemctl(&self) -> Result<PathBuf, Error> {
        if let Some(path) = &self.systemctl {
            return Ok(path.clone());
        }
        find_on_path("systemctl").ok_or_else(|| Error::Unavailable {
            service: self.describe(),
            reason: "systemctl is not on PATH: this host does not run systemd; use \
                     `kflash settings set service moonraker` or the command backend"
                .into(),
        })
    }

    fn privileged(&self, systemctl: &Path, args: &[&str]) -> Cmd {
        match &self.sudo {
            Some(sudo) => Cmd::new(sudo).arg("-n").arg(systemctl).args(args),
            None => Cmd::new(systemctl).args(args),
        }
    }

    fn hint(&self, systemctl: &Path) -> String {
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "<your user>".into());
        let sc = systemctl.display();
        let unit = &self.unit;
        format!(
            "Allow exactly these commands with a sudoers rule, e.g. \
             `echo '{user} ALL=(root) NOPASSWD: {sc} stop {unit}, {sc} start {unit}, \
             {sc} show -p ActiveState {unit}' | sudo tee /etc/sudoers.d/kflash && \
             sudo chmod 440 /etc/sudoers.d/kflash`, or let Moonraker do it without sudo: \
             `kflash settings set service moonraker`"
        )
    }

    /// Turn a failed run into `SudoRefused` when sudo said no, else a command error.
    fn explain(
        &self,
        action: &'static str,
        cmd: &Cmd,
        systemctl: &Path,
        err: process::Error,
    ) -> Error {
        let refused = self.sudo.is_some()
            && matches!(err, process::Error::Failed { .. })
            && is_sudo_refusal(err.tail());
        if refused {
            Error::SudoRefused {
                cmd: cmd.display(),
                output: err.tail().to_owned(),
                hint: self.hint(systemctl),
            }
        } else {
            Error::Command {
                action,
                service: self.describe(),
                source: Box::new(err),
            }
        }
    }

    fn act(&self, action: &'static str) -> Result<(), Error> {
        let systemctl = self.systemctl()?;
        let cmd = self
            .privileged(&systemctl, &[action, &self.unit])
            .timeout(ACTION_TIMEOUT);
        cmd.run()
            .map(drop)
            .map_err(|e| self.explain(action, &cmd, &systemctl, e))
    }
}

/// sudo's words when it would have to ask for a password (or is not allowed at all).
fn is_sudo_refusal(output: &str) -> bool {
    let o = output.to_ascii_lowercase();
    o.contains("a password is required")
        || o.contains("a terminal is required")
        || o.contains("is not allowed to")
        || o.contains("not in the sudoers")
        || o.contains("may not run sudo")
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path: OsString = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

impl ServiceControl for SystemdService {
    fn describe(&self) -> String {
        if self.sudo.is_some() {
            format!("{} (via sudo -n systemctl)", self.unit)
        } else {
            format!("{} (via systemctl)", self.unit)
        }
    }

    fn stop(&self) -> Result<(), Error> {
        self.act("stop")
    }

    fn start(&self) -> Result<(), Error> {
        self.act("start")
    }

    fn is_active(&self) -> Result<bool, Error> {
        let systemctl = self.systemctl()?;
        let cmd = Cmd::new(&systemctl)
            .args(["is-active", &self.unit])
            .timeout(QUERY_TIMEOUT);
        let out: Output = cmd.run_unchecked().map_err(|source| Error::Command {
            action: "query",
            service: self.describe(),
            source: Box::new(source),
        })?;
        let state = out
            .stdout
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        match state.as_str() {
            "active" | "reloading" => Ok(true),
            "inactive" | "failed" | "activating" | "deactivating" | "maintenance" => Ok(false),
            _ => Err(Error::Unavailable {
                service: self.describe(),
                reason: format!(
                    "`{}` answered `{}` ({})",
                    cmd.display(),
                    out.tail.trim(),
                    out.status
                ),
            }),
        }
    }

    fn check(&self) -> Result<(), Error> {
        let systemctl = self.systemctl()?;
        // Does the unit exist? (Reading needs no privilege.)
        let cmd = Cmd::new(&systemctl)
            .args(["show", "-p", "LoadState", &self.unit])
            .timeout(QUERY_TIMEOUT);
        let out = cmd.run().map_err(|source| Error::Command {
            action: "check control of",
            service: self.describe(),
            source: Box::new(source),
        })?;
        if field(&out.stdout, "LoadState") == "not-found" {
            return Err(Error::Unavailable {
                service: self.describe(),
                reason: format!(
                    "systemd has no unit `{}`; set the right one with \
                     `kflash settings set klipper_service <unit>`",
                    self.unit
                ),
            });
        }
        if let Some(sudo) = &self.sudo {
            // Would sudo run exactly the stop and start commands? (`sudo -l CMD` names the
            // matching rule and runs nothing.)
            for action in ["stop", "start"] {
                let cmd = Cmd::new(sudo)
                    .args(["-n", "-l"])
                    .arg(&systemctl)
                    .args([action, &self.unit])
                    .timeout(QUERY_TIMEOUT);
                let out = cmd.run_unchecked().map_err(|source| Error::Command {
                    action: "check control of",
                    service: self.describe(),
                    source: Box::new(source),
                })?;
                if !out.status.success() {
                    return Err(Error::SudoRefused {
                        cmd: format!("sudo -n {} {action} {}", systemctl.display(), self.unit),
                        output: out.tail,
                        hint: self.hint(&systemctl),
                    });
                }
            }
        }
        // The real path, harmlessly: sudo -n with the same systemctl binary. This also
        // catches a rule that lists the commands but still wants a password.
        let cmd = self
            .privileged(&systemctl, &["show", "-p", "ActiveState", &self.unit])
            .timeout(QUERY_TIMEOUT);
        let out = cmd
            .run()
            .map_err(|e| self.explain("check control of", &cmd, &systemctl, e))?;
        if field(&out.stdout, "ActiveState").is_empty() {
            return Err(Error::Unavailable {
                service: self.describe(),
                reason: format!(
                    "`{}` printed no ActiveState: {}",
                    cmd.display(),
                    out.tail.trim()
                ),
            });
        }
        Ok(())
    }
}

/// The value of `NAME=value` in `systemctl show` output (empty when absent).
fn field(stdout: &str, name: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
        .map(str::trim)
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    /// A fake `sudo` and `systemctl` that behave like the real ones for what kflash uses.
    /// `allowed` present => sudo -n runs commands; unit `klipper` exists; state in `state`.
    struct Fakes {
        dir: tempfile::TempDir,
    }

    impl Fakes {
        fn new(allowed: bool) -> Fakes {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().display().to_string();
            let sudo = format!(
                r#"#!/bin/sh
[ "$1" = "-n" ] || {{ echo "sudo: a terminal is required to read the password" >&2; exit 1; }}
shift
list=no; [ "$1" = "-l" ] && {{ list=yes; shift; }}
# NOPASSWD rules: one permitted command line per line of `allowed`, or ALL.
if [ ! -s "{d}/allowed" ]; then echo "sudo: a password is required" >&2; exit 1; fi
if ! grep -qxF -e ALL -e "$*" "{d}/allowed"; then
  [ $list = yes ] && exit 1
  echo "sudo: a password is required" >&2; exit 1
fi
[ $list = yes ] && {{ echo "$*"; exit 0; }}
FAKE_ROOT=1 exec "$@"
"#
            );
            let systemctl = format!(
                r#"#!/bin/sh
cmd=$1; unit=$2
[ "$cmd" = show ] && unit=$4
if [ "$unit" != klipper ]; then
  case $cmd in
    show) [ "$3" = LoadState ] && echo LoadState=not-found || echo ActiveState=inactive; exit 0;;
    is-active) echo inactive; exit 3;;
    *) echo "Failed to $cmd $unit.service: Unit $unit.service not found." >&2; exit 5;;
  esac
fi
case $cmd in
  stop|start)
    if [ -z "$FAKE_ROOT" ]; then
      echo "Failed to $cmd klipper.service: Access denied" >&2; exit 4
    fi
    echo "$cmd" >> "{d}/log"
    if [ $cmd = stop ]; then echo inactive > "{d}/state"; else echo active > "{d}/state"; fi;;
  is-active)
    s=$(cat "{d}/state"); echo "$s"; [ "$s" = active ] && exit 0; exit 3;;
  show) [ "$3" = LoadState ] && echo LoadState=loaded || echo "ActiveState=$(cat "{d}/state")";;
  *) echo "Unknown command verb $cmd." >&2; exit 1;;
esac
"#
            );
            for (name, text) in [("sudo", sudo), ("systemctl", systemctl)] {
                let p = dir.path().join(name);
                fs::write(&p, text).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            }
            fs::write(dir.path().join("state"), "active\n").unwrap();
            let fakes = Fakes { dir };
            if allowed {
                fakes.allow(&["ALL"]);
            }
            fakes
        }

        /// Replace the NOPASSWD rules (`{sc}` stands for the fake systemctl's path).
        fn allow(&self, rules: &[&str]) {
            let sc = self.dir.path().join("systemctl").display().to_string();
            let text: String = rules
                .iter()
                .map(|r| r.replace("{sc}", &sc) + "\n")
                .collect();
            fs::write(self.dir.path().join("allowed"), text).unwrap();
        }

        fn service(&self, unit: &str) -> SystemdService {
            SystemdService::with_programs(
                unit,
                Some(self.dir.path().join("sudo")),
                self.dir.path().join("systemctl"),
            )
        }

        fn log(&self) -> String {
            fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        }
    }

    #[test]
    fn stop_and_start_through_sudo() {
        let fakes = Fakes::new(true);
        let svc = fakes.service("klipper");
        svc.check().unwrap();
        assert!(svc.is_active().unwrap());
        svc.stop().unwrap();
        assert!(!svc.is_active().unwrap());
        svc.start().unwrap();
        assert!(svc.is_active().unwrap());
        assert_eq!(fakes.log(), "stop\nstart\n");
    }

    #[test]
    fn password_required_is_explained_by_check_and_stop() {
        let fakes = Fakes::new(false);
        let svc = fakes.service("klipper");
        let err = svc.check().unwrap_err();
        assert!(matches!(err, Error::SudoRefused { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("password is required"), "{msg}");
        assert!(msg.contains("NOPASSWD"), "{msg}");
        assert!(msg.contains("systemctl stop klipper"), "{msg}");
        assert!(msg.contains("service moonraker"), "{msg}");
        let err = svc.stop().unwrap_err();
        assert!(matches!(err, Error::SudoRefused { .. }), "{err}");
        assert_eq!(fakes.log(), "", "nothing may have been stopped");
        // Reading the state needs no sudo.
        assert!(svc.is_active().unwrap());
    }

    #[test]
    fn unknown_unit_is_found_by_check() {
        let fakes = Fakes::new(true);
        let svc = fakes.service("klipperr");
        let err = svc.check().unwrap_err().to_string();
        assert!(err.contains("no unit `klipperr`"), "{err}");
        let err = svc.start().unwrap_err().to_string();
        assert!(err.contains("not found"), "{err}");
    }

    #[test]
    fn without_sudo_the_real_failure_is_shown() {
        let fakes = Fakes::new(true);
        let svc =
            SystemdService::with_programs("klipper", None, fakes.dir.path().join("systemctl"));
        let err = svc.stop().unwrap_err();
        assert!(matches!(err, Error::Command { .. }), "{err}");
        assert!(err.to_string().contains("Access denied"), "{err}");
    }

    #[test]
    fn check_follows_the_exact_sudoers_rules() {
        let fakes = Fakes::new(false);
        let svc = fakes.service("klipper");
        // Only stop is allowed: start would need a password.
        fakes.allow(&["{sc} stop klipper"]);
        let err = svc.check().unwrap_err().to_string();
        assert!(err.contains("start klipper"), "{err}");
        // stop and start, but not the harmless real-path probe the hint also lists.
        fakes.allow(&["{sc} stop klipper", "{sc} start klipper"]);
        let err = svc.check().unwrap_err().to_string();
        assert!(err.contains("show -p ActiveState klipper"), "{err}");
        // The rule the hint recommends is enough.
        fakes.allow(&[
            "{sc} stop klipper",
            "{sc} start klipper",
            "{sc} show -p ActiveState klipper",
        ]);
        svc.check().unwrap();
        svc.stop().unwrap();
        svc.start().unwrap();
        assert_eq!(fakes.log(), "stop\nstart\n");
    }
}
