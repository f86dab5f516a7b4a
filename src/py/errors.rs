//! The Python exception hierarchy and the one place domain errors become `PyErr`.
//!
//! `KflashError` is the base; users catch the subclass that matters to them. Each domain
//! error enum gets exactly one `From<...> for PyErr` here, and each mapping is unit-tested.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::PyErr;

use crate::process;
use crate::snapshot;

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
    "A device key, serial path or pattern does not name exactly one device."
);
create_exception!(
    kflash._core,
    ConfigError,
    KflashError,
    "A firmware config (Kconfig .config) is missing, invalid or for another MCU."
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
    "Stopping or starting the klipper service failed."
);
create_exception!(
    kflash._core,
    CommandTimeout,
    KflashError,
    "An external command did not finish in time and was stopped."
);
create_exception!(
    kflash._core,
    PreflightRefused,
    KflashError,
    "A run was refused before anything was stopped (printing, lock held, no service control)."
);

impl From<process::Error> for PyErr {
    fn from(err: process::Error) -> PyErr {
        match err {
            process::Error::Timeout { .. } => CommandTimeout::new_err(err.to_string()),
            _ => KflashError::new_err(err.to_string()),
        }
    }
}

impl From<snapshot::Error> for PyErr {
    fn from(err: snapshot::Error) -> PyErr {
        KflashError::new_err(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyo3::Python;
    use std::time::Duration;

    #[test]
    fn process_errors_map_to_their_classes() {
        Python::initialize();
        Python::attach(|py| {
            let timeout: PyErr = process::Error::Timeout {
                cmd: "make".into(),
                after: Duration::from_secs(1),
                tail: String::new(),
            }
            .into();
            assert!(timeout.is_instance_of::<CommandTimeout>(py));
            assert!(timeout.is_instance_of::<KflashError>(py));
            let failed: PyErr = process::Error::Failed {
                cmd: "make".into(),
                status: process::Status::Exited(2),
                tail: "oops".into(),
            }
            .into();
            assert!(failed.is_instance_of::<KflashError>(py));
            assert!(failed.to_string().contains("oops"));
        });
    }

    #[test]
    fn snapshot_errors_map_to_kflash_error_naming_the_file() {
        Python::initialize();
        Python::attach(|py| {
            let err: PyErr = snapshot::Error::NotASnapshot {
                path: "/dev/shm/x".into(),
                reason: "bad magic".into(),
            }
            .into();
            assert!(err.is_instance_of::<KflashError>(py));
            assert!(err.to_string().contains("/dev/shm/x"));
        });
    }
}
