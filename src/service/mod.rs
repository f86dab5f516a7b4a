//! Stopping and starting the klipper service, and making sure it always comes back.
//!
//! Owns: the `ServiceControl` trait and its three backends (Moonraker's
//! `/machine/services/*`, `sudo -n systemctl`, user-given commands), the service settings
//! (`ServiceConfig`) and `from_config`, and the stop guard (`stop` -> `StopGuard`). The
//! watchdog process that restarts the service if the runner is SIGKILLed is
//! `crate::flash_run::watchdog`; it starts klipper through these backends.
//!
//! Invariants: once `stop` has been called the service is started again on every path —
//! explicitly by `StopGuard::restart` (which reports failure so the caller can exit 4),
//! otherwise by the guard's `Drop` (which never panics, only logs to stderr, and never hides
//! the error the caller is returning), and after a SIGKILL of the runner by the watchdog
//! (armed by the pipeline around the stop window).
//! A failed `stop` also tries to start the service again before returning its error.
//! `check` exercises the real control path without stopping anything.
//!
//! Thread-safety: backends are `Send + Sync` and hold no mutable state beyond a lazily
//! resolved unit name; calls block the calling thread.

mod command;
mod moonraker;
mod systemd;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use command::{split_command, CommandService};
pub use moonraker::MoonrakerService;
pub use systemd::SystemdService;

/// Which way the service is controlled (the `service` setting).
pub use crate::registry::Backend;

use crate::{moonraker as mr, process};

/// How long a start is retried for (attempts) by the guard, and the pause between attempts.
const START_ATTEMPTS: u32 = 3;
#[cfg(not(test))]
const START_RETRY_PAUSE: Duration = Duration::from_secs(2);
#[cfg(test)]
const START_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Errors controlling the service. Messages say what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service settings are incomplete or invalid.
    #[error("service settings: {0}")]
    Config(String),
    /// A stop/start/status command failed (the process error names it and its output).
    #[error("cannot {action} {service}: {source}")]
    Command {
        action: &'static str,
        service: String,
        #[source]
        source: Box<process::Error>,
    },
    /// Moonraker refused or could not be asked.
    #[error("cannot {action} {service}: {source}")]
    Moonraker {
        action: &'static str,
        service: String,
        #[source]
        source: Box<mr::Error>,
    },
    /// sudo wants a password for the exact systemctl command kflash needs.
    #[error(
        "sudo refused to run `{cmd}` without a password{}. {hint}",
        fmt_output(output)
    )]
    SudoRefused {
        cmd: String,
        output: String,
        hint: String,
    },
    /// The service did not reach the wanted state in time.
    #[error("{service} did not become {want} within {waited:?} (last state: {last})")]
    StateTimeout {
        service: String,
        want: &'static str,
        waited: Duration,
        last: String,
    },
    /// The control path does not work (found by `check`).
    #[error("cannot control {service}: {reason}")]
    Unavailable { service: String, reason: String },
    /// Every attempt to start the service again failed.
    #[error("{service} could not be started again after {attempts} attempts: {last}")]
    RestartFailed {
        service: String,
        attempts: u32,
        #[source]
        last: Box<Error>,
    },
    /// The watchdog could not be started or told to stand down.
    #[error("watchdog: {reason} (log: {log})")]
    Watchdog { reason: String, log: String },
}

fn fmt_output(output: &str) -> String {
    let output = output.trim();
    if output.is_empty() {
        String::new()
    } else {
        format!(" ({output})")
    }
}

/// Control of one service (klipper). Implementations block until the action finished.
pub trait ServiceControl: Send + Sync {
    /// What is controlled and how, for messages (e.g. `klipper (via Moonraker at ...)`).
    fn describe(&self) -> String;
    /// Stop the service and return once it is stopped.
    fn stop(&self) -> Result<(), Error>;
    /// Start the service and return once it is running.
    fn start(&self) -> Result<(), Error>;
    /// Whether the service is running now.
    fn is_active(&self) -> Result<bool, Error>;
    /// Verify, without stopping anything, that `stop` and `start` would work.
    fn check(&self) -> Result<(), Error>;
}

/// The service settings (`service`, `klipper_service`, `moonraker_url`, `stop_command`,
/// `start_command`). Also what the watchdog receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub backend: Backend,
    /// Unit name (default `klipper`). Empty with the Moonraker backend: ask Moonraker
    /// (`system_info.instance_ids.klipper`).
    pub unit: String,
    pub moonraker_url: String,
    pub stop_command: Option<String>,
    pub start_command: Option<String>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            backend: Backend::Moonraker,
            unit: "klipper".into(),
            moonraker_url: "http://127.0.0.1:7125".into(),
            stop_command: None,
            start_command: None,
        }
    }
}

/// Timeout of one HTTP request to Moonraker made by the service backends.
const MOONRAKER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Build the backend the settings ask for.
pub fn from_config(cfg: &ServiceConfig) -> Result<Arc<dyn ServiceControl>, Error> {
    match cfg.backend {
        Backend::Moonraker => {
            let client = mr::Client::new(&cfg.moonraker_url, MOONRAKER_REQUEST_TIMEOUT)
                .map_err(|e| Error::Config(e.to_string()))?;
            Ok(Arc::new(MoonrakerService::new(client, &cfg.unit)))
        }
        Backend::Systemd => {
            if cfg.unit.trim().is_empty() {
                return Err(Error::Config(
                    "the systemd backend needs a unit name: `kflash settings set \
                     klipper_service klipper`"
                        .into(),
                ));
            }
            Ok(Arc::new(SystemdService::new(cfg.unit.trim())))
        }
        Backend::Command => {
            let need = |value: &Option<String>, key: &str| -> Result<Vec<String>, Error> {
                match value.as_deref().map(str::trim) {
                    None | Some("") => Err(Error::Config(format!(
                        "the `command` service backend needs `{key}`: \
                         `kflash settings set {key} '...'`"
                    ))),
                    Some(text) => split_command(text)
                        .map_err(|reason| Error::Config(format!("`{key}`: {reason}"))),
                }
            };
            let stop = need(&cfg.stop_command, "stop_command")?;
            let start = need(&cfg.start_command, "start_command")?;
            Ok(Arc::new(CommandService::new(stop, start, None)))
        }
    }
}

/// Stop the service and return the guard that starts it again.
///
/// If stopping fails, the service may be half-stopped: it is started again (best effort,
/// logged to stderr) and the stop error is returned.
pub fn stop(svc: Arc<dyn ServiceControl>) -> Result<StopGuard, Error> {
    let stopped_at = Instant::now();
    match svc.stop() {
        Ok(()) => Ok(StopGuard {
            svc,
            stopped_at,
            restarted: false,
        }),
        Err(err) => {
            if !matches!(svc.is_active(), Ok(true)) {
                if let Err(start_err) = start_with_retries(&*svc) {
                    eprintln!(
                        "kflash: stopping {} failed and starting it again failed too: {start_err}",
                        svc.describe()
                    );
                }
            }
            Err(err)
        }
    }
}

/// Proof that the service is stopped; starts it again on `restart` or on drop.
#[must_use = "dropping the guard restarts the service at once"]
pub struct StopGuard {
    svc: Arc<dyn ServiceControl>,
    stopped_at: Instant,
    restarted: bool,
}

impl StopGuard {
    /// Start the service again (a few attempts) and return how long it was down.
    /// On failure the guard does not try again on drop: report it (exit code 4).
    pub fn restart(mut self) -> Result<Duration, Error> {
        self.restarted = true;
        start_with_retries(&*self.svc)?;
        Ok(self.stopped_at.elapsed())
    }
}

impl fmt::Debug for StopGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopGuard")
            .field("service", &self.svc.describe())
            .field("stopped_at", &self.stopped_at)
            .field("restarted", &self.restarted)
            .finish()
    }
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        if self.restarted {
            return;
        }
        self.restarted = true;
        let svc = &self.svc;
        let outcome = catch_unwind(AssertUnwindSafe(move || {
            let name = svc.describe();
            eprintln!("kflash: starting {name} again");
            let started = start_with_retries(&**svc);
            match &started {
                Ok(()) => eprintln!("kflash: {name} started again"),
                Err(err) => eprintln!(
                    "kflash: !!! {name} IS STILL STOPPED: {err}. Start it by hand \
                     (e.g. `sudo systemctl start klipper`)."
                ),
            }
        }));
        if outcome.is_err() {
            eprintln!("kflash: !!! starting the service again panicked; it may still be stopped");
        }
    }
}

/// Start `svc`, retrying a few times with a pause; the last error is kept.
pub fn start_with_retries(svc: &dyn ServiceControl) -> Result<(), Error> {
    let mut last = None;
    for attempt in 1..=START_ATTEMPTS {
        match svc.start() {
            Ok(()) => return Ok(()),
            Err(err) => {
                eprintln!(
                    "kflash: starting {} failed (attempt {attempt}/{START_ATTEMPTS}): {err}",
                    svc.describe()
                );
                last = Some(err);
            }
        }
        if attempt < START_ATTEMPTS {
            thread::sleep(START_RETRY_PAUSE * attempt);
        }
    }
    Err(Error::RestartFailed {
        service: svc.describe(),
        attempts: START_ATTEMPTS,
        last: Box::new(last.unwrap_or_else(|| Error::Config("no attempt made".into()))),
    })
}

/// Poll `probe` until it returns `want` or `timeout` passes (shared by backends).
fn wait_for_state(
    service: &str,
    want_active: bool,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<(bool, String), Error>,
) -> Result<(), Error> {
    let started = Instant::now();
    loop {
        let (active, last) = probe()?;
        if active == want_active {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(Error::StateTimeout {
                service: service.to_owned(),
                want: if want_active { "active" } else { "inactive" },
                waited: started.elapsed(),
                last,
            });
        }
        thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// A service that records calls; `start` fails `fail_starts` times.
    #[derive(Default)]
    struct Fake {
        active: AtomicBool,
        starts: AtomicU32,
        stops: AtomicU32,
        fail_starts: AtomicU32,
        fail_stop: AtomicBool,
        panic_on_start: AtomicBool,
    }

    impl ServiceControl for Fake {
        fn describe(&self) -> String {
            "fake klipper".into()
        }
        fn stop(&self) -> Result<(), Error> {
            self.stops.fetch_add(1, Ordering::SeqCst);
            if self.fail_stop.load(Ordering::SeqCst) {
                self.active.store(false, Ordering::SeqCst);
                return Err(Error::Unavailable {
                    service: "fake".into(),
                    reason: "stop timed out".into(),
                });
            }
            self.active.store(false, Ordering::SeqCst);
            Ok(())
        }
        fn start(&self) -> Result<(), Error> {
            self.starts.fetch_add(1, Ordering::SeqCst);
            assert!(!self.panic_on_start.load(Ordering::SeqCst), "boom");
            if self.fail_starts.load(Ordering::SeqCst) > 0 {
                self.fail_starts.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::Unavailable {
                    service: "fake".into(),
                    reason: "start failed".into(),
                });
            }
            self.active.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn is_active(&self) -> Result<bool, Error> {
            Ok(self.active.load(Ordering::SeqCst))
        }
        fn check(&self) -> Result<(), Error> {
            Ok(())
        }
    }

    fn fake() -> Arc<Fake> {
        let f = Arc::new(Fake::default());
        f.active.store(true, Ordering::SeqCst);
        f
    }

    #[test]
    fn explicit_restart_starts_once_and_reports_downtime() {
        let f = fake();
        let guard = stop(f.clone()).unwrap();
        assert!(!f.active.load(Ordering::SeqCst));
        let down = guard.restart().unwrap();
        assert!(down < Duration::from_secs(5));
        assert!(f.active.load(Ordering::SeqCst));
        assert_eq!(f.starts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn drop_restarts_on_error_paths() {
        let f = fake();
        let result: Result<(), String> = (|| {
            let _guard = stop(f.clone()).map_err(|e| e.to_string())?;
            Err("flash failed".to_string())
        })();
        assert_eq!(result.unwrap_err(), "flash failed");
        assert!(f.active.load(Ordering::SeqCst));
        assert_eq!(f.starts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn drop_restarts_during_a_panic() {
        let f = fake();
        let g = f.clone();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(move || {
            let _guard = stop(g).unwrap();
            panic!("flashing blew up");
        }));
        assert!(outcome.is_err());
        assert!(f.active.load(Ordering::SeqCst));
    }

    #[test]
    fn restart_retries_then_succeeds() {
        let f = fake();
        f.fail_starts.store(2, Ordering::SeqCst);
        let guard = stop(f.clone()).unwrap();
        guard.restart().unwrap();
        assert_eq!(f.starts.load(Ordering::SeqCst), 3);
        assert!(f.active.load(Ordering::SeqCst));
    }

    #[test]
    fn restart_failure_is_reported_and_drop_does_not_retry() {
        let f = fake();
        f.fail_starts.store(100, Ordering::SeqCst);
        let guard = stop(f.clone()).unwrap();
        let err = guard.restart().unwrap_err();
        assert!(
            matches!(err, Error::RestartFailed { attempts: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("start failed"), "{err}");
        assert_eq!(f.starts.load(Ordering::SeqCst), START_ATTEMPTS);
    }

    #[test]
    fn drop_never_panics_even_if_start_does() {
        let f = fake();
        let guard = stop(f.clone()).unwrap();
        f.panic_on_start.store(true, Ordering::SeqCst);
        drop(guard);
        assert_eq!(f.starts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn failed_stop_starts_again_and_returns_the_stop_error() {
        let f = fake();
        f.fail_stop.store(true, Ordering::SeqCst);
        let err = stop(f.clone()).unwrap_err();
        assert!(err.to_string().contains("stop timed out"), "{err}");
        assert!(f.active.load(Ordering::SeqCst));
        assert_eq!(f.starts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn backend_parsing_and_config_errors() {
        assert_eq!("Systemd".parse::<Backend>().unwrap(), Backend::Systemd);
        let err = "openrc".parse::<Backend>().unwrap_err();
        assert!(
            err.to_string().contains("moonraker, systemd, command"),
            "{err}"
        );
        let cfg = ServiceConfig {
            backend: Backend::Command,
            start_command: Some("true".into()),
            ..ServiceConfig::default()
        };
        let err = from_config(&cfg).err().unwrap();
        assert!(err.to_string().contains("stop_command"), "{err}");
        let cfg = ServiceConfig {
            backend: Backend::Command,
            stop_command: Some("echo 'unterminated".into()),
            start_command: Some("true".into()),
            ..ServiceConfig::default()
        };
        let err = from_config(&cfg).err().unwrap();
        assert!(err.to_string().contains("quote"), "{err}");
        let cfg = ServiceConfig {
            moonraker_url: "https://x".into(),
            ..ServiceConfig::default()
        };
        let err = from_config(&cfg).err().unwrap();
        assert!(err.to_string().contains("https"), "{err}");
        let cfg = ServiceConfig {
            backend: Backend::Systemd,
            unit: " ".into(),
            ..ServiceConfig::default()
        };
        assert!(from_config(&cfg).is_err());
    }

    #[test]
    fn config_round_trips_as_json() {
        let cfg = ServiceConfig {
            backend: Backend::Command,
            stop_command: Some("supervisorctl stop klipper".into()),
            ..ServiceConfig::default()
        };
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(text.contains(r#""backend":"command""#), "{text}");
        assert_eq!(serde_json::from_str::<ServiceConfig>(&text).unwrap(), cfg);
    }
}
