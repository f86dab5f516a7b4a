//! What a serial device is right now: a Klipper application, Katapult, a ROM loader, or
//! something without USB identity; and where it went after re-enumeration.
//!
//! Reads the device root (`$KFLASH_DEV_ROOT`, default /dev: `serial/by-id`, `serial/by-path`)
//! and the sysfs root (`$KFLASH_SYS_ROOT`, default /sys: `class/tty/<name>/device/..` holds
//! `idVendor`, `idProduct`, `manufacturer`, `product`, `serial`; `bus/usb/devices/<port>`).
//! The identity of a tty is the file name of ONE `read_link` hop of a by-id/by-path link.
//!
//! Stateless reads of the filesystem; thread-safe.

use std::fs;
use std::path::{Path, PathBuf};

use super::RomLoader;

/// The roots discovery reads (overridable for tests and the virtual printer bench).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    pub dev: PathBuf,
    pub sys: PathBuf,
}

impl Roots {
    /// `$KFLASH_DEV_ROOT` (default /dev) and `$KFLASH_SYS_ROOT` (default /sys).
    pub fn from_env() -> Self {
        let get = |key: &str, default: &str| {
            std::env::var_os(key)
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(default), PathBuf::from)
        };
        Self {
            dev: get("KFLASH_DEV_ROOT", "/dev"),
            sys: get("KFLASH_SYS_ROOT", "/sys"),
        }
    }
}

/// What is behind a USB port right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Klipper's application (1d50:614e or manufacturer "Klipper").
    Application,
    /// The Katapult bootloader (1d50:6177 or manufacturer "katapult").
    Katapult,
    /// A ROM loader: no tty, cannot be flashed through Katapult.
    Rom(RomLoader, String),
    /// A USB device kflash does not recognise (its `vid:pid`).
    Other(String),
}

/// The USB identity of a tty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbInfo {
    /// The USB device directory (its name is the port, e.g. "1-1.2").
    pub dir: PathBuf,
    pub usb_id: String,
    pub manufacturer: String,
    pub product: String,
}

fn read_line(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// The tty name behind `device`: one link hop for by-id/by-path links, else its file name.
pub fn tty_name(device: &Path) -> Option<String> {
    let in_serial_dir = device
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "by-id" || d == "by-path");
    if in_serial_dir {
        let target = fs::read_link(device).ok()?;
        return target.file_name().map(|n| n.to_string_lossy().into_owned());
    }
    device.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Read a USB device directory's identity files.
pub fn usb_dir_info(dir: &Path) -> Option<UsbInfo> {
    let vid = read_line(&dir.join("idVendor"))?.to_lowercase();
    let pid = read_line(&dir.join("idProduct"))?.to_lowercase();
    Some(UsbInfo {
        dir: dir.to_owned(),
        usb_id: format!("{vid}:{pid}"),
        manufacturer: read_line(&dir.join("manufacturer")).unwrap_or_default(),
        product: read_line(&dir.join("product")).unwrap_or_default(),
    })
}

/// The USB identity of the tty named `name`, if it is a USB tty.
pub fn tty_usb_info(roots: &Roots, name: &str) -> Option<UsbInfo> {
    let iface = fs::canonicalize(roots.sys.join("class/tty").join(name).join("device")).ok()?;
    // The interface directory's parent is the USB device; real sysfs may nest deeper.
    iface.ancestors().skip(1).take(3).find_map(usb_dir_info)
}

/// Classify a USB identity.
pub fn mode_of(info: &UsbInfo) -> Mode {
    let mfr = info.manufacturer.to_lowercase();
    match info.usb_id.as_str() {
        "1d50:6177" => Mode::Katapult,
        "1d50:614e" => Mode::Application,
        "0483:df11" => Mode::Rom(RomLoader::StmDfu, info.usb_id.clone()),
        "2e8a:0003" | "2e8a:000f" => Mode::Rom(RomLoader::RpBootsel, info.usb_id.clone()),
        _ if mfr == "katapult" => Mode::Katapult,
        _ if mfr == "klipper" => Mode::Application,
        other => Mode::Other(other.to_owned()),
    }
}

/// The by-path link that points at the tty named `name` (stable across re-enumeration).
pub fn by_path_link(roots: &Roots, name: &str) -> Option<PathBuf> {
    let dir = roots.dev.join("serial/by-path");
    let mut links: Vec<PathBuf> = fs::read_dir(&dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| tty_name(p).as_deref() == Some(name))
        .collect();
    links.sort();
    links.into_iter().next()
}

/// What the USB device directory `dir` (by port name under `bus/usb/devices`) is now.
pub fn port_mode(roots: &Roots, port: &str) -> Option<Mode> {
    usb_dir_info(&roots.sys.join("bus/usb/devices").join(port)).map(|i| mode_of(&i))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A sandbox laid out like the virtual printer bench for one USB board.
    pub(crate) struct Sandbox {
        pub dir: tempfile::TempDir,
        pub roots: Roots,
    }

    impl Sandbox {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let roots = Roots {
                dev: dir.path().join("dev"),
                sys: dir.path().join("sys"),
            };
            fs::create_dir_all(roots.dev.join("serial/by-id")).unwrap();
            fs::create_dir_all(roots.dev.join("serial/by-path")).unwrap();
            fs::create_dir_all(roots.sys.join("class/tty")).unwrap();
            fs::create_dir_all(roots.sys.join("bus/usb/devices")).unwrap();
            Self { dir, roots }
        }

        /// Present `tty` (pointing at `target`) as a USB device with these ids on `port`.
        pub(crate) fn plug(&self, tty: &str, target: &Path, port: &str, vid_pid: &str, mfr: &str) {
            let dev = &self.roots.dev;
            let _ = fs::remove_file(dev.join(tty));
            symlink(target, dev.join(tty)).unwrap();
            let by_id = dev.join("serial/by-id");
            for e in fs::read_dir(&by_id).unwrap().flatten() {
                if tty_name(&e.path()).as_deref() == Some(tty) {
                    fs::remove_file(e.path()).unwrap();
                }
            }
            symlink(
                format!("../../{tty}"),
                by_id.join(format!("usb-{mfr}_stm32f103xe_ABC-if00")),
            )
            .unwrap();
            let by_path = dev.join(format!("serial/by-path/platform-usb-0:{port}:1.0"));
            let _ = fs::remove_file(&by_path);
            symlink(format!("../../{tty}"), by_path).unwrap();
            let usbdir = self.roots.sys.join("devices").join(port);
            let iface = usbdir.join(format!("{port}:1.0"));
            fs::create_dir_all(&iface).unwrap();
            let (vid, pid) = vid_pid.split_once(':').unwrap();
            fs::write(usbdir.join("idVendor"), format!("{vid}\n")).unwrap();
            fs::write(usbdir.join("idProduct"), format!("{pid}\n")).unwrap();
            fs::write(usbdir.join("manufacturer"), format!("{mfr}\n")).unwrap();
            fs::write(usbdir.join("product"), "stm32f103xe\n").unwrap();
            let class = self.roots.sys.join("class/tty").join(tty);
            fs::create_dir_all(&class).unwrap();
            let _ = fs::remove_file(class.join("device"));
            symlink(&iface, class.join("device")).unwrap();
            let bus = self.roots.sys.join("bus/usb/devices").join(port);
            if !bus.exists() {
                symlink(&usbdir, bus).unwrap();
            }
        }

        /// The tty vanished (the board resets and re-enumerates).
        pub(crate) fn unplug(&self, tty: &str) {
            let _ = fs::remove_file(self.roots.dev.join(tty));
            for sub in ["serial/by-id", "serial/by-path"] {
                for e in fs::read_dir(self.roots.dev.join(sub)).unwrap().flatten() {
                    if tty_name(&e.path()).as_deref() == Some(tty) {
                        fs::remove_file(e.path()).unwrap();
                    }
                }
            }
            let _ = fs::remove_dir_all(self.roots.sys.join("class/tty").join(tty));
        }

        /// The board fell into a ROM loader: no tty, just USB ids on the port.
        pub(crate) fn rom(&self, tty: &str, port: &str, vid_pid: &str) {
            let _ = fs::remove_file(self.roots.dev.join(tty));
            for sub in ["serial/by-id", "serial/by-path"] {
                for e in fs::read_dir(self.roots.dev.join(sub)).unwrap().flatten() {
                    fs::remove_file(e.path()).unwrap();
                }
            }
            let usbdir = self.roots.sys.join("devices").join(port);
            let (vid, pid) = vid_pid.split_once(':').unwrap();
            fs::write(usbdir.join("idVendor"), format!("{vid}\n")).unwrap();
            fs::write(usbdir.join("idProduct"), format!("{pid}\n")).unwrap();
            fs::write(usbdir.join("manufacturer"), "STMicroelectronics\n").unwrap();
        }
    }

    #[test]
    fn identity_survives_re_enumeration_through_by_path() {
        let sb = Sandbox::new();
        sb.plug(
            "ttyACM0",
            Path::new("/dev/null"),
            "1-1.2",
            "1d50:614e",
            "Klipper",
        );
        let by_id = sb
            .roots
            .dev
            .join("serial/by-id/usb-Klipper_stm32f103xe_ABC-if00");
        assert_eq!(tty_name(&by_id).as_deref(), Some("ttyACM0"));
        let info = tty_usb_info(&sb.roots, "ttyACM0").unwrap();
        assert_eq!(mode_of(&info), Mode::Application);
        assert_eq!(info.dir.file_name().unwrap(), "1-1.2");
        let stable = by_path_link(&sb.roots, "ttyACM0").unwrap();
        // Katapult comes back on another ttyACM number; by-path follows it.
        sb.unplug("ttyACM0");
        sb.plug(
            "ttyACM1",
            Path::new("/dev/null"),
            "1-1.2",
            "1d50:6177",
            "katapult",
        );
        assert_eq!(tty_name(&stable).as_deref(), Some("ttyACM1"));
        let info = tty_usb_info(&sb.roots, "ttyACM1").unwrap();
        assert_eq!(mode_of(&info), Mode::Katapult);
        sb.rom("ttyACM1", "1-1.2", "0483:df11");
        assert_eq!(
            port_mode(&sb.roots, "1-1.2"),
            Some(Mode::Rom(RomLoader::StmDfu, "0483:df11".into()))
        );
        assert!(tty_name(&stable).is_none());
    }
}
