//! Running external commands (make, flashtool.py, systemctl, user stop/start commands).
//!
//! Owns: spawning a command in its own process group, a deadline, cancellation, the
//! TERM -> grace -> KILL escalation on the whole group, reaping, and draining stdout and
//! stderr on two threads so a chatty child never deadlocks on a full pipe.
//!
//! Invariants: a child is always reaped before `run` returns (no zombies); on timeout or
//! cancel the whole group is signalled, so grandchildren (`make` -> `cc1`) die too; errors
//! carry the command line, the exit code or signal, and the last lines of output.
//! We poll `try_wait` against the deadline instead of installing a SIGCHLD handler: the
//! library runs inside a Python host and must not touch process-wide signal state.
//!
//! Thread-safety: `run` blocks the calling thread; call it from any thread. `Cancel` is a
//! cheap clonable flag shared between the caller and whoever wants to stop the work.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{kill_process_group, Pid, Signal};

/// How many lines of combined output an error keeps.
pub const TAIL_LINES: usize = 40;
/// Longest stdout kept in full (for commands whose output is parsed).
const STDOUT_CAP: usize = 4 << 20;
const POLL: Duration = Duration::from_millis(10);
/// Time between SIGTERM and SIGKILL of the group.
const GRACE: Duration = Duration::from_secs(3);

/// A shared "please stop" request with two levels, set by the front end (Ctrl+C,
/// SIGTERM) and checked by long work: the first asks the work to stop (`cancel`), the
/// second to abandon even what it is finishing (`abandon`). A view made by `finishing`
/// shares the request but trips only at the second level: a board being written is
/// handed that view, so the first signal lets it finish. It may carry why (`stopped by
/// SIGTERM`), which a run's record keeps.
#[derive(Clone, Debug)]
pub struct Cancel {
    level: Arc<AtomicU8>,
    trips_at: u8,
    why: Arc<Mutex<Option<String>>>,
}

impl Default for Cancel {
    fn default() -> Self {
        Self {
            level: Arc::new(AtomicU8::new(0)),
            trips_at: 1,
            why: Arc::default(),
        }
    }
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    /// The first level: stop, but let what is being finished finish.
    pub fn cancel(&self) {
        self.level.fetch_max(1, Ordering::SeqCst);
    }
    /// Cancel and say why (the first reason given is kept).
    pub fn cancel_because(&self, reason: &str) {
        if let Ok(mut why) = self.why.lock() {
            why.get_or_insert_with(|| reason.to_owned());
        }
        self.cancel();
    }
    /// The second level: abandon everything, also what is being finished.
    pub fn abandon(&self) {
        self.level.fetch_max(2, Ordering::SeqCst);
    }
    /// Whether work holding this view must stop now.
    pub fn is_cancelled(&self) -> bool {
        self.level.load(Ordering::SeqCst) >= self.trips_at
    }
    /// Whether the second level was reached.
    pub fn is_abandoned(&self) -> bool {
        self.level.load(Ordering::SeqCst) >= 2
    }
    /// The same request, seen by work that is finished on the first level and stopped
    /// only on the second.
    #[must_use]
    pub fn finishing(&self) -> Cancel {
        Cancel {
            level: Arc::clone(&self.level),
            trips_at: 2,
            why: Arc::clone(&self.why),
        }
    }
    /// Why it was cancelled, when the canceller said.
    pub fn reason(&self) -> Option<String> {
        self.why.lock().ok().and_then(|why| why.clone())
    }
}

/// Errors from running a command. Every variant names the command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` timed out after {after:?} and was stopped{}", fmt_tail(tail))]
    Timeout {
        cmd: String,
        after: Duration,
        tail: String,
    },
    #[error("`{cmd}` was cancelled{}", fmt_tail(tail))]
    Cancelled { cmd: String, tail: String },
    #[error("`{cmd}` failed ({status}){}", fmt_tail(tail))]
    Failed {
        cmd: String,
        status: Status,
        tail: String,
    },
}

impl Error {
    /// The output tail the error carries (empty for spawn errors).
    pub fn tail(&self) -> &str {
        match self {
            Error::Spawn { .. } => "",
            Error::Timeout { tail, .. }
            | Error::Cancelled { tail, .. }
            | Error::Failed { tail, .. } => tail,
        }
    }
}

/// `"; last output:\n<tail>"` for an error message, or nothing when the tail is empty.
pub(crate) fn fmt_tail(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; last output:\n{}", tail.trim_end())
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
}

impl Status {
    fn from_exit(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Status::Exited(code),
            (None, Some(sig)) => Status::Signaled(sig),
            (None, None) => Status::Exited(-1),
        }
    }
    pub fn success(self) -> bool {
        self == Status::Exited(0)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Exited(code) => write!(f, "exit code {code}"),
            Status::Signaled(sig) => write!(f, "killed by signal {sig}"),
        }
    }
}

/// What a finished command produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: Status,
    /// All of stdout (up to a few MiB), for commands whose output is parsed.
    pub stdout: String,
    /// The last lines of stdout and stderr, interleaved as they arrived.
    pub tail: String,
    pub elapsed: Duration,
}

type LineSink = Arc<dyn Fn(&str) + Send + Sync>;

/// A command to run: program, arguments, working directory, environment, deadline.
#[derive(Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    timeout: Option<Duration>,
    cancel: Option<Cancel>,
    on_line: Option<LineSink>,
}

impl Cmd {
    pub fn new(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
            timeout: None,
            cancel: None,
            on_line: None,
        }
    }
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
    #[must_use]
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    #[must_use]
    pub fn cancel(mut self, cancel: &Cancel) -> Self {
        self.cancel = Some(cancel.clone());
        self
    }
    /// Called with every output line as it arrives (stdout and stderr), e.g. for progress.
    #[must_use]
    pub fn on_line(mut self, sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_line = Some(Arc::new(sink));
        self
    }

    /// The command line as a user would type it (for messages).
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| {
                let s = a.to_string_lossy();
                if s.is_empty() || s.contains([' ', '"', '\'']) {
                    format!("'{s}'")
                } else {
                    s.into_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Run to completion; a non-zero exit is an `Error::Failed`.
    pub fn run(&self) -> Result<Output, Error> {
        let out = self.run_unchecked()?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(Error::Failed {
                cmd: self.display(),
                status: out.status,
                tail: out.tail,
            })
        }
    }

    /// Run to completion and return the output whatever the exit status.
    /// Still fails on spawn errors, timeout and cancellation.
    pub fn run_unchecked(&self) -> Result<Output, Error> {
        let started = Instant::now();
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(dir) = &self.cwd {
            command.current_dir(dir);
        }
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            cmd: self.display(),
            source,
        })?;
        let capture = Capture::default();
        let readers = [
            child
                .stdout
                .take()
                .map(|s| capture.drain(s, true, self.on_line.clone())),
            child
                .stderr
                .take()
                .map(|s| capture.drain(s, false, self.on_line.clone())),
        ];
        let ended = self.wait(&mut child, started);
        // The leader is gone; a daemonised grandchild may still hold the pipes, so wait for
        // the readers only briefly rather than forever.
        let join_deadline = Instant::now() + Duration::from_secs(2);
        for reader in readers.into_iter().flatten() {
            while !reader.is_finished() && Instant::now() < join_deadline {
                thread::sleep(POLL);
            }
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        let (stdout, tail) = capture.take();
        match ended {
            Ended::Exited(status) => Ok(Output {
                status: Status::from_exit(status),
                stdout,
                tail,
                elapsed: started.elapsed(),
            }),
            Ended::TimedOut => Err(Error::Timeout {
                cmd: self.display(),
                after: started.elapsed(),
                tail,
            }),
            Ended::Cancelled => Err(Error::Cancelled {
                cmd: self.display(),
                tail,
            }),
        }
    }

    fn wait(&self, child: &mut Child, started: Instant) -> Ended {
        let deadline = self.timeout.map(|t| started + t);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ended::Exited(status),
                Ok(None) => {}
                Err(_) => return Ended::Exited(reap(child)),
            }
            if self.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
                stop_group(child);
                return Ended::Cancelled;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                stop_group(child);
                return Ended::TimedOut;
            }
            thread::sleep(POLL);
        }
    }
}

enum Ended {
    Exited(ExitStatus),
    TimedOut,
    Cancelled,
}

/// TERM the child's process group, wait the grace period, then KILL it; always reap.
fn stop_group(child: &mut Child) {
    // The child leads its own group (process_group(0)): signal the whole group.
    let group = Pid::from_child(child);
    let _ = kill_process_group(group, Signal::TERM);
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            // The leader is gone; make sure nothing of its group lingers (ESRCH when the
            // group is empty is harmless).
            let _ = kill_process_group(group, Signal::KILL);
            return;
        }
        thread::sleep(POLL);
    }
    let _ = kill_process_group(group, Signal::KILL);
    reap(child);
}

fn reap(child: &mut Child) -> ExitStatus {
    loop {
        match child.wait() {
            Ok(status) => return status,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return ExitStatus::from_raw(-1),
        }
    }
}

/// Output collected from both pipes: full stdout (capped) and a shared line tail.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<CaptureInner>>);

#[derive(Default)]
struct CaptureInner {
    stdout: String,
    tail: VecDeque<String>,
}

impl Capture {
    fn drain(
        &self,
        pipe: impl Read + Send + 'static,
        is_stdout: bool,
        on_line: Option<LineSink>,
    ) -> thread::JoinHandle<()> {
        let capture = self.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                if let Some(sink) = &on_line {
                    sink(line);
                }
                let mut inner = capture
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if is_stdout && inner.stdout.len() < STDOUT_CAP {
                    inner.stdout.push_str(line);
                    inner.stdout.push('\n');
                }
                if inner.tail.len() == TAIL_LINES {
                    inner.tail.pop_front();
                }
                inner.tail.push_back(line.to_owned());
            }
        })
    }

    fn take(&self) -> (String, String) {
        let mut inner = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stdout = std::mem::take(&mut inner.stdout);
        let tail = inner.tail.drain(..).collect::<Vec<_>>().join("\n");
        (stdout, tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Cmd {
        Cmd::new("sh").arg("-c").arg(script)
    }

    #[test]
    fn captures_stdout_and_tail() {
        let out = sh("echo one; echo two >&2; echo three").run().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, "one\nthree\n");
        for word in ["one", "two", "three"] {
            assert!(
                out.tail.contains(word),
                "{word} missing from {:?}",
                out.tail
            );
        }
    }

    #[test]
    fn failure_names_command_code_and_tail() {
        let err = sh("echo boom-output; exit 3").run().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("exit code 3"), "{msg}");
        assert!(msg.contains("boom-output"), "{msg}");
    }

    #[test]
    fn signal_is_reported() {
        let err = sh("kill -9 $$").run().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Failed {
                    status: Status::Signaled(9),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn spawn_error_names_program() {
        let err = Cmd::new("/nonexistent/kflash-tool").run().unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kflash-tool"));
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild");
        // A grandchild that would outlive its parent if only the leader were killed.
        let script = format!(
            "sleep 60 & echo $! > {}; echo started; wait",
            pidfile.display()
        );
        let err = sh(&script)
            .timeout(Duration::from_millis(300))
            .run()
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("started"));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Gone, or a zombie waiting for init to reap it: either way no longer running.
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')));
        assert!(!alive, "grandchild {pid} survived the timeout");
    }

    #[test]
    fn term_ignoring_child_is_killed_after_grace() {
        let started = Instant::now();
        let err = sh("trap '' TERM; sleep 30")
            .timeout(Duration::from_millis(100))
            .run()
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_finishing_view_trips_only_when_abandoned() {
        let cancel = Cancel::new();
        let finishing = cancel.finishing();
        assert!(!cancel.is_cancelled() && !finishing.is_cancelled());
        cancel.cancel();
        assert!(cancel.is_cancelled() && !cancel.is_abandoned());
        assert!(!finishing.is_cancelled(), "the first level lets it finish");
        finishing.clone().abandon();
        assert!(finishing.is_cancelled() && cancel.is_abandoned());
    }

    #[test]
    fn cancel_stops_the_command() {
        let cancel = Cancel::new();
        let flag = cancel.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            flag.cancel();
        });
        let err = sh("sleep 30").cancel(&cancel).run().unwrap_err();
        t.join().unwrap();
        assert!(matches!(err, Error::Cancelled { .. }));
    }

    #[test]
    fn large_output_on_both_pipes_does_not_deadlock() {
        let out =
            sh("i=0; while [ $i -lt 20000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done")
                .timeout(Duration::from_secs(60))
                .run()
                .unwrap();
        assert!(out.stdout.ends_with("out19999\n"));
        assert_eq!(out.tail.lines().count(), TAIL_LINES);
    }

    #[test]
    fn on_line_sees_every_line() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        sh("echo a; echo b")
            .on_line(move |l| sink.lock().unwrap().push(l.to_owned()))
            .run()
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn daemonised_grandchild_holding_pipes_does_not_hang() {
        let started = Instant::now();
        let out = sh("sleep 20 & echo parent-done").run().unwrap();
        assert!(out.stdout.contains("parent-done"));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
