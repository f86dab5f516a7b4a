//! The pipeline with recording fakes: every side effect lands in one shared log.

use super::*;
use crate::commands::ExitStatus;
use crate::flash::{self, Endpoint, Method};
use crate::process::{self, Cancel};
use crate::versions::VersionState;
use crate::{discovery, firmware, kconfig, moonraker, service};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Log = Arc<Mutex<Vec<String>>>;

fn log_of(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

struct FakeInventory {
    devices: Vec<DeviceInfo>,
    missing: Vec<String>,
}

impl Inventory for FakeInventory {
    fn devices(&self) -> Result<Vec<DeviceInfo>, crate::registry::Error> {
        Ok(self.devices.clone())
    }
    fn resolve(&self, dev: &DeviceInfo) -> Result<String, discovery::Error> {
        if self.missing.contains(&dev.key) {
            Err(discovery::Error::NotFound {
                pattern: dev.endpoint.describe(),
                present: "(none)".into(),
            })
        } else {
            Ok(dev.endpoint.describe())
        }
    }
}

fn unreachable_moonraker() -> moonraker::Error {
    moonraker::Error::Unreachable {
        url: "http://127.0.0.1:7125/printer/objects/query".into(),
        reason: "connection refused".into(),
    }
}

fn service_error(reason: &str) -> service::Error {
    service::Error::Unavailable {
        service: "klipper".into(),
        reason: reason.into(),
    }
}

struct FakeFirmware {
    /// Where the fake builds put their images.
    out: PathBuf,
    version: String,
    fail: Vec<String>,
    log: Log,
    cancel_during: Option<Cancel>,
    dict: Option<serde_json::Value>,
}

impl Firmware for FakeFirmware {
    fn target_version(&self, _dev: &DeviceInfo) -> Option<String> {
        Some(self.version.clone())
    }
    fn target_dict(&self, _dev: &DeviceInfo) -> Option<serde_json::Value> {
        self.dict.clone()
    }
    fn build(
        &self,
        devs: &[DeviceInfo],
        _c: &Cancel,
        _s: &Sink,
    ) -> Vec<Result<Built, firmware::Error>> {
        if let Some(c) = &self.cancel_during {
            c.cancel();
        }
        devs.iter()
            .map(|d| {
                self.log.lock().unwrap().push(format!("build {}", d.key));
                if self.fail.contains(&d.key) {
                    Err(firmware::Error::Make {
                        key: d.key.clone(),
                        source: process::Error::Failed {
                            cmd: "make -C /klipper".into(),
                            status: process::Status::Exited(2),
                            tail: "src/main.c:1: error: compile error".into(),
                        },
                    })
                } else {
                    let out_dir = self.out.join(&d.key);
                    std::fs::create_dir_all(&out_dir).unwrap();
                    let image = out_dir.join("klipper.bin");
                    std::fs::write(&image, format!("{} image {}", d.key, self.version)).unwrap();
                    let dict = serde_json::json!({
                        "version": self.version,
                        "config": {"MCU": d.target.as_ref().map(|t| t.mcu.clone()).unwrap_or_default()},
                    });
                    std::fs::write(out_dir.join("klipper.dict"), dict.to_string()).unwrap();
                    Ok(Built {
                        version: self.version.clone(),
                        out_dir,
                        image,
                        cached: false,
                    })
                }
            })
            .collect()
    }
}

struct FakeKlippy {
    /// `Err(())`: Moonraker is unreachable.
    state: Result<String, ()>,
    before: BTreeMap<String, String>,
    after: Mutex<BTreeMap<String, String>>,
    not_ready: Mutex<Option<String>>,
    log: Log,
}

impl Klippy for FakeKlippy {
    fn print_state(&self) -> Result<String, moonraker::Error> {
        self.state.clone().map_err(|()| unreachable_moonraker())
    }
    fn mcu_versions(&self) -> Result<BTreeMap<String, String>, moonraker::Error> {
        self.state.as_ref().map_err(|()| unreachable_moonraker())?;
        let restarted = log_of(&self.log).iter().any(|l| l == "start");
        Ok(if restarted {
            self.after.lock().unwrap().clone()
        } else {
            self.before.clone()
        })
    }
    fn wait_ready(&self, t: Duration, _c: &Cancel) -> Result<(), moonraker::Error> {
        if let Some(state) = self.not_ready.lock().unwrap().clone() {
            return Err(moonraker::Error::NotReady {
                url: "http://127.0.0.1:7125/server/info".into(),
                waited: t,
                state,
                message: String::new(),
            });
        }
        self.state
            .as_ref()
            .map(|_| ())
            .map_err(|()| unreachable_moonraker())
    }
}

struct FakeService {
    log: Log,
    check_fails: bool,
    start_fails: bool,
}

struct FakeStopped {
    log: Log,
    start_fails: bool,
    done: bool,
}

impl Stopped for FakeStopped {
    fn restart(mut self: Box<Self>) -> Result<Duration, service::Error> {
        self.done = true;
        self.log.lock().unwrap().push("start".into());
        if self.start_fails {
            Err(service_error("start command failed"))
        } else {
            Ok(Duration::from_secs(1))
        }
    }
}

impl Drop for FakeStopped {
    fn drop(&mut self) {
        if !self.done {
            self.log.lock().unwrap().push("start (guard drop)".into());
        }
    }
}

impl Service for FakeService {
    fn check(&self) -> Result<(), service::Error> {
        if self.check_fails {
            Err(service_error("sudo: a password is required"))
        } else {
            Ok(())
        }
    }
    fn stop(&self) -> Result<Box<dyn Stopped>, service::Error> {
        self.log.lock().unwrap().push("stop".into());
        Ok(Box::new(FakeStopped {
            log: self.log.clone(),
            start_fails: self.start_fails,
            done: false,
        }))
    }
}

struct FakeWatchdog(Log);
impl Watchdog for FakeWatchdog {
    fn arm(&self) -> Result<(), service::Error> {
        self.0.lock().unwrap().push("arm".into());
        Ok(())
    }
    fn disarm(&self) {
        self.0.lock().unwrap().push("disarm".into());
    }
}

struct FakeFlash {
    log: Log,
    fail: Vec<String>,
    cancel_on: Option<(String, Cancel)>,
    panic_on: Option<String>,
}

impl Flash for FakeFlash {
    fn check(&self, _dev: &DeviceInfo) -> Result<(), flash::Error> {
        Ok(())
    }
    fn flash(
        &self,
        dev: &DeviceInfo,
        _b: &Built,
        cancel: &Cancel,
        _s: &Sink,
    ) -> Result<flash::Flashed, flash::Failure> {
        self.log.lock().unwrap().push(format!("flash {}", dev.key));
        assert!(
            self.panic_on.as_deref() != Some(dev.key.as_str()),
            "flasher bug"
        );
        if let Some((key, c)) = &self.cancel_on {
            if key == &dev.key {
                c.cancel();
                return Err(flash::Failure {
                    error: flash::Error::Cancelled,
                    hint: None,
                    tried: vec![],
                });
            }
        }
        let _ = cancel;
        if self.fail.contains(&dev.key) {
            return Err(flash::Failure {
                error: flash::Error::DidNotReturn(Duration::from_secs(30)),
                hint: Some("power-cycle".into()),
                tried: vec![Method::Katapult],
            });
        }
        Ok(flash::Flashed {
            method: Method::Katapult,
            path: None,
        })
    }
}

fn device(key: &str, link: Link) -> DeviceInfo {
    let endpoint = match link {
        Link::Can => Endpoint::Can {
            interface: "can0".into(),
            uuid: format!("{key}uuid"),
        },
        Link::Linux => Endpoint::Linux {
            path: "/tmp/klipper_host_mcu".into(),
        },
        _ => Endpoint::Serial {
            path: format!("/dev/serial/by-id/{key}"),
        },
    };
    DeviceInfo {
        key: key.into(),
        name: None,
        method: Method::Auto,
        endpoint,
        baud: None,
        mcu_section: if key == "main" {
            "mcu".into()
        } else {
            format!("mcu {key}")
        },
        config: format!("/state/configs/{key}.config").into(),
        target: Ok(Target {
            mcu: "stm32f446xx".into(),
            link,
        }),
    }
}

struct World {
    log: Log,
    deps: Deps,
    printer: Arc<FakeKlippy>,
    _dir: tempfile::TempDir,
}

#[derive(Default)]
struct Setup {
    state: Option<Result<String, ()>>,
    build_fail: Vec<String>,
    flash_fail: Vec<String>,
    missing: Vec<String>,
    check_fails: bool,
    start_fails: bool,
    cancel_in_build: Option<Cancel>,
    cancel_on: Option<(String, Cancel)>,
    panic_on: Option<String>,
    before: Vec<(&'static str, &'static str)>,
    target_dict: Option<serde_json::Value>,
}

const V: &str = "v0.13.0-740-gabc";

fn world(devices: Vec<DeviceInfo>, s: Setup) -> World {
    let log: Log = Arc::default();
    let dir = tempfile::tempdir().unwrap();
    let after: BTreeMap<String, String> = devices
        .iter()
        .map(|d| (d.mcu_section.clone(), V.to_owned()))
        .collect();
    let printer = Arc::new(FakeKlippy {
        state: s.state.unwrap_or(Ok("standby".into())),
        before: s
            .before
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        after: Mutex::new(after),
        not_ready: Mutex::new(None),
        log: log.clone(),
    });
    let deps = Deps {
        inventory: Arc::new(FakeInventory {
            devices,
            missing: s.missing,
        }),
        firmware: Arc::new(FakeFirmware {
            out: dir.path().join("out"),
            version: V.into(),
            fail: s.build_fail,
            log: log.clone(),
            cancel_during: s.cancel_in_build,
            dict: s.target_dict,
        }),
        klippy: printer.clone(),
        service: Arc::new(FakeService {
            log: log.clone(),
            check_fails: s.check_fails,
            start_fails: s.start_fails,
        }),
        flasher: Arc::new(FakeFlash {
            log: log.clone(),
            fail: s.flash_fail,
            cancel_on: s.cancel_on,
            panic_on: s.panic_on,
        }),
        watchdog: Arc::new(FakeWatchdog(log.clone())),
        compare: |a, b| {
            if a == b {
                VersionState::Current
            } else {
                VersionState::Outdated
            }
        },
        state: crate::registry::StateDir::at(dir.path().join("state")),
        lock_path: dir.path().join("lock"),
        runs_dir: dir.path().join("runs"),
        flashed_dir: dir.path().join("flashed"),
        stagger: Duration::ZERO,
        ready_timeout: Duration::from_secs(1),
    };
    World {
        log,
        deps,
        printer,
        _dir: dir,
    }
}

fn count(log: &[String], what: &str) -> usize {
    log.iter().filter(|l| l.starts_with(what)).count()
}

fn run(w: &World, opts: &Options) -> Result<Report, Error> {
    flash_all(&w.deps, opts, &Cancel::new(), &crate::events::discard())
}

fn yes() -> Options {
    Options {
        yes: true,
        ..Options::default()
    }
}

#[test]
fn stops_once_flashes_in_safe_order_restarts_once_and_verifies() {
    let w = world(
        vec![
            device("main", Link::Serial),
            device("host", Link::Linux),
            device("bridge", Link::UsbCanBridge),
            device("ebb", Link::Can),
        ],
        Setup::default(),
    );
    let report = run(&w, &Options::default()).unwrap();
    let log = log_of(&w.log);
    let flashes: Vec<&String> = log.iter().filter(|l| l.starts_with("flash ")).collect();
    assert_eq!(
        flashes,
        ["flash ebb", "flash main", "flash bridge", "flash host"]
    );
    assert_eq!(count(&log, "stop"), 1);
    assert_eq!(count(&log, "start"), 1);
    let stop = log.iter().position(|l| l == "stop").unwrap();
    let arm = log.iter().position(|l| l == "arm").unwrap();
    let start = log.iter().position(|l| l == "start").unwrap();
    let disarm = log.iter().position(|l| l == "disarm").unwrap();
    let last_build = log.iter().rposition(|l| l.starts_with("build")).unwrap();
    assert!(
        last_build < arm && arm < stop && stop < start && start < disarm,
        "{log:?}"
    );
    assert!(report.ok, "{report:?}");
    assert_eq!(ExitStatus::of_report(&report), ExitStatus::Success);
    assert!(report.service.stopped && report.service.restarted);
    assert!(report.devices.iter().all(|d| d.verify == "pass"));
    assert_eq!(report.target_version.as_deref(), Some(V));
    let record = report.record.clone().unwrap();
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(saved["ok"], true);
    assert_eq!(saved["devices"].as_array().unwrap().len(), 4);
}

#[test]
fn one_failing_device_does_not_stop_the_others() {
    let w = world(
        vec![
            device("a", Link::Serial),
            device("b", Link::Serial),
            device("c", Link::Serial),
        ],
        Setup {
            flash_fail: vec!["b".into()],
            ..Setup::default()
        },
    );
    let report = run(&w, &Options::default()).unwrap();
    let log = log_of(&w.log);
    assert_eq!(count(&log, "flash "), 3);
    assert_eq!(count(&log, "start"), 1);
    assert!(!report.ok);
    assert_eq!(ExitStatus::of_report(&report), ExitStatus::Failure);
    let b = &report.devices[1];
    assert_eq!((b.flash.as_str(), b.verify.as_str()), ("fail", "skip"));
    assert_eq!(b.hint.as_deref(), Some("power-cycle"));
    assert_eq!(report.devices[2].verify, "pass");
}

#[test]
fn printing_refuses_and_stops_nothing() {
    for state in ["printing", "paused"] {
        let w = world(
            vec![device("main", Link::Serial)],
            Setup {
                state: Some(Ok(state.into())),
                ..Setup::default()
            },
        );
        let err = run(&w, &yes()).unwrap_err();
        assert!(
            matches!(err, Error::Refused(Refusal::Printing { state: ref s }) if s == state),
            "{err}"
        );
        let log = log_of(&w.log);
        assert_eq!(count(&log, "stop"), 0);
        assert_eq!(count(&log, "build"), 0);
    }
}

#[test]
fn moonraker_unreachable_needs_yes() {
    let setup = || Setup {
        state: Some(Err(())),
        ..Setup::default()
    };
    let w = world(vec![device("main", Link::Serial)], setup());
    let err = run(&w, &Options::default()).unwrap_err();
    assert!(
        matches!(err, Error::Refused(Refusal::NoMoonraker(_))),
        "{err}"
    );
    assert!(err.to_string().contains("--yes"), "{err}");
    assert_eq!(count(&log_of(&w.log), "stop"), 0);

    let w = world(vec![device("main", Link::Serial)], setup());
    let report = run(&w, &yes()).unwrap();
    assert_eq!(count(&log_of(&w.log), "stop"), 1);
    assert_eq!(count(&log_of(&w.log), "start"), 1);
    // Verification cannot be done without Moonraker: a failure the user sees.
    assert_eq!(report.devices[0].flash, "pass");
    assert_eq!(report.devices[0].verify, "fail");
}

#[test]
fn no_service_control_refuses() {
    let w = world(
        vec![device("main", Link::Serial)],
        Setup {
            check_fails: true,
            ..Setup::default()
        },
    );
    let err = run(&w, &Options::default()).unwrap_err();
    assert!(
        matches!(err, Error::Refused(Refusal::NoServiceControl(_))),
        "{err}"
    );
    assert!(err.to_string().contains("password"), "{err}");
    assert_eq!(count(&log_of(&w.log), "stop"), 0);
}

#[test]
fn lock_held_refuses() {
    let w = world(vec![device("main", Link::Serial)], Setup::default());
    let _held = RunLock::acquire(&w.deps.lock_path).unwrap();
    let err = run(&w, &Options::default()).unwrap_err();
    assert!(matches!(err, Error::Refused(Refusal::LockHeld(_))), "{err}");
    assert!(err.to_string().contains("another kflash run"), "{err}");
    assert_eq!(count(&log_of(&w.log), "stop"), 0);
}

#[test]
fn all_builds_failing_stops_nothing() {
    let w = world(
        vec![device("a", Link::Serial), device("b", Link::Can)],
        Setup {
            build_fail: vec!["a".into(), "b".into()],
            ..Setup::default()
        },
    );
    let report = run(&w, &Options::default()).unwrap();
    assert_eq!(count(&log_of(&w.log), "stop"), 0);
    assert!(!report.service.stopped);
    assert_eq!(ExitStatus::of_report(&report), ExitStatus::Failure);
    assert!(report
        .devices
        .iter()
        .all(|d| d.build == "fail" && d.flash == "skip"));
}

#[test]
fn devices_that_built_are_flashed_when_another_build_fails() {
    let w = world(
        vec![device("a", Link::Serial), device("b", Link::Serial)],
        Setup {
            build_fail: vec!["a".into()],
            ..Setup::default()
        },
    );
    let report = run(&w, &Options::default()).unwrap();
    let log = log_of(&w.log);
    assert_eq!(count(&log, "flash "), 1);
    assert!(log.contains(&"flash b".to_owned()));
    assert_eq!(ExitStatus::of_report(&report), ExitStatus::Failure);
}

#[test]
fn only_outdated_skips_current_devices_and_plan_says_why() {
    let w = world(
        vec![device("main", Link::Serial), device("ebb", Link::Can)],
        Setup {
            before: vec![("mcu", V), ("mcu ebb", "v0.12.0-1-gold")],
            ..Setup::default()
        },
    );
    let opts = Options {
        only_outdated: true,
        ..Options::default()
    };
    let p = plan(&w.deps, &opts, &crate::events::discard())
        .unwrap()
        .plan;
    assert_eq!(p.devices[0].action, "skip");
    assert_eq!(p.devices[0].state, "current");
    assert_eq!(p.devices[1].action, "flash");
    assert_eq!(p.devices[1].state, "outdated");
    assert!(log_of(&w.log).is_empty(), "plan had side effects");
    let report = run(&w, &opts).unwrap();
    assert_eq!(
        log_of(&w.log)
            .iter()
            .filter(|l| l.starts_with("flash "))
            .count(),
        1
    );
    assert!(report.ok);
}

#[test]
fn nothing_to_do_stops_nothing() {
    let w = world(
        vec![device("main", Link::Serial)],
        Setup {
            before: vec![("mcu", V)],
            ..Setup::default()
        },
    );
    let report = run(
        &w,
        &Options {
            only_outdated: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(report.ok);
    assert_eq!(ExitStatus::of_report(&report), ExitStatus::Success);
    assert!(log_of(&w.log).is_empty());
}

#[test]
fn restart_failure_is_exit_4_and_watchdog_stays_armed() {
    let w = world(
        vec![device("main", Link::Serial)],
        Setup {
            start_fails: true,
            ..Setup::default()
        },
    );
    let report = run(&w, &Options::default()).unwrap();
    assert_eq!(ExitStatus::of_report(&report), ExitStatus::NotRestarted);
    assert!(!report.service.restarted);
    assert_eq!(count(&log_of(&w.log), "disarm"), 0);
}

#[test]
fn cancel_in_stop_window_restarts_and_reports() {
    let cancel = Cancel::new();
    let w = world(
        vec![device("a", Link::Serial), device("b", Link::Serial)],
        Setup {
            cancel_on: Some(("a".into(), cancel.clone())),
            ..Setup::default()
        },
    );
    let err = flash_all(
        &w.deps,
        &Options::default(),
        &cancel,
        &crate::events::discard(),
    )
    .unwrap_err();
    let Error::Cancelled {
        report: Some(report),
    } = err
    else {
        panic!("expected a cancelled report, got {err}");
    };
    let log = log_of(&w.log);
    assert_eq!(count(&log, "start"), 1);
    assert!(!log.contains(&"flash b".to_owned()), "{log:?}");
    assert!(report.cancelled && report.service.restarted && !report.ok);
    assert!(report.record.is_some());
}

#[test]
fn cancel_during_build_stops_nothing() {
    let cancel = Cancel::new();
    let w = world(
        vec![device("a", Link::Serial)],
        Setup {
            cancel_in_build: Some(cancel.clone()),
            ..Setup::default()
        },
    );
    let err = flash_all(
        &w.deps,
        &Options::default(),
        &cancel,
        &crate::events::discard(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err}");
    assert_eq!(count(&log_of(&w.log), "stop"), 0);
}

#[test]
fn a_panicking_flasher_still_restarts() {
    let w = world(
        vec![device("a", Link::Serial)],
        Setup {
            panic_on: Some("a".into()),
            ..Setup::default()
        },
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&w, &Options::default())
    }));
    assert!(result.is_err());
    assert_eq!(
        log_of(&w.log)
            .iter()
            .filter(|l| l.starts_with("start"))
            .count(),
        1
    );
}

#[test]
fn unplugged_device_fails_alone() {
    let w = world(
        vec![device("a", Link::Serial), device("b", Link::Serial)],
        Setup {
            missing: vec!["a".into()],
            ..Setup::default()
        },
    );
    let report = run(&w, &Options::default()).unwrap();
    assert_eq!(report.devices[0].flash, "fail");
    assert!(report.devices[0]
        .error
        .as_deref()
        .unwrap()
        .contains("no serial device matches"));
    assert_eq!(report.devices[1].verify, "pass");
    assert_eq!(ExitStatus::of_report(&report), ExitStatus::Failure);
}

#[test]
fn config_problem_is_a_configuration_error_before_anything() {
    let mut bad = device("a", Link::Serial);
    bad.target = Err(ConfigError::Unreadable(kconfig::Error::Missing {
        path: "/state/configs/a.config".into(),
    }));
    let w = world(vec![bad, device("b", Link::Serial)], Setup::default());
    let err = run(&w, &Options::default()).unwrap_err();
    assert!(
        matches!(err, Error::Config { ref device, .. } if device == "a"),
        "{err}"
    );
    assert!(err.to_string().contains("kflash config a"), "{err}");
    assert!(log_of(&w.log).is_empty());
}

#[test]
fn selection_by_glob_and_unknown_key() {
    let all = vec![
        device("ebb36", Link::Can),
        device("ebb42", Link::Can),
        device("main", Link::Serial),
    ];
    let got = select(all.clone(), Some(&["ebb*".to_owned()])).unwrap();
    assert_eq!(
        got.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(),
        ["ebb36", "ebb42"]
    );
    let err = select(all, Some(&["nope".to_owned()])).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("nope") && msg.contains("ebb36, ebb42, main"),
        "{msg}"
    );
}

#[test]
fn verify_catches_a_board_still_on_the_old_version() {
    let w = world(vec![device("main", Link::Serial)], Setup::default());
    w.printer
        .after
        .lock()
        .unwrap()
        .insert("mcu".into(), "v0.12.0-1-gold".into());
    let report = run(&w, &Options::default()).unwrap();
    assert_eq!(report.devices[0].verify, "fail");
    assert_eq!(
        report.devices[0].version_after.as_deref(),
        Some("v0.12.0-1-gold")
    );
    assert_eq!(ExitStatus::of_report(&report), ExitStatus::Failure);
}

#[test]
fn boards_that_flashed_are_not_blamed_when_klippy_waits_for_a_failed_one() {
    let w = world(
        vec![device("main", Link::Serial), device("ebb", Link::Can)],
        Setup {
            flash_fail: vec!["main".into()],
            ..Setup::default()
        },
    );
    // Klippy never gets ready and reports no versions.
    w.printer.after.lock().unwrap().clear();
    *w.printer.not_ready.lock().unwrap() = Some("startup".into());
    let report = run(&w, &Options::default()).unwrap();
    let main = &report.devices[0];
    let ebb = &report.devices[1];
    assert_eq!(main.flash, "fail");
    assert_eq!((ebb.flash.as_str(), ebb.verify.as_str()), ("pass", "skip"));
    assert!(ebb.hint.as_deref().unwrap().contains("another MCU"));
    assert_eq!(ExitStatus::of_report(&report), ExitStatus::Failure);
}

#[test]
fn plan_tells_a_protocol_change_from_a_version_string_change() {
    let old = "v0.12.0-1-g1234567";
    let flashed = serde_json::json!({"version": old, "commands": {"a": 1}, "config": {"MCU": "x"}});
    for (commands, expect) in [
        (serde_json::json!({"a": 1}), "version string only"),
        (serde_json::json!({"a": 1, "b": 2}), "protocol changed"),
    ] {
        let w = world(
            vec![device("main", Link::Serial)],
            Setup {
                before: vec![("mcu", old)],
                target_dict: Some(
                    serde_json::json!({"version": V, "commands": commands, "config": {"MCU": "x"}}),
                ),
                ..Setup::default()
            },
        );
        std::fs::create_dir_all(&w.deps.flashed_dir).unwrap();
        std::fs::write(w.deps.flashed_dir.join("main.dict"), flashed.to_string()).unwrap();
        let p = plan(&w.deps, &Options::default(), &crate::events::discard())
            .unwrap()
            .plan;
        assert!(
            p.devices[0].reason.contains(expect),
            "{:?}",
            p.devices[0].reason
        );
    }
}

#[test]
fn build_returns_every_entry_with_the_first_failure() {
    let w = world(
        vec![device("a", Link::Serial), device("b", Link::Serial)],
        Setup {
            build_fail: vec!["b".into()],
            ..Setup::default()
        },
    );
    let err = build(&w.deps, None, &Cancel::new(), &crate::events::discard()).unwrap_err();
    let Error::Build { source, results } = &err else {
        panic!("expected a build error, got {err}");
    };
    assert_eq!(source.key(), "b");
    assert!(matches!(**source, firmware::Error::Make { .. }), "{source}");
    let builds: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r.key.as_str(), r.build.as_str()))
        .collect();
    assert_eq!(builds, [("a", "pass"), ("b", "fail")]);
    assert_eq!(count(&log_of(&w.log), "stop"), 0);
}
