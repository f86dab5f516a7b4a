//! The run record and the run's progress: one of each per flash run, in `<state>/runs/`.
//!
//! `<run id>.json` (schema `version` 1, written atomically) says who runs it (`pid`, and
//! the process's start time `pid_start` so a reused pid is not mistaken for it), with which
//! options and service settings, where its watchdog stands, and at the end the outcome:
//! `exit_code`, `ok`, `error`, `interrupted` (why, when a signal or a death ended it) and
//! the flash-all `report`. `<run id>.jsonl` holds every progress event as one JSON line
//! (`t`, `run_id`, `stage`, `device`, `fraction`, `level`, `message`), appended as they
//! happen. Run ids (`20260101T120000Z-1234`: UTC start and pid) sort by start time.
//!
//! Writers: the runner, holding the run lock, writes the record at its start (`Run::begin`,
//! state `running`), when its watchdog is launched, armed and disarmed, and at its end
//! (`finished`). The watchdog, holding the lock after the runner died, marks it
//! `interrupted`. The klippy extra only adds `<run id>.announced` (an empty file) once it
//! has posted the run's summary. So no file has two writers at once.
//!
//! Readers (`latest`, `read`, `events`) never block and never write: a `running` record
//! whose process is gone reads as `interrupted`, saying where it stopped.
//!
//! Thread-safety: `Run` is `Send + Sync` (its record and progress file are behind
//! mutexes; progress may be written from the builder's threads).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::lock::{LockError, RunLock};
use crate::events::{Event, Sink};
use crate::pipeline::report::utc_now;
use crate::registry::{write_atomic, StateDir};
use crate::service::ServiceConfig;

/// The record's schema version.
pub const SCHEMA: u32 = 1;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Finished,
    /// Its process went away without finishing (killed, power loss).
    Interrupted,
}

/// Where the run's watchdog stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WatchdogState {
    /// No watchdog (nothing was to be stopped yet).
    #[default]
    None,
    /// Started, waiting for the run's end; klipper is running.
    Launched,
    /// klipper is being stopped: if the run ends now, the watchdog starts klipper.
    Armed,
    /// klipper runs again: the watchdog stands down.
    Disarmed,
}

/// What a run was asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RunOptions {
    pub keys: Option<Vec<String>>,
    pub only_outdated: bool,
    pub yes: bool,
    /// A rollback: each board gets its last-known-good image, nothing is built.
    #[serde(default)]
    pub rollback: bool,
}

/// The run record (`<run id>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub run_id: String,
    pub state: RunState,
    pub pid: u32,
    /// The process's start time (clock ticks after boot, `/proc/<pid>/stat` field 22).
    pub pid_start: Option<u64>,
    pub started: String,
    pub finished: Option<String>,
    pub options: RunOptions,
    /// The service settings the run (and its watchdog) control klipper with.
    pub service: Option<ServiceConfig>,
    #[serde(default)]
    pub watchdog: WatchdogState,
    pub exit_code: Option<i32>,
    pub ok: Option<bool>,
    pub error: Option<String>,
    /// Why the run was interrupted (`stopped by SIGTERM`, or where its process died).
    pub interrupted: Option<String>,
    /// The flash-all report (DESIGN.md's JSON), when the run got that far.
    pub report: Option<Value>,
}

/// Why the run record could not be written (nothing was stopped).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot write the run record {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A new run id: UTC start time and pid.
pub fn new_run_id() -> String {
    let stamp: String = utc_now()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    format!("{stamp}-{}", std::process::id())
}

/// A run id is safe as a file name: letters, digits, `T`, `Z`, `-`, `_`, `.`; no leading dot.
pub fn valid_run_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 80
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn record_path(runs: &Path, id: &str) -> PathBuf {
    runs.join(format!("{id}.json"))
}

fn progress_path(runs: &Path, id: &str) -> PathBuf {
    runs.join(format!("{id}.jsonl"))
}

fn announced_path(runs: &Path, id: &str) -> PathBuf {
    runs.join(format!("{id}.announced"))
}

fn write_record(path: &Path, record: &Record) -> Result<(), RecordError> {
    let mut bytes = serde_json::to_vec_pretty(record).map_err(|e| RecordError::Write {
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(|source| RecordError::Write {
        path: path.to_owned(),
        source,
    })
}

/// A live run: holds the run lock, writes the record and the progress.
pub struct Run {
    id: String,
    runs: PathBuf,
    path: PathBuf,
    record: Mutex<Record>,
    progress: Mutex<Option<File>>,
    _lock: RunLock,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("id", &self.id)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// How a run ended, for its record.
#[derive(Debug, Default)]
pub struct Outcome {
    pub exit_code: i32,
    pub ok: bool,
    pub error: Option<String>,
    pub interrupted: Option<String>,
    pub report: Option<Value>,
}

impl Run {
    /// Take the run lock and write the record (`running`). `Err(Lock(Held))`: another run
    /// is in progress; nothing was written.
    pub fn begin(
        state: &StateDir,
        run_id: Option<&str>,
        options: RunOptions,
        service: Option<ServiceConfig>,
    ) -> Result<Run, RecordError> {
        let lock = RunLock::acquire(&state.lock_path())?;
        let runs = state.runs_dir();
        let id = run_id.map_or_else(new_run_id, str::to_owned);
        let path = record_path(&runs, &id);
        let write = |source| RecordError::Write {
            path: path.clone(),
            source,
        };
        if !valid_run_id(&id) {
            return Err(write(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{id}` is not a run id"),
            )));
        }
        fs::create_dir_all(&runs).map_err(write)?;
        let progress = File::create(progress_path(&runs, &id)).map_err(write)?;
        let record = Record {
            version: SCHEMA,
            run_id: id.clone(),
            state: RunState::Running,
            pid: std::process::id(),
            pid_start: start_time(std::process::id()),
            started: utc_now(),
            finished: None,
            options,
            service,
            watchdog: WatchdogState::None,
            exit_code: None,
            ok: None,
            error: None,
            interrupted: None,
            report: None,
        };
        write_record(&path, &record)?;
        Ok(Run {
            id,
            runs,
            path,
            record: Mutex::new(record),
            progress: Mutex::new(Some(progress)),
            _lock: lock,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The record's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state dir's `runs/`.
    pub fn runs_dir(&self) -> &Path {
        &self.runs
    }

    /// The record as it stands.
    pub fn record(&self) -> Record {
        lock(&self.record).clone()
    }

    /// Change the record and write it.
    fn update(&self, change: impl FnOnce(&mut Record)) -> Result<(), RecordError> {
        let mut record = lock(&self.record);
        change(&mut record);
        write_record(&self.path, &record)
    }

    /// Record that the watchdog is being launched, with the settings it will start klipper
    /// with.
    pub fn watchdog_launched(&self, service: &ServiceConfig) -> Result<(), RecordError> {
        self.update(|r| {
            r.service = Some(service.clone());
            r.watchdog = WatchdogState::Launched;
        })
    }

    /// Record where the watchdog stands (it reads this when the run ends).
    pub fn set_watchdog(&self, state: WatchdogState) -> Result<(), RecordError> {
        self.update(|r| r.watchdog = state)
    }

    /// A sink that appends every event to the progress file, then hands it on.
    pub fn sink(self: &Arc<Self>, then: Sink) -> Sink {
        let run = Arc::clone(self);
        Arc::new(move |event: &Event| {
            run.append(event);
            then(event);
        })
    }

    fn append(&self, event: &Event) {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| (d.as_secs_f64() * 1000.0).round() / 1000.0);
        let Ok(Value::Object(mut line)) = serde_json::to_value(event) else {
            return;
        };
        line.insert("t".into(), t.into());
        line.insert("run_id".into(), self.id.clone().into());
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        if let Some(file) = lock(&self.progress).as_mut() {
            // Best effort: progress must never stop a run.
            let _ = file.write_all(text.as_bytes());
        }
    }

    /// Write the outcome (`finished`).
    pub fn finish(&self, outcome: Outcome) -> Result<(), RecordError> {
        lock(&self.progress).take();
        self.update(|r| {
            r.state = RunState::Finished;
            r.finished = Some(utc_now());
            r.exit_code = Some(outcome.exit_code);
            r.ok = Some(outcome.ok);
            r.error = outcome.error;
            r.interrupted = outcome.interrupted;
            r.report = outcome.report;
        })
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // A run that unwound without `finish` (a panic): say so while the lock is held.
        if lock(&self.record).state == RunState::Running {
            let _ = self.update(|r| {
                r.state = RunState::Interrupted;
                r.finished = Some(utc_now());
                r.interrupted = Some("kflash stopped on an internal error".into());
            });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------- readers

/// A process's start time (`/proc/<pid>/stat` field 22), to tell a reused pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ..." -- comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that wrote `record` still runs (not a zombie, not a new process
/// with the same pid).
pub fn runner_alive(record: &Record) -> bool {
    let pid = record.pid;
    if pid == 0 {
        return false;
    }
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        // No /proc entry: gone (or /proc hides it: then ask the kernel).
        let Some(p) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return false;
        };
        return !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        );
    };
    let Some(close) = stat.rfind(')') else {
        return true;
    };
    let state = stat[close + 2..].chars().next().unwrap_or('R');
    if matches!(state, 'Z' | 'X') {
        return false;
    }
    match (record.pid_start, start_time(pid)) {
        (Some(want), Some(got)) => want == got,
        _ => true,
    }
}

/// The record of run `id` as a reader sees it (`running` with its process gone reads as
/// `interrupted`), or `None` when there is none (or it is not a record of this schema).
pub fn read(runs: &Path, id: &str) -> Option<Record> {
    if !valid_run_id(id) {
        return None;
    }
    let bytes = fs::read(record_path(runs, id)).ok()?;
    let mut record: Record = serde_json::from_slice(&bytes).ok()?;
    if record.version != SCHEMA {
        return None;
    }
    if record.state == RunState::Running && !runner_alive(&record) {
        record.state = RunState::Interrupted;
    }
    if record.state == RunState::Interrupted && record.interrupted.is_none() {
        record.interrupted = Some(died(runs, &record));
    }
    Some(record)
}

/// "its process (pid N) stopped during flash of mcu without finishing".
fn died(runs: &Path, record: &Record) -> String {
    let at = last_step(runs, &record.run_id)
        .map(|(stage, device)| {
            format!(
                " during {stage}{}",
                device.map(|d| format!(" of {d}")).unwrap_or_default()
            )
        })
        .unwrap_or_default();
    format!(
        "its process (pid {}) stopped{at} without finishing",
        record.pid
    )
}

/// The stage (and device) of the run's last progress event.
pub fn last_step(runs: &Path, id: &str) -> Option<(String, Option<String>)> {
    let (events, _) = events(runs, id, 0);
    let last = events.last()?;
    let stage = last.get("stage")?.as_str()?.to_owned();
    let device = last
        .get("device")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Some((stage, device))
}

/// Run ids in `runs/`, newest first.
pub fn ids(runs: &Path) -> Vec<String> {
    let Ok(dir) = fs::read_dir(runs) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id = name.strip_suffix(".json")?;
            valid_run_id(id).then(|| id.to_owned())
        })
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids
}

/// The newest run's record (of this schema).
pub fn latest(runs: &Path) -> Option<Record> {
    ids(runs).iter().find_map(|id| read(runs, id))
}

/// The complete progress lines of run `id` after byte `offset`, and the offset after
/// them (a line still being written is left for the next call).
pub fn events(runs: &Path, id: &str, offset: u64) -> (Vec<Value>, u64) {
    if !valid_run_id(id) {
        return (Vec::new(), offset);
    }
    let Ok(mut file) = File::open(progress_path(runs, id)) else {
        return (Vec::new(), offset);
    };
    let mut data = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut data).is_err() {
        return (Vec::new(), offset);
    }
    let Some(end) = data.iter().rposition(|&b| b == b'\n') else {
        return (Vec::new(), offset);
    };
    let events = data[..end]
        .split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .filter(Value::is_object)
        .collect();
    (events, offset + end as u64 + 1)
}

/// Whether the klippy extra has posted run `id`'s summary.
pub fn announced(runs: &Path, id: &str) -> bool {
    valid_run_id(id) && announced_path(runs, id).exists()
}

/// Note that run `id`'s summary was posted (the extra, once).
pub fn announce(runs: &Path, id: &str) -> io::Result<()> {
    if !valid_run_id(id) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{id}` is not a run id"),
        ));
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(announced_path(runs, id))
        .map(drop)
}

/// Mark a run whose process died `interrupted` (the watchdog, holding the lock).
pub fn mark_interrupted(runs: &Path, id: &str) -> Result<Record, RecordError> {
    let path = record_path(runs, id);
    let bytes = fs::read(&path).map_err(|source| RecordError::Write {
        path: path.clone(),
        source,
    })?;
    let mut record: Record = serde_json::from_slice(&bytes).map_err(|e| RecordError::Write {
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    if record.state == RunState::Running {
        record.interrupted = Some(died(runs, &record));
        record.state = RunState::Interrupted;
        record.finished = Some(utc_now());
        write_record(&path, &record)?;
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Level, Stage};

    fn state() -> (tempfile::TempDir, StateDir) {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path().join("state"));
        (dir, state)
    }

    #[test]
    fn a_run_writes_its_record_and_progress_and_finishes() {
        let (_dir, state) = state();
        let run = Arc::new(Run::begin(&state, Some("R1"), RunOptions::default(), None).unwrap());
        let runs = state.runs_dir();
        let rec = read(&runs, "R1").unwrap();
        assert_eq!(rec.state, RunState::Running);
        assert_eq!(rec.pid, std::process::id());
        assert!(rec.pid_start.is_some());
        assert_eq!(latest(&runs).unwrap().run_id, "R1");
        // one run at a time
        let err = Run::begin(&state, Some("R2"), RunOptions::default(), None).unwrap_err();
        assert!(
            matches!(err, RecordError::Lock(LockError::Held { .. })),
            "{err}"
        );
        assert!(read(&runs, "R2").is_none());
        let sink = run.sink(crate::events::discard());
        sink(&Event::info(Stage::Build, Some("mcu"), "built").with_fraction(1.0));
        sink(&Event::info(Stage::Stop, None, "stopping").with_level(Level::Warning));
        let (evs, offset) = events(&runs, "R1", 0);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0]["stage"], "build");
        assert_eq!(evs[0]["device"], "mcu");
        assert_eq!(evs[0]["run_id"], "R1");
        assert_eq!(evs[1]["level"], "warning");
        assert!(evs[1]["t"].as_f64().unwrap() > 0.0);
        assert_eq!(events(&runs, "R1", offset), (vec![], offset));
        run.set_watchdog(WatchdogState::Armed).unwrap();
        assert_eq!(read(&runs, "R1").unwrap().watchdog, WatchdogState::Armed);
        run.finish(Outcome {
            exit_code: 0,
            ok: true,
            report: Some(serde_json::json!({"ok": true})),
            ..Outcome::default()
        })
        .unwrap();
        let rec = read(&runs, "R1").unwrap();
        assert_eq!(rec.state, RunState::Finished);
        assert_eq!(rec.exit_code, Some(0));
        assert_eq!(rec.report.unwrap()["ok"], true);
        drop(sink);
        drop(run);
        // the lock is free again; the finished record stays finished
        Run::begin(&state, Some("R3"), RunOptions::default(), None).unwrap();
        assert_eq!(read(&runs, "R1").unwrap().state, RunState::Finished);
        assert_eq!(ids(&runs), ["R3", "R1"]);
    }

    #[test]
    fn a_record_of_a_dead_process_reads_as_interrupted_where_it_stopped() {
        let (_dir, state) = state();
        let runs = state.runs_dir();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        fs::create_dir_all(&runs).unwrap();
        let record = Record {
            version: SCHEMA,
            run_id: "20260101T000000Z-1".into(),
            state: RunState::Running,
            pid: dead,
            pid_start: None,
            started: utc_now(),
            finished: None,
            options: RunOptions::default(),
            service: None,
            watchdog: WatchdogState::Armed,
            exit_code: None,
            ok: None,
            error: None,
            interrupted: None,
            report: None,
        };
        write_record(&record_path(&runs, &record.run_id), &record).unwrap();
        fs::write(
            progress_path(&runs, &record.run_id),
            "{\"stage\":\"build\",\"device\":null}\n{\"stage\":\"flash\",\"device\":\"mcu\"}\n{\"partial",
        )
        .unwrap();
        let got = latest(&runs).unwrap();
        assert_eq!(got.state, RunState::Interrupted);
        let why = got.interrupted.unwrap();
        assert!(why.contains(&format!("pid {dead}")), "{why}");
        assert!(why.contains("during flash of mcu"), "{why}");
        // a reader wrote nothing
        let on_disk: Record =
            serde_json::from_slice(&fs::read(record_path(&runs, &record.run_id)).unwrap()).unwrap();
        assert_eq!(on_disk.state, RunState::Running);
        // the watchdog does
        mark_interrupted(&runs, &record.run_id).unwrap();
        let on_disk: Record =
            serde_json::from_slice(&fs::read(record_path(&runs, &record.run_id)).unwrap()).unwrap();
        assert_eq!(on_disk.state, RunState::Interrupted);
        assert!(!announced(&runs, &record.run_id));
        announce(&runs, &record.run_id).unwrap();
        assert!(announced(&runs, &record.run_id));
    }

    #[test]
    fn a_pid_reused_by_another_process_is_not_the_runner() {
        let mut record = Record {
            version: SCHEMA,
            run_id: "X".into(),
            state: RunState::Running,
            pid: std::process::id(),
            pid_start: start_time(std::process::id()),
            started: String::new(),
            finished: None,
            options: RunOptions::default(),
            service: None,
            watchdog: WatchdogState::None,
            exit_code: None,
            ok: None,
            error: None,
            interrupted: None,
            report: None,
        };
        assert!(runner_alive(&record));
        record.pid_start = record.pid_start.map(|t| t + 1);
        assert!(!runner_alive(&record));
    }

    #[test]
    fn ids_are_file_names_and_sort_by_time() {
        let id = new_run_id();
        assert!(valid_run_id(&id), "{id}");
        assert_eq!(
            id.len(),
            "20260101T120000Z-".len() + std::process::id().to_string().len()
        );
        for bad in ["", "../x", ".hidden", "a/b", "a b"] {
            assert!(!valid_run_id(bad), "{bad}");
        }
        assert!("20260102T000000Z-9" > "20260101T235959Z-12345");
    }
}
