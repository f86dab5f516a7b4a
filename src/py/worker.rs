//! The one worker loop for long calls (builds, flashes, runs, the Katapult flasher).
//!
//! The work runs on a worker thread with the GIL released; the calling thread waits
//! detached and re-attaches every `TICK` to hand queued progress events to `on_event`
//! (one dict per event, always on the caller's thread) and to call `py.check_signals()`.
//! When that raises (Ctrl+C, or a front end's SIGTERM/SIGHUP handler) or the callback
//! raises, the work's `Cancel` is set, the work unwinds (klipper is restarted by its
//! guard), and the exception is returned together with what the work returned. Signals
//! are still checked while the work unwinds: a second one escalates the `Cancel` to
//! `abandon` (a board being finished is left as it is). A panic
//! in the work becomes `RuntimeError` naming it; nothing the work stopped stays stopped
//! (its guards run while it unwinds).
//!
//! Thread-safety: one worker thread per call; events cross threads through a channel.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;

use crate::events::{Event, Sink};
use crate::process::Cancel;

/// How often the caller's thread delivers events and checks signals.
const TICK: Duration = Duration::from_millis(100);

/// Why a long call ended early: the Python exception, and the work's result when it
/// finished unwinding (a run's report, for instance).
pub struct Interrupted<T> {
    pub error: PyErr,
    pub result: Option<T>,
}

/// Run `work` on a worker thread; see the module doc.
pub fn run_detached<T: Send + 'static>(
    py: Python<'_>,
    on_event: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce(&Cancel, &Sink) -> T + Send + 'static,
) -> Result<T, Interrupted<T>> {
    let cancel = Cancel::new();
    let (tx, rx) = mpsc::channel::<Event>();
    let tx = Mutex::new(tx);
    let sink: Sink = Arc::new(move |e: &Event| {
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(e.clone());
        }
    });
    let worker_cancel = cancel.clone();
    let handle = std::thread::spawn(move || work(&worker_cancel, &sink));
    // A Mutex: the detached closure needs a `Sync` handle on the receiver.
    let rx = Mutex::new(rx);
    let mut interrupted: Option<PyErr> = None;
    let mut last_check = Instant::now();
    loop {
        let (events, finished) = py.detach(|| {
            let mut events = Vec::new();
            if let Ok(r) = rx.lock() {
                if let Ok(e) = r.recv_timeout(TICK) {
                    events.push(e);
                    events.extend(r.try_iter());
                }
            }
            (events, handle.is_finished())
        });
        for event in &events {
            deliver(py, on_event, event, &cancel, &mut interrupted);
        }
        if finished {
            break;
        }
        // Signals are checked every tick even while events keep arriving; the first asks
        // the work to stop (a board being written is finished), the second abandons it.
        if last_check.elapsed() >= TICK {
            last_check = Instant::now();
            if let Err(e) = py.check_signals() {
                interrupt(py, &cancel, &mut interrupted, e);
            }
        }
    }
    let joined = py.detach(|| handle.join());
    let rest: Vec<Event> = rx
        .lock()
        .map(|r| r.try_iter().collect())
        .unwrap_or_default();
    for event in &rest {
        deliver(py, on_event, event, &cancel, &mut interrupted);
    }
    match (joined, interrupted) {
        (Ok(value), None) => Ok(value),
        (Ok(value), Some(error)) => Err(Interrupted {
            error,
            result: Some(value),
        }),
        (Err(_), Some(error)) => Err(Interrupted {
            error,
            result: None,
        }),
        (Err(panic), None) => Err(Interrupted {
            error: PyRuntimeError::new_err(format!(
                "kflash: internal error ({}); anything it had stopped was started again",
                panic_message(panic.as_ref())
            )),
            result: None,
        }),
    }
}

/// What interrupted the work, for its record: the exception's text (`stopped by
/// SIGTERM`), else its class (`KeyboardInterrupt`).
fn why(py: Python<'_>, err: &PyErr) -> String {
    let text = err.value(py).to_string();
    if text.trim().is_empty() {
        err.get_type(py)
            .name()
            .map_or_else(|_| "interrupted".to_owned(), |n| n.to_string())
    } else {
        text
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// Hand one event to the callback; its first exception cancels the work. While the work
/// unwinds, progress is still shown and later callback errors are ignored.
fn deliver(
    py: Python<'_>,
    on_event: Option<&Bound<'_, PyAny>>,
    event: &Event,
    cancel: &Cancel,
    interrupted: &mut Option<PyErr>,
) {
    let Some(callback) = on_event else { return };
    let result = pythonize::pythonize(py, event)
        .map_err(PyErr::from)
        .and_then(|obj| callback.call1((obj,)));
    if let Err(e) = result {
        if interrupted.is_none() {
            cancel.cancel_because(&why(py, &e));
            *interrupted = Some(e);
        } else if e.is_instance_of::<PyKeyboardInterrupt>(py) {
            // A second Ctrl+C (or SIGTERM) that landed in the callback.
            cancel.abandon();
        }
    }
}

/// A signal: the first stops the work (keeping the exception to re-raise), any later
/// one abandons what the work is finishing.
fn interrupt(py: Python<'_>, cancel: &Cancel, interrupted: &mut Option<PyErr>, error: PyErr) {
    if interrupted.is_none() {
        cancel.cancel_because(&why(py, &error));
        *interrupted = Some(error);
    } else {
        cancel.abandon();
    }
}
