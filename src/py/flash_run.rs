//! `kflash._core.Runs`: the flash runs of one state directory, for the front ends that do
//! not run them in-process: the klippy extra (reads a run's record and progress, starts
//! the detached helper), `python -m kflash.helper` (its pending request) and `python -m
//! kflash.watchdog` (the watchdog itself).
//!
//! Reads are small local file reads, safe on klippy's reactor thread; `start_helper` and
//! `watch` release the GIL (the first blocks up to a minute, the second for a whole run).
//!
//! Thread-safety: `Runs` is frozen and holds only the state directory.

// pyo3 hands method arguments over by value; borrowing them is not an option there.
#![allow(clippy::needless_pass_by_value)]

use std::path::PathBuf;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use serde_json::Value;

use crate::commands::Context;
use crate::flash_run::{self, place, record, HelperRequest, Launcher, Record};
use crate::registry::{self, StateDir};

/// The flash runs of a kflash state directory (`runs/`): their records and progress, the
/// helper that runs one for klippy, and the watchdog that guards one.
///
/// `Runs(home=None)` uses the same state directory as `Engine(home)`.
#[pyclass(frozen, module = "kflash._core")]
pub struct Runs {
    state: StateDir,
}

fn to_py<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    Ok(pythonize::pythonize(py, value)?)
}

impl Runs {
    /// A record as Python sees it: the record, plus whether the extra announced it.
    fn view<'py>(&self, py: Python<'py>, record: Option<Record>) -> PyResult<Bound<'py, PyAny>> {
        let Some(record) = record else {
            return Ok(py.None().into_bound(py));
        };
        let announced = record::announced(&self.state.runs_dir(), &record.run_id);
        let mut value =
            serde_json::to_value(&record).map_err(|e| PyValueError::new_err(e.to_string()))?;
        if let Value::Object(map) = &mut value {
            map.insert("announced".into(), announced.into());
        }
        to_py(py, &value)
    }
}

#[pymethods]
impl Runs {
    /// The transient unit `sudo -n systemd-run` makes for the helper.
    #[classattr]
    const HELPER_UNIT: &'static str = place::HELPER_UNIT;
    /// The unit `scripts/install.sh` installs and Moonraker starts (`--pending`).
    #[classattr]
    const INSTALLED_UNIT: &'static str = place::INSTALLED_UNIT;
    /// The transient unit of a watchdog that must leave a service.
    #[classattr]
    const WATCHDOG_UNIT: &'static str = place::WATCHDOG_UNIT;

    #[new]
    #[pyo3(signature = (home=None))]
    fn new(home: Option<PathBuf>) -> PyResult<Self> {
        let state = match home {
            Some(path) => StateDir::at(path),
            None => StateDir::resolve().ok_or(registry::Error::NoStateDir)?,
        };
        Ok(Runs { state })
    }

    /// The state directory.
    #[getter]
    fn state_dir(&self) -> String {
        self.state.root().display().to_string()
    }

    /// A new run id (UTC start time and pid; ids sort by start time).
    #[staticmethod]
    fn new_id() -> String {
        record::new_run_id()
    }

    /// The newest run's record (`state`: running, finished or interrupted), or None.
    fn latest<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let record = record::latest(&self.state.runs_dir());
        self.view(py, record)
    }

    /// Run `run_id`'s record, or None.
    fn get<'py>(&self, py: Python<'py>, run_id: &str) -> PyResult<Bound<'py, PyAny>> {
        let record = record::read(&self.state.runs_dir(), run_id);
        self.view(py, record)
    }

    /// Run `run_id`'s progress events after byte `offset`: `(events, next_offset)`.
    #[pyo3(signature = (run_id, offset=0))]
    fn events<'py>(
        &self,
        py: Python<'py>,
        run_id: &str,
        offset: u64,
    ) -> PyResult<(Bound<'py, PyAny>, u64)> {
        let (events, next) = record::events(&self.state.runs_dir(), run_id, offset);
        Ok((to_py(py, &events)?, next))
    }

    /// Why a new run cannot start now (another run holds the lock or still runs), or None.
    fn busy(&self) -> Option<String> {
        flash_run::busy(&self.state)
    }

    /// Note that run `run_id`'s summary was posted (so it is posted once).
    fn announce(&self, run_id: &str) -> PyResult<()> {
        record::announce(&self.state.runs_dir(), run_id)
            .map_err(|e| PyOSError::new_err(format!("cannot note run {run_id} as posted: {e}")))
    }

    /// Start the detached helper for run `run_id` out of klipper's reach (`rollback`:
    /// it flashes the last-known-good images, as `Engine.rollback`); returns
    /// `{"run_id", "method", "pid", "unit"}` once it has begun the run. Raises
    /// PreflightRefused (nothing stopped) saying what is missing, RegistryError for a
    /// device key that breaks the key rule, ValueError for an unknown launcher.
    #[pyo3(signature = (run_id, *, only_outdated=false, device=None, rollback=false, launcher="auto", python=None, moonraker_url="http://127.0.0.1:7125"))]
    #[allow(clippy::too_many_arguments)]
    fn start_helper<'py>(
        &self,
        py: Python<'py>,
        run_id: String,
        only_outdated: bool,
        device: Option<String>,
        rollback: bool,
        launcher: &str,
        python: Option<PathBuf>,
        moonraker_url: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let launcher: Launcher = launcher.parse().map_err(PyValueError::new_err)?;
        let python = match python {
            Some(p) => p,
            None => py.import("sys")?.getattr("executable")?.extract()?,
        };
        let request = HelperRequest {
            run_id,
            only_outdated,
            device,
            rollback,
            launcher,
            python,
            moonraker_url: moonraker_url.to_owned(),
        };
        let state = self.state.clone();
        let started = py.detach(move || flash_run::start_helper(&state, &request))?;
        to_py(py, &started)
    }

    /// The run the installed unit is to run (`--pending`), taken (read and removed), or
    /// None.
    fn take_pending<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match flash_run::take_pending(&self.state) {
            Some(pending) => to_py(py, &pending),
            None => Ok(py.None().into_bound(py)),
        }
    }

    /// Be run `run_id`'s watchdog until the run ends (finishing the boards a dead runner
    /// left in their bootloader before klipper starts); the exit code (0 stood down or
    /// started klipper, 1 klipper still stopped, 2 nothing to guard).
    fn watch(&self, py: Python<'_>, run_id: String) -> i32 {
        let context = Context::at(self.state.clone());
        py.detach(move || context.watch(&run_id))
    }
}
