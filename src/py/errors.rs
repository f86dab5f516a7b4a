//! The Python exception hierarchy and the one place domain errors become `PyErr`.
//!
//! `KflashError` is the base; users catch the subclass that matters to them. Each domain
//! error enum that reaches Python gets exactly one `From<...> for PyErr` here, which picks
//! the class and sets the attributes a caller needs: `device`, `step`, `command`,
//! `exit_status` (the command's), `output_tail`, `hint` (all `None` when they do not
//! apply, and together as the dict `details`), `report` (what the call would have
//! returned, when there is one) and `exit_code` (the `ExitStatus` the CLI and the helper
//! exit with; set by the `commands::Error` conversion, which every front-end call goes
//! through).
//!
//! A timeout is catchable both as `CommandTimeout` and as the class of what timed out:
//! `BuildTimeout(BuildError, CommandTimeout)`, `FlashTimeout(FlashError, CommandTimeout)`.
//! Likewise a refusal caused by the service or by Moonraker is a `PreflightRefused` and a
//! `ServiceError` (`ServiceUnavailable`) or a `MoonrakerError` (`MoonrakerUnavailable`).
//! Those four classes are made at import time (`type(name, bases, ns)`): PyO3's
//! `create_exception!` takes one base.
//!
//! Thread-safety: conversions attach to the interpreter; the classes are created once.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use serde::Serialize;

use crate::commands::{self, ExitStatus};
use crate::{
    firmware, flash_run, katapult, moonraker, pipeline, process, registry, service, snapshot,
};

create_exception!(
    kflash._core,
    KflashError,
    PyException,
    "Base class of every kflash error."
);
create_exception!(
    kflash._core,
    RegistryError,
    KflashError,
    "The device registry or settings are unreadable, invalid or cannot be written."
);
create_exception!(
    kflash._core,
    DeviceNotFound,
    KflashError,
    "A device key or pattern does not name a registered device."
);
create_exception!(
    kflash._core,
    ConfigError,
    KflashError,
    "A firmware config (Kconfig .config) is missing, invalid or for another MCU, or a \
     device cannot be flashed with the tools configured."
);
create_exception!(
    kflash._core,
    BuildError,
    KflashError,
    "Building firmware failed."
);
create_exception!(
    kflash._core,
    FlashError,
    KflashError,
    "Flashing a device failed."
);
create_exception!(
    kflash._core,
    ServiceError,
    KflashError,
    "The klipper service cannot be stopped or started."
);
create_exception!(
    kflash._core,
    MoonrakerError,
    KflashError,
    "Moonraker is unreachable, answered with an error, or sent something unexpected."
);
create_exception!(
    kflash._core,
    CommandTimeout,
    KflashError,
    "An external command or a device did not answer in time."
);
create_exception!(
    kflash._core,
    PreflightRefused,
    KflashError,
    "A run was refused before anything was stopped (printing, lock held, no service \
     control, Moonraker unreachable)."
);

/// An exception class deriving from two of the classes above.
struct Combined {
    name: &'static str,
    doc: &'static str,
    bases: fn(Python<'_>) -> [Bound<'_, PyType>; 2],
    class: PyOnceLock<Py<PyType>>,
}

impl Combined {
    fn get<'py>(&self, py: Python<'py>) -> PyResult<&Bound<'py, PyType>> {
        self.class
            .get_or_try_init(py, || {
                let ns = PyDict::new(py);
                ns.set_item("__module__", "kflash._core")?;
                ns.set_item("__doc__", self.doc)?;
                let bases = PyTuple::new(py, (self.bases)(py))?;
                let class = py
                    .get_type::<PyType>()
                    .call1((self.name, bases, ns))?
                    .cast_into::<PyType>()?;
                Ok::<_, PyErr>(class.unbind())
            })
            .map(|class| class.bind(py))
    }
}

static BUILD_TIMEOUT: Combined = Combined {
    name: "BuildTimeout",
    doc: "A firmware build did not finish in time and was stopped.",
    bases: |py| [py.get_type::<BuildError>(), py.get_type::<CommandTimeout>()],
    class: PyOnceLock::new(),
};
static FLASH_TIMEOUT: Combined = Combined {
    name: "FlashTimeout",
    doc: "A board did not answer the flasher in time.",
    bases: |py| [py.get_type::<FlashError>(), py.get_type::<CommandTimeout>()],
    class: PyOnceLock::new(),
};
static SERVICE_UNAVAILABLE: Combined = Combined {
    name: "ServiceUnavailable",
    doc: "Refused before anything was stopped: the klipper service cannot be controlled.",
    bases: |py| {
        [
            py.get_type::<PreflightRefused>(),
            py.get_type::<ServiceError>(),
        ]
    },
    class: PyOnceLock::new(),
};
static MOONRAKER_UNAVAILABLE: Combined = Combined {
    name: "MoonrakerUnavailable",
    doc: "Refused before anything was stopped: Moonraker is unreachable, so whether the \
          printer is printing is unknown (pass yes=True to proceed anyway).",
    bases: |py| {
        [
            py.get_type::<PreflightRefused>(),
            py.get_type::<MoonrakerError>(),
        ]
    },
    class: PyOnceLock::new(),
};

/// Add the classes with two bases to the module (at import).
pub fn add_combined_classes(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    for combined in [
        &BUILD_TIMEOUT,
        &FLASH_TIMEOUT,
        &SERVICE_UNAVAILABLE,
        &MOONRAKER_UNAVAILABLE,
    ] {
        module.add(combined.name, combined.get(py)?)?;
    }
    Ok(())
}

/// The attributes every kflash exception carries (`None` where they do not apply).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Details {
    /// The device key (or, for the Katapult flasher, the tty).
    pub device: Option<String>,
    /// Where it happened: a pipeline stage (`plan`, `preflight`, `build`, ...) or a step
    /// of the Katapult flasher (`connect`, `write`, `verify`, ...).
    pub step: Option<String>,
    /// The external command that failed.
    pub command: Option<String>,
    /// Its exit code (negative: killed by that signal).
    pub exit_status: Option<i32>,
    /// The last lines of its output.
    pub output_tail: Option<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Details {
    fn at(step: &str) -> Details {
        Details {
            step: Some(step.into()),
            ..Details::default()
        }
    }

    #[must_use]
    fn device(mut self, device: &str) -> Details {
        self.device = Some(device.into());
        self
    }

    /// What a failed command says about itself.
    #[must_use]
    fn command(mut self, err: &process::Error) -> Details {
        let (command, tail) = match err {
            process::Error::Spawn { cmd, .. } => (cmd, ""),
            process::Error::Timeout { cmd, tail, .. } | process::Error::Cancelled { cmd, tail } => {
                (cmd, tail.as_str())
            }
            process::Error::Failed { cmd, status, tail } => {
                self.exit_status = Some(match *status {
                    process::Status::Exited(code) => code,
                    process::Status::Signaled(sig) => -sig,
                });
                (cmd, tail.as_str())
            }
        };
        self.command = Some(command.clone());
        self.output_tail = (!tail.trim().is_empty()).then(|| tail.to_owned());
        self
    }

    /// What a service error says about the command behind it, if any.
    #[must_use]
    fn service(self, err: &service::Error) -> Details {
        match err {
            service::Error::Command { source, .. } => self.command(source),
            service::Error::SudoRefused { cmd, output, hint } => Details {
                command: Some(cmd.clone()),
                output_tail: (!output.trim().is_empty()).then(|| output.clone()),
                hint: Some(hint.clone()),
                ..self
            },
            service::Error::RestartFailed { last, .. } => self.service(last),
            _ => self,
        }
    }
}

/// An exception of `class` with `err`'s message and the attributes.
fn exception(
    py: Python<'_>,
    class: &Bound<'_, PyType>,
    err: &dyn std::error::Error,
    details: &Details,
    report: Option<Bound<'_, PyAny>>,
) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let exc = class.call1((err.to_string(),))?;
        let dict = pythonize::pythonize(py, details)?;
        for (key, value) in dict.cast::<PyDict>()?.iter() {
            exc.setattr(key.cast::<pyo3::types::PyString>()?, value)?;
        }
        exc.setattr("details", dict)?;
        exc.setattr("report", report.unwrap_or_else(|| py.None().into_bound(py)))?;
        Ok(PyErr::from_value(exc))
    })();
    made.unwrap_or_else(|e| e)
}

fn class_of<T: pyo3::PyTypeInfo>(py: Python<'_>) -> Bound<'_, PyType> {
    py.get_type::<T>()
}

fn combined<'py>(py: Python<'py>, combined: &Combined) -> Bound<'py, PyType> {
    combined
        .get(py)
        .map_or_else(|_| class_of::<KflashError>(py), Clone::clone)
}

fn to_py<'py>(py: Python<'py>, value: &impl Serialize) -> Option<Bound<'py, PyAny>> {
    pythonize::pythonize(py, value).ok()
}

/// Every front-end call ends here: the domain error's class and attributes, plus the
/// exit code the front ends exit with.
impl From<commands::Error> for PyErr {
    fn from(err: commands::Error) -> PyErr {
        let status = ExitStatus::of_error(&err);
        let pyerr = match err {
            commands::Error::Registry(e) => e.into(),
            commands::Error::Run(e) => (*e).into(),
            commands::Error::Katapult(e) => e.into(),
            commands::Error::EndpointCount => Python::attach(|py| {
                exception(
                    py,
                    &class_of::<RegistryError>(py),
                    &err,
                    &Details::default(),
                    None,
                )
            }),
            commands::Error::ReadConfig { .. } | commands::Error::NotAConfig { .. } => {
                Python::attach(|py| {
                    exception(
                        py,
                        &class_of::<ConfigError>(py),
                        &err,
                        &Details::default(),
                        None,
                    )
                })
            }
            commands::Error::WriteConfig { .. } | commands::Error::WriteRecord { .. } => {
                Python::attach(|py| {
                    exception(
                        py,
                        &class_of::<KflashError>(py),
                        &err,
                        &Details::default(),
                        None,
                    )
                })
            }
        };
        Python::attach(|py| {
            let _ = pyerr.value(py).setattr("exit_code", status.code());
        });
        pyerr
    }
}

impl From<registry::Error> for PyErr {
    fn from(err: registry::Error) -> PyErr {
        Python::attach(|py| {
            let (class, details) = match &err {
                registry::Error::UnknownDevice { key, .. } => (
                    class_of::<DeviceNotFound>(py),
                    Details::default().device(key),
                ),
                registry::Error::InvalidKey { key, .. } | registry::Error::DuplicateKey(key) => (
                    class_of::<RegistryError>(py),
                    Details::default().device(key),
                ),
                _ => (class_of::<RegistryError>(py), Details::default()),
            };
            exception(py, &class, &err, &details, None)
        })
    }
}

impl From<pipeline::Error> for PyErr {
    fn from(err: pipeline::Error) -> PyErr {
        use pipeline::{Error, Refusal};
        let err = match err {
            Error::Registry(e) => return e.into(),
            Error::Build { source, results } => return build_error(&source, Some(&results)),
            other => other,
        };
        Python::attach(|py| {
            let (class, details, report) = match &err {
                Error::NoMatch { .. } => {
                    (class_of::<DeviceNotFound>(py), Details::at("plan"), None)
                }
                Error::Config { device, .. } => (
                    class_of::<ConfigError>(py),
                    Details::at("plan").device(device),
                    None,
                ),
                Error::CannotFlash { unflashable } => {
                    let mut details = Details::at("preflight");
                    details.device = unflashable.first().map(|(key, _)| key.clone());
                    (class_of::<ConfigError>(py), details, None)
                }
                Error::Refused(Refusal::NoServiceControl(e)) => (
                    combined(py, &SERVICE_UNAVAILABLE),
                    Details::at("preflight").service(e),
                    None,
                ),
                Error::Refused(Refusal::NoMoonraker(e)) => (
                    combined(py, &MOONRAKER_UNAVAILABLE),
                    moonraker_details(e),
                    None,
                ),
                Error::Refused(_) => (
                    class_of::<PreflightRefused>(py),
                    Details::at("preflight"),
                    None,
                ),
                Error::Lock(_) => (class_of::<KflashError>(py), Details::at("preflight"), None),
                Error::Cancelled { report } => (
                    class_of::<KflashError>(py),
                    Details::default(),
                    report.as_deref().and_then(|r| to_py(py, r)),
                ),
                Error::Registry(_) | Error::Build { .. } => unreachable!("converted above"),
            };
            exception(py, &class, &err, &details, report)
        })
    }
}

fn moonraker_details(err: &moonraker::Error) -> Details {
    let mut details = Details::at("preflight");
    if err.is_unreachable() {
        details.hint = Some(
            "is Moonraker running? check the setting moonraker_url; pass --yes (yes=True) to \
             flash without it"
                .into(),
        );
    }
    details
}

/// A failed build: `BuildError` (`BuildTimeout` when make ran out of time) with the
/// command, its exit status and output tail; `results` are every device's entries.
fn build_error(err: &firmware::Error, results: Option<&[pipeline::DeviceReport]>) -> PyErr {
    Python::attach(|py| {
        let details = Details::at("build").device(err.key());
        let (class, details) = match err {
            firmware::Error::Make { source, .. } => {
                (class_of::<BuildError>(py), details.command(source))
            }
            firmware::Error::Timeout { cmd, tail, .. } => (
                combined(py, &BUILD_TIMEOUT),
                Details {
                    command: Some(cmd.clone()),
                    output_tail: (!tail.trim().is_empty()).then(|| tail.clone()),
                    ..details
                },
            ),
            _ => (class_of::<BuildError>(py), details),
        };
        let report = results.and_then(|r| to_py(py, &r));
        exception(py, &class, err, &details, report)
    })
}

impl From<firmware::Error> for PyErr {
    fn from(err: firmware::Error) -> PyErr {
        build_error(&err, None)
    }
}

impl From<katapult::Error> for PyErr {
    fn from(err: katapult::Error) -> PyErr {
        Python::attach(|py| {
            let class = if err.is_timeout() {
                combined(py, &FLASH_TIMEOUT)
            } else {
                class_of::<FlashError>(py)
            };
            let details = Details {
                device: katapult_device(&err),
                step: katapult_step(&err),
                ..Details::default()
            };
            exception(py, &class, &err, &details, None)
        })
    }
}

fn katapult_device(err: &katapult::Error) -> Option<String> {
    use katapult::Error as E;
    match err {
        E::Open { path, .. } | E::Io { path, .. } => Some(path.display().to_string()),
        E::NotInBootloader { device, .. }
        | E::RomLoader { device, .. }
        | E::McuMismatch { device, .. }
        | E::NoBootloader { device, .. } => Some(device.display().to_string()),
        _ => None,
    }
}

fn katapult_step(err: &katapult::Error) -> Option<String> {
    use katapult::Error as E;
    match err {
        E::Io { step, .. }
        | E::Timeout { step, .. }
        | E::Nack { step, .. }
        | E::CommandError { step, .. }
        | E::Protocol { step, .. }
        | E::Cancelled { step } => Some(step.to_string()),
        E::NotInBootloader { .. } | E::RomLoader { .. } => {
            Some(katapult::Step::EnterBootloader.to_string())
        }
        E::NoBootloader { .. } | E::McuMismatch { .. } => Some(katapult::Step::Connect.to_string()),
        E::VerifyMismatch { .. } => Some(katapult::Step::Verify.to_string()),
        _ => None,
    }
}

impl From<moonraker::Error> for PyErr {
    fn from(err: moonraker::Error) -> PyErr {
        Python::attach(|py| {
            exception(
                py,
                &class_of::<MoonrakerError>(py),
                &err,
                &Details::default(),
                None,
            )
        })
    }
}

/// The helper could not be started out of klipper's reach: refused before anything was
/// stopped (a device key breaking the key rule stays a `RegistryError`).
impl From<flash_run::StartError> for PyErr {
    fn from(err: flash_run::StartError) -> PyErr {
        if let flash_run::StartError::Key(err) = err {
            return err.into();
        }
        Python::attach(|py| {
            let pyerr = exception(
                py,
                &class_of::<PreflightRefused>(py),
                &err,
                &Details::at("preflight"),
                None,
            );
            let _ = pyerr
                .value(py)
                .setattr("exit_code", ExitStatus::Refused.code());
            pyerr
        })
    }
}

impl From<snapshot::Error> for PyErr {
    fn from(err: snapshot::Error) -> PyErr {
        Python::attach(|py| {
            let pyerr = exception(
                py,
                &class_of::<KflashError>(py),
                &err,
                &Details::default(),
                None,
            );
            let _ = pyerr
                .value(py)
                .setattr("exit_code", ExitStatus::Failure.code());
            pyerr
        })
    }
}

#[cfg(test)]
mod tests;
