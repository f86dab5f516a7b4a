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

// ---- the frame codec, for protocol-level tests and the wheels' smoke test ----

/// Encode one Katapult frame: `01 88 | code | len | payload | crc lo | crc hi | 99 03`
/// (a command such as CONNECT `0x11`; or any code, e.g. a response, for a simulator).
/// `payload` must be whole 32-bit words, at most 1020 bytes; ValueError otherwise.
#[pyfunction]
#[pyo3(signature = (code, payload=None))]
pub fn katapult_encode<'py>(
    py: Python<'py>,
    code: u8,
    payload: Option<&[u8]>,
) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
    let frame = katapult::codec::Frame::new(code, payload.unwrap_or_default().to_vec())
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    Ok(pyo3::types::PyBytes::new(py, &frame.encode()))
}

/// Decode the device -> host frames in `data`, in order, as a host reads them. Each is a
/// dict with `response`: `"ack"` (with `command`, the acknowledged command's code, and
/// `payload`, the bytes after it; CONNECT adds `proto_version`, `app_start`, `block_size`,
/// `mcu`, `bootloader_version`; SEND_BLOCK `address`; SEND_EOF `pages`; REQUEST_BLOCK
/// `address` and `data`), `"nack"`, `"command_error"`, `"busy"`, `"garbage"` (`bytes`:
/// how many were skipped, `reason`) or `"malformed"` (`detail`). An unfinished frame at the
/// end is left out.
#[pyfunction]
pub fn katapult_decode<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Vec<Bound<'py, PyDict>>> {
    use katapult::codec::{Ack, DecodeError, Decoder, Response};
    use pyo3::types::PyBytes;
    let mut decoder = Decoder::new();
    decoder.push(data);
    let mut out = Vec::new();
    while let Some(item) = decoder.next_frame() {
        let d = PyDict::new(py);
        let found = item.and_then(|frame| Ok((Response::from_frame(&frame)?, frame)));
        match found {
            Ok((Response::Nack, _)) => d.set_item("response", "nack")?,
            Ok((Response::CommandError, _)) => d.set_item("response", "command_error")?,
            Ok((Response::Busy, _)) => d.set_item("response", "busy")?,
            Ok((Response::Ack(ack), frame)) => {
                d.set_item("response", "ack")?;
                d.set_item("command", ack.acked())?;
                // An ACK's payload starts with the acknowledged command (checked above).
                d.set_item("payload", PyBytes::new(py, &frame.payload()[4..]))?;
                match ack {
                    Ack::Connect(info) => {
                        d.set_item("proto_version", info.proto_version_string())?;
                        d.set_item("app_start", info.app_start)?;
                        d.set_item("block_size", info.block_size)?;
                        d.set_item("mcu", info.mcu)?;
                        d.set_item("bootloader_version", info.bootloader_version)?;
                    }
                    Ack::SendBlock { addr } => d.set_item("address", addr)?,
                    Ack::SendEof { pages } => d.set_item("pages", pages)?,
                    Ack::RequestBlock { addr, data } => {
                        d.set_item("address", addr)?;
                        d.set_item("data", PyBytes::new(py, &data))?;
                    }
                    Ack::Complete | Ack::Other { .. } => {}
                }
            }
            Err(DecodeError::Garbage { skipped, reason }) => {
                d.set_item("response", "garbage")?;
                d.set_item("bytes", skipped)?;
                d.set_item("reason", reason.to_string())?;
            }
            Err(err @ DecodeError::Malformed { .. }) => {
                d.set_item("response", "malformed")?;
                d.set_item("detail", err.to_string())?;
            }
        }
        out.push(d);
    }
    Ok(out)
}
