//! Starting the detached helper for klippy's `[kflash]`: `python -m kflash.helper` out of
//! klipper's reach, and the request the installed unit reads.
//!
//! `start_helper` picks the routes (`super::detach::routes`: refused at once when the one
//! asked for cannot leave klipper.service), tries them in order, and returns once the
//! helper has begun the run (its record exists), or says why not: every route that failed
//! names what is missing (a sudoers rule for systemd-run, the `kflash-run` line in
//! `moonraker.asvc`, Moonraker's PolicyKit rule, kflash's unit itself) and how to add it.
//! A helper that started but exited before beginning the run is reported with its log.
//! In every case nothing has been stopped.
//!
//! The Moonraker route starts `kflash-run.service`, whose command is fixed (`python -m
//! kflash.helper --home <state> --pending`): the run's options wait for it in
//! `<state>/runs/pending.json`, which `take_pending` reads and removes.
//!
//! Thread-safety: plain functions; `start_helper` blocks for up to `START_TIMEOUT` (call it
//! off klippy's reactor).

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::detach::{self, Job, Launcher, Purpose, Refusal, Route, Started, Tried};
use super::place::{Place, HELPER_UNIT, INSTALLED_UNIT};
use super::record::{self, valid_run_id};
use super::watchdog::{reap_later, tail_of};
use crate::moonraker::{Client, ServiceAction};
use crate::process::Cmd;
use crate::registry::{self, write_atomic, StateDir};

/// How long a started helper may take to begin the run (a cold Python start on a Pi).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of one request to Moonraker.
const MOONRAKER_TIMEOUT: Duration = Duration::from_secs(10);
/// Where a unit file of `kflash-run` may live.
const UNIT_DIRS: [&str; 4] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// One run for the helper.
#[derive(Debug, Clone)]
pub struct HelperRequest {
    pub run_id: String,
    pub only_outdated: bool,
    pub device: Option<String>,
    /// Flash each board's last-known-good image instead of a new build (`--rollback`;
    /// `only_outdated` does not apply).
    pub rollback: bool,
    pub launcher: Launcher,
    /// The helper's interpreter.
    pub python: PathBuf,
    pub moonraker_url: String,
}

/// A helper that began its run.
#[derive(Debug, Clone, Serialize)]
pub struct HelperStarted {
    pub run_id: String,
    /// `systemd-run`, `moonraker` or `session`.
    pub method: &'static str,
    pub pid: u32,
    /// The unit that holds it (`kflash-helper`, `kflash-run`), if any.
    pub unit: Option<String>,
}

/// Why the helper did not begin the run. Nothing was stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The device key breaks the one key rule (`registry::validate_key`).
    #[error(transparent)]
    Key(#[from] registry::Error),
    /// Started, but it never began the run.
    #[error("kflash's helper ({method}) {reason}. Nothing was stopped.")]
    Failed {
        method: &'static str,
        reason: String,
    },
}

/// The run the installed unit is to run (`runs/pending.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub version: u32,
    pub run_id: String,
    pub only_outdated: bool,
    pub device: Option<String>,
    #[serde(default)]
    pub rollback: bool,
}

fn pending_path(state: &StateDir) -> PathBuf {
    state.runs_dir().join("pending.json")
}

/// Read and remove the pending request (`None` when there is none or it is unreadable).
pub fn take_pending(state: &StateDir) -> Option<Pending> {
    let path = pending_path(state);
    let bytes = fs::read(&path).ok()?;
    let _ = fs::remove_file(&path);
    serde_json::from_slice(&bytes).ok()
}

/// Start the helper for one run; see the module doc.
pub fn start_helper(state: &StateDir, req: &HelperRequest) -> Result<HelperStarted, StartError> {
    let failed = |method, reason| StartError::Failed { method, reason };
    if !valid_run_id(&req.run_id) {
        return Err(failed(
            "none",
            format!("cannot take the run id `{}`", req.run_id),
        ));
    }
    if let Some(device) = &req.device {
        registry::validate_key(device)?;
    }
    let place = Place::detect();
    let routes = detach::routes(&place, req.launcher, Purpose::Helper)?;
    let root = state.root().to_path_buf();
    let runs = state.runs_dir();
    let log = runs.join(format!("{}.log", req.run_id));
    let job = Job {
        argv: helper_argv(&root, req),
        unit: HELPER_UNIT,
        cwd: root.clone(),
        log: log.clone(),
        env: vec![("KFLASH_HOME".into(), root.into_os_string())],
    };
    let mut tried = Vec::new();
    for route in routes {
        let started = match route {
            Route::Session => detach::session(&job),
            Route::SystemdRun => detach::systemd_run(&job),
            Route::Moonraker => through_moonraker(state, req),
        };
        match started {
            Ok(started) => {
                let method = started.route.as_str();
                let unit = started.unit.clone();
                let pid = wait_started(&runs, &req.run_id, started, &log)
                    .map_err(|reason| failed(method, reason))?;
                return Ok(HelperStarted {
                    run_id: req.run_id.clone(),
                    method,
                    pid,
                    unit,
                });
            }
            Err(why) => tried.push(why),
        }
    }
    Err(Refusal::after(&place, Purpose::Helper, tried).into())
}

/// `python -m kflash.helper --home <state> --run-id <id> [--rollback | --only-outdated]
/// [--device <key>]`.
fn helper_argv(root: &Path, req: &HelperRequest) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        req.python.clone().into_os_string(),
        "-m".into(),
        "kflash.helper".into(),
        "--home".into(),
        root.as_os_str().to_owned(),
        "--run-id".into(),
        req.run_id.clone().into(),
    ];
    if req.rollback {
        argv.push("--rollback".into());
    } else if req.only_outdated {
        argv.push("--only-outdated".into());
    }
    if let Some(device) = &req.device {
        argv.extend(["--device".into(), device.into()]);
    }
    argv
}

/// Start `kflash-run.service` through Moonraker with the run's options pending.
fn through_moonraker(state: &StateDir, req: &HelperRequest) -> Result<Started, Tried> {
    let tried = |problem: String, fix: String| Tried {
        route: Route::Moonraker,
        problem,
        fix,
    };
    let client = Client::new(&req.moonraker_url, MOONRAKER_TIMEOUT).map_err(|e| {
        tried(
            e.to_string(),
            "Set the [kflash] option moonraker_url to Moonraker's address".into(),
        )
    })?;
    let services = client.available_services().map_err(|e| {
        let fix = if e.is_unreachable() {
            "Is Moonraker running? (the [kflash] option moonraker_url says where)"
        } else {
            "Moonraker's log (moonraker.log) says more"
        };
        tried(e.to_string(), fix.into())
    })?;
    if !services.iter().any(|s| s == INSTALLED_UNIT) {
        let fix = if installed() {
            format!(
                "Add the line `{INSTALLED_UNIT}` to moonraker.asvc in Moonraker's data path \
                 (e.g. ~/printer_data/moonraker.asvc), then restart Moonraker"
            )
        } else {
            format!(
                "{INSTALLED_UNIT}.service is not installed: run kflash's scripts/install.sh \
                 (it installs the unit and adds it to moonraker.asvc), then restart Moonraker"
            )
        };
        return Err(tried(
            format!(
                "Moonraker does not offer {INSTALLED_UNIT} (it is not in its \
                 available_services)"
            ),
            fix,
        ));
    }
    let pending = Pending {
        version: 1,
        run_id: req.run_id.clone(),
        only_outdated: req.only_outdated && !req.rollback,
        device: req.device.clone(),
        rollback: req.rollback,
    };
    let path = pending_path(state);
    let written = fs::create_dir_all(state.runs_dir()).and_then(|()| {
        let mut bytes = serde_json::to_vec_pretty(&pending).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes)
    });
    if let Err(e) = written {
        return Err(tried(
            format!("cannot write {}: {e}", path.display()),
            "Make kflash's state dir writable".into(),
        ));
    }
    if let Err(e) = client.service_action(ServiceAction::Start, INSTALLED_UNIT) {
        let _ = fs::remove_file(&path);
        let warnings = client.warnings().unwrap_or_default();
        let polkit = warnings
            .iter()
            .find(|w| w.contains("PolicyKit") || w.to_ascii_lowercase().contains("polkit"));
        let denied = e
            .to_string()
            .contains("Interactive authentication required")
            || e.to_string().contains("not authorized");
        let fix = if polkit.is_some() || denied {
            let said = polkit.map_or_else(String::new, |w| format!(" (Moonraker warns: \"{w}\")"));
            "Moonraker may not start units: its PolicyKit rule is missing".to_owned()
                + &said
                + ". Add it with Moonraker's scripts/set-policykit-rules.sh (in Moonraker's \
                   source, e.g. ~/moonraker/scripts/set-policykit-rules.sh), then restart \
                   Moonraker"
        } else {
            "Moonraker's log (moonraker.log) says why".into()
        };
        return Err(tried(
            format!("Moonraker could not start {INSTALLED_UNIT}: {e}"),
            fix,
        ));
    }
    Ok(Started {
        route: Route::Moonraker,
        child: None,
        unit: Some(INSTALLED_UNIT.into()),
    })
}

/// Whether kflash's unit file is installed on this host.
fn installed() -> bool {
    UNIT_DIRS.iter().any(|dir| {
        Path::new(dir)
            .join(format!("{INSTALLED_UNIT}.service"))
            .exists()
    })
}

/// Wait until the helper has written its record; its pid. Errors say why it never did.
fn wait_started(
    runs: &Path,
    run_id: &str,
    mut started: Started,
    log: &Path,
) -> Result<u32, String> {
    let begun = Instant::now();
    let mut seen_active = false;
    let mut last_look = begun;
    loop {
        if let Some(rec) = record::read(runs, run_id) {
            if let Some(child) = started.child.take() {
                reap_later(child);
            }
            return Ok(rec.pid);
        }
        if let Some(child) = started.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "exited ({status}) before beginning the run{}",
                    tail_of(log, 0)
                ));
            }
        }
        if let Some(unit) = &started.unit {
            if last_look.elapsed() >= Duration::from_millis(500) {
                last_look = Instant::now();
                let state = unit_state(unit);
                seen_active |= matches!(state.as_str(), "active" | "activating" | "deactivating");
                let ended = state == "failed"
                    || (state == "inactive"
                        && (seen_active || begun.elapsed() > Duration::from_secs(5)));
                if ended && record::read(runs, run_id).is_none() {
                    return Err(format!(
                        "stopped ({unit}.service is {state}) before beginning the run; \
                         `journalctl -u {unit}` says why"
                    ));
                }
            }
        }
        if begun.elapsed() >= START_TIMEOUT {
            if let Some(mut child) = started.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(format!(
                "did not begin the run within {START_TIMEOUT:?}{}",
                tail_of(log, 0)
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `systemctl show -p ActiveState --value <unit>` (reading needs no privilege).
fn unit_state(unit: &str) -> String {
    Cmd::new("systemctl")
        .args(["show", "-p", "ActiveState", "--value", unit])
        .timeout(Duration::from_secs(10))
        .run()
        .map(|out| out.stdout.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_request_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path());
        assert_eq!(take_pending(&state), None);
        fs::create_dir_all(state.runs_dir()).unwrap();
        let pending = Pending {
            version: 1,
            run_id: "R1".into(),
            only_outdated: true,
            device: Some("EBB36".into()),
            rollback: false,
        };
        fs::write(pending_path(&state), serde_json::to_vec(&pending).unwrap()).unwrap();
        assert_eq!(take_pending(&state), Some(pending));
        assert_eq!(take_pending(&state), None);
        // a request written before rollbacks existed is a flash run
        fs::write(
            pending_path(&state),
            r#"{"version": 1, "run_id": "R2", "only_outdated": false, "device": null}"#,
        )
        .unwrap();
        assert!(!take_pending(&state).unwrap().rollback);
    }

    fn request(rollback: bool, device: Option<&str>) -> HelperRequest {
        HelperRequest {
            run_id: "R1".into(),
            only_outdated: true,
            device: device.map(Into::into),
            rollback,
            launcher: Launcher::Only(super::Route::Session),
            python: "/usr/bin/python3".into(),
            moonraker_url: "http://127.0.0.1:7125".into(),
        }
    }

    fn argv_of(req: &HelperRequest) -> Vec<String> {
        helper_argv(Path::new("/state"), req)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn the_helper_is_told_a_rollback_and_its_device() {
        let head = [
            "/usr/bin/python3",
            "-m",
            "kflash.helper",
            "--home",
            "/state",
            "--run-id",
            "R1",
        ];
        assert_eq!(
            argv_of(&request(true, Some("EBB36"))),
            [&head[..], &["--rollback", "--device", "EBB36"]].concat()
        );
        assert_eq!(
            argv_of(&request(true, None)),
            [&head[..], &["--rollback"]].concat()
        );
        assert_eq!(
            argv_of(&request(false, None)),
            [&head[..], &["--only-outdated"]].concat()
        );
    }

    #[test]
    fn a_key_breaking_the_key_rule_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path());
        let err = start_helper(&state, &request(true, Some("-x"))).unwrap_err();
        assert!(matches!(err, StartError::Key(_)), "{err}");
        assert!(
            err.to_string().contains("start with a letter or a digit"),
            "{err}"
        );
        assert!(!state.runs_dir().exists());
    }
}
