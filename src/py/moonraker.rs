//! Python wrapper of the Moonraker client's ready-wait: `wait_klippy_ready`.
//!
//! The wait runs through the one worker loop (`super::worker`): Ctrl+C cancels it and
//! propagates.

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::worker::run_detached;
use crate::moonraker::Client;

/// How long one request to Moonraker may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    let outcome = run_detached(py, None, move |cancel, _sink| {
        client.wait_klippy_ready(timeout, cancel)
    })
    .map_err(|i| i.error)?;
    match outcome {
        Ok(()) => Ok(true),
        Err(err) if err.is_ready_timeout() => Ok(false),
        Err(err) => Err(err.into()),
    }
}
