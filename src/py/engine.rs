//! `kflash._core.Engine`: the front ends' handle on one state directory
//! (`commands::Context`).
//!
//! Every method converts its inputs to owned Rust values and returns the command's result
//! as plain dicts and lists (serde through `pythonize`). Long calls (`build`, `flash`,
//! `flash_all`) go through the one worker loop (`super::worker`); when a signal or the
//! `on_event` callback interrupts a run, the pipeline unwinds (klipper is restarted) and
//! the interrupting exception is re-raised with the run's report attached as its `report`
//! attribute (when there is one).
//!
//! Thread-safety: `Engine` is frozen and holds only the state dir's context.

// pyo3 hands method arguments over by value; borrowing them is not an option there.
#![allow(clippy::needless_pass_by_value)]

use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use serde::Serialize;

use super::worker::{run_detached, Interrupted};
use crate::commands::{self, Context, NewDevice, RunKind};
use crate::pipeline::{self, Options, Report};

/// A kflash state directory: devices, settings, configs, builds and runs.
///
/// `Engine(home=None)` uses `$KFLASH_HOME`, else `~/printer_data/kflash` when
/// `~/printer_data` exists, else `$XDG_CONFIG_HOME/kflash`.
#[pyclass(frozen, module = "kflash._core")]
pub struct Engine {
    context: Context,
}

fn to_py<'py>(py: Python<'py>, value: &impl Serialize) -> PyResult<Bound<'py, PyAny>> {
    Ok(pythonize::pythonize(py, value)?)
}

/// Check a device key the one way every front end does (the CLI, `devices import`, the
/// klippy extra): 1-64 ASCII letters, digits, `_`, `.`, `-`, starting with a letter or a
/// digit. Raises `RegistryError` saying which rule was broken.
#[pyfunction]
pub fn validate_key(key: &str) -> PyResult<()> {
    Ok(crate::registry::validate_key(key)?)
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
        kind: RunKind,
        run_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let context = self.context.clone();
        let on_event = on_event.map(|cb| cb.into_bound(py));
        let outcome = run_detached(py, on_event.as_ref(), move |cancel, sink| {
            context.run(kind, &opts, run_id.as_deref(), cancel, sink)
        });
        match outcome {
            Ok(Ok(report)) => to_py(py, &report),
            Ok(Err(err)) => Err(err.into()),
            Err(Interrupted { error, result }) => {
                let report: Option<Report> = match result {
                    Some(Ok(r)) => Some(r),
                    Some(Err(commands::Error::Run(e))) => match *e {
                        pipeline::Error::Cancelled { report } => report.map(|r| *r),
                        _ => None,
                    },
                    _ => None,
                };
                if let Some(report) = report {
                    let _ = error.value(py).setattr("report", to_py(py, &report)?);
                }
                Err(error)
            }
        }
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (home=None))]
    fn new(py: Python<'_>, home: Option<PathBuf>) -> PyResult<Self> {
        let mut context = Context::open(home)?;
        context.python = py
            .import("sys")?
            .getattr("executable")?
            .extract::<Option<PathBuf>>()?
            .filter(|p| !p.as_os_str().is_empty());
        Ok(Engine { context })
    }

    /// The state directory this engine works in.
    #[getter]
    fn state_dir(&self) -> String {
        self.context.state.root().display().to_string()
    }

    /// Every setting as `{name: value}` (text).
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.context.settings()?)
    }

    /// Change one setting (validated first; a rejected value changes nothing).
    fn set_setting<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        value: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.context.set_setting(key, value)?)
    }

    /// Every registered device with its config status.
    fn devices<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.context.devices()?)
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
        to_py(py, &self.context.add_device(&new)?)
    }

    /// Forget a device (its config file is kept).
    fn remove_device<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.context.remove_device(key)?)
    }

    /// Register every `[mcu ...]` of a printer.cfg that is not registered yet.
    fn import_printer_cfg<'py>(&self, py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.context.import_printer_cfg(Path::new(path))?)
    }

    /// Path of a device's firmware config (`configs/<key>.config`).
    fn config_path(&self, key: &str) -> PyResult<String> {
        Ok(self.context.config_path(key)?.display().to_string())
    }

    /// Attach an existing Klipper `.config` to a device (copied in atomically).
    fn set_config<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        path: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.context.set_config(key, &path)?)
    }

    /// The `make menuconfig` command line for a device's config (run it in the Klipper
    /// tree); its `OUT=` is the device's own build directory.
    fn menuconfig_command(&self, key: &str) -> PyResult<Vec<String>> {
        Ok(self.context.menuconfig_command(key)?)
    }

    /// What flash-all would do, per device, and why. Changes nothing.
    #[pyo3(signature = (keys=None, only_outdated=false))]
    fn plan<'py>(
        &self,
        py: Python<'py>,
        keys: Option<Vec<String>>,
        only_outdated: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let context = self.context.clone();
        let opts = Options {
            keys: keys_of(keys),
            only_outdated,
            yes: false,
        };
        let plan = py.detach(move || context.plan(&opts))?;
        to_py(py, &plan)
    }

    /// Build the selected devices' firmware (no stop window). Raises BuildError (its
    /// `report` holds every device's entry) when a build failed.
    #[pyo3(signature = (keys=None, on_event=None))]
    fn build<'py>(
        &self,
        py: Python<'py>,
        keys: Option<Vec<String>>,
        on_event: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let context = self.context.clone();
        let keys = keys_of(keys);
        let on_event = on_event.map(|cb| cb.into_bound(py));
        let results = run_detached(py, on_event.as_ref(), move |cancel, sink| {
            context.build(keys.as_deref(), cancel, sink)
        })
        .map_err(|i| i.error)??;
        to_py(py, &results)
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
        self.run_pipeline(py, opts, on_event, RunKind::FlashAll, None)
    }

    /// Build every selected device, stop klipper once, flash, restart, verify, report.
    /// The run is recorded in `runs/<run_id>.json` (a new id when `run_id` is None).
    #[pyo3(signature = (keys=None, only_outdated=false, yes=false, on_event=None, run_id=None))]
    fn flash_all<'py>(
        &self,
        py: Python<'py>,
        keys: Option<Vec<String>>,
        only_outdated: bool,
        yes: bool,
        on_event: Option<Py<PyAny>>,
        run_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let opts = Options {
            keys: keys_of(keys),
            only_outdated,
            yes,
        };
        self.run_pipeline(py, opts, on_event, RunKind::FlashAll, run_id)
    }

    /// Flash each selected board's last-known-good image (the one last flashed to it and
    /// verified there) inside one stop window; restart, verify, report. A board without
    /// one is skipped (an error when it was named). Recorded like `flash_all`.
    #[pyo3(signature = (keys=None, yes=false, on_event=None, run_id=None))]
    fn rollback<'py>(
        &self,
        py: Python<'py>,
        keys: Option<Vec<String>>,
        yes: bool,
        on_event: Option<Py<PyAny>>,
        run_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let opts = Options {
            keys: keys_of(keys),
            only_outdated: false,
            yes,
        };
        self.run_pipeline(py, opts, on_event, RunKind::Rollback, run_id)
    }

    /// Klippy's state and each device's current vs target version; the last run.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let context = self.context.clone();
        let status = py.detach(move || context.status())?;
        to_py(py, &status)
    }
}
