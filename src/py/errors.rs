//! The Python exception hierarchy and the one place domain errors become `PyErr`.
//!
//! `KflashError` is the base; users catch the subclass that matters to them. Each domain
//! error enum gets exactly one `From<...> for PyErr` here, and each mapping is unit-tested.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::PyErr;

use crate::build;
use crate::discovery;
use crate::katapult;
use crate::kconfig;
use crate::pipeline;
use crate::process;
use crate::registry;
use crate::snapshot;
use crate::{moonraker, service};

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

create_exception!(
    kflash._core,
    MoonrakerError,
    KflashError,
    "Moonraker is unreachable, answered with an error, or sent something unexpected."
);

impl From<process::Error> for PyErr {
    fn from(err: process::Error) -> PyErr {
        match err {
            process::Error::Timeout { .. } => CommandTimeout::new_err(err.to_string()),
            _ => KflashError::new_err(err.to_string()),
        }
    }
}

impl From<build::Error> for PyErr {
    fn from(err: build::Error) -> PyErr {
        match err {
            build::Error::Timeout { .. } => CommandTimeout::new_err(err.to_string()),
            build::Error::ConfigMissing { .. } => ConfigError::new_err(err.to_string()),
            _ => BuildError::new_err(err.to_string()),
        }
    }
}

impl From<service::Error> for PyErr {
    fn from(err: service::Error) -> PyErr {
        ServiceError::new_err(err.to_string())
    }
}

impl From<moonraker::Error> for PyErr {
    fn from(err: moonraker::Error) -> PyErr {
        MoonrakerError::new_err(err.to_string())
    }
}

impl From<registry::Error> for PyErr {
    fn from(err: registry::Error) -> PyErr {
        match err {
            registry::Error::UnknownDevice { .. } => DeviceNotFound::new_err(err.to_string()),
            _ => RegistryError::new_err(err.to_string()),
        }
    }
}

impl From<kconfig::Error> for PyErr {
    fn from(err: kconfig::Error) -> PyErr {
        ConfigError::new_err(err.to_string())
    }
}

impl From<discovery::Error> for PyErr {
    fn from(err: discovery::Error) -> PyErr {
        match err {
            discovery::Error::Cancelled { .. } => KflashError::new_err(err.to_string()),
            _ => DeviceNotFound::new_err(err.to_string()),
        }
    }
}

impl From<pipeline::Error> for PyErr {
    fn from(err: pipeline::Error) -> PyErr {
        match err {
            pipeline::Error::Registry(e) => e.into(),
            pipeline::Error::NoMatch { .. } => DeviceNotFound::new_err(err.to_string()),
            pipeline::Error::Config(_) => ConfigError::new_err(err.to_string()),
            pipeline::Error::Refused(_) => PreflightRefused::new_err(err.to_string()),
            pipeline::Error::Cancelled { .. } | pipeline::Error::Io(_) => {
                KflashError::new_err(err.to_string())
            }
        }
    }
}

impl From<snapshot::Error> for PyErr {
    fn from(err: snapshot::Error) -> PyErr {
        KflashError::new_err(err.to_string())
    }
}

impl From<katapult::Error> for PyErr {
    fn from(err: katapult::Error) -> PyErr {
        if err.is_timeout() {
            CommandTimeout::new_err(err.to_string())
        } else {
            FlashError::new_err(err.to_string())
        }
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
    fn build_errors_map_to_their_classes() {
        Python::initialize();
        Python::attach(|py| {
            let timeout: PyErr = build::Error::Timeout {
                key: "ebb".into(),
                cmd: "make -C klipper".into(),
                after: Duration::from_secs(600),
                tail: "Compiling".into(),
            }
            .into();
            assert!(timeout.is_instance_of::<CommandTimeout>(py));
            assert!(timeout.to_string().contains("make -C klipper"));
            let failed: PyErr = build::Error::Make {
                key: "ebb".into(),
                source: process::Error::Failed {
                    cmd: "make".into(),
                    status: process::Status::Exited(2),
                    tail: "error: foo.c".into(),
                },
            }
            .into();
            assert!(failed.is_instance_of::<BuildError>(py));
            assert!(failed.to_string().contains("error: foo.c"));
            let toolchain: PyErr = build::Error::ToolchainMissing {
                key: "ebb".into(),
                compiler: "arm-none-eabi-gcc".into(),
                packages: "gcc-arm-none-eabi".into(),
            }
            .into();
            assert!(toolchain.is_instance_of::<BuildError>(py));
            let config: PyErr = build::Error::ConfigMissing {
                key: "ebb".into(),
                path: "/x/ebb.config".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }
            .into();
            assert!(config.is_instance_of::<ConfigError>(py));
            assert!(config.is_instance_of::<KflashError>(py));
        });
    }

    #[test]
    fn service_and_moonraker_errors_map_to_their_classes() {
        Python::initialize();
        Python::attach(|py| {
            let err: PyErr = service::Error::Unavailable {
                service: "klipper".into(),
                reason: "sudo refused".into(),
            }
            .into();
            assert!(err.is_instance_of::<ServiceError>(py));
            assert!(err.is_instance_of::<KflashError>(py));
            assert!(err.to_string().contains("sudo refused"));
            let err: PyErr = moonraker::Error::Unreachable {
                url: "http://127.0.0.1:7125/server/info".into(),
                reason: "connection refused".into(),
            }
            .into();
            assert!(err.is_instance_of::<MoonrakerError>(py));
            assert!(err.is_instance_of::<KflashError>(py));
            assert!(!err.is_instance_of::<ServiceError>(py));
            assert!(err.to_string().contains("127.0.0.1:7125"));
        });
    }

    #[test]
    fn registry_errors_map_to_their_classes() {
        Python::initialize();
        Python::attach(|py| {
            let bad_key: PyErr = registry::validate_key("a/b").unwrap_err().into();
            assert!(bad_key.is_instance_of::<RegistryError>(py));
            assert!(bad_key.to_string().contains("path separators"));
            let unknown: PyErr = registry::Registry::default()
                .get("EBB36")
                .unwrap_err()
                .into();
            assert!(unknown.is_instance_of::<DeviceNotFound>(py));
            assert!(unknown.is_instance_of::<KflashError>(py));
        });
    }

    #[test]
    fn kconfig_errors_map_to_config_error() {
        Python::initialize();
        Python::attach(|py| {
            let config = kconfig::KConfig::parse("CONFIG_MCU=\"stm32f103xe\"\n");
            let wrong: PyErr = kconfig::check_mcu("rp2040", &config).unwrap_err().into();
            assert!(wrong.is_instance_of::<ConfigError>(py));
            assert!(wrong.to_string().contains("stm32f103xe"));
            let none: PyErr = kconfig::KConfig::parse("").target().unwrap_err().into();
            assert!(none.is_instance_of::<ConfigError>(py));
        });
    }

    #[test]
    fn discovery_errors_map_to_device_not_found() {
        Python::initialize();
        Python::attach(|py| {
            let none = discovery::Discovery::at("/nonexistent/dev", "/nonexistent/sys");
            let missing: PyErr = none.resolve("usb-Klipper_*").unwrap_err().into();
            assert!(missing.is_instance_of::<DeviceNotFound>(py));
            let ambiguous: PyErr = discovery::Error::Ambiguous {
                pattern: "usb-*".into(),
                candidates: "a, b".into(),
            }
            .into();
            assert!(ambiguous.is_instance_of::<DeviceNotFound>(py));
            assert!(ambiguous.to_string().contains("a, b"));
            let stopped: PyErr = discovery::Error::Cancelled { id: "x".into() }.into();
            assert!(!stopped.is_instance_of::<DeviceNotFound>(py));
            assert!(stopped.is_instance_of::<KflashError>(py));
        });
    }

    #[test]
    fn pipeline_errors_map_to_their_classes() {
        Python::initialize();
        Python::attach(|py| {
            let refused: PyErr = pipeline::Error::Refused("the printer is printing".into()).into();
            assert!(refused.is_instance_of::<PreflightRefused>(py));
            assert!(refused.to_string().contains("printing"));
            let config: PyErr = pipeline::Error::Config("no config".into()).into();
            assert!(config.is_instance_of::<ConfigError>(py));
            let nomatch: PyErr = pipeline::Error::NoMatch {
                pattern: "ebb*".into(),
                candidates: vec!["mcu".into()],
            }
            .into();
            assert!(nomatch.is_instance_of::<DeviceNotFound>(py));
            assert!(nomatch.to_string().contains("mcu"));
            let reg: PyErr =
                pipeline::Error::Registry(registry::validate_key("").unwrap_err()).into();
            assert!(reg.is_instance_of::<RegistryError>(py));
            let cancelled: PyErr = pipeline::Error::Cancelled { report: None }.into();
            assert!(cancelled.is_instance_of::<KflashError>(py));
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
            for err in [
                snapshot::Error::Truncated {
                    path: "/dev/shm/x".into(),
                    size: 3,
                    expected: 64,
                },
                snapshot::Error::Replaced {
                    path: "/dev/shm/x".into(),
                },
            ] {
                let err: PyErr = err.into();
                assert!(err.is_instance_of::<KflashError>(py));
                assert!(err.to_string().contains("/dev/shm/x"));
            }
        });
    }

    #[test]
    fn katapult_errors_map_to_flash_error_or_command_timeout() {
        Python::initialize();
        Python::attach(|py| {
            let timeout: PyErr = katapult::Error::Timeout {
                step: katapult::Step::Write,
                addr: Some(0x0800_2000),
                tries: 3,
                per_try: Duration::from_secs(5),
            }
            .into();
            assert!(timeout.is_instance_of::<CommandTimeout>(py));
            assert!(timeout.to_string().contains("0x08002000"));
            let gone: PyErr = katapult::Error::NotInBootloader {
                device: "/dev/ttyACM0".into(),
                waited: Duration::from_secs(10),
            }
            .into();
            assert!(gone.is_instance_of::<CommandTimeout>(py));
            let mismatch: PyErr = katapult::Error::McuMismatch {
                device: "/dev/ttyACM0".into(),
                image: "rp2040".into(),
                bootloader: "stm32f103xe".into(),
            }
            .into();
            assert!(mismatch.is_instance_of::<FlashError>(py));
            assert!(!mismatch.is_instance_of::<CommandTimeout>(py));
            assert!(mismatch.to_string().contains("rp2040"));
            let verify: PyErr = katapult::Error::VerifyMismatch {
                addr: 0x0800_23e8,
                block: 0x0800_2380,
            }
            .into();
            assert!(verify.is_instance_of::<FlashError>(py));
            assert!(verify.is_instance_of::<KflashError>(py));
        });
    }
}
