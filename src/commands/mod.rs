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
//! Thread-safety: `Context` is an immutable value; concurrent runs are serialised by the
//! run lock, concurrent edits are last-writer-wins on an atomic file.

mod devices;
mod exit_status;
pub mod printer;
mod settings;
mod status;

use std::path::PathBuf;

pub use devices::{DeviceRow, Imported, NewDevice, Skipped};
pub use exit_status::ExitStatus;
pub use status::{DeviceStatus, LastRun, Status};

use crate::events::Sink;
use crate::flash::NativeKatapult;
use crate::katapult::{self, BootloaderInfo, FlashReport, SerialFlashOptions, SerialStatusOptions};
use crate::pipeline::{self, DeviceReport, Options, Plan, Recovered, Report};
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
}

impl From<pipeline::Error> for Error {
    fn from(err: pipeline::Error) -> Error {
        Error::Run(Box::new(err))
    }
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
    /// Open `home`, or the default state dir (`$KFLASH_HOME`, `~/printer_data/kflash`, ...).
    pub fn open(home: Option<PathBuf>) -> Result<Context, Error> {
        let state = match home {
            Some(path) => StateDir::at(path),
            None => StateDir::resolve().ok_or(registry::Error::NoStateDir)?,
        };
        Ok(Context {
            state,
            python: None,
            native_katapult: Some(printer::native_katapult()),
        })
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
        let deps = self.deps()?;
        Ok(pipeline::build(&deps, keys, cancel, sink)?)
    }

    /// `kflash flash KEY` and `kflash flash-all`: build, one stop window, restart, verify.
    pub fn flash_all(&self, opts: &Options, cancel: &Cancel, sink: &Sink) -> Result<Report, Error> {
        let deps = self.deps()?;
        Ok(pipeline::flash_all(&deps, opts, cancel, sink)?)
    }

    /// `kflash rollback [KEY...]`: each selected board's last-known-good image, one stop
    /// window, restart, verify.
    pub fn rollback(&self, opts: &Options, cancel: &Cancel, sink: &Sink) -> Result<Report, Error> {
        let deps = self.deps()?;
        Ok(pipeline::rollback(&deps, opts, cancel, sink)?)
    }

    /// Finish the boards an unfinished run left behind (the pending record): a board
    /// found in Katapult by its stable identity gets the recorded image; what cannot be
    /// finished stays recorded for the next run. Neither stops nor starts klipper.
    ///
    /// The watchdog calls this, with klipper still stopped, before it starts klipper after
    /// the runner died (the run lock died with the runner; a run that holds it again is
    /// `Refused`); flash-all calls it first.
    pub fn recover(&self, cancel: &Cancel, sink: &Sink) -> Result<Vec<Recovered>, Error> {
        let deps = self.deps()?;
        Ok(pipeline::recover_first(&deps, cancel, sink)?)
    }

    /// Whether an unfinished run left boards to recover (a cheap check, no scan).
    pub fn has_pending(&self) -> bool {
        pipeline::pending::load(&self.state).is_some()
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
