//! Python wrapper of the Moonraker client's ready-wait: `wait_klippy_ready`.
//!
//! The wait runs on a worker thread while the calling thread waits with the GIL released,
//! re-attaching every 100 ms to call `py.check_signals()`: Ctrl+C cancels the wait and
//! propagates.

use std::sync::mpsc;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::moonraker::Client;
use crate::process::Cancel;

/// How long one request to Moonraker may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the waiting call re-attaches to check for signals.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Wait until klippy is `ready` behind the Moonraker at `moonraker_url`, for at most
/// `timeout` seconds. Returns True once klippy is ready, False when it did not get there in
/// time: stopped or starting (Moonraker answers 503 on /printer/* meanwhile) or Moonraker
/// itself unreachable. Raises MoonrakerError when klippy stopped on an error or a shutdown
/// (with klippy's message), when Moonraker answers something that is not Moonraker's, or
/// for a URL that breaks the `moonraker_url` rule.
#[pyfunction]
pub fn wait_klippy_ready(py: Python<'_>, moonraker_url: &str, timeout: f64) -> PyResult<bool> {
    let timeout = Duration::try_from_secs_f64(timeout)
        .map_err(|_| PyValueError::new_err("timeout must be a number of seconds >= 0"))?;
    let client = Client::new(moonraker_url, REQUEST_TIMEOUT)?;
    let cancel = Cancel::new();
    let (tx, rx) = mpsc::channel();
    let worker = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            let _ = tx.send(client.wait_klippy_ready(timeout, &cancel));
        })
    };
    let mut rx = rx;
    let outcome = loop {
        let (back, got) = py.detach(move || {
            let got = rx.recv_timeout(SIGNAL_CHECK);
            (rx, got)
        });
        rx = back;
        match got {
            Ok(result) => break result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Err(err) = py.check_signals() {
                    cancel.cancel();
                    let _ = py.detach(|| worker.join());
                    return Err(err);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(pyo3::exceptions::PyRuntimeError::new_err(
                    "the ready-wait stopped unexpectedly",
                ))
            }
        }
    };
    let _ = py.detach(|| worker.join());
    match outcome {
        Ok(()) => Ok(true),
        Err(err) if err.is_ready_timeout() => Ok(false),
        Err(err) => Err(err.into()),
    }
}
