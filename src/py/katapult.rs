//! Python wrappers of the native Katapult flasher: `katapult_flash` and `katapult_status`.
//!
//! Inputs become owned Rust values; the flasher runs through the one worker loop
//! (`super::worker`): progress reaches `on_event` on the caller's thread, Ctrl+C or an
//! exception from the callback cancels the flash and propagates.

use std::path::PathBuf;

use pyo3::prelude::*;

use super::worker::run_detached;
use crate::commands;
use crate::katapult::{SerialFlashOptions, SerialStatusOptions};

/// Flash `firmware` (klipper.bin) to the board on `device` through Katapult, natively.
///
/// Enters the bootloader when the board runs Klipper (USB: 1200-baud touch; UART when
/// `baud` is given: the request string), refuses an image built for another MCU before
/// writing, writes, reads every block back, and sends COMPLETE. `on_event(dict)` receives
/// progress (`stage`, `device`, `fraction`, `level`, `message`). Returns a dict with
/// `device`, `bytes`, `blocks`, `block_size`, `app_start`, `mcu`, `bootloader_version`,
/// `firmware_version`, `pages`, `completed`, `duration_s`, `retries`, `rate_bps`.
/// Raises FlashError (FlashTimeout, also a CommandTimeout, when the board did not answer
/// in time).
#[pyfunction]
#[pyo3(signature = (device, firmware, baud=None, on_event=None))]
pub fn katapult_flash<'py>(
    py: Python<'py>,
    device: PathBuf,
    firmware: PathBuf,
    baud: Option<u32>,
    on_event: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut opts = SerialFlashOptions::new(device, firmware);
    opts.baud = baud;
    let report = run_detached(py, on_event, move |cancel, sink| {
        commands::katapult_flash(&opts, cancel, sink)
    })
    .map_err(|i| i.error)??;
    Ok(pythonize::pythonize(py, &report)?)
}

/// Connect to the Katapult bootloader of the board on `device` (entering it if needed),
/// flash nothing, send COMPLETE. Returns a dict with `device`, `mcu`,
/// `bootloader_version`, `proto_version`, `app_start`, `block_size`.
#[pyfunction]
#[pyo3(signature = (device, baud=None, on_event=None))]
pub fn katapult_status<'py>(
    py: Python<'py>,
    device: PathBuf,
    baud: Option<u32>,
    on_event: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut opts = SerialStatusOptions::new(device);
    opts.baud = baud;
    let info = run_detached(py, on_event, move |cancel, sink| {
        commands::katapult_status(&opts, cancel, sink)
    })
    .map_err(|i| i.error)??;
    Ok(pythonize::pythonize(py, &info)?)
}
