//! Discovery against sandbox device and sysfs trees laid out like the bench's.

use super::*;
use std::os::unix::fs::symlink;

struct Sandbox {
    _tmp: tempfile::TempDir,
    dev: PathBuf,
    sys: PathBuf,
}

fn by_id_name(maker: &str, mcu: &str, serial: &str) -> String {
    format!("usb-{maker}_{mcu}_{serial}-if00")
}

impl Sandbox {
    fn new() -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        let dev = tmp.path().join("dev");
        let sys = tmp.path().join("sys");
        fs::create_dir_all(dev.join("serial/by-id")).unwrap();
        fs::create_dir_all(dev.join("serial/by-path")).unwrap();
        fs::create_dir_all(sys.join("class/tty")).unwrap();
        Sandbox {
            _tmp: tmp,
            dev,
            sys,
        }
    }

    fn discovery(&self) -> Discovery {
        Discovery::at(&self.dev, &self.sys)
    }

    /// A USB board: ttyACM<n> -> /dev/pts/<n+10>, by-id and by-path links, sysfs ids.
    fn usb_board(&self, n: u32, maker: &str, mcu: &str, serial: &str, port: &str, product: u16) {
        let tty = format!("ttyACM{n}");
        symlink(format!("/dev/pts/{}", n + 10), self.dev.join(&tty)).unwrap();
        symlink(
            format!("../../{tty}"),
            self.dev
                .join("serial/by-id")
                .join(by_id_name(maker, mcu, serial)),
        )
        .unwrap();
        symlink(
            format!("../../{tty}"),
            self.dev
                .join("serial/by-path")
                .join(format!("platform-xhci-hcd.0-usb-0:{port}:1.0")),
        )
        .unwrap();
        let usb_dev = self.sys.join("devices/usb1").join(format!("1-{port}"));
        let iface = usb_dev.join(format!("1-{port}:1.0"));
        fs::create_dir_all(&iface).unwrap();
        fs::write(usb_dev.join("idVendor"), "1d50\n").unwrap();
        fs::write(usb_dev.join("idProduct"), format!("{product:04x}\n")).unwrap();
        fs::write(usb_dev.join("serial"), format!("{serial}\n")).unwrap();
        fs::write(usb_dev.join("manufacturer"), format!("{maker}\n")).unwrap();
        fs::write(usb_dev.join("product"), format!("{mcu}\n")).unwrap();
        let class = self.sys.join("class/tty").join(&tty);
        fs::create_dir_all(&class).unwrap();
        symlink(&iface, class.join("device")).unwrap();
    }

    /// The board at ttyACM<n> leaves: its links and its sysfs tty entry disappear.
    fn unplug(&self, n: u32, maker: &str, mcu: &str, serial: &str, port: &str) {
        let tty = format!("ttyACM{n}");
        fs::remove_file(self.dev.join(&tty)).unwrap();
        fs::remove_file(
            self.dev
                .join("serial/by-id")
                .join(by_id_name(maker, mcu, serial)),
        )
        .unwrap();
        fs::remove_file(
            self.dev
                .join("serial/by-path")
                .join(format!("platform-xhci-hcd.0-usb-0:{port}:1.0")),
        )
        .unwrap();
        fs::remove_dir_all(self.sys.join("class/tty").join(&tty)).unwrap();
        fs::remove_dir_all(self.sys.join("devices/usb1").join(format!("1-{port}"))).unwrap();
    }

    fn three_boards(&self) {
        self.usb_board(0, "Klipper", "stm32f446xx", "1A2B", "1.2", 0x614e);
        self.usb_board(1, "Klipper", "stm32f103xe", "3C4D", "1.3", 0x614e);
        self.usb_board(2, "Klipper", "rp2040", "E661", "1.4", 0x606f);
    }
}

#[test]
fn scan_joins_by_id_and_by_path_with_usb_details() {
    let sb = Sandbox::new();
    sb.three_boards();
    let ports = sb.discovery().scan();
    assert_eq!(ports.len(), 3);
    let octopus = ports.iter().find(|p| p.tty == "ttyACM0").unwrap();
    assert_eq!(
        octopus.by_id_name().as_deref(),
        Some("usb-Klipper_stm32f446xx_1A2B-if00")
    );
    assert_eq!(
        octopus.by_path_name().as_deref(),
        Some("platform-xhci-hcd.0-usb-0:1.2:1.0")
    );
    let usb = octopus.usb.as_ref().unwrap();
    assert_eq!((usb.vendor, usb.product), (0x1d50, 0x614e));
    assert_eq!(usb.serial.as_deref(), Some("1A2B"));
    assert_eq!(usb.manufacturer.as_deref(), Some("Klipper"));
    assert_eq!(usb.product_name.as_deref(), Some("stm32f446xx"));
    assert_eq!(usb_mode(octopus), UsbMode::Klipper);
    let bridge = ports.iter().find(|p| p.tty == "ttyACM2").unwrap();
    assert_eq!(usb_mode(bridge), UsbMode::UsbCanBridge);
}

#[test]
fn tty_is_one_link_hop_not_the_pty() {
    let sb = Sandbox::new();
    sb.usb_board(5, "Klipper", "rp2040", "E661", "1.1", 0x614e);
    let ports = sb.discovery().scan();
    assert_eq!(ports[0].tty, "ttyACM5", "not pts/15");
}

#[test]
fn empty_or_missing_roots_scan_to_nothing() {
    let d = Discovery::at("/nonexistent/dev", "/nonexistent/sys");
    assert!(d.scan().is_empty());
    assert!(d.find_rom_loaders().is_empty());
    let msg = d.resolve("usb-Klipper_*").unwrap_err().to_string();
    assert!(msg.contains("none"), "{msg}");
}

#[test]
fn resolve_by_full_path_name_and_glob() {
    let sb = Sandbox::new();
    sb.three_boards();
    let d = sb.discovery();
    let full = sb
        .dev
        .join("serial/by-id/usb-Klipper_stm32f103xe_3C4D-if00");
    assert_eq!(d.resolve(full.to_str().unwrap()).unwrap().tty, "ttyACM1");
    assert_eq!(
        d.resolve("usb-Klipper_stm32f446xx_1A2B-if00").unwrap().tty,
        "ttyACM0"
    );
    assert_eq!(d.resolve("usb-Klipper_rp2040*").unwrap().tty, "ttyACM2");
    assert_eq!(d.resolve("*-usb-0:1.3:1.0").unwrap().tty, "ttyACM1");
    assert_eq!(
        d.resolve("/dev/serial/by-id/*stm32f446*").unwrap().tty,
        "ttyACM0"
    );
    // A by-path directory hint does not match by-id names.
    assert!(d
        .resolve("/dev/serial/by-path/usb-Klipper_rp2040*")
        .is_err());
}

#[test]
fn glob_matching_nothing_lists_what_is_present() {
    let sb = Sandbox::new();
    sb.three_boards();
    let err = sb
        .discovery()
        .resolve("usb-Klipper_stm32h723*")
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }));
    let msg = err.to_string();
    assert!(msg.contains("usb-Klipper_stm32h723*"), "{msg}");
    for present in [
        "usb-Klipper_stm32f446xx_1A2B-if00",
        "usb-Klipper_stm32f103xe_3C4D-if00",
        "usb-Klipper_rp2040_E661-if00",
    ] {
        assert!(msg.contains(present), "{msg}");
    }
}

#[test]
fn glob_matching_several_lists_the_candidates() {
    let sb = Sandbox::new();
    sb.three_boards();
    let err = sb.discovery().resolve("usb-Klipper_stm32*").unwrap_err();
    assert!(matches!(err, Error::Ambiguous { .. }));
    let msg = err.to_string();
    assert!(msg.contains("usb-Klipper_stm32f446xx_1A2B-if00"), "{msg}");
    assert!(msg.contains("usb-Klipper_stm32f103xe_3C4D-if00"), "{msg}");
    assert!(!msg.contains("rp2040"), "{msg}");
}

#[test]
fn a_uart_outside_by_id_resolves_by_path() {
    let sb = Sandbox::new();
    fs::write(sb.dev.join("ttyAMA0"), "").unwrap();
    let d = sb.discovery();
    let port = d.resolve(sb.dev.join("ttyAMA0").to_str().unwrap()).unwrap();
    assert_eq!(port.tty, "ttyAMA0");
    assert_eq!(port.usb, None);
    // /dev/... paths are looked up under the device root too.
    assert_eq!(d.resolve("/dev/ttyAMA0").unwrap().tty, "ttyAMA0");
    assert_eq!(StableId::of(&port), StableId::Tty("ttyAMA0".into()));
}

#[test]
fn the_board_is_found_again_after_bootloader_entry() {
    let sb = Sandbox::new();
    sb.usb_board(0, "Klipper", "stm32f446xx", "1A2B", "1.2", 0x614e);
    let d = sb.discovery();
    let before = d.resolve("usb-Klipper_stm32f446xx*").unwrap();
    let stable = StableId::of(&before);
    assert_eq!(
        stable,
        StableId::ByPath("platform-xhci-hcd.0-usb-0:1.2:1.0".into())
    );
    // Bootloader entry: the Klipper link goes, Katapult appears on another ttyACM number.
    sb.unplug(0, "Klipper", "stm32f446xx", "1A2B", "1.2");
    assert!(d.find(&stable).is_none());
    sb.usb_board(3, "katapult", "stm32f446xx", "1A2B", "1.2", 0x6177);
    let after = d.find(&stable).unwrap();
    assert_eq!(after.tty, "ttyACM3");
    assert_eq!(usb_mode(&after), UsbMode::Katapult);
    assert_eq!(
        after.by_id_name().as_deref(),
        Some("usb-katapult_stm32f446xx_1A2B-if00")
    );
    // The USB serial is stable too.
    assert!(StableId::UsbSerial("1A2B".into()).matches(&after));
}

#[test]
fn usb_serial_falls_back_to_the_by_id_name() {
    let port = SerialPort {
        by_id: Some(PathBuf::from(
            "/dev/serial/by-id/usb-katapult_rp2040_E6614C311B-if00",
        )),
        by_path: None,
        tty: "ttyACM0".into(),
        usb: None,
    };
    assert_eq!(port.usb_serial().as_deref(), Some("E6614C311B"));
    assert_eq!(
        StableId::of(&port),
        StableId::UsbSerial("E6614C311B".into())
    );
    assert_eq!(usb_mode(&port), UsbMode::Katapult);
}

#[test]
fn wait_for_returns_the_device_once_it_appears() {
    let sb = Sandbox::new();
    let d = sb.discovery();
    let stable = StableId::ByPath("platform-xhci-hcd.0-usb-0:1.2:1.0".into());
    let cancel = Cancel::new();
    let waiter = {
        let d = d.clone();
        let stable = stable.clone();
        let cancel = cancel.clone();
        std::thread::spawn(move || d.wait_for(&stable, Duration::from_secs(20), &cancel))
    };
    sb.usb_board(7, "katapult", "rp2040", "E661", "1.2", 0x6177);
    let port = waiter.join().unwrap().unwrap();
    assert_eq!(port.tty, "ttyACM7");
}

#[test]
fn wait_for_times_out_listing_what_is_present() {
    let sb = Sandbox::new();
    sb.usb_board(0, "Klipper", "rp2040", "E661", "1.4", 0x614e);
    let d = sb.discovery();
    let stable = StableId::ByPath("platform-xhci-hcd.0-usb-0:9.9:1.0".into());
    let started = Instant::now();
    let err = d
        .wait_for(&stable, Duration::from_millis(120), &Cancel::new())
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(120));
    let msg = err.to_string();
    assert!(matches!(err, Error::Timeout { .. }), "{msg}");
    assert!(
        msg.contains("9.9") && msg.contains("usb-Klipper_rp2040_E661-if00"),
        "{msg}"
    );
}

#[test]
fn wait_for_stops_when_cancelled() {
    let sb = Sandbox::new();
    let cancel = Cancel::new();
    cancel.cancel();
    let err = sb
        .discovery()
        .wait_for(
            &StableId::Tty("ttyACM0".into()),
            Duration::from_secs(60),
            &cancel,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }));
}

#[test]
fn rom_loaders_are_found_by_usb_id() {
    let sb = Sandbox::new();
    let devices = sb.sys.join("bus/usb/devices");
    for (port, vendor, product) in [
        ("1-1.2", "0483", "df11"),
        ("1-1.3", "2e8a", "0003"),
        ("1-1.4", "2e8a", "000f"),
        ("1-1.5", "1d50", "614e"),
    ] {
        let dir = devices.join(port);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("idVendor"), format!("{vendor}\n")).unwrap();
        fs::write(dir.join("idProduct"), format!("{product}\n")).unwrap();
    }
    fs::create_dir_all(devices.join("usb1")).unwrap();
    let loaders = sb.discovery().find_rom_loaders();
    let found: Vec<(RomLoader, &str, String)> = loaders
        .iter()
        .map(|l| (l.loader, l.usb_id.as_str(), file_name(&l.path).unwrap()))
        .collect();
    assert_eq!(
        found,
        [
            (RomLoader::StmDfu, "0483:df11", "1-1.2".to_string()),
            (RomLoader::RpBootsel, "2e8a:0003", "1-1.3".to_string()),
            (RomLoader::RpBootsel, "2e8a:000f", "1-1.4".to_string()),
        ]
    );
}
