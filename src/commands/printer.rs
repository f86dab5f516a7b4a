//! The real `Deps`: the pipeline's ports wired to the registry, discovery, the builder,
//! Moonraker, the service backends, the watchdog and the flasher.
//!
//! Owns only adapters: no policy lives here. `Home::deps` reads the settings once per
//! run and builds every adapter from them.
//!
//! Thread-safety: every adapter is `Send + Sync`; the device adapter keeps the stable
//! identity of each device (learnt when it was resolved) behind a mutex, the watchdog
//! adapter keeps the armed watchdog behind a mutex.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Home;
use crate::discovery::{self, Discovery, StableId, UsbMode};
use crate::events::Sink;
use crate::firmware::{self, BuildRequest};
use crate::flash::{self, Comeback, Endpoint, Family, RomLoader, Tools};
use crate::moonraker::{Client, ServiceAction};
use crate::pipeline::{
    Built, Deps, DeviceInfo, Error, Firmware, Flash, Freshness, Inventory, Printer, Service,
    Stopped, Watchdog,
};
use crate::process::{Cancel, Cmd};
use crate::registry::{Registry, ServiceKind, Settings};
use crate::service::{self, Backend, ServiceConfig, ServiceControl, StopGuard};
use crate::versions::{self, VersionState};

/// Timeout of one Moonraker request made by the pipeline.
const MOONRAKER_TIMEOUT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `versions::compare` in the pipeline's terms.
pub fn compare(mcu: &str, target: &str) -> Freshness {
    match versions::compare(mcu, target) {
        VersionState::Current => Freshness::Current,
        VersionState::Outdated => Freshness::Outdated,
        VersionState::Newer => Freshness::Newer,
        VersionState::Unknown => Freshness::Unknown,
    }
}

/// The service settings of the registry, as the service module wants them.
pub fn service_config(s: &Settings) -> ServiceConfig {
    ServiceConfig {
        backend: match s.service {
            ServiceKind::Moonraker => Backend::Moonraker,
            ServiceKind::Systemd => Backend::Systemd,
            ServiceKind::Command => Backend::Command,
        },
        unit: s.klipper_service.clone(),
        moonraker_url: s.moonraker_url.clone(),
        stop_command: s.stop_command.clone(),
        start_command: s.start_command.clone(),
    }
}

/// Registry devices + discovery. Also the flasher's `Watch`.
pub struct LiveDevices {
    home: Home,
    disc: Discovery,
    /// Stable identity of each serial device, learnt when it was resolved.
    stable: Mutex<HashMap<String, StableId>>,
    /// ROM loaders on the bus when each device was located for flashing (they belong to
    /// other boards).
    roms_before: Mutex<HashMap<String, Vec<PathBuf>>>,
}

impl LiveDevices {
    fn rom_paths(&self) -> Vec<PathBuf> {
        self.disc
            .find_rom_loaders()
            .into_iter()
            .map(|r| r.path)
            .collect()
    }
}

impl LiveDevices {
    fn serial_pattern(endpoint: &Endpoint) -> Option<String> {
        match endpoint {
            Endpoint::Serial { path, .. } => Some(path.display().to_string()),
            _ => None,
        }
    }

    fn find_port(&self, key: &str, endpoint: &Endpoint) -> Result<discovery::SerialPort, String> {
        let stable = lock(&self.stable).get(key).cloned();
        if let Some(port) = stable.and_then(|s| self.disc.find(&s)) {
            return Ok(port);
        }
        let pattern = Self::serial_pattern(endpoint).ok_or("not a serial device")?;
        let port = self.disc.resolve(&pattern).map_err(|e| e.to_string())?;
        lock(&self.stable).insert(key.to_owned(), StableId::of(&port));
        Ok(port)
    }

    fn port_path(&self, port: &discovery::SerialPort) -> PathBuf {
        port.path()
            .map_or_else(|| self.disc.dev.0.join(&port.tty), Path::to_path_buf)
    }
}

impl Inventory for LiveDevices {
    fn devices(&self) -> Result<Vec<DeviceInfo>, Error> {
        let reg = self.home.registry()?;
        Ok(self.home.device_infos(&reg))
    }

    fn resolve(&self, dev: &DeviceInfo) -> Result<String, String> {
        match &dev.endpoint {
            Endpoint::Serial { .. } => self
                .find_port(&dev.key, &dev.endpoint)
                .map(|p| self.port_path(&p).display().to_string()),
            Endpoint::Can { interface, uuid } => Ok(format!("{interface}:{uuid}")),
            Endpoint::Linux { path } => Ok(path.display().to_string()),
        }
    }

    fn rescan(&self) {
        // Keep the stable identities; discovery reads the file system afresh on each call.
    }
}

fn rom_loader(r: &discovery::RomLoader) -> RomLoader {
    let (family, what) = match r.family {
        "stm32-dfu" => (Family::Stm32, "STM32 DFU (0483:df11)"),
        "rp2040-bootsel" => (Family::Rp2040, "RP2040 BOOTSEL (2e8a:0003)"),
        "rp2350-bootsel" => (Family::Rp2040, "RP2350 BOOTSEL (2e8a:000f)"),
        _ => (Family::Generic, "a ROM bootloader"),
    };
    RomLoader {
        family,
        description: format!("{what} at {}", r.path.display()),
    }
}

impl flash::Watch for LiveDevices {
    fn locate(&self, key: &str, endpoint: &Endpoint) -> Option<PathBuf> {
        lock(&self.roms_before).insert(key.to_owned(), self.rom_paths());
        self.find_port(key, endpoint)
            .ok()
            .map(|p| self.port_path(&p))
    }

    fn wait_back(
        &self,
        key: &str,
        endpoint: &Endpoint,
        timeout: Duration,
        cancel: &Cancel,
    ) -> Comeback {
        let Endpoint::Serial { .. } = endpoint else {
            return Comeback::Gone;
        };
        let stable = lock(&self.stable).get(key).cloned();
        let deadline = Instant::now() + timeout;
        // ROM loaders on the bus before the flash belong to other boards.
        let known = lock(&self.roms_before)
            .get(key)
            .cloned()
            .unwrap_or_else(|| self.rom_paths());
        loop {
            let port = match &stable {
                Some(s) => self.disc.find(s),
                None => Self::serial_pattern(endpoint).and_then(|p| self.disc.resolve(&p).ok()),
            };
            if let Some(port) = &port {
                if matches!(
                    discovery::usb_mode(port),
                    UsbMode::Klipper | UsbMode::UsbCanBridge | UsbMode::Other
                ) {
                    return Comeback::Klipper(self.port_path(port));
                }
            } else if let Some(r) = self
                .disc
                .find_rom_loaders()
                .iter()
                .find(|r| !known.contains(&r.path))
            {
                // Our board is gone and a new ROM loader appeared: it fell into it.
                return Comeback::RomLoader(rom_loader(r));
            }
            if cancel.is_cancelled() || Instant::now() >= deadline {
                return match self.disc.find_rom_loaders().first() {
                    Some(r) => Comeback::RomLoader(rom_loader(r)),
                    None => Comeback::Gone,
                };
            }
            std::thread::sleep(discovery::POLL);
        }
    }

    fn rom_loaders(&self) -> Vec<RomLoader> {
        self.disc
            .find_rom_loaders()
            .iter()
            .map(rom_loader)
            .collect()
    }
}

/// The builder.
pub struct LiveFirmware {
    klipper_dir: PathBuf,
    builds_dir: PathBuf,
    timeout: Duration,
    jobs: usize,
}

impl LiveFirmware {
    fn request(&self, d: &DeviceInfo) -> BuildRequest {
        BuildRequest {
            key: d.key.clone(),
            config: d.config.clone(),
            klipper_dir: self.klipper_dir.clone(),
            builds_dir: self.builds_dir.clone(),
            timeout: self.timeout,
        }
    }
}

impl Firmware for LiveFirmware {
    fn target_version(&self, dev: &DeviceInfo) -> Option<String> {
        // The cached build's dictionary when the cache is valid, else the tree's version.
        firmware::up_to_date(&self.request(dev))
            .map(|fw| fw.version)
            .or_else(|| Some(firmware::source_version(&self.klipper_dir)))
    }

    fn target_dict(&self, dev: &DeviceInfo) -> Option<Value> {
        firmware::up_to_date(&self.request(dev)).and_then(|fw| fw.dict().ok())
    }

    fn build(
        &self,
        devs: &[DeviceInfo],
        cancel: &Cancel,
        sink: &Sink,
    ) -> Vec<Result<Built, String>> {
        let reqs: Vec<BuildRequest> = devs.iter().map(|d| self.request(d)).collect();
        firmware::build_all(&reqs, self.jobs, cancel, sink)
            .into_iter()
            .map(|r| {
                r.map(|fw| Built {
                    version: fw.version,
                    out_dir: fw.out_dir,
                    image: fw.image,
                    cached: fw.cached,
                })
                .map_err(|e| e.to_string())
            })
            .collect()
    }
}

/// Klippy through Moonraker.
pub struct LivePrinter {
    client: Result<Client, String>,
    sections: Vec<String>,
}

impl Printer for LivePrinter {
    fn print_state(&self) -> Result<String, String> {
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let state = client.print_state().map_err(|e| e.to_string())?;
        Ok(state.print_stats.unwrap_or_else(|| "standby".into()))
    }

    fn mcu_versions(&self) -> Result<BTreeMap<String, String>, String> {
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let sections: Vec<&str> = self.sections.iter().map(String::as_str).collect();
        let got = client.mcu_versions(&sections).map_err(|e| e.to_string())?;
        Ok(got
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    fn wait_ready(&self, timeout: Duration, cancel: &Cancel) -> Result<(), String> {
        let client = self.client.as_ref().map_err(Clone::clone)?;
        client
            .wait_klippy_ready(timeout, cancel)
            .map_err(|e| e.to_string())
    }
}

/// The klipper service through the configured backend.
pub struct LiveService {
    svc: Result<Arc<dyn ServiceControl>, String>,
}

impl Stopped for StopGuard {
    fn restart(self: Box<Self>) -> Result<Duration, String> {
        StopGuard::restart(*self).map_err(|e| e.to_string())
    }
}

impl Service for LiveService {
    fn check(&self) -> Result<(), String> {
        let svc = self.svc.as_ref().map_err(Clone::clone)?;
        svc.check().map_err(|e| e.to_string())
    }

    fn stop(&self) -> Result<Box<dyn Stopped>, String> {
        let svc = self.svc.as_ref().map_err(Clone::clone)?;
        service::stop(Arc::clone(svc))
            .map(|g| Box::new(g) as Box<dyn Stopped>)
            .map_err(|e| e.to_string())
    }
}

/// The watchdog process (`python -m kflash.watchdog`).
pub struct LiveWatchdog {
    launch: Option<Vec<OsString>>,
    cfg: ServiceConfig,
    state_dir: PathBuf,
    armed: Mutex<Option<service::Watchdog>>,
}

impl Watchdog for LiveWatchdog {
    fn arm(&self) -> Result<(), String> {
        let launch = self
            .launch
            .as_ref()
            .ok_or("no Python interpreter known to run kflash.watchdog")?;
        let dog = service::Watchdog::arm(launch, &self.cfg, &self.state_dir)
            .map_err(|e| e.to_string())?;
        *lock(&self.armed) = Some(dog);
        Ok(())
    }

    fn disarm(&self) {
        if let Some(dog) = lock(&self.armed).take() {
            if let Err(e) = dog.disarm() {
                eprintln!("kflash: {e}");
            }
        }
    }
}

/// The real flasher behind the pipeline's `Flash` port.
impl Flash for flash::Flasher {
    fn check(&self, dev: &DeviceInfo) -> Result<(), String> {
        let mcu = dev.target.as_ref().map_or("", |t| t.mcu.as_str());
        let job = flash::Job {
            key: &dev.key,
            method: dev.method,
            endpoint: &dev.endpoint,
            mcu,
            out_dir: Path::new(""),
            image: Path::new(""),
            kconfig: &dev.config,
        };
        flash::Flasher::check(self, &job)
    }
    fn flash(
        &self,
        dev: &DeviceInfo,
        built: &Built,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<flash::Flashed, flash::Failure> {
        let mcu = dev.target.as_ref().map_or("", |t| t.mcu.as_str());
        let job = flash::Job {
            key: &dev.key,
            method: dev.method,
            endpoint: &dev.endpoint,
            mcu,
            out_dir: &built.out_dir,
            image: &built.image,
            kconfig: &dev.config,
        };
        flash::Flasher::flash(self, &job, cancel, sink)
    }
}

/// Restart the linux MCU's service (`klipper-mcu` or `klipper_mcu`) the way klipper's
/// service is controlled; `Ok(None)` when neither exists.
fn linux_restart(settings: &Settings) -> flash::LinuxRestart {
    let kind = settings.service;
    let url = settings.moonraker_url.clone();
    Arc::new(move |cancel: &Cancel| -> Result<Option<String>, String> {
        let units = ["klipper-mcu", "klipper_mcu"];
        match kind {
            ServiceKind::Moonraker => {
                let client = Client::new(&url, MOONRAKER_TIMEOUT).map_err(|e| e.to_string())?;
                let available = client.available_services().map_err(|e| e.to_string())?;
                let Some(unit) = units.iter().find(|u| available.iter().any(|a| a == *u)) else {
                    return Ok(None);
                };
                client
                    .service_action(ServiceAction::Restart, unit)
                    .map_err(|e| e.to_string())?;
                Ok(Some((*unit).to_owned()))
            }
            ServiceKind::Systemd => {
                for unit in units {
                    let listed = Cmd::new("systemctl")
                        .args(["list-unit-files", "--no-legend", &format!("{unit}.service")])
                        .timeout(Duration::from_secs(20))
                        .cancel(cancel)
                        .run_unchecked()
                        .map_err(|e| e.to_string())?;
                    if listed.stdout.contains(unit) {
                        Cmd::new("sudo")
                            .args(["-n", "systemctl", "restart", unit])
                            .timeout(Duration::from_secs(60))
                            .cancel(cancel)
                            .run()
                            .map_err(|e| e.to_string())?;
                        return Ok(Some(unit.to_owned()));
                    }
                }
                Ok(None)
            }
            ServiceKind::Command => Ok(None),
        }
    })
}

impl Home {
    /// The real dependencies of a run, from the current settings.
    pub fn deps(&self) -> Result<Deps, Error> {
        let reg = self.registry()?;
        let s = &reg.settings;
        let devices = Arc::new(LiveDevices {
            home: self.clone(),
            disc: Discovery::from_env(),
            stable: Mutex::new(HashMap::new()),
            roms_before: Mutex::new(HashMap::new()),
        });
        let mut tools = Tools::new(&s.klipper_dir);
        tools.katapult_dir = Some(s.katapult_dir.clone());
        tools.linux_mcu_binary.clone_from(&s.linux_mcu_binary);
        tools.flash_timeout = Duration::from_secs(s.flash_timeout_s);
        tools.linux_restart = Some(linux_restart(s));
        tools.native_katapult = match s.katapult_flasher {
            crate::registry::KatapultFlasher::Native => self.native_katapult.clone(),
            crate::registry::KatapultFlasher::Flashtool => None,
        };
        let cfg = service_config(s);
        let jobs = std::thread::available_parallelism().map_or(2, usize::from);
        let ready_timeout = std::env::var("KFLASH_READY_TIMEOUT_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(60), Duration::from_secs);
        Ok(Deps {
            inventory: devices.clone(),
            firmware: Arc::new(LiveFirmware {
                klipper_dir: s.klipper_dir.clone(),
                builds_dir: self.state.builds_dir(),
                timeout: Duration::from_secs(s.build_timeout_s),
                jobs,
            }),
            printer: Arc::new(LivePrinter {
                client: Client::new(&s.moonraker_url, MOONRAKER_TIMEOUT).map_err(|e| e.to_string()),
                sections: reg.devices.iter().map(|d| d.mcu_section.clone()).collect(),
            }),
            service: Arc::new(LiveService {
                svc: service::from_config(&cfg).map_err(|e| e.to_string()),
            }),
            flasher: Arc::new(flash::Flasher::new(tools, devices)),
            watchdog: Arc::new(LiveWatchdog {
                launch: self.python.as_ref().map(|py| {
                    vec![
                        py.clone().into_os_string(),
                        "-m".into(),
                        "kflash.watchdog".into(),
                    ]
                }),
                cfg,
                state_dir: self.state.root().to_path_buf(),
                armed: Mutex::new(None),
            }),
            compare,
            lock_path: self.state.lock_path(),
            runs_dir: self.state.runs_dir(),
            flashed_dir: self.state.root().join("flashed"),
            stagger: Duration::from_millis(200),
            ready_timeout,
        })
    }

    /// Klippy's state, each device's current and target version, and the last run.
    pub fn status(&self) -> Result<Value, Error> {
        let reg: Registry = self.registry()?;
        let deps = self.deps()?;
        let state = deps.printer.print_state();
        let versions = deps.printer.mcu_versions().unwrap_or_default();
        let devices: Vec<Value> = self
            .device_infos(&reg)
            .iter()
            .map(|d| {
                let before = versions.get(&d.mcu_section).cloned();
                let target = d
                    .target
                    .as_ref()
                    .ok()
                    .and_then(|_| deps.firmware.target_version(d));
                let fresh = match (&before, &target) {
                    (Some(b), Some(t)) => compare(b, t),
                    _ => Freshness::Unknown,
                };
                json!({
                    "key": d.key,
                    "mcu_section": d.mcu_section,
                    "version": before,
                    "target_version": target,
                    "state": fresh.as_str(),
                    "problem": d.target.as_ref().err(),
                })
            })
            .collect();
        let last_run = last_run(&self.state.runs_dir());
        Ok(json!({
            "state_dir": self.state.root().display().to_string(),
            "moonraker": state.is_ok(),
            "moonraker_error": state.as_ref().err(),
            "print_state": state.ok(),
            "devices": devices,
            "last_run": last_run,
        }))
    }
}

fn last_run(dir: &Path) -> Value {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Value::Null;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .last()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .map_or(Value::Null, |v| {
            json!({
                "ok": v.get("ok"),
                "started": v.get("started"),
                "finished": v.get("finished"),
                "cancelled": v.get("cancelled"),
            })
        })
}

/// The native Katapult serial flasher in the shape of the flasher's seam: the default
/// for serial boards (setting `katapult_flasher`), flashtool.py its fallback, `make flash`
/// the last resort of `auto`.
pub fn native_katapult() -> flash::NativeKatapult {
    Arc::new(|dev, baud, firmware, cancel, sink| {
        crate::katapult::flash_device(dev, baud, firmware, cancel, sink)
            .map(drop)
            .map_err(|e| flash::NativeFailure {
                message: e.to_string(),
                try_flashtool: e.worth_another_flasher(),
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flash::Watch;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn board(root: &Path) -> (LiveDevices, Endpoint) {
        let dev = root.join("dev");
        let sys = root.join("sys");
        fs::create_dir_all(dev.join("serial/by-id")).unwrap();
        fs::create_dir_all(dev.join("serial/by-path")).unwrap();
        fs::write(dev.join("ttyACM0"), "").unwrap();
        let name = "usb-Klipper_stm32f446xx_ABC-if00";
        symlink("../../ttyACM0", dev.join("serial/by-id").join(name)).unwrap();
        symlink("../../ttyACM0", dev.join("serial/by-path/pci-usb-0:1:1.0")).unwrap();
        let usb = sys.join("devices/usb1/1-1");
        fs::create_dir_all(usb.join("1-1:1.0")).unwrap();
        fs::write(usb.join("idVendor"), "1d50\n").unwrap();
        fs::write(usb.join("idProduct"), "614e\n").unwrap();
        fs::create_dir_all(sys.join("class/tty/ttyACM0")).unwrap();
        symlink(usb.join("1-1:1.0"), sys.join("class/tty/ttyACM0/device")).unwrap();
        let live = LiveDevices {
            home: Home::open(Some(root.join("state"))).unwrap(),
            disc: Discovery::at(&dev, &sys),
            stable: Mutex::new(HashMap::new()),
            roms_before: Mutex::new(HashMap::new()),
        };
        let endpoint = Endpoint::Serial {
            path: PathBuf::from(format!("/dev/serial/by-id/{name}")),
            baud: None,
        };
        (live, endpoint)
    }

    #[test]
    fn a_board_still_in_katapult_is_not_back_until_it_runs_klipper() {
        let dir = tempfile::tempdir().unwrap();
        let (live, ep) = board(dir.path());
        assert!(live.locate("mcu", &ep).is_some());
        // In Katapult: another by-id name and USB id; by-path is the same.
        let dev = dir.path().join("dev");
        let klipper = dev.join("serial/by-id/usb-Klipper_stm32f446xx_ABC-if00");
        let katapult = dev.join("serial/by-id/usb-katapult_stm32f446xx_ABC-if00");
        fs::rename(&klipper, &katapult).unwrap();
        let usb = dir.path().join("sys/devices/usb1/1-1");
        fs::write(usb.join("idProduct"), "6177\n").unwrap();
        let back = live.wait_back("mcu", &ep, Duration::from_millis(300), &Cancel::new());
        assert!(matches!(back, Comeback::Gone), "{back:?}");
        fs::rename(&katapult, &klipper).unwrap();
        fs::write(usb.join("idProduct"), "614e\n").unwrap();
        let back = live.wait_back("mcu", &ep, Duration::from_secs(5), &Cancel::new());
        assert_eq!(back, Comeback::Klipper(klipper));
    }

    #[test]
    fn a_board_that_fell_into_dfu_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (live, ep) = board(dir.path());
        assert!(live.locate("mcu", &ep).is_some());
        let dev = dir.path().join("dev");
        fs::remove_file(dev.join("serial/by-id/usb-Klipper_stm32f446xx_ABC-if00")).unwrap();
        fs::remove_file(dev.join("serial/by-path/pci-usb-0:1:1.0")).unwrap();
        let rom = dir.path().join("sys/bus/usb/devices/1-1");
        fs::create_dir_all(&rom).unwrap();
        fs::write(rom.join("idVendor"), "0483\n").unwrap();
        fs::write(rom.join("idProduct"), "df11\n").unwrap();
        let started = Instant::now();
        let back = live.wait_back("mcu", &ep, Duration::from_secs(30), &Cancel::new());
        assert!(started.elapsed() < Duration::from_secs(5));
        match back {
            Comeback::RomLoader(r) => {
                assert_eq!(r.family, Family::Stm32);
                assert!(r.description.contains("0483:df11"));
            }
            other => panic!("{other:?}"),
        }
    }
}
