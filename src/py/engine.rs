//! `kflash._core.Engine`: the front ends' handle on one state directory.
//!
//! Every method converts its inputs to owned Rust values and returns plain dicts/lists.
//! Long calls (`build`, `flash`, `flash_all`) run on a worker thread with the GIL
//! released; the calling thread re-attaches every ~100 ms to hand queued progress events
//! to `on_event(dict)` and to call `py.check_signals()`. When that raises (Ctrl+C, or the
//! CLI's SIGTERM/SIGHUP handlers) the run's `Cancel` is set, the pipeline unwinds (klipper
//! is restarted), and the original exception is re-raised with the run's report attached
//! as its `report` attribute (when there is one).
//!
//! Thread-safety: `Engine` is frozen and holds only the state dir path.

// pyo3 hands method arguments over by value; borrowing them is not an option there.
#![allow(clippy::needless_pass_by_value)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde::Serialize;
use serde_json::Value;

use crate::commands::{Home, NewDevice};
use crate::events::{Event, Sink};
use crate::pipeline::{self, Options};
use crate::process::Cancel;

/// How often the caller's thread wakes up to deliver events and check signals.
const TICK: Duration = Duration::from_millis(100);

/// A kflash state directory: devices, settings, configs, builds and runs.
///
/// `Engine(home=None)` uses `$KFLASH_HOME`, else `~/printer_data/kflash` when
/// `~/printer_data` exists, else `$XDG_CONFIG_HOME/kflash`.
#[pyclass(frozen, module = "kflash._core")]
pub struct Engine {
    home: Home,
}

fn to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}

fn ser<'py>(py: Python<'py>, value: &impl Serialize) -> PyResult<Bound<'py, PyAny>> {
    let value = serde_json::to_value(value).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    to_py(py, &value)
}

/// Run `work` on a worker thread with the GIL released; deliver events and check signals
/// every tick. On an exception from `check_signals` or `on_event`: cancel, wait for the
/// work to unwind, then return `Err((exception, result))`.
fn run_detached<T: Send + 'static>(
    py: Python<'_>,
    on_event: Option<&Py<PyAny>>,
    work: impl FnOnce(Cancel, Sink) -> T + Send + 'static,
) -> Result<T, (PyErr, Option<T>)> {
    let cancel = Cancel::new();
    let (tx, rx) = mpsc::channel::<Event>();
    let tx = std::sync::Mutex::new(tx);
    let sink: Sink = Arc::new(move |e: &Event| {
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(e.clone());
        }
    });
    let worker_cancel = cancel.clone();
    let handle = std::thread::spawn(move || work(worker_cancel, sink));
    // Mutex: the detached closure borrows it from another "thread" as far as Send goes.
    let rx = std::sync::Mutex::new(rx);
    let drain = |rx: &std::sync::Mutex<mpsc::Receiver<Event>>| -> Vec<Event> {
        rx.lock()
            .map(|r| r.try_iter().collect())
            .unwrap_or_default()
    };
    let mut interrupted: Option<PyErr> = None;
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
        if interrupted.is_none() {
            if let Err(e) = py.check_signals() {
                cancel.cancel();
                interrupted = Some(e);
            }
        }
    }
    let result = py.detach(|| handle.join());
    for event in drain(&rx) {
        deliver(py, on_event, &event, &cancel, &mut interrupted);
    }
    match (result, interrupted) {
        (Ok(value), None) => Ok(value),
        (Ok(value), Some(err)) => Err((err, Some(value))),
        (Err(_), Some(err)) => Err((err, None)),
        (Err(_), None) => Err((
            PyRuntimeError::new_err(
                "kflash: the run panicked (klipper was restarted by its guard)",
            ),
            None,
        )),
    }
}

fn deliver(
    py: Python<'_>,
    on_event: Option<&Py<PyAny>>,
    event: &Event,
    cancel: &Cancel,
    interrupted: &mut Option<PyErr>,
) {
    let Some(callback) = on_event else { return };
    if interrupted.is_some() {
        // Still show progress while unwinding; ignore callback errors now.
        if let Ok(obj) = ser(py, event) {
            let _ = callback.call1(py, (obj,));
        }
        return;
    }
    let result = ser(py, event).and_then(|obj| callback.call1(py, (obj,)));
    if let Err(e) = result {
        cancel.cancel();
        *interrupted = Some(e);
    }
}

/// Attach the run's report to an exception that interrupted it.
fn with_report(py: Python<'_>, err: PyErr, report: Option<&pipeline::Report>) -> PyErr {
    if let Some(report) = report {
        if let Ok(obj) = ser(py, report) {
            let _ = err.value(py).setattr("report", obj);
        }
    }
    err
}

fn keys_of(keys: Option<Vec<String>>) -> Option<Vec<String>> {
    keys.filter(|k| !k.is_empty())
}

impl Engine {
    fn run_pipeline<'py>(
        &self,
        py: Python<'py>,
        opts: Options,
        on_event: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let home = self.home.clone();
        let outcome = run_detached(py, on_event.as_ref(), move |cancel, sink| {
            let deps = home.deps()?;
            pipeline::flash_all(&deps, &opts, &cancel, &sink)
        });
        match outcome {
            Ok(Ok(report)) => ser(py, &report),
            Ok(Err(err)) => Err(err.into()),
            Err((err, result)) => {
                let report = match &result {
                    Some(Ok(r)) => Some(r.clone()),
                    Some(Err(pipeline::Error::Cancelled { report })) => report.as_deref().cloned(),
                    _ => None,
                };
                Err(with_report(py, err, report.as_ref()))
            }
        }
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (home=None))]
    fn new(py: Python<'_>, home: Option<PathBuf>) -> PyResult<Self> {
        let mut home = Home::open(home)?;
        home.python = py
            .import("sys")?
            .getattr("executable")?
            .extract::<Option<PathBuf>>()?
            .filter(|p| !p.as_os_str().is_empty());
        Ok(Engine { home })
    }

    /// The state directory this engine works in.
    #[getter]
    fn state_dir(&self) -> String {
        self.home.state.root().display().to_string()
    }

    /// Every setting as `{name: value}` (text).
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        ser(py, &self.home.settings()?)
    }

    /// Change one setting (validated first; a rejected value changes nothing).
    fn set_setting<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        value: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        ser(py, &self.home.set_setting(key, value)?)
    }

    /// Every registered device with its config status.
    fn devices<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        ser(py, &self.home.devices()?)
    }

    /// Register a device reached by exactly one of `serial`, `can_uuid` or `linux`.
    #[pyo3(signature = (key, *, serial=None, can_uuid=None, interface="can0", linux=None, method="auto", config=None, name=None, mcu_section=None, baud=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_device<'py>(
        &self,
        py: Python<'py>,
        key: String,
        serial: Option<String>,
        can_uuid: Option<String>,
        interface: &str,
        linux: Option<String>,
        method: &str,
        config: Option<PathBuf>,
        name: Option<String>,
        mcu_section: Option<String>,
        baud: Option<u32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let new = NewDevice {
            key,
            serial,
            can_uuid,
            interface: Some(interface.to_owned()),
            linux,
            method: Some(method.to_owned()),
            config,
            name,
            mcu_section,
            baud,
        };
        ser(py, &self.home.add_device(&new)?)
    }

    /// Forget a device (its config file is kept).
    fn remove_device<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyAny>> {
        ser(py, &self.home.remove_device(key)?)
    }

    /// Register every `[mcu ...]` of a printer.cfg that is not registered yet.
    fn import_printer_cfg<'py>(&self, py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyAny>> {
        ser(py, &self.home.import_printer_cfg(Path::new(path))?)
    }

    /// Path of a device's firmware config (`configs/<key>.config`).
    fn config_path(&self, key: &str) -> PyResult<String> {
        Ok(self.home.config_path(key)?.display().to_string())
    }

    /// What flash-all would do, per device, and why. Changes nothing.
    #[pyo3(signature = (keys=None, only_outdated=false))]
    fn plan<'py>(
        &self,
        py: Python<'py>,
        keys: Option<Vec<String>>,
        only_outdated: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let home = self.home.clone();
        let opts = Options {
            keys: keys_of(keys),
            only_outdated,
            yes: false,
        };
        let plan = py.detach(move || {
            let deps = home.deps()?;
            pipeline::plan(&deps, &opts, &crate::events::discard()).map(|(p, _)| p)
        })?;
        ser(py, &plan)
    }

    /// Build the selected devices' firmware (no stop window).
    #[pyo3(signature = (keys=None, on_event=None))]
    fn build<'py>(
        &self,
        py: Python<'py>,
        keys: Option<Vec<String>>,
        on_event: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let home = self.home.clone();
        let keys = keys_of(keys);
        let outcome = run_detached(py, on_event.as_ref(), move |cancel, sink| {
            let deps = home.deps()?;
            pipeline::build(&deps, keys.as_deref(), &cancel, &sink)
        });
        match outcome {
            Ok(Ok(results)) => ser(py, &results),
            Ok(Err(err)) => Err(err.into()),
            Err((err, _)) => Err(err),
        }
    }

    /// Build and flash one device inside one stop window; returns the report.
    #[pyo3(signature = (key, on_event=None, yes=false))]
    fn flash<'py>(
        &self,
        py: Python<'py>,
        key: String,
        on_event: Option<Py<PyAny>>,
        yes: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let opts = Options {
            keys: Some(vec![key]),
            only_outdated: false,
            yes,
        };
        self.run_pipeline(py, opts, on_event)
    }

    /// Build every selected device, stop klipper once, flash, restart, verify, report.
    #[pyo3(signature = (keys=None, only_outdated=false, yes=false, on_event=None))]
    fn flash_all<'py>(
        &self,
        py: Python<'py>,
        keys: Option<Vec<String>>,
        only_outdated: bool,
        yes: bool,
        on_event: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let opts = Options {
            keys: keys_of(keys),
            only_outdated,
            yes,
        };
        self.run_pipeline(py, opts, on_event)
    }

    /// Klippy's state and each device's current vs target version; the last run.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let home = self.home.clone();
        let status = py.detach(move || home.status())?;
        to_py(py, &status)
    }
}
