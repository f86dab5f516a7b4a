//! The watchdog: a separate process that starts the service again if the runner dies
//! without saying so (SIGKILL, OOM kill, power-off of the terminal...).
//!
//! Owns: spawning the watchdog (`python -m kflash.watchdog` or the script by path; pure
//! stdlib so it works even when the native module cannot load) in a NEW SESSION, with
//! stdin a pipe from the runner, stdout/stderr appended to `<state_dir>/watchdog.log` and
//! every other file descriptor closed at exec — so a script capturing the runner's output
//! never hangs on the watchdog. The runner sends one JSON line with the service settings;
//! `disarm` sends `done`. If the pipe reaches EOF without `done`, the watchdog starts the
//! service through the same backend (within 10 s) and logs what it did.
//!
//! Invariants: `arm` returns only once the watchdog has read the settings and said `armed`
//! in its log (or fails with the log's tail); dropping a `Watchdog` without `disarm` is the
//! crash path (the pipe closes and the watchdog restarts the service), so disarm only after
//! the service is running again.
//!
//! Limit: a new session does not leave the runner's cgroup. If the runner is itself a
//! systemd unit (e.g. started with `systemd-run`) with the default `KillMode=control-group`,
//! systemd kills the watchdog together with the runner; such a runner must be started with
//! `-p KillMode=process` (or the watchdog given its own unit).
//!
//! Thread-safety: a `Watchdog` is owned by the runner thread; it is `Send`.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{Error, ServiceConfig};

/// How long `arm` waits for the watchdog to say `armed` (a cold Python start on a Pi).
const ARM_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `disarm` waits for the watchdog to exit.
const DISARM_TIMEOUT: Duration = Duration::from_secs(5);
/// The word the watchdog logs once it holds the settings.
const ARMED_WORD: &str = "armed";

/// A running watchdog. `disarm` when the service is running again; drop = crash path.
#[derive(Debug)]
pub struct Watchdog {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl Watchdog {
    /// Start the watchdog (`launch` is its command line, e.g. `[python, -m,
    /// kflash.watchdog]`) and hand it the service settings.
    pub fn arm(
        launch: &[OsString],
        cfg: &ServiceConfig,
        state_dir: &Path,
    ) -> Result<Watchdog, Error> {
        let log = state_dir.join("watchdog.log");
        let fail = |reason: String| Error::Watchdog {
            reason,
            log: log.display().to_string(),
        };
        let (program, args) = launch
            .split_first()
            .ok_or_else(|| fail("no watchdog command given".into()))?;
        fs::create_dir_all(state_dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", state_dir.display())))?;
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| fail(format!("cannot open the log: {e}")))?;
        let offset = out.metadata().map_or(0, |m| m.len());
        let err = out
            .try_clone()
            .map_err(|e| fail(format!("cannot open the log: {e}")))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(state_dir)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
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
        let mut child = command.spawn().map_err(|e| {
            fail(format!(
                "cannot start `{}`: {e}",
                launch
                    .iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
        })?;
        let mut stdin = child.stdin.take();
        let line = serde_json::json!({
            "version": 1,
            "runner_pid": std::process::id(),
            "service": cfg,
        })
        .to_string()
            + "\n";
        let written = stdin
            .as_mut()
            .map(|s| s.write_all(line.as_bytes()).and_then(|()| s.flush()));
        let mut dog = Watchdog {
            child: Some(child),
            stdin,
            log: log.clone(),
        };
        if let Some(Err(e)) = written {
            // Usually the watchdog died at once (broken pipe): its exit and log say why.
            let reason = match dog.wait_armed(offset) {
                Err(reason) => reason,
                Ok(()) => format!("cannot hand over the settings: {e}"),
            };
            return Err(dog.abort(reason));
        }
        match dog.wait_armed(offset) {
            Ok(()) => Ok(dog),
            Err(reason) => Err(dog.abort(reason)),
        }
    }

    /// The watchdog's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The watchdog's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Tell the watchdog the service is running again, and wait for it to exit.
    pub fn disarm(mut self) -> Result<(), Error> {
        let fail = |reason: String, log: &Path| Error::Watchdog {
            reason,
            log: log.display().to_string(),
        };
        if let Some(mut stdin) = self.stdin.take() {
            // A write error means the watchdog is gone already; its exit status says why.
            let _ = stdin.write_all(b"done\n").and_then(|()| stdin.flush());
        }
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + DISARM_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(fail(
                        format!(
                            "exited with {status} while standing down{}",
                            tail_of(&self.log, 0)
                        ),
                        &self.log,
                    ))
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    reap_later(child);
                    return Err(fail(
                        format!("did not exit within {DISARM_TIMEOUT:?} after `done`"),
                        &self.log,
                    ));
                }
                Err(e) => return Err(fail(format!("cannot wait for it: {e}"), &self.log)),
            }
        }
    }

    /// Wait until the log (past `offset`) says `armed`, or the watchdog exits.
    fn wait_armed(&mut self, offset: u64) -> Result<(), String> {
        let deadline = Instant::now() + ARM_TIMEOUT;
        loop {
            if read_from(&self.log, offset).lines().any(|l| {
                l.split_whitespace()
                    .any(|w| w.trim_end_matches(':') == ARMED_WORD)
            }) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "exited at once ({status}){}",
                        tail_of(&self.log, offset)
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "did not report `{ARMED_WORD}` within {ARM_TIMEOUT:?}{}",
                    tail_of(&self.log, offset)
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Arming failed: tell the watchdog to stand down (no restart: nothing was stopped),
    /// reap it, and build the error.
    fn abort(&mut self, reason: String) -> Error {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"done\n");
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Error::Watchdog {
            reason,
            log: self.log.display().to_string(),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Crash path: closing the pipe without `done` makes the watchdog start the service.
        drop(self.stdin.take());
        if let Some(child) = self.child.take() {
            reap_later(child);
        }
    }
}

/// Reap `child` on a background thread so it never lingers as a zombie.
fn reap_later(mut child: Child) {
    let _ = thread::Builder::new()
        .name("kflash-watchdog-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
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

fn tail_of(path: &Path, offset: u64) -> String {
    let text = read_from(path, offset);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; its log says:\n{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Backend;
    use std::io::{self, BufRead};
    use std::process::Stdio;

    const DIR_VAR: &str = "KFLASH_TEST_WATCHDOG_DIR";
    const MODE_VAR: &str = "KFLASH_TEST_WATCHDOG_MODE";

    fn launch() -> Vec<OsString> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kflash/watchdog.py");
        vec!["python3".into(), script.into()]
    }

    fn config(dir: &Path) -> ServiceConfig {
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

    /// The runner: arms the watchdog, then waits to be killed or disarms (re-executed by
    /// the tests below in a child process; does nothing in a normal test run).
    #[test]
    #[ignore = "helper process for the watchdog tests"]
    fn runner_process() {
        let Some(dir) = std::env::var_os(DIR_VAR) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let dog = Watchdog::arm(&launch(), &config(&dir), &dir.join("state")).unwrap();
        if std::env::var(MODE_VAR).as_deref() == Ok("disarm") {
            dog.disarm().unwrap();
            println!("RUNNER-DISARMED");
            return;
        }
        println!("RUNNER-ARMED");
        io::stdout().flush().unwrap();
        thread::sleep(Duration::from_secs(60));
    }

    fn spawn_runner(dir: &Path, mode: &str) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "service::watchdog::tests::runner_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, dir)
            .env(MODE_VAR, mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
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

    #[test]
    fn sigkilled_runner_gets_the_service_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut runner = spawn_runner(dir.path(), "kill");
        let stdout = runner.stdout.take().unwrap();
        let mut lines = io::BufReader::new(stdout).lines();
        assert!(
            lines
                .by_ref()
                .map_while(Result::ok)
                .any(|l| l.contains("RUNNER-ARMED")),
            "runner did not arm the watchdog"
        );
        assert!(!dir.path().join("started").exists());
        runner.kill().unwrap();
        runner.wait().unwrap();
        let killed = Instant::now();
        // The watchdog must not hold the runner's stdout: reading it to EOF finishes.
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let rest: Vec<String> = lines.map_while(Result::ok).collect();
            let _ = tx.send(rest);
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "something still holds the runner's stdout pipe"
        );
        let marker = dir.path().join("started");
        assert!(
            wait_until(Duration::from_secs(10), || marker.exists()),
            "the watchdog did not start the service within 10 s; log:\n{}",
            read_from(&dir.path().join("state/watchdog.log"), 0)
        );
        assert!(killed.elapsed() < Duration::from_secs(10));
        let log = dir.path().join("state/watchdog.log");
        assert!(wait_until(Duration::from_secs(5), || read_from(&log, 0)
            .contains("started again")));
        assert_eq!(fs::read_to_string(&marker).unwrap(), "started\n");
    }

    #[test]
    fn disarmed_watchdog_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let runner = spawn_runner(dir.path(), "disarm");
        let out = runner.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("RUNNER-DISARMED"), "{text}");
        let log = read_from(&dir.path().join("state/watchdog.log"), 0);
        assert!(log.contains("disarmed"), "{log}");
        assert!(!dir.path().join("started").exists(), "{log}");
    }

    #[test]
    fn watchdog_that_cannot_start_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let err = Watchdog::arm(
            &[
                "sh".into(),
                "-c".into(),
                "echo broken python >&2; exit 3".into(),
            ],
            &cfg,
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("exited at once"), "{err}");
        assert!(err.contains("broken python"), "{err}");
        assert!(err.contains("watchdog.log"), "{err}");
        let err = Watchdog::arm(&["/nonexistent/python".into()], &cfg, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/python"), "{err}");
    }

    #[test]
    fn disarm_in_process_reports_success() {
        let dir = tempfile::tempdir().unwrap();
        let dog = Watchdog::arm(&launch(), &config(dir.path()), dir.path()).unwrap();
        assert!(dog.pid().is_some());
        dog.disarm().unwrap();
        assert!(!dir.path().join("started").exists());
    }
}
