//! Native Katapult flashing: the protocol, a session over any byte stream, and serial
//! boards.
//!
//! Owns everything kflash needs to flash a board that runs the Katapult bootloader without
//! Katapult's `flashtool.py`: the wire format (`codec`), reading the MCU and version out of a
//! `klipper.bin` (`image`), raw ttys and the two bootloader requests (`port`), the
//! connect/write/verify/complete conversation (`session`), and serial boards: entering the
//! bootloader and finding the board again after it re-enumerates (`serial`, through
//! `crate::discovery`). CAN nodes flash through Katapult's `flashtool.py` (chosen by
//! `flash/`) until a real CAN transport can be tested here.
//!
//! Public entry points: [`flash_serial`], [`status_serial`], and [`flash_device`] (the shape
//! of `flash::NativeKatapult`); `flashtool.py` stays the fallback, chosen by `flash/`.
//!
//! Invariants: nothing is written to a board before its bootloader's MCU was compared with
//! the image's embedded dictionary; a flash is reported done only after every block was read
//! back and compared byte for byte; every error names the step and, where there is one, the
//! flash address. Thread-safety: a flash runs on the caller's thread; `Cancel` may be set
//! from any thread and is checked between frames.

pub mod codec;
pub mod image;
pub mod port;
pub mod serial;
pub mod session;

#[cfg(test)]
pub(crate) mod fake;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use image::{image_info, ImageInfo};
pub use serial::{
    flash_serial, status_serial, BootloaderInfo, SerialFlashOptions, SerialStatusOptions,
};
pub use session::{FlashReport, Timing};

/// Where a config says the application must start: Katapult's CONNECT must report the
/// same address, or the image would be written where the board does not run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppStart {
    /// `CONFIG_FLASH_APPLICATION_ADDRESS` (or flash start + the chosen bootloader offset).
    pub address: u32,
    /// The start of flash, to name the offset menuconfig calls it by.
    pub flash_start: u32,
}

/// One board to flash natively: the shape of the pipeline's native Katapult seam
/// (`flash::NativeKatapult`).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub device: &'a std::path::Path,
    /// `Some` for a UART board.
    pub baud: Option<u32>,
    pub firmware: &'a std::path::Path,
    /// Checked against CONNECT before anything is written, when known.
    pub app_start: Option<AppStart>,
}

/// Flash a board with every default: discovery from the environment, default timeouts.
/// `Ok` only after a verified write.
pub fn flash_device(
    req: &Request<'_>,
    cancel: &crate::process::Cancel,
    sink: &crate::events::Sink,
) -> Result<FlashReport, Error> {
    let mut opts = SerialFlashOptions::new(req.device, req.firmware);
    opts.baud = req.baud;
    opts.app_start = req.app_start;
    flash_serial(&opts, cancel, sink)
}

/// Where in the flashing sequence something happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Asking the application to reboot into Katapult and waiting for it.
    EnterBootloader,
    Connect,
    Write,
    Eof,
    Verify,
    Complete,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::EnterBootloader => "bootloader entry",
            Step::Connect => "connect",
            Step::Write => "write",
            Step::Eof => "end of write",
            Step::Verify => "verify",
            Step::Complete => "complete",
        })
    }
}

/// A ROM loader a board can fall into instead of Katapult.
pub use crate::discovery::RomLoader;

fn at(addr: Option<u32>) -> String {
    addr.map(|a| format!(" at address {a:#010x}"))
        .unwrap_or_default()
}

/// Everything that can go wrong flashing through Katapult.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read firmware {}: {source}", path.display())]
    Firmware {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("firmware {} is empty", path.display())]
    EmptyFirmware { path: PathBuf },
    #[error(
        "firmware {} is in {kind} format; Katapult flashes the raw image (klipper.bin)",
        path.display()
    )]
    NotRawImage { path: PathBuf, kind: &'static str },
    #[error("no Klipper data dictionary found in the firmware image")]
    NoDictionary,
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error on {} during {step}: {source}", path.display())]
    Io {
        path: PathBuf,
        step: Step,
        #[source]
        source: io::Error,
    },
    #[error(
        "not in bootloader: {} did not re-enumerate as Katapult within {:.1} s after the \
         bootloader request (is Katapult installed? double-tap reset to enter it by hand)",
        device.display(), waited.as_secs_f64()
    )]
    NotInBootloader { device: PathBuf, waited: Duration },
    #[error(
        "{} came back as {loader} ({usb_id}), not Katapult: nothing was flashed. {}",
        device.display(), loader.recovery()
    )]
    RomLoader {
        device: PathBuf,
        loader: RomLoader,
        usb_id: String,
    },
    #[error(
        "MCU mismatch: the firmware is built for {image} but the bootloader on {} is {bootloader}; \
         nothing was written",
        device.display()
    )]
    McuMismatch {
        device: PathBuf,
        image: String,
        bootloader: String,
    },
    #[error(
        "Katapult on {} starts the application at {bootloader:#010x} ({}), but the config \
         builds it for {config:#010x} ({}): nothing was written. Choose \"{}\" as the \
         Bootloader offset in menuconfig",
        device.display(),
        crate::kconfig::offset_choice(u64::from(bootloader.saturating_sub(*flash_start))),
        crate::kconfig::offset_choice(u64::from(config.saturating_sub(*flash_start))),
        crate::kconfig::offset_choice(u64::from(bootloader.saturating_sub(*flash_start)))
    )]
    AppStartMismatch {
        device: PathBuf,
        bootloader: u32,
        config: u32,
        flash_start: u32,
    },
    #[error(
        "verify mismatch at address {addr:#010x} (block {block:#010x}): the flash does not hold \
         the firmware; the board stays in Katapult, flash it again"
    )]
    VerifyMismatch { addr: u32, block: u32 },
    #[error("timeout in {step}{}: no answer after {tries} tries of {per_try:?}", at(*addr))]
    Timeout {
        step: Step,
        addr: Option<u32>,
        tries: u32,
        per_try: Duration,
    },
    #[error(
        "timeout in connect: no Katapult bootloader answered on {} ({tries} tries of \
         {per_try:?}); {hint}",
        device.display()
    )]
    NoBootloader {
        device: PathBuf,
        tries: u32,
        per_try: Duration,
        hint: &'static str,
    },
    #[error("NACK in {step}{}: the bootloader could not read our frames ({tries} tries)", at(*addr))]
    Nack {
        step: Step,
        addr: Option<u32>,
        tries: u32,
    },
    #[error("command error in {step}{}: the bootloader refused {command} ({tries} tries)", at(*addr))]
    CommandError {
        step: Step,
        addr: Option<u32>,
        command: &'static str,
        tries: u32,
    },
    #[error("protocol error in {step}{}: {detail}", at(*addr))]
    Protocol {
        step: Step,
        addr: Option<u32>,
        detail: String,
    },
    #[error("cancelled during {step}")]
    Cancelled { step: Step },
}

impl Error {
    /// Whether another Katapult flasher (flashtool.py) could still succeed: true for
    /// communication failures, false when the image, the MCU or the board's state rule it
    /// out, or the user cancelled.
    pub fn worth_another_flasher(&self) -> bool {
        !matches!(
            self,
            Error::Firmware { .. }
                | Error::EmptyFirmware { .. }
                | Error::NotRawImage { .. }
                | Error::NoDictionary
                | Error::RomLoader { .. }
                | Error::McuMismatch { .. }
                | Error::AppStartMismatch { .. }
                | Error::Cancelled { .. }
        )
    }

    /// The bootloader offset to choose in menuconfig, when that is what went wrong.
    pub fn offset_to_choose(&self) -> Option<String> {
        match self {
            Error::AppStartMismatch {
                bootloader,
                flash_start,
                ..
            } => Some(crate::kconfig::offset_choice(u64::from(
                bootloader.saturating_sub(*flash_start),
            ))),
            _ => None,
        }
    }

    /// True for the errors that mean "the device did not answer in time".
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. } | Error::NotInBootloader { .. } | Error::NoBootloader { .. }
        )
    }
    /// True when the flash may hold a partial or wrong image (a write or verify failed).
    pub fn flash_touched(&self) -> bool {
        match self {
            Error::VerifyMismatch { .. } => true,
            Error::Timeout { step, .. }
            | Error::Nack { step, .. }
            | Error::CommandError { step, .. }
            | Error::Protocol { step, .. }
            | Error::Cancelled { step }
            | Error::Io { step, .. } => matches!(step, Step::Write | Step::Eof | Step::Verify),
            _ => false,
        }
    }
}
