//! `kflash._core.ExitStatus`: the core's one `commands::ExitStatus`, for the CLI and the
//! detached helper.
//!
//! `ExitStatus.of(outcome)` asks the core for the status of a run's report (a dict), of
//! an exception (a kflash error carries its `exit_code`; an interrupt carries the run's
//! `report` when there is one), so no front end decides an exit code itself.
//! `int(status)` is the process exit code.
//!
//! Thread-safety: an immutable value.

use pyo3::basic::CompareOp;
use pyo3::exceptions::{PyBaseException, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyInt, PyMapping};
use serde::Deserialize;

use crate::commands::ExitStatus as Status;

/// How a kflash command ended: `int(status)` is the process exit code.
///
/// SUCCESS (0) all good or nothing to do; FAILURE (1) some device failed, klipper
/// restarted; USAGE (2) usage or configuration error, nothing stopped; REFUSED (3)
/// refused by pre-flight; NOT_RESTARTED (4) klipper could not be started again.
#[pyclass(frozen, module = "kflash._core", name = "ExitStatus")]
#[derive(Clone, Copy)]
pub struct ExitStatus(pub Status);

/// The part of a run's report the exit status depends on.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Outcome {
    ok: bool,
    cancelled: bool,
    service: ServiceOutcome,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ServiceOutcome {
    stopped: bool,
    restarted: bool,
}

impl Outcome {
    fn status(&self) -> Status {
        let status = Status::of_outcome(self.ok, self.service.stopped, self.service.restarted);
        if self.cancelled {
            status.max(Status::Failure)
        } else {
            status
        }
    }
}

fn of_report(report: &Bound<'_, PyAny>) -> PyResult<Status> {
    let outcome: Outcome = pythonize::depythonize(report)?;
    Ok(outcome.status())
}

// pyo3 methods take `&self`, whatever the size of the value.
#[allow(clippy::trivially_copy_pass_by_ref)]
#[pymethods]
impl ExitStatus {
    #[classattr]
    const SUCCESS: ExitStatus = ExitStatus(Status::Success);
    #[classattr]
    const FAILURE: ExitStatus = ExitStatus(Status::Failure);
    #[classattr]
    const USAGE: ExitStatus = ExitStatus(Status::Usage);
    #[classattr]
    const REFUSED: ExitStatus = ExitStatus(Status::Refused);
    #[classattr]
    const NOT_RESTARTED: ExitStatus = ExitStatus(Status::NotRestarted);

    /// The status of a run's report (a dict), or of an exception that ended a command.
    #[staticmethod]
    fn of(outcome: &Bound<'_, PyAny>) -> PyResult<ExitStatus> {
        if outcome.is_instance_of::<PyBaseException>() {
            if let Ok(code) = outcome.getattr("exit_code") {
                if let Some(status) = code.extract::<i64>().ok().and_then(Status::from_code) {
                    return Ok(ExitStatus(status));
                }
            }
            let report = outcome.getattr("report").ok().filter(|r| !r.is_none());
            return Ok(ExitStatus(match report {
                Some(r)
                    if r.is_instance_of::<PyMapping>()
                        || r.cast::<pyo3::types::PyDict>().is_ok() =>
                {
                    of_report(&r)?.max(Status::Failure)
                }
                _ => Status::Failure,
            }));
        }
        if outcome.cast::<pyo3::types::PyDict>().is_ok() || outcome.is_instance_of::<PyMapping>() {
            return Ok(ExitStatus(of_report(outcome)?));
        }
        Err(PyTypeError::new_err(
            "ExitStatus.of() takes a run's report (dict) or an exception",
        ))
    }

    /// `SUCCESS`, `FAILURE`, `USAGE`, `REFUSED` or `NOT_RESTARTED`.
    #[getter]
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn __int__(&self) -> i32 {
        self.0.code()
    }

    fn __index__(&self) -> i32 {
        self.0.code()
    }

    fn __hash__(&self) -> u64 {
        self.0.code() as u64
    }

    fn __repr__(&self) -> String {
        format!("ExitStatus.{}", self.0.name())
    }

    fn __richcmp__(&self, other: &Bound<'_, PyAny>, op: CompareOp) -> PyResult<Py<PyAny>> {
        let py = other.py();
        let other = if let Ok(status) = other.cast::<ExitStatus>() {
            i64::from(status.get().0.code())
        } else if let Ok(int) = other.cast::<PyInt>() {
            int.extract::<i64>()?
        } else {
            return Ok(py.NotImplemented());
        };
        let me = i64::from(self.0.code());
        Ok(op
            .matches(me.cmp(&other))
            .into_pyobject(py)?
            .to_owned()
            .into_any()
            .unbind())
    }
}
