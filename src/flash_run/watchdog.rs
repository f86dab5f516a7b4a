//! The watchdog: a separate process that starts klipper again if the run's process dies
//! while klipper is stopped (SIGKILL, OOM kill, a closed terminal).
//!
//! Runner side (`LiveWatchdog`, the pipeline's `Watchdog` port): at pre-flight `launch`
//! starts `python -m kflash.watchdog --home <state> --run-id <id>` out of the runner's
//! reach through the one detach (`super::detach`: a new session, or `sudo -n systemd-run`
//! when the runner sits in a service that would take it down), and returns once the
//! watchdog says `armed` in `<state>/watchdog.log`; a watchdog that cannot be launched
//! refuses the run before anything is stopped. `arm` (just before klipper stops) and
//! `disarm` (klipper runs again) only write the run record.
//!
//! Watchdog side (`watch`): it blocks on the run lock, which the kernel releases the
//! moment the runner's process ends, however it ends; then it reads the run record. Armed
//! and the runner gone (or the run ended with klipper still stopped): it marks the record
//! interrupted and starts klipper through the core's service backends with the run's own
//! settings (`service::from_config`), a few attempts, every step logged. Otherwise it
//! stands down. Either way it exits.
//!
//! Thread-safety: `LiveWatchdog` is `Send + Sync` (the record is behind `Run`'s mutex);
//! `watch` blocks its thread for the run's whole life.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::detach::{self, Job, Launcher, Purpose, Refusal, Route, Started};
use super::lock::RunLock;
use super::place::{Place, WATCHDOG_UNIT};
use super::record::{self, Run, RunState, WatchdogState};
use crate::pipeline::report::utc_now;
use crate::registry::StateDir;
use crate::service::{self, ServiceConfig};

/// How long `launch` waits for the watchdog to say `armed` (a cold Python start on a Pi).
const ARM_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the watchdog looks again when it got the lock but the runner still lives
/// (a runner that does not hold the lock: it never does in kflash, but never guess).
const RECHECK: Duration = Duration::from_millis(200);

/// `<state>/watchdog.log`.
pub fn log_path(state: &StateDir) -> PathBuf {
    state.root().join("watchdog.log")
}

fn fail(state: &StateDir, reason: String) -> service::Error {
    service::Error::Watchdog {
        reason,
        log: log_path(state).display().to_string(),
    }
}

/// The runner's watchdog (the pipeline's `Watchdog` port on a real host).
pub struct LiveWatchdog {
    pub run: Arc<Run>,
    pub state: StateDir,
    /// The interpreter that runs `kflash.watchdog` (the host's `sys.executable`).
    pub python: Option<PathBuf>,
    pub service: ServiceConfig,
}

impl crate::pipeline::Watchdog for LiveWatchdog {
    fn launch(&self) -> Result<(), service::Error> {
        let place = Place::detect();
        if place.inside_klipper(&self.service.unit) {
            let unit = place.trap().unwrap_or("klipper");
            return Err(fail(
                &self.state,
                format!(
                    "kflash itself runs inside {unit}.service, so stopping klipper would kill \
                     this run. Start it with KFLASH_ALL (the [kflash] extra runs it outside \
                     {unit}.service) or from a login shell"
                ),
            ));
        }
        let Some(python) = &self.python else {
            return Err(fail(
                &self.state,
                "no Python interpreter is known to run `python -m kflash.watchdog`".into(),
            ));
        };
        let routes = detach::routes(&place, Launcher::Auto, Purpose::Watchdog)
            .map_err(|r| fail(&self.state, r.to_string()))?;
        self.run
            .watchdog_launched(&self.service)
            .map_err(|e| fail(&self.state, e.to_string()))?;
        let log = log_path(&self.state);
        let offset = std::fs::metadata(&log).map_or(0, |m| m.len());
        let root = self.state.root().to_path_buf();
        let job = Job {
            argv: vec![
                python.clone().into_os_string(),
                "-m".into(),
                "kflash.watchdog".into(),
                "--home".into(),
                root.clone().into_os_string(),
                "--run-id".into(),
                self.run.id().into(),
            ],
            unit: WATCHDOG_UNIT,
            cwd: root,
            log: log.clone(),
            env: Vec::new(),
        };
        let mut tried = Vec::new();
        for route in routes {
            let started = match route {
                Route::SystemdRun => detach::systemd_run(&job),
                Route::Session | Route::Moonraker => detach::session(&job),
            };
            match started {
                Ok(started) => {
                    return wait_armed(started, &log, offset, self.run.id())
                        .map_err(|reason| fail(&self.state, reason));
                }
                Err(why) => tried.push(why),
            }
        }
        Err(fail(
            &self.state,
            Refusal::after(&place, Purpose::Watchdog, tried).to_string(),
        ))
    }

    fn arm(&self) -> Result<(), service::Error> {
        self.run
            .set_watchdog(WatchdogState::Armed)
            .map_err(|e| fail(&self.state, e.to_string()))
    }

    fn disarm(&self) {
        if let Err(e) = self.run.set_watchdog(WatchdogState::Disarmed) {
            eprintln!("kflash: {e}; the watchdog may start klipper again needlessly");
        }
    }
}

/// Wait until the log (past `offset`) has this run's `armed` line, or the watchdog exits.
fn wait_armed(mut started: Started, log: &Path, offset: u64, run_id: &str) -> Result<(), String> {
    let deadline = Instant::now() + ARM_TIMEOUT;
    let mark = format!("(run {run_id},");
    loop {
        let text = read_from(log, offset);
        if text
            .lines()
            .any(|l| l.contains(": armed for ") && l.contains(&mark))
        {
            if let Some(child) = started.child.take() {
                reap_later(child);
            }
            return Ok(());
        }
        if let Some(child) = started.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the watchdog exited at once ({status}){}",
                    tail_of(log, offset)
                ));
            }
        }
        if Instant::now() >= deadline {
            if let Some(mut child) = started.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let how = started.unit.map_or_else(String::new, |u| {
                format!(" (`journalctl -u {u}` shows what it did)")
            });
            return Err(format!(
                "the watchdog did not report `armed` within {ARM_TIMEOUT:?}{how}{}",
                tail_of(log, offset)
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reap `child` on a background thread so it never lingers as a zombie.
pub(super) fn reap_later(mut child: std::process::Child) {
    let _ = thread::Builder::new()
        .name("kflash-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}

/// `; its log says:` and the last lines of `path` past `offset` (empty when none).
pub(super) fn tail_of(path: &Path, offset: u64) -> String {
    let text = read_from(path, offset);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; its log ({}) says:\n{tail}", path.display())
    }
}

// ------------------------------------------------------------------- the watchdog

/// The watchdog's log: `<UTC time> kflash watchdog <pid>: <message>` lines.
struct Log(Option<File>);

impl Log {
    fn say(&mut self, message: &str) {
        let line = format!(
            "{} kflash watchdog {}: {message}\n",
            utc_now(),
            std::process::id()
        );
        match self.0.as_mut() {
            Some(file) => {
                let _ = file.write_all(line.as_bytes());
            }
            None => eprint!("{line}"),
        }
    }
}

/// Guard run `run_id` until it ends (see the module doc); the process exit code: 0 stood
/// down or started klipper, 1 klipper is still stopped, 2 nothing to guard.
///
/// `recover` runs before klipper is started when the run was armed: it finishes the boards
/// the run left in their bootloader (`commands::Context::watch` passes the pipeline's
/// recovery) and returns what it did, one line per board, for the log. It runs under the
/// run lock the watchdog holds.
pub fn watch(state: &StateDir, run_id: &str, recover: &dyn Fn() -> Vec<String>) -> i32 {
    let _ = std::fs::create_dir_all(state.root());
    let mut log = Log(OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(state))
        .ok());
    let runs = state.runs_dir();
    let Some(record) = record::read(&runs, run_id) else {
        log.say(&format!(
            "no run record {run_id} in {}: nothing to guard",
            runs.display()
        ));
        return 2;
    };
    let Some(settings) = record.service.clone() else {
        log.say(&format!(
            "run {run_id} has no service settings: nothing to guard"
        ));
        return 2;
    };
    let klipper = match service::from_config(&settings) {
        Ok(control) => control,
        Err(e) => {
            log.say(&format!("cannot control klipper: {e}"));
            return 2;
        }
    };
    let name = klipper.describe();
    log.say(&format!(
        "armed for {name} (run {run_id}, runner pid {})",
        record.pid
    ));
    // The run ends when its process lets go of the lock (or dies holding it).
    let (record, _lock) = loop {
        let held = match RunLock::wait(&state.lock_path()) {
            Ok(held) => held,
            Err(e) => {
                log.say(&format!("cannot wait for the run: {e}"));
                return 1;
            }
        };
        match record::read(&runs, run_id) {
            Some(r) if r.state == RunState::Running => {
                drop(held);
                thread::sleep(RECHECK);
            }
            Some(r) => break (r, held),
            None => {
                log.say(&format!(
                    "the record of run {run_id} is gone: standing down"
                ));
                return 2;
            }
        }
    };
    let died = record.state == RunState::Interrupted;
    if died {
        if let Err(e) = record::mark_interrupted(&runs, run_id) {
            log.say(&format!("cannot mark the run interrupted: {e}"));
        }
    }
    match (record.watchdog, died) {
        (WatchdogState::Armed, true) => {
            log.say(&format!(
                "the runner went away without finishing: starting {name}"
            ));
        }
        (WatchdogState::Armed, false) => {
            log.say(&format!(
                "the run ended with klipper still stopped: starting {name}"
            ));
        }
        (_, true) => {
            log.say("the runner went away before stopping klipper: nothing to start");
            return 0;
        }
        (_, false) => {
            log.say("disarmed: the run finished with klipper running; standing down");
            return 0;
        }
    }
    // A runner killed mid-flash may have left a board in its bootloader: finish it first,
    // while klipper is still stopped.
    for line in recover() {
        log.say(&line);
    }
    match service::start_with_retries(&*klipper) {
        Ok(()) => {
            log.say(&format!("{name} started again"));
            0
        }
        Err(e) => {
            log.say(&format!(
                "!!! {name} IS STILL STOPPED: {e}. Start it by hand"
            ));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Watchdog as _;
    use crate::registry::Backend;
    use record::RunOptions;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;

    /// `KFLASH_CGROUP_FILE` is process-wide: tests that launch a watchdog take turns.
    static ENV: Mutex<()> = Mutex::new(());

    fn settings(dir: &Path) -> ServiceConfig {
        let marker = dir.join("started");
        ServiceConfig {
            backend: Backend::Command,
            unit: "klipper".into(),
            stop_command: Some("true".into()),
            start_command: Some(format!(
                "sh -c 'echo started >> \"$0\"' '{}'",
                marker.display()
            )),
            ..ServiceConfig::default()
        }
    }

    fn begin(state: &StateDir, dir: &Path, id: &str) -> Arc<Run> {
        let run = Run::begin(state, Some(id), RunOptions::default(), None).unwrap();
        run.watchdog_launched(&settings(dir)).unwrap();
        Arc::new(run)
    }

    fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        cond()
    }

    fn watcher(state: &StateDir, id: &str) -> thread::JoinHandle<i32> {
        let state = state.clone();
        let id = id.to_owned();
        thread::spawn(move || watch(&state, &id, &Vec::new))
    }

    #[test]
    fn armed_run_that_ends_with_klipper_stopped_gets_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path().join("state"));
        let run = begin(&state, dir.path(), "R1");
        // The recovery runs first, while klipper is still stopped.
        let dog = {
            let (state, started) = (state.clone(), dir.path().join("started"));
            thread::spawn(move || {
                watch(&state, "R1", &|| {
                    vec![format!(
                        "main: recovered, klipper started: {}",
                        started.exists()
                    )]
                })
            })
        };
        assert!(wait_until(Duration::from_secs(5), || {
            read_from(&log_path(&state), 0).contains("armed for")
        }));
        run.set_watchdog(WatchdogState::Armed).unwrap();
        // The restart failed: the run finishes with klipper stopped.
        run.finish(record::Outcome::default()).unwrap();
        assert!(!dir.path().join("started").exists());
        drop(run);
        assert_eq!(dog.join().unwrap(), 0);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("started")).unwrap(),
            "started\n"
        );
        let log = read_from(&log_path(&state), 0);
        assert!(log.contains("ended with klipper still stopped"), "{log}");
        let recovered = log.find("main: recovered, klipper started: false").unwrap();
        assert!(log[recovered..].contains("started again"), "{log}");
    }

    #[test]
    fn disarmed_or_never_armed_runs_start_nothing() {
        for last in [WatchdogState::Disarmed, WatchdogState::Launched] {
            let dir = tempfile::tempdir().unwrap();
            let state = StateDir::at(dir.path().join("state"));
            let run = begin(&state, dir.path(), "R2");
            let dog = watcher(&state, "R2");
            if last == WatchdogState::Disarmed {
                run.set_watchdog(WatchdogState::Armed).unwrap();
            }
            run.set_watchdog(last).unwrap();
            run.finish(record::Outcome::default()).unwrap();
            drop(run);
            assert_eq!(dog.join().unwrap(), 0);
            assert!(!dir.path().join("started").exists());
            assert!(read_from(&log_path(&state), 0).contains("standing down"));
        }
    }

    #[test]
    fn nothing_to_guard_is_said() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path().join("state"));
        assert_eq!(watch(&state, "NOPE", &Vec::new), 2);
        assert!(read_from(&log_path(&state), 0).contains("nothing to guard"));
    }

    #[test]
    fn launch_refuses_inside_klipper_and_without_python() {
        let _env = ENV
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path().join("state"));
        let run = begin(&state, dir.path(), "R3");
        let dog = LiveWatchdog {
            run: Arc::clone(&run),
            state: state.clone(),
            python: None,
            service: settings(dir.path()),
        };
        let err = dog.launch().unwrap_err().to_string();
        assert!(err.contains("no Python interpreter"), "{err}");
        let cgroup = dir.path().join("cgroup");
        std::fs::write(&cgroup, "0::/system.slice/klipper.service\n").unwrap();
        let systemd = dir.path().join("systemd");
        std::fs::create_dir(&systemd).unwrap();
        std::env::set_var("KFLASH_CGROUP_FILE", &cgroup);
        std::env::set_var("KFLASH_SYSTEMD_DIR", &systemd);
        let err = dog.launch().unwrap_err().to_string();
        std::env::remove_var("KFLASH_CGROUP_FILE");
        std::env::remove_var("KFLASH_SYSTEMD_DIR");
        assert!(err.contains("runs inside klipper.service"), "{err}");
    }

    #[test]
    fn a_watchdog_that_dies_at_once_is_reported() {
        let _env = ENV
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path().join("state"));
        let run = begin(&state, dir.path(), "R4");
        // "python" that fails before the watchdog can say anything.
        let fake = dir.path().join("python");
        std::fs::write(&fake, "#!/bin/sh\necho 'broken python' >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dog = LiveWatchdog {
            run,
            state: state.clone(),
            python: Some(fake),
            service: settings(dir.path()),
        };
        let err = dog.launch().unwrap_err().to_string();
        assert!(err.contains("exited at once"), "{err}");
        assert!(err.contains("broken python"), "{err}");
        assert!(err.contains("watchdog.log"), "{err}");
    }
}
