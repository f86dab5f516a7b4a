//! Flash methods and the fallback chain: how one device gets its new firmware.
//!
//! Owns: Katapult through the user's `flashtool.py` (serial and CAN), `make flash` in the
//! Klipper tree, the linux-process MCU (replace the binary, restart its service), the
//! `auto` chain between them, waiting for a USB/UART board to come back running Klipper,
//! and the recovery hint per board family when it does not (STM32 DFU, RP2040 BOOTSEL,
//! power-cycle).
//!
//! Invariants:
//! - A Katapult flash succeeds ONLY when flashtool printed `Programming Complete`; its exit
//!   code alone proves nothing (it exits 0 with "Device is not Katapult").
//! - At most one `make flash` runs at a time in the whole process (it builds helper tools
//!   inside the shared Klipper tree): a global mutex.
//! - The linux MCU binary is replaced by a new inode (copy next to it, rename over), never
//!   written in place: writing over a running executable fails with ETXTBSY.
//! - Every external command runs through `crate::process` with the caller's `Cancel`.
//!
//! Two tools come from outside: `Tools::native_katapult` (the native serial flasher, tried
//! before flashtool.py for serial devices when set) and `Tools::linux_restart` (restarts
//! the linux MCU's service through the configured service backend).
//!
//! Thread-safety: `Flasher` is `Send + Sync`; flashing different devices from different
//! threads is allowed, `make flash` serialises itself.

mod hints;
mod methods;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::discovery::{RomBoard, RomLoader};
use crate::events::{Event, Level, Sink, Stage};
use crate::process::{self, Cancel};
use crate::{katapult, service};

pub use hints::{
    in_katapult_hint, not_flashed_hint, recovery_hint, rom_loader_hint, unreached_hint,
};
pub use methods::{find_flashtool, flashtool_verdict, FlashtoolVerdict};

/// How a device is flashed (the registry's method: auto, katapult, make, linux).
pub use crate::registry::FlashMethod as Method;

/// Where a device is reached (the registry's type).
pub use crate::registry::Endpoint;

/// A board family, for recovery instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Stm32,
    Rp2040,
    Generic,
}

impl Family {
    /// Family of a Kconfig `CONFIG_MCU` value ("stm32f446xx", "rp2040", "atmega2560"...).
    pub fn of_mcu(mcu: &str) -> Self {
        let mcu = mcu.to_ascii_lowercase();
        if mcu.starts_with("stm32") {
            Family::Stm32
        } else if mcu.starts_with("rp2") {
            Family::Rp2040
        } else {
            Family::Generic
        }
    }

    /// The family whose ROM loader this is.
    pub fn of_loader(loader: RomLoader) -> Self {
        match loader {
            RomLoader::StmDfu => Family::Stm32,
            RomLoader::RpBootsel => Family::Rp2040,
        }
    }
}

/// How a serial board came back after a flash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comeback {
    /// Running Klipper again, at this path.
    Klipper(PathBuf),
    /// Stuck in a ROM bootloader.
    RomLoader(RomBoard),
    /// Still (or again) in Katapult at this path when the time was up.
    Katapult(PathBuf),
    /// Not seen at all within the timeout.
    Gone,
}

/// Device discovery as the flasher needs it (the real one wraps `crate::discovery`).
pub trait Watch: Send + Sync {
    /// Where the device's tty is now (its ttyACM number may have changed).
    fn locate(&self, key: &str, endpoint: &Endpoint) -> Option<PathBuf>;
    /// Wait until the device is back running Klipper, identified by its stable identity.
    fn wait_back(
        &self,
        key: &str,
        endpoint: &Endpoint,
        timeout: Duration,
        cancel: &Cancel,
    ) -> Comeback;
    /// ROM loaders currently on the bus.
    fn rom_loaders(&self) -> Vec<RomBoard>;
}

/// The native Katapult serial flasher: `(request, cancel, sink)`. Returns `Ok` only when
/// the image was written and verified; `katapult::Error::worth_another_flasher` says
/// whether flashtool.py could still succeed after an error.
pub type NativeKatapult = Arc<
    dyn Fn(&katapult::Request<'_>, &Cancel, &Sink) -> Result<(), katapult::Error> + Send + Sync,
>;

/// Restarts the linux MCU's service: `Ok(Some(unit))` restarted, `Ok(None)` when no
/// `klipper-mcu`/`klipper_mcu` service exists.
pub type LinuxRestart =
    Arc<dyn Fn(&Cancel) -> Result<Option<String>, service::Error> + Send + Sync>;

/// The tools and paths flashing needs (from the settings).
#[derive(Clone)]
pub struct Tools {
    pub klipper_dir: PathBuf,
    pub katapult_dir: Option<PathBuf>,
    /// Interpreter for flashtool.py.
    pub python: PathBuf,
    /// The linux-process MCU binary that gets replaced (default /usr/local/bin/klipper_mcu).
    pub linux_mcu_binary: PathBuf,
    /// Deadline for one flash command.
    pub flash_timeout: Duration,
    /// How long a board may take to come back running Klipper.
    pub return_timeout: Duration,
    pub native_katapult: Option<NativeKatapult>,
    pub linux_restart: Option<LinuxRestart>,
    /// The linux MCU's service (setting `linux_mcu_service`), for hints; `None`: whichever
    /// of `klipper-mcu` / `klipper_mcu` exists.
    pub linux_mcu_service: Option<String>,
}

impl Tools {
    /// Defaults for a Klipper tree (timeouts 300 s per command, 30 s to come back).
    pub fn new(klipper_dir: impl Into<PathBuf>) -> Self {
        Self {
            klipper_dir: klipper_dir.into(),
            katapult_dir: None,
            python: PathBuf::from("python3"),
            linux_mcu_binary: PathBuf::from("/usr/local/bin/klipper_mcu"),
            flash_timeout: Duration::from_secs(300),
            return_timeout: Duration::from_secs(30),
            native_katapult: None,
            linux_restart: None,
            linux_mcu_service: None,
        }
    }
}

/// One device to flash with one built firmware.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    pub key: &'a str,
    pub method: Method,
    pub endpoint: &'a Endpoint,
    /// UART baud rate (serial boards on a UART).
    pub baud: Option<u32>,
    /// Kconfig `CONFIG_MCU` ("linux" for the linux target).
    pub mcu: &'a str,
    /// The build's OUT directory (what `make flash OUT=` needs).
    pub out_dir: &'a Path,
    /// The image to flash (klipper.bin / .uf2 / .elf.hex, or klipper.elf for linux).
    pub image: &'a Path,
    /// The device's Kconfig file.
    pub kconfig: &'a Path,
}

/// Errors of one device's flash. Every variant says what went wrong in the user's words.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{device}: the device is not in Katapult (flashtool: \"Device is not Katapult\"); nothing was flashed")]
    NotKatapult { device: String },
    #[error("no flash tool: flashtool.py not found (looked in {}); install Katapult or set katapult_dir", searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NoFlashtool { searched: Vec<PathBuf> },
    #[error("no Klipper tree at {} (set klipper_dir)", path.display())]
    NoKlipperTree { path: PathBuf },
    #[error(
        "flashtool did not confirm the flash (no `Programming Complete` line){}",
        crate::process::fmt_tail(tail)
    )]
    NotConfirmed { tail: String },
    #[error("no firmware to flash: {0} is missing")]
    NoFirmware(PathBuf),
    #[error("{0}")]
    Command(#[from] process::Error),
    #[error("method `{method}` cannot flash {what}")]
    Unsupported { method: &'static str, what: String },
    #[error("the device's tty was not found ({0}); is it plugged in?")]
    NotConnected(String),
    #[error("after flashing, the board came back as {0} instead of Klipper")]
    CameBackInRomLoader(String),
    #[error("after flashing, the board did not come back running Klipper within {0:?}")]
    DidNotReturn(Duration),
    #[error("after flashing, the board stayed in Katapult ({})", .0.display())]
    StayedInKatapult(PathBuf),
    #[error("cannot replace {path}: {source}")]
    Install {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the linux MCU binary was replaced but its service could not be restarted: {0}")]
    LinuxRestart(Box<service::Error>),
    #[error("native Katapult flasher: {0}")]
    Native(Box<katapult::Error>),
    #[error("native Katapult flasher: {native}; flashtool.py then failed too: {flashtool}")]
    NativeThenFlashtool {
        native: Box<katapult::Error>,
        flashtool: Box<Error>,
    },
    #[error("Katapult failed: {katapult}; the fallback `make flash` failed too: {make}")]
    BothFailed {
        katapult: Box<Error>,
        make: Box<Error>,
    },
    #[error("cancelled")]
    Cancelled,
}

/// A failed flash: the error and what the user can do about it.
#[derive(Debug)]
pub struct Failure {
    pub error: Error,
    pub hint: Option<String>,
    /// The methods tried, in order.
    pub tried: Vec<Method>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)
    }
}

/// A successful flash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flashed {
    /// The method that did it.
    pub method: Method,
    /// Where the board is now (serial devices).
    pub path: Option<PathBuf>,
}

/// Flashes devices with the configured tools; waits for them to come back.
pub struct Flasher {
    pub tools: Tools,
    pub watch: Arc<dyn Watch>,
}

impl Flasher {
    pub fn new(tools: Tools, watch: Arc<dyn Watch>) -> Self {
        Self { tools, watch }
    }

    /// Checks before any downtime that some method can flash this device.
    pub fn check(&self, job: &Job<'_>) -> Result<(), Error> {
        let flashtool = find_flashtool(&self.tools).is_some();
        let native = self.tools.native_katapult.is_some();
        let make = self.tools.klipper_dir.join("Makefile").is_file();
        let ok = match (job.endpoint, job.method) {
            (Endpoint::Linux { .. }, Method::Auto | Method::Linux) => true,
            (Endpoint::Can { .. }, Method::Auto | Method::Katapult) => flashtool,
            (Endpoint::Serial { .. }, Method::Auto) => flashtool || native || make,
            (Endpoint::Serial { .. }, Method::Katapult) => flashtool || native,
            (Endpoint::Serial { .. }, Method::Make) => make,
            (endpoint, method) => {
                return Err(Error::Unsupported {
                    method: method.as_str(),
                    what: endpoint.describe(),
                })
            }
        };
        match (ok, job.method) {
            (true, _) => Ok(()),
            (false, Method::Make) => Err(Error::NoKlipperTree {
                path: self.tools.klipper_dir.clone(),
            }),
            (false, _) => Err(Error::NoFlashtool {
                searched: methods::flashtool_candidates(&self.tools),
            }),
        }
    }

    /// Flash one device following its method (and the `auto` chain), then wait for it.
    pub fn flash(&self, job: &Job<'_>, cancel: &Cancel, sink: &Sink) -> Result<Flashed, Failure> {
        let family = Family::of_mcu(job.mcu);
        let mut tried = Vec::new();
        let fail =
            |error: Error, tried: Vec<Method>, hint: Option<String>| Failure { error, hint, tried };
        let result = match (job.endpoint, job.method) {
            (Endpoint::Linux { .. }, Method::Auto | Method::Linux) => {
                tried.push(Method::Linux);
                return methods::linux(&self.tools, job, cancel, sink)
                    .map(|()| Flashed {
                        method: Method::Linux,
                        path: None,
                    })
                    .map_err(|e| fail(e, tried, None));
            }
            (Endpoint::Can { .. }, Method::Auto | Method::Katapult) => {
                tried.push(Method::Katapult);
                return methods::katapult(&self.tools, job, None, cancel, sink)
                    .map(|()| Flashed {
                        method: Method::Katapult,
                        path: None,
                    })
                    .map_err(|e| {
                        let hint = Some(recovery_hint(family, job, &self.tools));
                        fail(e, tried, hint)
                    });
            }
            (
                Endpoint::Serial { .. },
                method @ (Method::Auto | Method::Katapult | Method::Make),
            ) => self.flash_serial(job, method, &mut tried, cancel, sink),
            (endpoint, method) => Err(Error::Unsupported {
                method: method.as_str(),
                what: endpoint.describe(),
            }),
        };
        match result {
            Ok(method) => self.wait_back(job, method, tried, family, cancel, sink),
            Err(Error::Cancelled) => Err(fail(Error::Cancelled, tried, None)),
            Err(error) => {
                let hint = Some(match &error {
                    Error::Native(e) => match (e.offset_to_choose(), &**e) {
                        (Some(offset), _) => hints::config_hint(
                            &format!(
                                "Choose \"{offset}\" as the Bootloader offset, save, and run \
                                 again:"
                            ),
                            job.key,
                        ),
                        (None, katapult::Error::McuMismatch { bootloader, .. }) => {
                            hints::config_hint(
                                &format!(
                                    "Choose {bootloader} as the processor model, save, and run \
                                     again:"
                                ),
                                job.key,
                            )
                        }
                        _ => self.rom_loader_hint(job, family),
                    },
                    _ => self.rom_loader_hint(job, family),
                });
                Err(fail(error, tried, hint))
            }
        }
    }

    fn flash_serial(
        &self,
        job: &Job<'_>,
        method: Method,
        tried: &mut Vec<Method>,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<Method, Error> {
        let locate = || {
            self.watch
                .locate(job.key, job.endpoint)
                .ok_or_else(|| Error::NotConnected(job.endpoint.describe()))
        };
        let mut katapult_error = None;
        if matches!(method, Method::Auto | Method::Katapult) {
            tried.push(Method::Katapult);
            let mut native_error = None;
            if let Some(native) = &self.tools.native_katapult {
                let dev = locate()?;
                match methods::native_katapult(native, job, &dev, cancel, sink) {
                    Ok(()) => return Ok(Method::Katapult),
                    Err((e, false)) => return Err(e),
                    Err((e, true)) if find_flashtool(&self.tools).is_none() => {
                        native_error = Some(e);
                    }
                    Err((e, true)) => {
                        sink(
                            &Event::info(
                                Stage::Flash,
                                Some(job.key),
                                format!(
                                    "native Katapult flasher failed ({e}); trying flashtool.py"
                                ),
                            )
                            .with_level(Level::Warning),
                        );
                        native_error = Some(e);
                    }
                }
            }
            // flashtool.py: the fallback of the native flasher, or the only Katapult
            // flasher when the native one is switched off. The board may sit in Katapult
            // under another tty now, so it is located again.
            let flashtool = match native_error {
                Some(e) if find_flashtool(&self.tools).is_none() => Err(e),
                native_error => locate()
                    .and_then(|dev| methods::katapult(&self.tools, job, Some(&dev), cancel, sink))
                    .map_err(|e| match native_error {
                        Some(Error::Native(native)) if !matches!(e, Error::Cancelled) => {
                            Error::NativeThenFlashtool {
                                native,
                                flashtool: Box::new(e),
                            }
                        }
                        _ => e,
                    }),
            };
            match flashtool {
                Ok(()) => return Ok(Method::Katapult),
                // Fall back to make flash only when Katapult could not even be tried or
                // failed talking; never after "not Katapult" (the board sits in a ROM
                // loader: that needs the user) nor after a cancel.
                Err(e @ (Error::NotKatapult { .. } | Error::Cancelled)) => return Err(e),
                Err(e) if method == Method::Katapult => return Err(e),
                Err(e) => {
                    sink(
                        &Event::info(
                            Stage::Flash,
                            Some(job.key),
                            format!("Katapult failed ({e}); falling back to `make flash`"),
                        )
                        .with_level(Level::Warning),
                    );
                    katapult_error = Some(e);
                }
            }
        }
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        tried.push(Method::Make);
        let result = locate().and_then(|dev| {
            methods::make_flash(&self.tools, job, &dev, cancel, sink).map(|()| Method::Make)
        });
        match (result, katapult_error) {
            (Err(Error::Cancelled), _) => Err(Error::Cancelled),
            (Err(make), Some(katapult)) => Err(Error::BothFailed {
                katapult: Box::new(katapult),
                make: Box::new(make),
            }),
            (result, _) => result,
        }
    }

    fn wait_back(
        &self,
        job: &Job<'_>,
        method: Method,
        tried: Vec<Method>,
        family: Family,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<Flashed, Failure> {
        sink(&Event::info(
            Stage::Flash,
            Some(job.key),
            "waiting for the board to come back running Klipper",
        ));
        let hint = recovery_hint(family, job, &self.tools);
        match self
            .watch
            .wait_back(job.key, job.endpoint, self.tools.return_timeout, cancel)
        {
            Comeback::Klipper(path) => Ok(Flashed {
                method,
                path: Some(path),
            }),
            Comeback::RomLoader(rom) => Err(Failure {
                error: Error::CameBackInRomLoader(rom.describe()),
                hint: Some(rom_loader_hint(rom.loader, job, &self.tools)),
                tried,
            }),
            Comeback::Katapult(path) => Err(Failure {
                error: Error::StayedInKatapult(path),
                hint: Some(in_katapult_hint()),
                tried,
            }),
            Comeback::Gone if cancel.is_cancelled() => Err(Failure {
                error: Error::Cancelled,
                hint: Some(hint),
                tried,
            }),
            Comeback::Gone => Err(Failure {
                error: Error::DidNotReturn(self.tools.return_timeout),
                hint: Some(hint),
                tried,
            }),
        }
    }

    /// After a failure: a ROM loader of this board's family on the bus explains it (and
    /// says how to recover); another family's loader belongs to another board.
    fn rom_loader_hint(&self, job: &Job<'_>, family: Family) -> String {
        let ours = self
            .watch
            .rom_loaders()
            .into_iter()
            .find(|r| family == Family::Generic || Family::of_loader(r.loader) == family);
        match ours {
            Some(rom) => rom_loader_hint(rom.loader, job, &self.tools),
            None => recovery_hint(family, job, &self.tools),
        }
    }

    /// The hint for a board that did not end up running Klipper (for a caller that has
    /// no failure at hand, e.g. a recovery that found it in a ROM loader).
    pub fn hint(&self, job: &Job<'_>, loader: Option<RomLoader>) -> String {
        match loader {
            Some(loader) => rom_loader_hint(loader, job, &self.tools),
            None => recovery_hint(Family::of_mcu(job.mcu), job, &self.tools),
        }
    }
}

#[cfg(test)]
mod tests;
