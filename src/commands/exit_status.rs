//! The one exit status of every command, decided here from a run's report or from an
//! error, and nowhere else (the CLI and the detached helper both ask for it).
//!
//! Plain values; thread-safe.

use std::fmt;

use super::Error;
use crate::pipeline::{self, Report};

/// How a command ended, as the process exit code scripts rely on (DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitStatus {
    /// 0: all good, or nothing to do.
    Success = 0,
    /// 1: some device failed (klipper was restarted), or the command failed.
    Failure = 1,
    /// 2: usage or configuration error; nothing was stopped.
    Usage = 2,
    /// 3: refused by pre-flight (printing, lock held, no service control, no Moonraker).
    Refused = 3,
    /// 4: klipper was stopped and could not be started again.
    NotRestarted = 4,
}

impl ExitStatus {
    /// Every status, in code order.
    pub const ALL: [ExitStatus; 5] = [
        ExitStatus::Success,
        ExitStatus::Failure,
        ExitStatus::Usage,
        ExitStatus::Refused,
        ExitStatus::NotRestarted,
    ];

    /// The process exit code.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The status of a code (`None` for codes kflash never exits with).
    pub fn from_code(code: i64) -> Option<ExitStatus> {
        ExitStatus::ALL
            .into_iter()
            .find(|s| i64::from(s.code()) == code)
    }

    /// `SUCCESS`, `FAILURE`, `USAGE`, `REFUSED`, `NOT_RESTARTED`.
    pub fn name(self) -> &'static str {
        match self {
            ExitStatus::Success => "SUCCESS",
            ExitStatus::Failure => "FAILURE",
            ExitStatus::Usage => "USAGE",
            ExitStatus::Refused => "REFUSED",
            ExitStatus::NotRestarted => "NOT_RESTARTED",
        }
    }

    /// The status of a run that produced a report: `ok`, and whether klipper was stopped
    /// and started again.
    pub fn of_outcome(ok: bool, stopped: bool, restarted: bool) -> ExitStatus {
        if stopped && !restarted {
            ExitStatus::NotRestarted
        } else if ok {
            ExitStatus::Success
        } else {
            ExitStatus::Failure
        }
    }

    /// The status of a run's report (a cancelled run is never a success).
    pub fn of_report(report: &Report) -> ExitStatus {
        let status =
            ExitStatus::of_outcome(report.ok, report.service.stopped, report.service.restarted);
        if report.cancelled {
            status.max(ExitStatus::Failure)
        } else {
            status
        }
    }

    /// The status of a command that failed.
    pub fn of_error(err: &Error) -> ExitStatus {
        match err {
            Error::Registry(_)
            | Error::EndpointCount
            | Error::ReadConfig { .. }
            | Error::NotAConfig { .. } => ExitStatus::Usage,
            Error::Run(e) => match &**e {
                pipeline::Error::Registry(_)
                | pipeline::Error::NoMatch { .. }
                | pipeline::Error::Config { .. }
                | pipeline::Error::CannotFlash { .. }
                | pipeline::Error::Lock(_) => ExitStatus::Usage,
                pipeline::Error::Refused(_) => ExitStatus::Refused,
                pipeline::Error::Cancelled {
                    report: Some(report),
                } => ExitStatus::of_report(report),
                pipeline::Error::Build { .. } | pipeline::Error::Cancelled { report: None } => {
                    ExitStatus::Failure
                }
            },
            Error::Katapult(_) | Error::WriteConfig { .. } | Error::WriteRecord { .. } => {
                ExitStatus::Failure
            }
        }
    }
}

impl From<ExitStatus> for i32 {
    fn from(status: ExitStatus) -> i32 {
        status.code()
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{Refusal, ServiceReport};

    #[allow(clippy::fn_params_excessive_bools)]
    fn report(ok: bool, stopped: bool, restarted: bool, cancelled: bool) -> Report {
        Report {
            ok,
            target_version: None,
            service: ServiceReport {
                stopped,
                restarted,
                ..ServiceReport::default()
            },
            devices: Vec::new(),
            cancelled,
            prewarm: None,
            started: String::new(),
            finished: String::new(),
            record: None,
            recovered: Vec::new(),
        }
    }

    #[test]
    fn a_lock_that_cannot_be_opened_is_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "").unwrap();
        let err = crate::flash_run::RunLock::acquire(&blocker.join("lock")).unwrap_err();
        let err = crate::commands::Error::from(err);
        assert_eq!(ExitStatus::of_error(&err), ExitStatus::Usage, "{err}");
    }

    #[test]
    fn reports_decide_0_1_and_4() {
        assert_eq!(
            ExitStatus::of_report(&report(true, true, true, false)),
            ExitStatus::Success
        );
        assert_eq!(
            ExitStatus::of_report(&report(true, false, false, false)),
            ExitStatus::Success
        );
        assert_eq!(
            ExitStatus::of_report(&report(false, true, true, false)),
            ExitStatus::Failure
        );
        assert_eq!(
            ExitStatus::of_report(&report(false, true, false, false)),
            ExitStatus::NotRestarted
        );
        assert_eq!(
            ExitStatus::of_report(&report(true, true, true, true)),
            ExitStatus::Failure
        );
    }

    #[test]
    fn errors_decide_1_2_and_3() {
        let usage = Error::Registry(registry_error());
        assert_eq!(ExitStatus::of_error(&usage), ExitStatus::Usage);
        let refused = Error::from(pipeline::Error::Refused(Refusal::Printing {
            state: "printing".into(),
        }));
        assert_eq!(ExitStatus::of_error(&refused), ExitStatus::Refused);
        let cancelled = Error::from(pipeline::Error::Cancelled {
            report: Some(Box::new(report(false, true, false, true))),
        });
        assert_eq!(ExitStatus::of_error(&cancelled), ExitStatus::NotRestarted);
        assert_eq!(
            ExitStatus::of_error(&Error::from(pipeline::Error::Cancelled { report: None })),
            ExitStatus::Failure
        );
        for status in ExitStatus::ALL {
            assert_eq!(
                ExitStatus::from_code(i64::from(status.code())),
                Some(status)
            );
        }
        assert_eq!(ExitStatus::from_code(7), None);
    }

    fn registry_error() -> crate::registry::Error {
        crate::registry::validate_key("a/b").unwrap_err()
    }
}
