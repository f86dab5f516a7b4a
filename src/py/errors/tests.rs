//! The mapping from domain errors to Python classes and attributes, with errors built the
//! way production builds them. The Python tests drive the same through public calls.

use super::*;
use crate::commands;
use pyo3::Python;
use std::time::Duration;

fn attr<'py>(py: Python<'py>, err: &PyErr, name: &str) -> Bound<'py, PyAny> {
    err.value(py).getattr(name).unwrap()
}

fn failed_make(key: &str) -> firmware::Error {
    firmware::Error::Make {
        key: key.into(),
        source: process::Error::Failed {
            cmd: "make -C /klipper OUT=/b/out/".into(),
            status: process::Status::Exited(2),
            tail: "src/main.c:3: error: boom".into(),
        },
    }
}

#[test]
fn a_failed_build_is_a_build_error_with_command_status_and_tail() {
    Python::initialize();
    Python::attach(|py| {
        let err: PyErr = commands::Error::from(pipeline::Error::Build {
            source: Box::new(failed_make("ebb")),
            results: vec![],
        })
        .into();
        assert!(err.is_instance_of::<BuildError>(py));
        assert!(!err.is_instance_of::<CommandTimeout>(py));
        assert_eq!(attr(py, &err, "device").extract::<String>().unwrap(), "ebb");
        assert_eq!(attr(py, &err, "step").extract::<String>().unwrap(), "build");
        assert_eq!(attr(py, &err, "exit_status").extract::<i32>().unwrap(), 2);
        assert!(attr(py, &err, "command")
            .extract::<String>()
            .unwrap()
            .starts_with("make -C"));
        assert!(attr(py, &err, "output_tail")
            .extract::<String>()
            .unwrap()
            .contains("boom"));
        assert_eq!(attr(py, &err, "exit_code").extract::<i32>().unwrap(), 1);
        assert!(attr(py, &err, "report").is_instance_of::<pyo3::types::PyList>());
    });
}

#[test]
fn a_build_timeout_is_a_build_error_and_a_command_timeout() {
    Python::initialize();
    Python::attach(|py| {
        let err: PyErr = firmware::Error::Timeout {
            key: "ebb".into(),
            cmd: "make -C klipper".into(),
            after: Duration::from_secs(600),
            tail: "Compiling src/sched.c".into(),
        }
        .into();
        assert!(err.is_instance_of::<BuildError>(py));
        assert!(err.is_instance_of::<CommandTimeout>(py));
        assert!(!err.is_instance_of::<FlashError>(py));
        assert_eq!(err.get_type(py).name().unwrap().to_string(), "BuildTimeout");
        assert_eq!(
            attr(py, &err, "command").extract::<String>().unwrap(),
            "make -C klipper"
        );
    });
}

#[test]
fn a_katapult_timeout_is_a_flash_error_and_a_command_timeout() {
    Python::initialize();
    Python::attach(|py| {
        let timeout: PyErr = commands::Error::Katapult(katapult::Error::Timeout {
            step: katapult::Step::Write,
            addr: Some(0x0800_2000),
            tries: 3,
            per_try: Duration::from_secs(5),
        })
        .into();
        assert!(timeout.is_instance_of::<FlashError>(py));
        assert!(timeout.is_instance_of::<CommandTimeout>(py));
        assert!(!timeout.is_instance_of::<BuildError>(py));
        assert!(timeout.to_string().contains("0x08002000"));
        assert_eq!(
            attr(py, &timeout, "step").extract::<String>().unwrap(),
            "write"
        );
        let mismatch: PyErr = katapult::Error::McuMismatch {
            device: "/dev/ttyACM0".into(),
            image: "rp2040".into(),
            bootloader: "stm32f103xe".into(),
        }
        .into();
        assert!(mismatch.is_instance_of::<FlashError>(py));
        assert!(!mismatch.is_instance_of::<CommandTimeout>(py));
        assert_eq!(
            attr(py, &mismatch, "device").extract::<String>().unwrap(),
            "/dev/ttyACM0"
        );
    });
}

#[test]
fn refusals_are_preflight_refused_and_say_by_what() {
    Python::initialize();
    Python::attach(|py| {
        let printing: PyErr =
            commands::Error::from(pipeline::Error::Refused(pipeline::Refusal::Printing {
                state: "printing".into(),
            }))
            .into();
        assert!(printing.is_instance_of::<PreflightRefused>(py));
        assert!(!printing.is_instance_of::<ServiceError>(py));
        assert_eq!(
            attr(py, &printing, "exit_code").extract::<i32>().unwrap(),
            3
        );
        let service: PyErr = commands::Error::from(pipeline::Error::Refused(
            pipeline::Refusal::NoServiceControl(service::Error::Command {
                action: "check",
                service: "klipper".into(),
                source: Box::new(process::Error::Failed {
                    cmd: "/bin/stop-klipper --dry-run".into(),
                    status: process::Status::Exited(1),
                    tail: "permission denied".into(),
                }),
            }),
        ))
        .into();
        assert!(service.is_instance_of::<PreflightRefused>(py));
        assert!(service.is_instance_of::<ServiceError>(py));
        assert_eq!(
            attr(py, &service, "command").extract::<String>().unwrap(),
            "/bin/stop-klipper --dry-run"
        );
        assert_eq!(
            attr(py, &service, "exit_status").extract::<i32>().unwrap(),
            1
        );
        let moonraker: PyErr = commands::Error::from(pipeline::Error::Refused(
            pipeline::Refusal::NoMoonraker(moonraker::Error::Unreachable {
                url: "http://127.0.0.1:7125/printer/objects/query".into(),
                reason: "connection refused".into(),
            }),
        ))
        .into();
        assert!(moonraker.is_instance_of::<PreflightRefused>(py));
        assert!(moonraker.is_instance_of::<MoonrakerError>(py));
        assert!(!moonraker.is_instance_of::<ServiceError>(py));
        assert!(moonraker.to_string().contains("--yes"));
    });
}

#[test]
fn usage_errors_exit_2() {
    Python::initialize();
    Python::attach(|py| {
        let unknown: PyErr = commands::Error::Registry(
            crate::registry::Registry::default()
                .get("EBB36")
                .unwrap_err(),
        )
        .into();
        assert!(unknown.is_instance_of::<DeviceNotFound>(py));
        assert_eq!(
            attr(py, &unknown, "device").extract::<String>().unwrap(),
            "EBB36"
        );
        assert_eq!(attr(py, &unknown, "exit_code").extract::<i32>().unwrap(), 2);
        let nomatch: PyErr = commands::Error::from(pipeline::Error::NoMatch {
            pattern: "ebb*".into(),
            candidates: vec!["mcu".into()],
        })
        .into();
        assert!(nomatch.is_instance_of::<DeviceNotFound>(py));
        assert_eq!(attr(py, &nomatch, "exit_code").extract::<i32>().unwrap(), 2);
        let config: PyErr = commands::Error::from(pipeline::Error::Config {
            device: "ebb".into(),
            source: pipeline::ConfigError::Unreadable(crate::kconfig::Error::Missing {
                path: "/s/configs/ebb.config".into(),
            }),
        })
        .into();
        assert!(config.is_instance_of::<ConfigError>(py));
        assert!(config.to_string().contains("kflash config ebb"));
        assert_eq!(attr(py, &config, "exit_code").extract::<i32>().unwrap(), 2);
        let details = attr(py, &config, "details");
        assert_eq!(
            details
                .get_item("device")
                .unwrap()
                .extract::<String>()
                .unwrap(),
            "ebb"
        );
    });
}

#[test]
fn a_damaged_mirror_is_a_kflash_error_naming_the_file() {
    Python::initialize();
    Python::attach(|py| {
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
