//! Python wrappers of the native Katapult flasher: `katapult_flash` and `katapult_status`.
//!
//! Inputs become owned Rust values; the flash runs on a worker thread while the calling
//! thread waits with the GIL released, re-attaching every 100 ms to call
//! `py.check_signals()` (Ctrl+C cancels the flash and unwinds) and to deliver progress
//! events to `on_event` — so the callback always runs on the caller's thread, and an
//! exception it raises cancels the flash and propagates.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often a waiting call re-attaches to check for signals (Ctrl+C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::events::{Event, Level, Sink, Stage};
use crate::katapult::{self, BootloaderInfo, FlashReport, SerialFlashOptions, SerialStatusOptions};
use crate::process::Cancel;

use super::errors::FlashError;

enum Msg<T> {
    Event(Event),
    Done(T),
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Plan => "plan",
        Stage::Preflight => "preflight",
        Stage::Build => "build",
        Stage::Stop => "stop",
        Stage::Flash => "flash",
        Stage::Restart => "restart",
        Stage::Verify => "verify",
        Stage::Report => "report",
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Info => "info",
        Level::Warning => "warning",
        Level::Error => "error",
    }
}

fn event_dict<'py>(py: Python<'py>, e: &Event) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("stage", stage_name(e.stage))?;
    d.set_item("device", e.device.as_deref())?;
    d.set_item("fraction", e.fraction)?;
    d.set_item("level", level_name(e.level))?;
    d.set_item("message", &e.message)?;
    Ok(d)
}

/// Run `work` on a worker thread with the GIL released; deliver its events to `on_event`
/// on this thread; cancel it on a signal or a failing callback.
fn run_detached<T: Send + 'static>(
    py: Python<'_>,
    on_event: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce(&Cancel, &Sink) -> T + Send + 'static,
) -> PyResult<T> {
    let cancel = Cancel::new();
    let (tx, rx) = mpsc::channel::<Msg<T>>();
    let worker = {
        let cancel = cancel.clone();
        let tx = tx.clone();
        let events = tx.clone();
        std::thread::spawn(move || {
            let sink: Sink = std::sync::Arc::new(move |e: &Event| {
                let _ = events.send(Msg::Event(e.clone()));
            });
            let out = work(&cancel, &sink);
            let _ = tx.send(Msg::Done(out));
        })
    };
    drop(tx);
    let mut pending: Option<PyErr> = None;
    let mut rx = rx;
    let mut last_check = Instant::now();
    let result = loop {
        let (back, msg) = py.detach(move || {
            let msg = rx.recv_timeout(SIGNAL_CHECK);
            (rx, msg)
        });
        rx = back;
        // Signals are checked every 100 ms even while events keep arriving.
        if pending.is_none() && last_check.elapsed() >= SIGNAL_CHECK {
            last_check = Instant::now();
            if let Err(err) = py.check_signals() {
                cancel.cancel();
                pending = Some(err);
            }
        }
        match msg {
            Ok(Msg::Event(e)) => {
                if let (Some(cb), None) = (on_event, &pending) {
                    if let Err(err) = event_dict(py, &e).and_then(|d| cb.call1((d,))) {
                        cancel.cancel();
                        pending = Some(err);
                    }
                }
            }
            Ok(Msg::Done(out)) => break Some(out),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
        }
    };
    let panicked = py.detach(|| worker.join()).is_err();
    if let Some(err) = pending {
        return Err(err);
    }
    match result {
        Some(out) if !panicked => Ok(out),
        _ => Err(FlashError::new_err(
            "the Katapult flasher stopped unexpectedly",
        )),
    }
}

fn report_dict<'py>(py: Python<'py>, r: &FlashReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("device", r.device.to_string_lossy())?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("blocks", r.blocks)?;
    d.set_item("block_size", r.block_size)?;
    d.set_item("app_start", r.app_start)?;
    d.set_item("mcu", &r.mcu)?;
    d.set_item("bootloader_version", r.bootloader_version.as_deref())?;
    d.set_item("firmware_version", r.firmware_version.as_deref())?;
    d.set_item("pages", r.pages)?;
    d.set_item("completed", r.completed)?;
    d.set_item("duration_s", r.duration.as_secs_f64())?;
    d.set_item("retries", r.retries)?;
    d.set_item("rate_bps", r.rate())?;
    Ok(d)
}

fn status_dict<'py>(py: Python<'py>, s: &BootloaderInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("device", s.device.to_string_lossy())?;
    d.set_item("mcu", &s.mcu)?;
    d.set_item("bootloader_version", s.bootloader_version.as_deref())?;
    d.set_item("proto_version", &s.proto_version)?;
    d.set_item("app_start", s.app_start)?;
    d.set_item("block_size", s.block_size)?;
    Ok(d)
}

/// Flash `firmware` (klipper.bin) to the board on `device` through Katapult, natively.
///
/// Enters the bootloader when the board runs Klipper (USB: 1200-baud touch; UART when
/// `baud` is given: the request string), refuses an image built for another MCU before
/// writing, writes, reads every block back, and sends COMPLETE. `on_event(dict)` receives
/// progress (`stage`, `device`, `fraction`, `level`, `message`). Returns a dict with
/// `device`, `bytes`, `blocks`, `block_size`, `app_start`, `mcu`, `bootloader_version`,
/// `firmware_version`, `pages`, `completed`, `duration_s`, `rate_bps`.
/// Raises FlashError (CommandTimeout when the board did not answer in time).
#[pyfunction]
#[pyo3(signature = (device, firmware, baud=None, on_event=None))]
pub fn katapult_flash<'py>(
    py: Python<'py>,
    device: PathBuf,
    firmware: PathBuf,
    baud: Option<u32>,
    on_event: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let mut opts = SerialFlashOptions::new(device, firmware);
    opts.baud = baud;
    let result = run_detached(py, on_event, move |cancel, sink| {
        katapult::flash_serial(&opts, cancel, sink)
    })?;
    report_dict(py, &result?)
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
) -> PyResult<Bound<'py, PyDict>> {
    let mut opts = SerialStatusOptions::new(device);
    opts.baud = baud;
    let result = run_detached(py, on_event, move |cancel, sink| {
        katapult::status_serial(&opts, cancel, sink)
    })?;
    status_dict(py, &result?)
}
