//! Starting a process out of klipper's reach: the one way the helper and the watchdog
//! leave klippy's (or the runner's) cgroup.
//!
//! Three routes:
//! - `session`: a new session (`setsid`), stdin `/dev/null`, stdout and stderr appended to
//!   a log, every other descriptor closed. Enough outside any systemd service (a login
//!   shell, supervisord with `stopasgroup`) and inside kflash's own units
//!   (`KillMode=process`), never inside klipper.service: it stays in that cgroup.
//! - `systemd-run`: `sudo -n systemd-run --unit=<name> --collect --property=
//!   KillMode=process` as the calling user: a transient unit of its own, which outlives
//!   both klipper and its own main process's death.
//! - `moonraker`: the installed `kflash-run.service`, started through Moonraker's
//!   service API (no sudo). Only the helper has such a unit (`super::helper`).
//!
//! `routes` decides, before anything is tried, which routes can protect the process from
//! where it runs, and refuses at once (`Refusal`) when the one asked for cannot (an
//! explicit `session` inside klipper.service). Each route that is tried and fails says
//! what is missing and how to add it (`Tried`); when none worked the refusal lists them.
//! Either way nothing has been stopped.
//!
//! Thread-safety: plain functions; a start blocks for at most a command's deadline.

use std::ffi::OsString;
use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::place::Place;
use crate::process::Cmd;

/// How long `sudo -n systemd-run` may take.
const SYSTEMD_RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variables a unit started by systemd-run gets from the caller (systemd
/// starts units with an empty environment); `KFLASH_*` are passed too.
const PASS_ENV: [&str; 6] = ["PATH", "HOME", "USER", "LANG", "PYTHONPATH", "VIRTUAL_ENV"];

/// A way out of klipper's reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    SystemdRun,
    Moonraker,
    Session,
}

impl Route {
    /// The name the `[kflash] launcher:` option uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::SystemdRun => "systemd-run",
            Route::Moonraker => "moonraker",
            Route::Session => "session",
        }
    }
}

/// Which routes to consider: `auto`, or exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Auto,
    Only(Route),
}

impl std::str::FromStr for Launcher {
    type Err = String;

    fn from_str(text: &str) -> Result<Launcher, String> {
        Ok(match text {
            "auto" => Launcher::Auto,
            "systemd-run" => Launcher::Only(Route::SystemdRun),
            "moonraker" => Launcher::Only(Route::Moonraker),
            "session" => Launcher::Only(Route::Session),
            other => {
                return Err(format!(
                    "unknown launcher `{other}` (choose from auto, systemd-run, moonraker, \
                     session)"
                ))
            }
        })
    }
}

/// What is being started (the words of the messages, and whether Moonraker's unit fits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The detached helper that runs a flash run for klippy's `[kflash]`.
    Helper,
    /// The watchdog that starts klipper again if the runner dies.
    Watchdog,
}

impl Purpose {
    fn what(self) -> &'static str {
        match self {
            Purpose::Helper => "a flash run",
            Purpose::Watchdog => "the watchdog that starts klipper again if kflash is killed",
        }
    }
}

/// A route that was tried and failed: what went wrong and what is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tried {
    pub route: Route,
    /// What happened (`sudo: a password is required`).
    pub problem: String,
    /// The missing piece and how to add it.
    pub fix: String,
}

impl fmt::Display for Tried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.route {
            Route::SystemdRun => "sudo -n systemd-run",
            Route::Moonraker => "Moonraker's kflash-run unit",
            Route::Session => "a new session",
        };
        write!(f, "- {how}: {}. {}", self.problem, self.fix)
    }
}

/// No route can protect the process from where it runs. Nothing was stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// An explicit `session` inside a service: a new session stays in its cgroup.
    #[error(
        "`launcher: session` cannot protect {what} here: this runs inside {unit}.service, and \
         a new session stays in its cgroup, so `systemctl stop {unit}` would kill it.\nRemove \
         `launcher: session` from [kflash] (`auto` uses `sudo -n systemd-run` or Moonraker's \
         kflash-run unit). Nothing was stopped.",
        what = purpose.what()
    )]
    SessionInService { unit: String, purpose: Purpose },
    /// Moonraker's unit only runs the helper.
    #[error(
        "{what} cannot be started through Moonraker: its kflash-run unit runs the helper. \
         Nothing was stopped.",
        what = purpose.what()
    )]
    NotForMoonraker { purpose: Purpose },
    /// Every route was tried; none worked.
    #[error(
        "kflash cannot start {what} that survives `systemctl stop {unit}`: this runs inside \
         {unit}.service, and stopping it kills every process started from it.\n{}\nFix one \
         of these. Nothing was stopped.",
        tried.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
        what = purpose.what()
    )]
    NoRoute {
        unit: String,
        purpose: Purpose,
        tried: Vec<Tried>,
    },
    /// The one route asked for was tried and failed (outside a trap, or an explicit route).
    #[error(
        "kflash could not start {what} ({}): {}. Nothing was stopped.",
        tried.route.as_str(),
        tried.to_string().trim_start_matches("- "),
        what = purpose.what()
    )]
    Failed { purpose: Purpose, tried: Tried },
}

impl Refusal {
    /// The refusal after every route in `tried` failed.
    pub fn after(place: &Place, purpose: Purpose, mut tried: Vec<Tried>) -> Refusal {
        match place.trap() {
            Some(unit) => Refusal::NoRoute {
                unit: unit.to_owned(),
                purpose,
                tried,
            },
            None => Refusal::Failed {
                purpose,
                tried: tried.pop().unwrap_or(Tried {
                    route: Route::Session,
                    problem: "no route".into(),
                    fix: String::new(),
                }),
            },
        }
    }
}

/// The routes to try, in order, for `purpose` from `place`; refuses at once when the one
/// asked for cannot protect the process.
pub fn routes(place: &Place, launcher: Launcher, purpose: Purpose) -> Result<Vec<Route>, Refusal> {
    match (launcher, place.trap()) {
        (Launcher::Only(Route::Moonraker), _) if purpose == Purpose::Watchdog => {
            Err(Refusal::NotForMoonraker { purpose })
        }
        (Launcher::Only(Route::Session), Some(unit)) => Err(Refusal::SessionInService {
            unit: unit.to_owned(),
            purpose,
        }),
        (Launcher::Only(route), _) => Ok(vec![route]),
        (Launcher::Auto, None) => Ok(vec![Route::Session]),
        (Launcher::Auto, Some(_)) => Ok(match purpose {
            Purpose::Helper => vec![Route::SystemdRun, Route::Moonraker],
            Purpose::Watchdog => vec![Route::SystemdRun],
        }),
    }
}

/// What to start and where its output goes.
#[derive(Debug, Clone)]
pub struct Job {
    /// Program and arguments.
    pub argv: Vec<OsString>,
    /// The transient unit's name (systemd-run).
    pub unit: &'static str,
    pub cwd: PathBuf,
    /// Where a session child's stdout and stderr are appended.
    pub log: PathBuf,
    /// Extra environment (on top of the caller's for a session; with `PASS_ENV` and
    /// `KFLASH_*` for systemd-run).
    pub env: Vec<(OsString, OsString)>,
}

/// A started process: its child handle (session) or its unit (systemd).
#[derive(Debug)]
pub struct Started {
    pub route: Route,
    pub child: Option<Child>,
    pub unit: Option<String>,
}

/// Start `job` in a new session. Errors say why in the words of `Tried`.
pub fn session(job: &Job) -> Result<Started, Tried> {
    let fail = |problem: String| Tried {
        route: Route::Session,
        problem,
        fix: String::new(),
    };
    let (program, args) = job
        .argv
        .split_first()
        .ok_or_else(|| fail("no command".into()))?;
    if let Some(dir) = job.log.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    }
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&job.log)
        .map_err(|e| fail(format!("cannot open {}: {e}", job.log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| fail(format!("cannot open {}: {e}", job.log.display())))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(&job.cwd)
        .env("PYTHONUNBUFFERED", "1")
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the closure runs between fork and exec; it only makes async-signal-safe
    // system calls (setsid, close_range or fcntl) and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            cloexec_from_3();
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| fail(format!("cannot start `{}`: {e}", program.to_string_lossy())))?;
    Ok(Started {
        route: Route::Session,
        child: Some(child),
        unit: None,
    })
}

/// Start `job` as a transient unit with `sudo -n systemd-run` (directly when root).
pub fn systemd_run(job: &Job) -> Result<Started, Tried> {
    let fail = |problem: String, fix: String| Tried {
        route: Route::SystemdRun,
        problem,
        fix,
    };
    let Some(systemd_run) = find_on_path("systemd-run") else {
        return Err(fail(
            "systemd-run is not on PATH".into(),
            "Install systemd (the host is said to run it)".into(),
        ));
    };
    let root = rustix::process::geteuid().is_root();
    let mut cmd = if root {
        Cmd::new(&systemd_run)
    } else {
        Cmd::new("sudo").arg("-n").arg(&systemd_run)
    };
    cmd = cmd
        .arg(format!("--unit={}", job.unit))
        .args(["--collect", "--quiet", "--property=KillMode=process"])
        .arg(format!("--uid={}", rustix::process::getuid().as_raw()))
        .arg(format!("--gid={}", rustix::process::getgid().as_raw()))
        .arg(format!("--working-directory={}", job.cwd.display()));
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            PASS_ENV.contains(&k.as_ref()) || k.starts_with("KFLASH_")
        })
        .collect();
    for (k, v) in &job.env {
        env.retain(|(old, _)| old != k);
        env.push((k.clone(), v.clone()));
    }
    env.sort();
    for (k, v) in env {
        let mut arg = OsString::from("--setenv=");
        arg.push(k);
        arg.push("=");
        arg.push(v);
        cmd = cmd.arg(arg);
    }
    cmd = cmd.arg("--").args(&job.argv).timeout(SYSTEMD_RUN_TIMEOUT);
    match cmd.run() {
        Ok(_) => Ok(Started {
            route: Route::SystemdRun,
            child: None,
            unit: Some(job.unit.to_owned()),
        }),
        Err(e) => {
            let tail = e
                .tail()
                .trim()
                .lines()
                .last()
                .unwrap_or_default()
                .to_owned();
            let problem = if tail.is_empty() { e.to_string() } else { tail };
            let fix = if is_sudo_refusal(&problem) {
                let user = std::env::var("USER").unwrap_or_else(|_| "<user>".into());
                format!(
                    "Let {user} run it without a password with a sudoers rule: `echo '{user} \
                     ALL=(root) NOPASSWD: {}' | sudo tee /etc/sudoers.d/kflash-run`",
                    systemd_run.display()
                )
            } else if problem.contains("already loaded") || problem.contains("already exists") {
                format!(
                    "A unit {}.service is still there: `systemctl status {0}` shows what it \
                     runs",
                    job.unit
                )
            } else {
                "See the journal (`journalctl -n 50`)".into()
            };
            Err(fail(problem, fix))
        }
    }
}

/// sudo's (or, without sudo, systemd's) words when the user may not do it.
fn is_sudo_refusal(output: &str) -> bool {
    let o = output.to_ascii_lowercase();
    o.contains("password is required")
        || o.contains("interactive authentication required")
        || o.contains("access denied")
        || o.contains("a terminal is required")
        || o.contains("is not allowed to")
        || o.contains("not in the sudoers")
        || o.contains("may not run sudo")
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Mark every descriptor from 3 up close-on-exec (runs between fork and exec). No kept
/// crate wraps close_range, and the fallback walks raw descriptor numbers.
fn cloexec_from_3() {
    // SAFETY: close_range(CLOSE_RANGE_CLOEXEC) only sets descriptor flags; sysconf and
    // fcntl(F_GETFD/F_SETFD) touch no memory of ours (a closed descriptor gives EBADF). All
    // three are async-signal-safe.
    unsafe {
        let all = libc::syscall(
            libc::SYS_close_range,
            3_u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if all == 0 {
            return;
        }
        // Kernels before 5.11: walk the descriptor table.
        let max = libc::sysconf(libc::_SC_OPEN_MAX);
        let max = if max <= 0 { 1024 } else { max.min(65_536) } as libc::c_int;
        for fd in 3..max {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(unit: Option<&str>) -> Place {
        Place {
            systemd: true,
            unit: unit.map(str::to_owned),
        }
    }

    #[test]
    fn auto_leaves_klipper_by_a_unit_and_a_session_elsewhere() {
        let klipper = place(Some("klipper"));
        assert_eq!(
            routes(&klipper, Launcher::Auto, Purpose::Helper).unwrap(),
            [Route::SystemdRun, Route::Moonraker]
        );
        assert_eq!(
            routes(&klipper, Launcher::Auto, Purpose::Watchdog).unwrap(),
            [Route::SystemdRun]
        );
        for free in [
            place(None),
            place(Some("kflash-helper")),
            place(Some("kflash-run")),
        ] {
            assert_eq!(
                routes(&free, Launcher::Auto, Purpose::Watchdog).unwrap(),
                [Route::Session]
            );
        }
    }

    #[test]
    fn an_explicit_session_inside_klipper_is_refused_untried() {
        let err = routes(
            &place(Some("klipper")),
            Launcher::Only(Route::Session),
            Purpose::Helper,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("launcher: session"), "{text}");
        assert!(text.contains("klipper.service"), "{text}");
        assert!(text.contains("Nothing was stopped"), "{text}");
        // Outside a service the same choice is fine.
        assert_eq!(
            routes(
                &place(None),
                Launcher::Only(Route::Session),
                Purpose::Helper
            )
            .unwrap(),
            [Route::Session]
        );
        assert!(matches!(
            routes(
                &place(None),
                Launcher::Only(Route::Moonraker),
                Purpose::Watchdog
            ),
            Err(Refusal::NotForMoonraker { .. })
        ));
    }

    #[test]
    fn a_refusal_lists_every_missing_piece() {
        let tried = vec![
            Tried {
                route: Route::SystemdRun,
                problem: "sudo: a password is required".into(),
                fix: "Let pi run it".into(),
            },
            Tried {
                route: Route::Moonraker,
                problem: "not listed".into(),
                fix: "add it to moonraker.asvc".into(),
            },
        ];
        let text = Refusal::after(&place(Some("klipper")), Purpose::Helper, tried).to_string();
        assert!(
            text.starts_with("kflash cannot start a flash run"),
            "{text}"
        );
        assert!(text.contains("- sudo -n systemd-run: sudo: a password is required. Let pi"));
        assert!(text.contains("- Moonraker's kflash-run unit: not listed. add it"));
        assert!(text.ends_with("Nothing was stopped."), "{text}");
    }

    #[test]
    fn launcher_names() {
        assert_eq!("auto".parse::<Launcher>().unwrap(), Launcher::Auto);
        assert_eq!(
            "session".parse::<Launcher>().unwrap(),
            Launcher::Only(Route::Session)
        );
        assert!("nohup"
            .parse::<Launcher>()
            .unwrap_err()
            .contains("systemd-run"));
    }
}
