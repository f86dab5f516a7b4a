//! The pipeline's ports on a real printer: the registry and discovery (devices), the
//! firmware builder, Moonraker (klippy), the configured service backend, the flasher,
//! klippy's pre-warm, and for a flash run the watchdog process
//! (`crate::flash_run::LiveWatchdog`).
//!
//! Owns only adapters: no policy lives here. `Context::deps` reads the settings once per
//! run and builds every adapter from them. Each adapter passes its domain's error on
//! unchanged.
//!
//! Thread-safety: every adapter is `Send + Sync`; the device adapter keeps the stable
//! identity of each device (learnt when it was resolved) behind a mutex.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Context;
use crate::discovery::{self, Discovery, RomBoard, StableId, UsbMode};
use crate::events::Sink;
use crate::firmware::{self, BuildRequest};
use crate::flash::{self, Comeback, Endpoint, Tools};
use crate::flash_run::{LiveWatchdog, Run};
use crate::moonraker::{self, Client, ServiceAction};
use crate::pipeline::{
    self, Bootloader, Built, Deps, DeviceInfo, Firmware, Flash, InterfaceState, Inventory, Klippy,
    Prewarm, Service, Stopped, Watchdog,
};
use crate::prewarm;
use crate::process::{Cancel, Cmd};
use crate::registry::{self, Backend, KatapultFlasher, Settings};
use crate::service::{self, ServiceConfig, StopGuard};
use crate::versions;

/// Timeout of one Moonraker request made by the pipeline.
const MOONRAKER_TIMEOUT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The service settings of the registry, as the service module wants them.
pub fn service_config(s: &Settings) -> ServiceConfig {
    ServiceConfig {
        backend: s.service,
        unit: s.klipper_service.clone(),
        moonraker_url: s.moonraker_url.clone(),
        stop_command: s.stop_command.clone(),
        start_command: s.start_command.clone(),
    }
}

/// Registry devices + discovery. Also the flasher's `Watch`.
pub struct LiveDevices {
    context: Context,
    disc: Discovery,
    /// Stable identity of each serial device, learnt when it was resolved.
    stable: Mutex<HashMap<String, StableId>>,
    /// ROM loaders on the bus when each device was located for flashing (they belong to
    /// other boards).
    roms_before: Mutex<HashMap<String, Vec<PathBuf>>>,
    /// Identities kept by earlier runs (`identities.json`), to find boards in bootloaders.
    known: Mutex<BTreeMap<String, discovery::Identity>>,
}

impl LiveDevices {
    fn rom_paths(&self) -> Vec<PathBuf> {
        self.disc
            .find_rom_loaders()
            .into_iter()
            .map(|r| r.path)
            .collect()
    }

    /// The tty of a serial device: by its stable identity once known, else by its
    /// registered path (or pattern), else — a board sitting in its bootloader, whose
    /// by-id name and tty differ — by the identity kept from an earlier run, or the
    /// bootloader's by-id name for the same chip and serial.
    fn find_port(
        &self,
        key: &str,
        pattern: &str,
    ) -> Result<discovery::SerialPort, discovery::Error> {
        let stable = lock(&self.stable).get(key).cloned();
        if let Some(port) = stable.and_then(|s| self.disc.find(&s)) {
            return Ok(port);
        }
        let found = self.disc.resolve(pattern).or_else(|err| {
            let kept = lock(&self.known).get(key).cloned();
            kept.and_then(|id| self.disc.find_identity(&id))
                .or_else(|| {
                    let other = discovery::by_id_counterpart(pattern)?;
                    self.disc.resolve(&other).ok()
                })
                .ok_or(err)
        })?;
        lock(&self.stable).insert(key.to_owned(), StableId::of(&found));
        Ok(found)
    }

    fn port_path(&self, port: &discovery::SerialPort) -> PathBuf {
        port.path()
            .map_or_else(|| self.disc.dev.0.join(&port.tty), Path::to_path_buf)
    }
}

impl Inventory for LiveDevices {
    fn devices(&self) -> Result<Vec<DeviceInfo>, registry::Error> {
        let reg = self.context.registry()?;
        Ok(self.context.device_infos(&reg))
    }

    fn resolve(&self, dev: &DeviceInfo) -> Result<String, discovery::Error> {
        match &dev.endpoint {
            Endpoint::Serial { path } => self
                .find_port(&dev.key, path)
                .map(|p| self.port_path(&p).display().to_string()),
            Endpoint::Can { .. } | Endpoint::Linux { .. } => Ok(dev.endpoint.describe()),
        }
    }

    fn bootloader(&self, dev: &DeviceInfo) -> Option<Bootloader> {
        let Endpoint::Serial { path } = &dev.endpoint else {
            return None;
        };
        match self.find_port(&dev.key, path) {
            Ok(port) if discovery::usb_mode(&port) == UsbMode::Katapult => {
                Some(Bootloader::Katapult {
                    path: self.port_path(&port).display().to_string(),
                })
            }
            Ok(_) => None,
            Err(_) => {
                let kept = lock(&self.known).get(&dev.key).cloned()?;
                self.disc.rom_loader_of(&kept).map(Bootloader::RomLoader)
            }
        }
    }

    fn identity(&self, dev: &DeviceInfo) -> Option<discovery::Identity> {
        let Endpoint::Serial { path } = &dev.endpoint else {
            return None;
        };
        let port = self.find_port(&dev.key, path).ok()?;
        let fresh = discovery::Identity::of(&port);
        // A board found in its bootloader keeps what was learnt while it ran Klipper.
        let kept = lock(&self.known).get(&dev.key).cloned();
        Some(match kept {
            Some(kept) if discovery::usb_mode(&port) == UsbMode::Katapult => kept,
            _ => fresh,
        })
    }

    fn interface(&self, name: &str) -> InterfaceState {
        match self.disc.net_interface(name) {
            discovery::NetState::Up => InterfaceState::Up,
            discovery::NetState::Down => InterfaceState::Down,
            discovery::NetState::Missing => InterfaceState::Missing,
        }
    }
}

impl flash::Watch for LiveDevices {
    fn locate(&self, key: &str, endpoint: &Endpoint) -> Option<PathBuf> {
        lock(&self.roms_before).insert(key.to_owned(), self.rom_paths());
        let Endpoint::Serial { path } = endpoint else {
            return None;
        };
        self.find_port(key, path).ok().map(|p| self.port_path(&p))
    }

    fn wait_back(
        &self,
        key: &str,
        endpoint: &Endpoint,
        timeout: Duration,
        cancel: &Cancel,
    ) -> Comeback {
        let Endpoint::Serial { path } = endpoint else {
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
                None => self.disc.resolve(path).ok(),
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
                .into_iter()
                .find(|r| !known.contains(&r.path))
            {
                // Our board is gone and a new ROM loader appeared: it fell into it.
                return Comeback::RomLoader(r);
            }
            if cancel.is_cancelled() || Instant::now() >= deadline {
                if let Some(port) = port.filter(|p| discovery::usb_mode(p) == UsbMode::Katapult) {
                    return Comeback::Katapult(self.port_path(&port));
                }
                return match self.disc.find_rom_loaders().into_iter().next() {
                    Some(r) => Comeback::RomLoader(r),
                    None => Comeback::Gone,
                };
            }
            std::thread::sleep(discovery::POLL);
        }
    }

    fn rom_loaders(&self) -> Vec<RomBoard> {
        self.disc.find_rom_loaders()
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
    ) -> Vec<Result<Built, firmware::Error>> {
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
            })
            .collect()
    }
}

/// Klippy through Moonraker.
pub struct LiveKlippy {
    url: String,
    sections: Vec<String>,
}

impl LiveKlippy {
    fn client(&self) -> Result<Client, moonraker::Error> {
        Client::new(&self.url, MOONRAKER_TIMEOUT)
    }
}

impl Klippy for LiveKlippy {
    fn print_state(&self) -> Result<String, moonraker::Error> {
        let state = self.client()?.print_state()?;
        Ok(state.print_stats.unwrap_or_else(|| "standby".into()))
    }

    fn mcu_versions(&self) -> Result<BTreeMap<String, String>, moonraker::Error> {
        let sections: Vec<&str> = self.sections.iter().map(String::as_str).collect();
        let got = self.client()?.mcu_versions(&sections)?;
        Ok(got
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    fn mcu_chips(&self) -> BTreeMap<String, String> {
        let sections: Vec<&str> = self.sections.iter().map(String::as_str).collect();
        self.client()
            .and_then(|c| c.mcu_chips(&sections))
            .map(|got| {
                got.into_iter()
                    .filter_map(|(k, v)| v.map(|v| (k, v)))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn wait_ready(&self, timeout: Duration, cancel: &Cancel) -> Result<(), moonraker::Error> {
        self.client()?.wait_klippy_ready(timeout, cancel)
    }
}

/// The klipper service through the configured backend.
pub struct LiveService {
    cfg: ServiceConfig,
}

impl Stopped for StopGuard {
    fn restart(self: Box<Self>) -> Result<Duration, service::Error> {
        StopGuard::restart(*self)
    }
}

impl Service for LiveService {
    fn check(&self) -> Result<(), service::Error> {
        service::from_config(&self.cfg)?.check()
    }

    fn stop(&self) -> Result<Box<dyn Stopped>, service::Error> {
        let guard = service::stop(service::from_config(&self.cfg)?)?;
        Ok(Box::new(guard))
    }
}

/// Pre-warming klippy: which klippy from the settings and klippy's own word (Moonraker's
/// `/printer/info`), then `crate::prewarm`.
pub struct LivePrewarm {
    url: String,
    klipper_dir: PathBuf,
    klippy_dir: Option<PathBuf>,
    klippy_python: Option<PathBuf>,
    timeout: Duration,
}

impl LivePrewarm {
    /// The klippy the service runs, as klippy reports it (`None` when Moonraker or
    /// klippy cannot say).
    fn running(&self) -> Option<prewarm::Running> {
        let info = Client::new(&self.url, MOONRAKER_TIMEOUT)
            .and_then(|c| c.klippy_info())
            .ok()?;
        let path = |key: &str| info.get(key)?.as_str().map(PathBuf::from);
        Some(prewarm::Running {
            klipper_path: path("klipper_path")?,
            python: path("python_path")?,
        })
    }
}

impl Prewarm for LivePrewarm {
    fn locate(&self) -> Result<prewarm::Klippy, prewarm::Skip> {
        prewarm::locate(&prewarm::Lookup {
            klipper_dir: self.klipper_dir.clone(),
            klippy_dir: self.klippy_dir.clone(),
            klippy_python: self.klippy_python.clone(),
            running: self.running(),
        })
    }

    fn warm(
        &self,
        klippy: &prewarm::Klippy,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<prewarm::Warmed, prewarm::Error> {
        prewarm::warm(klippy, self.timeout, cancel, sink)
    }
}

/// No watchdog: what `plan`, `build` and `status` get (they never stop klipper).
struct NoWatchdog;

impl Watchdog for NoWatchdog {
    fn launch(&self) -> Result<(), service::Error> {
        Err(service::Error::Watchdog {
            reason: "only a flash run has a watchdog".into(),
            log: String::new(),
        })
    }

    fn arm(&self) -> Result<(), service::Error> {
        self.launch()
    }

    fn disarm(&self) {}
}

/// The real flasher behind the pipeline's `Flash` port.
impl Flash for flash::Flasher {
    fn check(&self, dev: &DeviceInfo) -> Result<(), flash::Error> {
        flash::Flasher::check(self, &dev.job(None))
    }

    fn flash(
        &self,
        dev: &DeviceInfo,
        built: &Built,
        cancel: &Cancel,
        sink: &Sink,
    ) -> Result<flash::Flashed, flash::Failure> {
        flash::Flasher::flash(self, &dev.job(Some(built)), cancel, sink)
    }

    fn hint(
        &self,
        dev: &DeviceInfo,
        built: Option<&Built>,
        loader: Option<discovery::RomLoader>,
    ) -> Option<String> {
        Some(flash::Flasher::hint(self, &dev.job(built), loader))
    }

    fn finish_timeout(&self) -> Duration {
        self.tools.flash_timeout
    }
}

/// Restart the linux MCU's service the way klipper's service is controlled: the setting
/// `linux_mcu_service` (an error when it does not exist), else whichever of `klipper-mcu`
/// and `klipper_mcu` exists (`Ok(None)` when neither does).
fn linux_restart(settings: &Settings) -> flash::LinuxRestart {
    let backend = settings.service;
    let url = settings.moonraker_url.clone();
    let configured = settings.linux_mcu_service.clone();
    Arc::new(
        move |cancel: &Cancel| -> Result<Option<String>, service::Error> {
            let units: Vec<&str> = match &configured {
                Some(unit) => vec![unit.as_str()],
                None => vec!["klipper-mcu", "klipper_mcu"],
            };
            let missing = |found: Option<String>| match (&configured, found) {
                (Some(unit), None) => Err(service::Error::Unavailable {
                    service: unit.clone(),
                    reason: "the service set as linux_mcu_service does not exist (empty: \
                             whichever of klipper-mcu / klipper_mcu exists)"
                        .into(),
                }),
                (_, found) => Ok(found),
            };
            let moonraker = |action: &'static str, unit: &str| {
                let service = unit.to_owned();
                move |e: moonraker::Error| service::Error::Moonraker {
                    action,
                    service,
                    source: Box::new(e),
                }
            };
            let command = |action: &'static str, unit: &str| {
                let service = unit.to_owned();
                move |e| service::Error::Command {
                    action,
                    service,
                    source: Box::new(e),
                }
            };
            match backend {
                Backend::Moonraker => {
                    let client = Client::new(&url, MOONRAKER_TIMEOUT)
                        .map_err(moonraker("find", "klipper-mcu"))?;
                    let available = client
                        .available_services()
                        .map_err(moonraker("find", "klipper-mcu"))?;
                    let Some(unit) = units.iter().find(|u| available.iter().any(|a| a == *u))
                    else {
                        return missing(None);
                    };
                    client
                        .service_action(ServiceAction::Restart, unit)
                        .map_err(moonraker("restart", unit))?;
                    Ok(Some((*unit).to_owned()))
                }
                Backend::Systemd => {
                    for unit in units.iter().copied() {
                        let listed = Cmd::new("systemctl")
                            .args(["list-unit-files", "--no-legend", &format!("{unit}.service")])
                            .timeout(Duration::from_secs(20))
                            .cancel(cancel)
                            .run_unchecked()
                            .map_err(command("find", unit))?;
                        if listed.stdout.contains(unit) {
                            Cmd::new("sudo")
                                .args(["-n", "systemctl", "restart", unit])
                                .timeout(Duration::from_secs(60))
                                .cancel(cancel)
                                .run()
                                .map_err(command("restart", unit))?;
                            return Ok(Some(unit.to_owned()));
                        }
                    }
                    missing(None)
                }
                Backend::Command => Ok(None),
            }
        },
    )
}

/// The native Katapult serial flasher in the shape of the flasher's seam: the default
/// for serial boards (setting `katapult_flasher`), flashtool.py its fallback, `make flash`
/// the last resort of `auto`.
pub fn native_katapult() -> flash::NativeKatapult {
    Arc::new(|req, cancel, sink| crate::katapult::flash_device(req, cancel, sink).map(drop))
}

impl Context {
    /// The real dependencies of flash run `run`, its watchdog included.
    pub fn deps_for(&self, run: &Arc<Run>) -> Result<Deps, registry::Error> {
        let mut deps = self.deps()?;
        deps.watchdog = Arc::new(LiveWatchdog {
            run: Arc::clone(run),
            state: self.state.clone(),
            python: self.python.clone(),
            service: service_config(&self.registry()?.settings),
        });
        Ok(deps)
    }

    /// The real dependencies of a run (no watchdog), from the current settings.
    pub fn deps(&self) -> Result<Deps, registry::Error> {
        let reg = self.registry()?;
        let s = &reg.settings;
        let devices = Arc::new(LiveDevices {
            context: self.clone(),
            disc: Discovery::from_env(),
            stable: Mutex::new(HashMap::new()),
            roms_before: Mutex::new(HashMap::new()),
            known: Mutex::new(pipeline::pending::identities(&self.state)),
        });
        let mut tools = Tools::new(&s.klipper_dir);
        tools.katapult_dir = Some(s.katapult_dir.clone());
        tools.linux_mcu_binary.clone_from(&s.linux_mcu_binary);
        tools.flash_timeout = Duration::from_secs(s.flash_timeout_s);
        tools.linux_restart = Some(linux_restart(s));
        tools.linux_mcu_service.clone_from(&s.linux_mcu_service);
        tools.native_katapult = match s.katapult_flasher {
            KatapultFlasher::Native => self.native_katapult.clone(),
            KatapultFlasher::Flashtool => None,
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
            klippy: Arc::new(LiveKlippy {
                url: s.moonraker_url.clone(),
                sections: reg.devices.iter().map(|d| d.mcu_section.clone()).collect(),
            }),
            service: Arc::new(LiveService { cfg }),
            flasher: Arc::new(flash::Flasher::new(tools, devices)),
            watchdog: Arc::new(NoWatchdog),
            prewarm: s.prewarm.then(|| {
                Arc::new(LivePrewarm {
                    url: s.moonraker_url.clone(),
                    klipper_dir: s.klipper_dir.clone(),
                    klippy_dir: s.klippy_dir.clone(),
                    klippy_python: s.klippy_python.clone(),
                    timeout: Duration::from_secs(s.build_timeout_s),
                }) as Arc<dyn Prewarm>
            }),
            flash_parallel: s.flash_parallel,
            compare: versions::compare,
            state: self.state.clone(),
            flashed_dir: self.state.flashed_dir(),
            stagger: Duration::from_millis(200),
            ready_timeout,
            auto_rollback: s.auto_rollback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::RomLoader;
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
            context: Context::open(Some(root.join("state"))).unwrap(),
            disc: Discovery::at(&dev, &sys),
            stable: Mutex::new(HashMap::new()),
            roms_before: Mutex::new(HashMap::new()),
            known: Mutex::new(BTreeMap::new()),
        };
        let endpoint = Endpoint::Serial {
            path: format!("/dev/serial/by-id/{name}"),
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
        assert_eq!(
            back,
            Comeback::Katapult(katapult.clone()),
            "still in Katapult"
        );
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
                assert_eq!(r.loader, RomLoader::StmDfu);
                assert!(r.describe().contains("0483:df11"));
            }
            other => panic!("{other:?}"),
        }
    }
}
