//! The pipeline with recording fakes: every side effect lands in one shared log.

use super::pending;
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

/// Boards sitting in a bootloader, by key (shared by the inventory and the flasher: a
/// flash takes a board out of Katapult).
type Boot = Arc<Mutex<BTreeMap<String, Bootloader>>>;
/// Each interface's coming states (the last one stays).
type Ifaces = Arc<Mutex<BTreeMap<String, Vec<InterfaceState>>>>;

struct FakeInventory {
    devices: Vec<DeviceInfo>,
    missing: Vec<String>,
    boot: Boot,
    ifaces: Ifaces,
}

impl Inventory for FakeInventory {
    fn devices(&self) -> Result<Vec<DeviceInfo>, crate::registry::Error> {
        Ok(self.devices.clone())
    }
    fn bootloader(&self, dev: &DeviceInfo) -> Option<Bootloader> {
        self.boot.lock().unwrap().get(&dev.key).cloned()
    }
    fn identity(&self, dev: &DeviceInfo) -> Option<discovery::Identity> {
        matches!(dev.endpoint, Endpoint::Serial { .. }).then(|| discovery::Identity {
            by_path: Some(format!("usb-0:{}", dev.key)),
            ..discovery::Identity::default()
        })
    }
    fn interface(&self, name: &str) -> InterfaceState {
        let mut all = self.ifaces.lock().unwrap();
        match all.get_mut(name) {
            Some(states) if states.len() > 1 => states.remove(0),
            Some(states) => states[0],
            None => InterfaceState::Up,
        }
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
    chips: BTreeMap<String, String>,
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
    fn mcu_chips(&self) -> BTreeMap<String, String> {
        self.chips.clone()
    }
    fn wait_ready(&self, t: Duration, _c: &Cancel) -> Result<(), moonraker::Error> {
        self.log.lock().unwrap().push("wait ready".into());
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

struct FakeWatchdog {
    log: Log,
    /// `launch` or `arm` fails.
    fails: Option<&'static str>,
}
impl FakeWatchdog {
    fn step(&self, what: &'static str) -> Result<(), service::Error> {
        self.log.lock().unwrap().push(what.into());
        if self.fails == Some(what) {
            return Err(service::Error::Watchdog {
                reason: format!("cannot {what} it"),
                log: "watchdog.log".into(),
            });
        }
        Ok(())
    }
}
impl Watchdog for FakeWatchdog {
    fn launch(&self) -> Result<(), service::Error> {
        self.step("launch")
    }
    fn arm(&self) -> Result<(), service::Error> {
        self.step("arm")
    }
    fn disarm(&self) {
        self.log.lock().unwrap().push("disarm".into());
    }
}

struct FakeFlash {
    log: Log,
    fail: Vec<String>,
    cancel_on: Option<(String, Cancel)>,
    panic_on: Option<String>,
    /// These devices each wait (up to 20 s) until all of them are being flashed.
    meet: Vec<String>,
    met: Arc<(Mutex<usize>, std::sync::Condvar)>,
    /// While this board is written, interrupt the run once (or twice: abandon).
    interrupt_on: Option<(String, Cancel, bool)>,
    boot: Boot,
}

impl Flash for FakeFlash {
    fn check(&self, _dev: &DeviceInfo) -> Result<(), flash::Error> {
        Ok(())
    }
    fn flash(
        &self,
        dev: &DeviceInfo,
        b: &Built,
        cancel: &Cancel,
        _s: &Sink,
    ) -> Result<flash::Flashed, flash::Failure> {
        self.log.lock().unwrap().push(format!("flash {}", dev.key));
        if self.meet.contains(&dev.key) {
            let (count, cv) = &*self.met;
            let mut n = count.lock().unwrap();
            *n += 1;
            cv.notify_all();
            let (_n, waited) = cv
                .wait_timeout_while(n, Duration::from_secs(20), |n| *n < self.meet.len())
                .unwrap();
            if waited.timed_out() {
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("{} flashed alone", dev.key));
            }
        }
        self.log
            .lock()
            .unwrap()
            .push(format!("image {} {}", dev.key, b.image.display()));
        if let Some((key, run, twice)) = &self.interrupt_on {
            if key == &dev.key {
                run.cancel();
                if *twice {
                    run.abandon();
                }
                if cancel.is_cancelled() {
                    return Err(flash::Failure {
                        error: flash::Error::Cancelled,
                        hint: None,
                        tried: vec![Method::Katapult],
                    });
                }
            }
        }
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
        self.boot.lock().unwrap().remove(&dev.key);
        Ok(flash::Flashed {
            method: Method::Katapult,
            path: None,
        })
    }
    fn finish_timeout(&self) -> Duration {
        Duration::from_secs(5)
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
    boot: Boot,
    ifaces: Ifaces,
    dir: tempfile::TempDir,
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
    watchdog_fails: Option<&'static str>,
    prewarm: Option<Arc<dyn Prewarm>>,
    flash_parallel: bool,
    meet: Vec<String>,
    chips: Vec<(&'static str, &'static str)>,
    interrupt_on: Option<(String, Cancel, bool)>,
}

const V: &str = "v0.13.0-740-gabc";

fn world(devices: Vec<DeviceInfo>, s: Setup) -> World {
    let log: Log = Arc::default();
    let dir = tempfile::tempdir().unwrap();
    let after: BTreeMap<String, String> = devices
        .iter()
        .map(|d| (d.mcu_section.clone(), V.to_owned()))
        .collect();
    let boot: Boot = Arc::default();
    let ifaces: Ifaces = Arc::default();
    let printer = Arc::new(FakeKlippy {
        state: s.state.unwrap_or(Ok("standby".into())),
        chips: s
            .chips
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
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
            boot: boot.clone(),
            ifaces: ifaces.clone(),
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
            meet: s.meet,
            met: Arc::default(),
            interrupt_on: s.interrupt_on,
            boot: boot.clone(),
        }),
        watchdog: Arc::new(FakeWatchdog {
            log: log.clone(),
            fails: s.watchdog_fails,
        }),
        prewarm: s.prewarm,
        flash_parallel: s.flash_parallel,
        compare: |a, b| {
            if a == b {
                VersionState::Current
            } else {
                VersionState::Outdated
            }
        },
        state: crate::registry::StateDir::at(dir.path().join("state")),
        flashed_dir: dir.path().join("flashed"),
        stagger: Duration::ZERO,
        ready_timeout: Duration::from_secs(1),
        auto_rollback: false,
    };
    World {
        log,
        deps,
        printer,
        boot,
        ifaces,
        dir,
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
    let launch = log.iter().position(|l| l == "launch").unwrap();
    let first_build = log.iter().position(|l| l.starts_with("build")).unwrap();
    assert!(launch < first_build, "{log:?}");
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
fn a_watchdog_that_cannot_be_launched_refuses_before_building() {
    let w = world(
        vec![device("main", Link::Serial)],
        Setup {
            watchdog_fails: Some("launch"),
            ..Setup::default()
        },
    );
    let err = run(&w, &Options::default()).unwrap_err();
    assert!(
        matches!(err, Error::Refused(Refusal::NoWatchdog(_))),
        "{err}"
    );
    assert!(err.to_string().contains("cannot launch it"), "{err}");
    let log = log_of(&w.log);
    assert_eq!(count(&log, "stop"), 0);
    assert_eq!(count(&log, "build"), 0, "{log:?}");
}

#[test]
fn a_watchdog_that_cannot_be_armed_stops_nothing() {
    let w = world(
        vec![device("main", Link::Serial)],
        Setup {
            watchdog_fails: Some("arm"),
            ..Setup::default()
        },
    );
    let report = run(&w, &Options::default()).unwrap();
    let log = log_of(&w.log);
    assert_eq!(count(&log, "stop"), 0, "{log:?}");
    assert_eq!(count(&log, "flash"), 0, "{log:?}");
    assert!(!report.ok && !report.service.stopped);
    let why = report.service.error.unwrap();
    assert!(
        why.contains("not stopped") && why.contains("cannot arm it"),
        "{why}"
    );
    assert_eq!(report.devices[0].flash, "fail");
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
    let flashed =
        serde_json::json!({"version": old, "commands": {"a": 1}, "config": {"MCU": "stm32f446xx"}});
    for (commands, expect) in [
        (serde_json::json!({"a": 1}), "version string only"),
        (serde_json::json!({"a": 1, "b": 2}), "protocol changed"),
    ] {
        let w = world(
            vec![device("main", Link::Serial)],
            Setup {
                before: vec![("mcu", old)],
                target_dict: Some(
                    serde_json::json!({"version": V, "commands": commands, "config": {"MCU": "stm32f446xx"}}),
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

/// A sink that keeps every event.
fn recording_sink() -> (Sink, Arc<Mutex<Vec<crate::events::Event>>>) {
    let events: Arc<Mutex<Vec<crate::events::Event>>> = Arc::default();
    let keep = events.clone();
    (
        Arc::new(move |e| keep.lock().unwrap().push(e.clone())),
        events,
    )
}

#[test]
fn the_outage_runs_from_the_stop_until_klippy_is_ready_and_names_its_parts() {
    let w = world(vec![device("main", Link::Serial)], Setup::default());
    let report = run(&w, &Options::default()).unwrap();
    let log = log_of(&w.log);
    let start = log.iter().position(|l| l == "start").unwrap();
    let ready = log.iter().position(|l| l == "wait ready").unwrap();
    assert!(start < ready, "{log:?}");
    let svc = &report.service;
    assert!(svc.ready && svc.startup_s.is_some(), "{svc:?}");
    let parts = svc.stop_s + svc.flash_s + svc.start_s + svc.startup_s.unwrap();
    assert!(svc.downtime_s + 0.15 >= parts, "{svc:?}");
    let words = svc.outage.as_deref().unwrap();
    assert!(
        words.starts_with("the printer was unavailable for ") && words.contains("klippy start-up"),
        "{words}"
    );
}

#[test]
fn klippy_is_waited_for_even_when_every_flash_failed_and_the_outage_says_it_gave_up() {
    let w = world(
        vec![device("main", Link::Serial)],
        Setup {
            flash_fail: vec!["main".into()],
            ..Setup::default()
        },
    );
    *w.printer.not_ready.lock().unwrap() = Some("startup".into());
    let report = run(&w, &Options::default()).unwrap();
    assert_eq!(count(&log_of(&w.log), "wait ready"), 1);
    let svc = &report.service;
    assert!(!svc.ready && svc.startup_s.is_some(), "{svc:?}");
    let words = svc.outage.as_deref().unwrap();
    assert!(
        words.contains("at least") && words.contains("still not ready"),
        "{words}"
    );
}

#[test]
fn a_cancelled_run_does_not_wait_for_klippy_and_says_so() {
    let cancel = Cancel::new();
    let w = world(
        vec![device("a", Link::Serial), device("b", Link::Serial)],
        Setup {
            cancel_on: Some(("a".into(), cancel.clone())),
            ..Setup::default()
        },
    );
    let err = flash_all(&w.deps, &yes(), &cancel, &crate::events::discard()).unwrap_err();
    let Error::Cancelled {
        report: Some(report),
    } = err
    else {
        panic!("expected a cancelled report, got {err}");
    };
    assert_eq!(count(&log_of(&w.log), "wait ready"), 0);
    assert!(report.service.outage.unwrap().contains("did not wait"));
}

struct FakePrewarm {
    log: Log,
    outcome: fn() -> Result<crate::prewarm::Warmed, crate::prewarm::Error>,
    skip: Option<&'static str>,
}

impl Prewarm for FakePrewarm {
    fn locate(&self) -> Result<crate::prewarm::Klippy, crate::prewarm::Skip> {
        if let Some(why) = self.skip {
            return Err(crate::prewarm::Skip(why.into()));
        }
        Ok(crate::prewarm::Klippy {
            dir: "/home/pi/klipper/klippy".into(),
            python: "/home/pi/klippy-env/bin/python".into(),
        })
    }
    fn warm(
        &self,
        _k: &crate::prewarm::Klippy,
        _c: &Cancel,
        _s: &Sink,
    ) -> Result<crate::prewarm::Warmed, crate::prewarm::Error> {
        self.log.lock().unwrap().push("prewarm".into());
        (self.outcome)()
    }
}

fn with_prewarm(
    devices: Vec<DeviceInfo>,
    outcome: fn() -> Result<crate::prewarm::Warmed, crate::prewarm::Error>,
    skip: Option<&'static str>,
) -> World {
    let mut w = world(devices, Setup::default());
    w.deps.prewarm = Some(Arc::new(FakePrewarm {
        log: w.log.clone(),
        outcome,
        skip,
    }));
    w
}

#[test]
fn klippy_is_prewarmed_during_the_build_before_anything_stops() {
    let w = with_prewarm(
        vec![device("main", Link::Serial)],
        || {
            Ok(crate::prewarm::Warmed {
                c_helper: Some(Duration::from_secs(20)),
                compiled: 3,
            })
        },
        None,
    );
    let (sink, events) = recording_sink();
    let report = flash_all(&w.deps, &Options::default(), &Cancel::new(), &sink).unwrap();
    let log = log_of(&w.log);
    let warm = log.iter().position(|l| l == "prewarm").unwrap();
    let stop = log.iter().position(|l| l == "stop").unwrap();
    assert!(warm < stop, "{log:?}");
    let pre = report.prewarm.unwrap();
    assert_eq!(pre.state, "warmed");
    assert_eq!(pre.klippy.as_deref(), Some("/home/pi/klipper/klippy"));
    assert!(
        pre.message.contains("c_helper.so built (20.0 s)"),
        "{pre:?}"
    );
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|e| e.stage == crate::events::Stage::Prewarm && e.message == pre.message));
}

#[test]
fn a_failed_prewarm_is_one_warning_and_the_run_goes_on() {
    let w = with_prewarm(
        vec![device("main", Link::Serial)],
        || {
            Err(crate::prewarm::Error::Build(process::Error::Failed {
                cmd: "sh -c 'gcc ...'".into(),
                status: process::Status::Exited(1),
                tail: "cc1: out of memory".into(),
            }))
        },
        None,
    );
    let (sink, events) = recording_sink();
    let report = flash_all(&w.deps, &Options::default(), &Cancel::new(), &sink).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.prewarm.as_ref().unwrap().state, "failed");
    let warnings: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| {
            e.stage == crate::events::Stage::Prewarm && e.level == crate::events::Level::Warning
        })
        .map(|e| e.message.clone())
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("out of memory") && warnings[0].contains("klippy will do it"),
        "{warnings:?}"
    );
}

#[test]
fn a_klippy_that_is_not_the_services_is_not_prewarmed_and_one_line_says_why() {
    let w = with_prewarm(
        vec![device("main", Link::Serial)],
        || unreachable!("nothing is warmed when the klippy was not found"),
        Some("klipper runs klippy from /opt/klippy, not from the Klipper tree"),
    );
    let report = run(&w, &Options::default()).unwrap();
    let pre = report.prewarm.unwrap();
    assert_eq!(pre.state, "skipped");
    assert!(pre.message.contains("/opt/klippy"), "{pre:?}");
    assert!(report.ok);
    assert_eq!(count(&log_of(&w.log), "prewarm"), 0);
}

#[test]
fn flash_parallel_flashes_boards_that_share_nothing_at_once_and_keeps_the_can_order() {
    let w = world(
        vec![
            device("main", Link::Serial),
            device("host", Link::Linux),
            device("bridge", Link::UsbCanBridge),
            device("ebb", Link::Can),
        ],
        Setup {
            flash_parallel: true,
            // The first of each group: each waits until the three are flashing.
            meet: vec!["main".into(), "host".into(), "ebb".into()],
            ..Setup::default()
        },
    );
    let (sink, events) = recording_sink();
    let report = flash_all(&w.deps, &Options::default(), &Cancel::new(), &sink).unwrap();
    let log = log_of(&w.log);
    assert!(!log.iter().any(|l| l.ends_with("alone")), "{log:?}");
    let at = |what: &str| log.iter().position(|l| l == what).unwrap();
    assert!(at("flash ebb") < at("flash bridge"), "{log:?}");
    assert_eq!(count(&log, "stop"), 1);
    assert_eq!(count(&log, "start"), 1);
    assert!(report.ok, "{report:?}");
    // Every flashing event names its board.
    let keys = ["main", "host", "bridge", "ebb"];
    let events = events.lock().unwrap();
    let per_board: Vec<&crate::events::Event> = events
        .iter()
        .filter(|e| e.stage == crate::events::Stage::Flash && e.device.is_some())
        .collect();
    assert!(per_board.len() >= 8, "{per_board:?}");
    assert!(per_board
        .iter()
        .all(|e| keys.contains(&e.device.as_deref().unwrap())));
}

#[test]
fn kflash_build_prewarms_klippy_too_and_stops_nothing() {
    let w = with_prewarm(
        vec![device("main", Link::Serial)],
        || {
            Ok(crate::prewarm::Warmed {
                c_helper: Some(Duration::from_secs(3)),
                compiled: 1,
            })
        },
        None,
    );
    build(&w.deps, None, &Cancel::new(), &crate::events::discard()).unwrap();
    let log = log_of(&w.log);
    assert_eq!(count(&log, "prewarm"), 1, "{log:?}");
    assert_eq!(count(&log, "stop"), 0, "{log:?}");
}

fn images(log: &[String]) -> Vec<String> {
    log.iter()
        .filter_map(|l| l.strip_prefix("image "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_first_interrupt_finishes_the_board_being_written_and_skips_the_rest() {
    let run_cancel = Cancel::new();
    let w = world(
        vec![device("a", Link::Serial), device("b", Link::Serial)],
        Setup {
            interrupt_on: Some(("a".into(), run_cancel.clone(), false)),
            ..Setup::default()
        },
    );
    let err = flash_all(&w.deps, &yes(), &run_cancel, &crate::events::discard()).unwrap_err();
    let Error::Cancelled {
        report: Some(report),
    } = err
    else {
        panic!("{err:?}")
    };
    let log = log_of(&w.log);
    assert_eq!(count(&log, "flash "), 1, "{log:?}");
    assert_eq!(count(&log, "start"), 1);
    let (a, b) = (&report.devices[0], &report.devices[1]);
    assert_eq!(a.flash, "pass", "the board being written was finished");
    assert_eq!(b.flash, "skip");
    assert_eq!(b.reason, "cancelled before flashing");
    let hint = b.hint.as_deref().unwrap();
    assert!(hint.contains("kflash flash b"), "{hint}");
    assert!(report.service.restarted && report.cancelled);
    // Nothing was left half-written: no pending record.
    assert!(!w.deps.state.pending_json().exists());
}

#[test]
fn a_second_interrupt_abandons_the_board_and_says_so() {
    let run_cancel = Cancel::new();
    let w = world(
        vec![device("a", Link::Serial)],
        Setup {
            interrupt_on: Some(("a".into(), run_cancel.clone(), true)),
            ..Setup::default()
        },
    );
    let err = flash_all(&w.deps, &yes(), &run_cancel, &crate::events::discard()).unwrap_err();
    let Error::Cancelled {
        report: Some(report),
    } = err
    else {
        panic!("{err:?}")
    };
    let a = &report.devices[0];
    assert_eq!(a.flash, "fail");
    assert!(a.error.as_deref().unwrap().contains("abandoned"), "{a:?}");
    assert!(
        a.hint.as_deref().unwrap().contains("kflash flash-all"),
        "{a:?}"
    );
    assert!(report.service.restarted);
    // The abandoned board stays in the pending record for the next run.
    let pending = pending::load(&w.deps.state).unwrap();
    assert_eq!(pending.devices.len(), 1);
    assert_eq!(pending.devices[0].progress, pending::Progress::Writing);
}

#[test]
fn the_pending_record_is_written_before_the_stop_and_keeps_only_unfinished_boards() {
    let w = world(
        vec![device("a", Link::Serial), device("b", Link::Serial)],
        Setup {
            flash_fail: vec!["b".into()],
            ..Setup::default()
        },
    );
    run(&w, &yes()).unwrap();
    let pending = pending::load(&w.deps.state).unwrap();
    let keys: Vec<&str> = pending.devices.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(keys, ["b"]);
    let b = &pending.devices[0];
    assert!(b.image.starts_with(w.deps.state.pending_image_dir("b")));
    assert_eq!(
        std::fs::read(&b.image).unwrap(),
        format!("b image {V}").as_bytes()
    );
    assert_eq!(b.identity.by_path.as_deref(), Some("usb-0:b"));
    // Identities are kept for every later command.
    let ids = pending::identities(&w.deps.state);
    assert!(ids.contains_key("a") && ids.contains_key("b"));
}

#[test]
fn a_record_that_cannot_be_written_stops_nothing() {
    let w = world(vec![device("a", Link::Serial)], Setup::default());
    // A file where the state directory must be: nothing can be written under it.
    std::fs::write(w.deps.state.root(), "not a directory").unwrap();
    let report = run(&w, &yes()).unwrap();
    let log = log_of(&w.log);
    assert_eq!(count(&log, "stop"), 0, "{log:?}");
    assert!(!report.service.stopped);
    assert!(report.devices[0]
        .error
        .as_deref()
        .unwrap()
        .contains("pending record"));
}

/// The same world, with a flasher that no longer fails.
fn healed(w: &mut World) {
    w.deps.flasher = Arc::new(FakeFlash {
        log: w.log.clone(),
        fail: vec![],
        cancel_on: None,
        panic_on: None,
        interrupt_on: None,
        boot: w.boot.clone(),
        meet: vec![],
        met: Arc::default(),
    });
}

#[test]
fn flash_all_first_finishes_a_board_left_in_katapult() {
    let mut w = world(
        vec![device("a", Link::Serial), device("b", Link::Serial)],
        Setup {
            flash_fail: vec!["b".into()],
            ..Setup::default()
        },
    );
    run(&w, &yes()).unwrap();
    healed(&mut w);
    // b was left in its bootloader by the failed write.
    w.boot.lock().unwrap().insert(
        "b".into(),
        Bootloader::Katapult {
            path: "/dev/serial/by-id/usb-katapult_b".into(),
        },
    );
    let p = plan(&w.deps, &Options::default(), &crate::events::discard())
        .unwrap()
        .plan;
    assert!(
        p.devices[1].reason.contains("b is in its bootloader"),
        "{:?}",
        p.devices[1]
    );
    assert_eq!(
        p.devices[1].bootloader.as_deref(),
        Some("Katapult on /dev/serial/by-id/usb-katapult_b")
    );
    // The watchdog's (and flash-all's) recovery writes the recorded image, with no stop.
    let before = count(&log_of(&w.log), "stop");
    let done = recover_first(&w.deps, &Cancel::new(), &crate::events::discard()).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].key.as_str(), done[0].outcome), ("b", "flashed"));
    assert_eq!(count(&log_of(&w.log), "stop"), before);
    let last = images(&log_of(&w.log)).pop().unwrap();
    assert!(last.starts_with("b ") && last.contains("pending"), "{last}");
    assert!(pending::load(&w.deps.state).is_none(), "nothing left");
    assert!(w.boot.lock().unwrap().is_empty());
}

#[test]
fn a_board_in_a_rom_loader_is_left_with_a_hint() {
    let w = world(
        vec![device("a", Link::Serial)],
        Setup {
            flash_fail: vec!["a".into()],
            ..Setup::default()
        },
    );
    run(&w, &yes()).unwrap();
    w.boot.lock().unwrap().insert(
        "a".into(),
        Bootloader::RomLoader(discovery::RomBoard {
            loader: discovery::RomLoader::StmDfu,
            usb_id: "0483:df11".into(),
            path: "/sys/bus/usb/devices/1-1".into(),
        }),
    );
    let report = run(&w, &yes()).unwrap();
    assert_eq!(report.recovered.len(), 1);
    assert_eq!(report.recovered[0].outcome, "left");
    assert!(report.recovered[0].detail.contains("STM32 DFU"));
    assert_eq!(report.devices[0].action, "error");
    assert!(report.devices[0].reason.contains("a is in its bootloader"));
    assert!(
        pending::load(&w.deps.state).is_some(),
        "kept for the next run"
    );
}

#[test]
fn a_config_for_another_chip_is_an_error_before_any_stop() {
    let w = world(
        vec![device("main", Link::Serial)],
        Setup {
            chips: vec![("mcu", "rp2040")],
            ..Setup::default()
        },
    );
    let p = plan(&w.deps, &Options::default(), &crate::events::discard())
        .unwrap()
        .plan;
    assert_eq!(p.devices[0].action, "error");
    assert_eq!(p.devices[0].board_mcu.as_deref(), Some("rp2040"));
    let err = run(&w, &yes()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("stm32f446xx") && msg.contains("rp2040") && msg.contains("kflash config main"),
        "{msg}"
    );
    assert_eq!(
        ExitStatus::of_error(&crate::commands::Error::from(err)),
        ExitStatus::Usage
    );
    assert_eq!(count(&log_of(&w.log), "stop"), 0);
}

#[test]
fn a_can_interface_that_is_down_refuses_before_any_stop() {
    let w = world(vec![device("ebb", Link::Can)], Setup::default());
    for (state, word) in [
        (InterfaceState::Down, "is down"),
        (InterfaceState::Missing, "does not exist"),
    ] {
        w.ifaces.lock().unwrap().insert("can0".into(), vec![state]);
        let err = run(&w, &yes()).unwrap_err();
        assert!(
            matches!(err, Error::Refused(Refusal::CanInterface { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains(word), "{err}");
    }
    assert_eq!(count(&log_of(&w.log), "stop"), 0);
}

#[test]
fn after_a_bridge_is_flashed_its_can_interface_is_waited_for() {
    let w = world(
        vec![
            device("bridge", Link::UsbCanBridge),
            device("ebb", Link::Can),
        ],
        Setup::default(),
    );
    // Up for the pre-flight, then down after the bridge reset, then up again.
    w.ifaces.lock().unwrap().insert(
        "can0".into(),
        vec![
            InterfaceState::Up,
            InterfaceState::Missing,
            InterfaceState::Down,
            InterfaceState::Up,
        ],
    );
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let sink: Sink = Arc::new(move |e: &crate::events::Event| {
        seen.lock().unwrap().push(e.message.clone());
    });
    let report = flash_all(&w.deps, &yes(), &Cancel::new(), &sink).unwrap();
    assert!(report.ok);
    let events = events.lock().unwrap();
    assert!(
        events.iter().any(|m| m.contains("waiting for can0")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|m| m == "CAN interfaces are up"),
        "{events:?}"
    );
    // Nothing left to pop: the wait saw every state.
    assert_eq!(w.ifaces.lock().unwrap()["can0"], [InterfaceState::Up]);
}

#[test]
fn rollback_writes_the_image_last_verified_on_the_board() {
    let w = world(
        vec![device("a", Link::Serial), device("b", Link::Serial)],
        Setup::default(),
    );
    // Nothing verified yet: no way back (an error when named, skipped otherwise).
    let named = Options {
        keys: Some(vec!["a".into()]),
        ..yes()
    };
    let report = rollback(&w.deps, &named, &Cancel::new(), &crate::events::discard()).unwrap();
    assert_eq!(report.devices[0].action, "error");
    assert!(report.devices[0].reason.contains("no last-known-good"));
    assert!(!report.service.stopped);
    run(&w, &yes()).unwrap();
    let good = w.deps.state.good_dir("a");
    assert!(good.join("klipper.bin").is_file(), "kept at verify");
    let report = rollback(&w.deps, &yes(), &Cancel::new(), &crate::events::discard()).unwrap();
    assert!(report.ok, "{report:?}");
    assert!(report.devices.iter().all(|d| d.verify == "pass"));
    assert!(report.devices[0].reason.starts_with("roll back to"));
    let written = images(&log_of(&w.log));
    let last_two = &written[written.len() - 2..];
    assert!(
        last_two.iter().all(|l| l.contains("/good/")),
        "{last_two:?}"
    );
}

#[test]
fn auto_rollback_restores_the_last_known_good_image_when_verify_fails() {
    let mut w = world(vec![device("main", Link::Serial)], Setup::default());
    run(&w, &yes()).unwrap();
    // A new build that klippy will not report after flashing.
    let firmware = Arc::new(FakeFirmware {
        out: w.dir.path().join("out2"),
        version: "v0.14.0-1-gnew".into(),
        fail: vec![],
        log: w.log.clone(),
        cancel_during: None,
        dict: None,
    });
    w.deps.firmware = firmware;
    w.deps.auto_rollback = true;
    let report = run(&w, &yes()).unwrap();
    let main = &report.devices[0];
    assert_eq!(main.verify, "fail", "{main:?}");
    let rollback = main.rollback.as_deref().unwrap();
    assert!(
        rollback.contains(&format!("rolled back to {V}")),
        "{rollback}"
    );
    assert_eq!(main.version_after.as_deref(), Some(V));
    let log = log_of(&w.log);
    // Three stop windows: the first run, the new firmware, the way back.
    assert_eq!(count(&log, "stop"), 3);
    assert!(images(&log).last().unwrap().contains("/good/"));
    assert!(!report.ok);
}

#[test]
fn an_interrupt_while_verify_waits_reports_a_cancelled_run_with_klipper_running() {
    let run_cancel = Cancel::new();
    let w = world(vec![device("a", Link::Serial)], Setup::default());
    run_cancel.cancel(); // as if Ctrl+C came while klippy starts: verify gives up at once
    let mut report = Report {
        ok: false,
        target_version: None,
        service: ServiceReport::default(),
        devices: vec![DeviceReport::new("a", "katapult", "flash")],
        cancelled: false,
        prewarm: None,
        started: String::new(),
        finished: String::new(),
        record: None,
        recovered: Vec::new(),
    };
    report.devices[0].flash = "pass".into();
    let built = Built {
        version: V.into(),
        out_dir: PathBuf::new(),
        image: PathBuf::new(),
        cached: false,
    };
    verify::verify(
        &w.deps,
        &[device("a", Link::Serial)],
        &[(0, built)],
        &mut report,
        verify::ReadyWait {
            stopped_at: std::time::Instant::now(),
            start_returned: std::time::Instant::now(),
            timeout: Duration::from_secs(1),
        },
        &run_cancel,
        &crate::events::discard(),
    );
    assert!(report.cancelled);
    assert_eq!(report.devices[0].verify, "skip");
    assert!(report.devices[0]
        .hint
        .as_deref()
        .unwrap()
        .contains("kflash status"));
}
