//! What each front-end command does, over one state directory: the operations the CLI,
//! the detached helper and the klippy extra call (devices, settings, config path, plan,
//! build, flash / flash-all, status, the Katapult flasher on its own), the one error type
//! they return, and the one `ExitStatus` every front end exits with.
//!
//! `printer` holds the pipeline's ports on a real printer (`Context::deps`).
//!
//! Invariants: every edit validates first and saves the registry atomically, so a
//! rejected input never changes devices.json; a device's config is copied into
//! `configs/<key>.config` atomically and never modified afterwards except by the user
//! (`kflash config KEY`).
//!
//! Every flash run (`flash_all`, for the CLI and the helper alike) holds the run lock and
//! is recorded with its progress in `runs/` (`crate::flash_run`); `build` holds the lock.
//!
//! Thread-safety: `Context` is an immutable value; concurrent runs are serialised by the
//! run lock, concurrent edits are last-writer-wins on an atomic file.

mod devices;
mod exit_status;
pub mod printer;
mod settings;
mod status;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

pub use devices::{DeviceRow, Imported, NewDevice, Skipped};
pub use exit_status::ExitStatus;
pub use status::{DeviceStatus, LastRun, Status};

use crate::events::Sink;
use crate::flash::NativeKatapult;
use crate::flash_run::{LockError, Outcome, RecordError, Run, RunLock, RunOptions};
use crate::katapult::{self, BootloaderInfo, FlashReport, SerialFlashOptions, SerialStatusOptions};
use crate::pipeline::{self, DeviceReport, Options, Plan, Report};
use crate::process::Cancel;
use crate::registry::{self, Registry, StateDir};

/// Why a command failed. Every variant keeps the domain error it came from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(transparent)]
    Run(Box<pipeline::Error>),
    #[error(transparent)]
    Katapult(#[from] katapult::Error),
    #[error("give exactly one of --serial PATH, --can-uuid UUID or --linux PATH")]
    EndpointCount,
    #[error("cannot read config {}: {source}", path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} does not look like a Klipper .config (no CONFIG_ lines); create one with \
         `kflash config {key}`",
        path.display()
    )]
    NotAConfig { path: PathBuf, key: String },
    #[error("cannot write {}: {source}", path.display())]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The run record could not be written (nothing was stopped).
    #[error("cannot write the run record {}: {source}", path.display())]
    WriteRecord {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<pipeline::Error> for Error {
    fn from(err: pipeline::Error) -> Error {
        Error::Run(Box::new(err))
    }
}

/// Another run holding the lock is a pre-flight refusal.
impl From<LockError> for Error {
    fn from(err: LockError) -> Error {
        match err {
            LockError::Held { .. } => pipeline::Error::Refused(pipeline::Refusal::LockHeld(err)),
            LockError::Io { .. } => pipeline::Error::Lock(err),
        }
        .into()
    }
}

impl From<RecordError> for Error {
    fn from(err: RecordError) -> Error {
        match err {
            RecordError::Lock(e) => e.into(),
            RecordError::Write { path, source } => Error::WriteRecord { path, source },
        }
    }
}

/// What a flash run writes: freshly built firmware, or each board's last-known-good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    FlashAll,
    Rollback,
}

/// A state directory and what the front ends can do with it.
#[derive(Clone)]
pub struct Context {
    pub state: StateDir,
    /// The Python interpreter that runs `kflash.watchdog` (the host's `sys.executable`).
    pub python: Option<PathBuf>,
    /// The native Katapult serial flasher (used unless the setting `katapult_flasher` is
    /// `flashtool`; tests may swap it).
    pub native_katapult: Option<NativeKatapult>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("state", &self.state)
            .field("python", &self.python)
            .field("native_katapult", &self.native_katapult.is_some())
            .finish()
    }
}

impl Context {
    /// The context of an existing state directory.
    pub fn at(state: StateDir) -> Context {
        Context {
            state,
            python: None,
            native_katapult: Some(printer::native_katapult()),
        }
    }

    /// Open `home`, or the default state dir (`$KFLASH_HOME`, `~/printer_data/kflash`, ...).
    pub fn open(home: Option<PathBuf>) -> Result<Context, Error> {
        let state = match home {
            Some(path) => StateDir::at(path),
            None => StateDir::resolve().ok_or(registry::Error::NoStateDir)?,
        };
        Ok(Context::at(state))
    }

    pub fn registry(&self) -> Result<Registry, registry::Error> {
        Registry::load(&self.state)
    }

    /// `kflash plan`: what flash-all would do, per device, and why. Changes nothing.
    pub fn plan(&self, opts: &Options) -> Result<Plan, Error> {
        let deps = self.deps()?;
        Ok(pipeline::plan(&deps, opts, &crate::events::discard())?.plan)
    }

    /// `kflash build`: build the selected devices' firmware (klipper keeps running).
    pub fn build(
        &self,
        keys: Option<&[String]>,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<Vec<DeviceReport>, Error> {
        let _lock = RunLock::acquire(&self.state.lock_path())?;
        let deps = self.deps()?;
        Ok(pipeline::build(&deps, keys, cancel, sink)?)
    }

    /// `kflash flash KEY` and `kflash flash-all`: build, one stop window, restart, verify.
    pub fn flash_all(
        &self,
        opts: &Options,
        run_id: Option<&str>,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<Report, Error> {
        self.run(RunKind::FlashAll, opts, run_id, cancel, sink)
    }

    /// A flash run (`kind`): it holds the lock and is recorded, progress included, in
    /// `runs/<run id>.json` (`run_id`: the helper's, else a new one); `report.record`
    /// names the record. Boards an earlier run left behind are recovered first.
    pub fn run(
        &self,
        kind: RunKind,
        opts: &Options,
        run_id: Option<&str>,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<Report, Error> {
        let options = RunOptions {
            keys: opts.keys.clone(),
            only_outdated: opts.only_outdated,
            yes: opts.yes,
            rollback: kind == RunKind::Rollback,
        };
        let run = Arc::new(Run::begin(&self.state, run_id, options, None)?);
        let sink = run.sink(sink.clone());
        let mut outcome = self.deps_for(&run).map_err(Error::from).and_then(|deps| {
            Ok(match kind {
                RunKind::FlashAll => pipeline::flash_all(&deps, opts, cancel, &sink)?,
                RunKind::Rollback => pipeline::rollback(&deps, opts, cancel, &sink)?,
            })
        });
        let record = Some(run.path().to_path_buf());
        let report = match &mut outcome {
            Ok(report) => Some(report),
            Err(Error::Run(e)) => match &mut **e {
                pipeline::Error::Cancelled {
                    report: Some(report),
                } => Some(&mut **report),
                _ => None,
            },
            Err(_) => None,
        };
        let report = report.map(|r| {
            r.record.clone_from(&record);
            serde_json::to_value(&*r).ok()
        });
        let (status, ok, error) = match &outcome {
            Ok(r) => (ExitStatus::of_report(r), r.ok, None),
            Err(e) => (ExitStatus::of_error(e), false, Some(e.to_string())),
        };
        let finished = run.finish(Outcome {
            exit_code: status.code(),
            ok,
            error,
            interrupted: cancel.reason().filter(|_| cancel.is_cancelled()),
            report: report.flatten(),
        });
        if let Err(e) = finished {
            sink(
                &crate::events::Event::info(
                    crate::events::Stage::Report,
                    None,
                    format!("could not write the run record: {e}"),
                )
                .with_level(crate::events::Level::Warning),
            );
        }
        outcome
    }

    /// The watchdog's side of run `run_id` (`crate::flash_run::watch`): after the runner
    /// died with klipper stopped, it first finishes the boards the run left in their
    /// bootloader (the pending record), then starts klipper. The process exit code.
    pub fn watch(&self, run_id: &str) -> i32 {
        crate::flash_run::watch(&self.state, run_id, &|| self.recover_held())
    }

    /// Finish the boards an unfinished run left behind (the pending record): a board
    /// found in Katapult by its stable identity gets the recorded image; what cannot be
    /// finished stays recorded for the next run. Neither stops nor starts klipper. The
    /// caller holds the run lock (the watchdog). One line per board, for its log.
    fn recover_held(&self) -> Vec<String> {
        let said = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&said);
        let sink: Sink = Arc::new(move |e: &crate::events::Event| {
            let line = match &e.device {
                Some(key) => format!("{key}: {}", e.message),
                None => e.message.clone(),
            };
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(line);
        });
        let result = self
            .deps()
            .map_err(Error::from)
            .and_then(|deps| Ok(pipeline::recover_first(&deps, &Cancel::new(), &sink)?));
        let mut lines = std::mem::take(&mut *said.lock().unwrap_or_else(PoisonError::into_inner));
        if let Err(e) = result {
            lines.push(format!("could not recover the boards the run left: {e}"));
        }
        lines
    }
}

/// `kflash katapult flash`: the native Katapult flasher on its own.
pub fn katapult_flash(
    opts: &SerialFlashOptions,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<FlashReport, Error> {
    Ok(katapult::flash_serial(opts, cancel, sink)?)
}

/// `kflash katapult status`: connect to a board's Katapult, flash nothing.
pub fn katapult_status(
    opts: &SerialStatusOptions,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<BootloaderInfo, Error> {
    Ok(katapult::status_serial(opts, cancel, sink)?)
}

/// `kflash katapult flash --json`: what was flashed, how fast.
impl serde::Serialize for FlashReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("FlashReport", 13)?;
        m.serialize_field("device", &self.device)?;
        m.serialize_field("bytes", &self.bytes)?;
        m.serialize_field("blocks", &self.blocks)?;
        m.serialize_field("block_size", &self.block_size)?;
        m.serialize_field("app_start", &self.app_start)?;
        m.serialize_field("mcu", &self.mcu)?;
        m.serialize_field("bootloader_version", &self.bootloader_version)?;
        m.serialize_field("firmware_version", &self.firmware_version)?;
        m.serialize_field("pages", &self.pages)?;
        m.serialize_field("completed", &self.completed)?;
        m.serialize_field("duration_s", &self.duration.as_secs_f64())?;
        m.serialize_field("retries", &self.retries)?;
        m.serialize_field("rate_bps", &self.rate())?;
        m.end()
    }
}

/// `kflash katapult status --json`: the bootloader that answered.
impl serde::Serialize for BootloaderInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("BootloaderInfo", 6)?;
        m.serialize_field("device", &self.device)?;
        m.serialize_field("mcu", &self.mcu)?;
        m.serialize_field("bootloader_version", &self.bootloader_version)?;
        m.serialize_field("proto_version", &self.proto_version)?;
        m.serialize_field("app_start", &self.app_start)?;
        m.serialize_field("block_size", &self.block_size)?;
        m.end()
    }
}
