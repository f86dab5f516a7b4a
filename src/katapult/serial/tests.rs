//! The real serial port code against a fake bootloader thread on a pty: bootloader entry,
//! re-enumeration, ROM loaders, UART requests, faults in real time.

use super::*;
use crate::events;
use crate::katapult::codec::Command;
use crate::katapult::fake::{collect, image_of, FakeBootloader, Faults, PtyDevice, Sandbox, MCU};
use crate::katapult::image::tests::fake_image;
use crate::katapult::port::pty;
use crate::katapult::RomLoader;
use std::sync::Arc;

#[test]
fn only_stm32_parts_with_double_buffered_usb_are_primed() {
    assert!(needs_priming("stm32f103xe") && needs_priming("STM32G0B1XX"));
    assert!(
        !needs_priming("stm32f446xx") && !needs_priming("stm32h723xx") && !needs_priming("rp2040")
    );
}

// ---- the real serial port against a fake bootloader on a pty ----

fn quick_timing() -> Timing {
    Timing {
        reenumerate: Duration::from_secs(3),
        uart_reboot: Duration::from_millis(50),
        connect: Duration::from_millis(300),
        connect_tries: 5,
        block: Duration::from_millis(300),
        block_tries: 3,
        read: Duration::from_millis(300),
        read_tries: 3,
        settle: Duration::from_millis(20),
        poll: Duration::from_millis(5),
    }
}

fn opts_for(device: &Path, firmware: &Path, roots: &Discovery) -> SerialFlashOptions {
    SerialFlashOptions {
        device: device.to_owned(),
        firmware: firmware.to_owned(),
        baud: None,
        stable: None,
        discovery: roots.clone(),
        timing: quick_timing(),
        app_start: None,
    }
}

fn empty_roots(dir: &Path) -> Discovery {
    Discovery::at(dir.join("dev"), dir.join("sys"))
}

#[test]
fn pty_flash_of_every_size_and_block_size() {
    let dir = tempfile::tempdir().unwrap();
    let roots = empty_roots(dir.path());
    for bs in [64u32, 128, 256, 512] {
        for len in [1usize, 63, 4096] {
            pty_flash(dir.path(), &roots, bs, len);
        }
    }
    pty_flash(dir.path(), &roots, 512, 1 << 20);
}

#[test]
fn pty_flash_of_one_mib_in_every_block_size() {
    let dir = tempfile::tempdir().unwrap();
    let roots = empty_roots(dir.path());
    for bs in [64u32, 128, 256] {
        pty_flash(dir.path(), &roots, bs, 1 << 20);
    }
}

fn pty_flash(dir: &Path, roots: &Discovery, bs: u32, len: usize) {
    {
        {
            let p = pty::open();
            let fake = PtyDevice::serve(p.master, FakeBootloader::new(MCU, bs), false, None);
            let fw = dir.join("klipper.bin");
            let image = image_of(len);
            std::fs::write(&fw, &image).unwrap();
            let report = flash_serial(
                &opts_for(&p.slave_path, &fw, roots),
                &Cancel::new(),
                &events::discard(),
            )
            .unwrap_or_else(|e| panic!("bs {bs} len {len}: {e}"));
            assert_eq!(report.bytes, len);
            let dev = fake.device.lock().unwrap();
            assert_eq!(dev.read(0x0800_2000, len), image, "bs {bs} len {len}");
            assert!(dev.completed);
        }
    }
}

#[test]
fn pty_faults_are_recovered_or_fail_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let roots = empty_roots(dir.path());
    let fw = dir.path().join("klipper.bin");
    let image = image_of(4096);
    std::fs::write(&fw, &image).unwrap();
    let recoverable = [
        Faults {
            corrupt_reply_every: Some(6),
            ..Faults::default()
        },
        Faults {
            drop_reply_every: Some(23),
            ..Faults::default()
        },
        Faults {
            drop_request_every: Some(29),
            ..Faults::default()
        },
        Faults {
            nack_every: Some(13),
            ..Faults::default()
        },
        Faults {
            erase_delay: Duration::from_millis(200),
            ..Faults::default()
        },
    ];
    for faults in recoverable {
        let p = pty::open();
        let mut dev = FakeBootloader::new(MCU, 64);
        dev.faults = faults.clone();
        let fake = PtyDevice::serve(p.master, dev, false, None);
        flash_serial(
            &opts_for(&p.slave_path, &fw, &roots),
            &Cancel::new(),
            &events::discard(),
        )
        .unwrap_or_else(|e| panic!("{faults:?}: {e}"));
        assert_eq!(
            fake.device.lock().unwrap().read(0x0800_2000, image.len()),
            image
        );
    }
    // A board whose every reply is corrupted never reports flashed.
    let p = pty::open();
    let mut dev = FakeBootloader::new(MCU, 64);
    dev.faults.corrupt_reply_every = Some(1);
    let _fake = PtyDevice::serve(p.master, dev, false, None);
    let err = flash_serial(
        &opts_for(&p.slave_path, &fw, &roots),
        &Cancel::new(),
        &events::discard(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("protocol error in connect: only damaged replies after 5 tries"),
        "{err}"
    );
    // Slower than every try: a timeout in write naming the first block's address.
    let p = pty::open();
    let mut dev = FakeBootloader::new(MCU, 64);
    dev.faults.refuse_block_at = None;
    dev.faults.erase_delay = Duration::from_secs(1);
    let _fake = PtyDevice::serve(p.master, dev, false, None);
    let mut opts = opts_for(&p.slave_path, &fw, &roots);
    opts.timing.block_tries = 1;
    let err = flash_serial(&opts, &Cancel::new(), &events::discard()).unwrap_err();
    assert!(
        err.to_string()
            .contains("timeout in write at address 0x08002000"),
        "{err}"
    );
}

#[test]
fn pty_usb_board_is_touched_found_again_by_path_and_flashed() {
    let sb = Sandbox::new();
    let p = pty::open();
    let pts = p.slave_path.clone();
    sb.plug("ttyACM0", &pts, "1-1.2", "1d50:614e", "Klipper");
    let roots = sb.discovery.clone();
    let sb = Arc::new(sb);
    let sb2 = sb.clone();
    let flip: Box<dyn FnOnce() + Send> = Box::new(move || {
        sb2.unplug("ttyACM0");
        sb2.plug("ttyACM1", &pts, "1-1.2", "1d50:6177", "katapult");
    });
    let fake = PtyDevice::serve(p.master, FakeBootloader::new(MCU, 64), true, Some(flip));
    let fw = sb.dir.path().join("klipper.bin");
    let image = fake_image(MCU, "v0.13.0-731-gdeadbee", 6, 7000);
    std::fs::write(&fw, &image).unwrap();
    let by_id = roots
        .dev
        .0
        .join("serial/by-id/usb-Klipper_stm32f103xe_ABC-if00");
    let (sink, events) = collect();
    let report = flash_serial(&opts_for(&by_id, &fw, &roots), &Cancel::new(), &sink).unwrap();
    assert_eq!(
        report.device,
        roots
            .dev
            .0
            .join("serial/by-id/usb-katapult_stm32f103xe_ABC-if00")
    );
    assert_eq!(
        report.firmware_version.as_deref(),
        Some("v0.13.0-731-gdeadbee")
    );
    assert_eq!(
        fake.device.lock().unwrap().read(0x0800_2000, image.len()),
        image
    );
    let events = events.lock().unwrap();
    assert!(events.iter().any(|e| e.message.contains("1200-baud touch")));
    assert!(events
        .iter()
        .any(|e| e.message.starts_with("Katapult appeared on")));
}

#[test]
fn pty_board_left_in_katapult_is_found_from_its_klipper_link() {
    let sb = Sandbox::new();
    let p = pty::open();
    sb.plug("ttyACM3", &p.slave_path, "1-1.2", "1d50:6177", "katapult");
    let fake = PtyDevice::serve(p.master, FakeBootloader::new(MCU, 64), false, None);
    let fw = sb.dir.path().join("klipper.bin");
    let image = image_of(1000);
    std::fs::write(&fw, &image).unwrap();
    // The registry knows the board by its application's by-id link, which is gone now.
    let klipper_link = sb
        .discovery
        .dev
        .0
        .join("serial/by-id/usb-Klipper_stm32f103xe_ABC-if00");
    assert!(!klipper_link.exists());
    let report = flash_serial(
        &opts_for(&klipper_link, &fw, &sb.discovery),
        &Cancel::new(),
        &events::discard(),
    )
    .unwrap();
    assert!(report.device.ends_with("usb-katapult_stm32f103xe_ABC-if00"));
    assert_eq!(
        fake.device.lock().unwrap().read(0x0800_2000, image.len()),
        image
    );
    assert_eq!(
        by_id_counterpart("/dev/serial/by-id/usb-katapult_rp2040_E66-if00").as_deref(),
        Some("/dev/serial/by-id/usb-Klipper_rp2040_E66-if00")
    );
    assert_eq!(
        by_id_counterpart("usb-Klipper_rp2040_E66-if00").as_deref(),
        Some("usb-katapult_rp2040_E66-if00")
    );
    assert_eq!(by_id_counterpart("/dev/ttyACM0"), None);
}

#[test]
fn pty_usb_board_that_falls_into_dfu_is_reported_with_recovery_steps() {
    let sb = Arc::new(Sandbox::new());
    let p = pty::open();
    sb.plug("ttyACM0", &p.slave_path, "1-1.2", "1d50:614e", "Klipper");
    let sb2 = sb.clone();
    let to_dfu: Box<dyn FnOnce() + Send> =
        Box::new(move || sb2.rom("ttyACM0", "1-1.2", "0483:df11"));
    let _fake = PtyDevice::serve(p.master, FakeBootloader::new(MCU, 64), true, Some(to_dfu));
    let fw = sb.dir.path().join("klipper.bin");
    std::fs::write(&fw, image_of(100)).unwrap();
    let by_id = sb
        .discovery
        .dev
        .0
        .join("serial/by-id/usb-Klipper_stm32f103xe_ABC-if00");
    let err = flash_serial(
        &opts_for(&by_id, &fw, &sb.discovery),
        &Cancel::new(),
        &events::discard(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::RomLoader {
                loader: RomLoader::StmDfu,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("STM32 DFU (0483:df11)") && text.contains("nothing was flashed"),
        "{text}"
    );
    assert!(text.contains("dfu-util"), "{text}");
}

#[test]
fn pty_usb_board_that_never_comes_back_is_not_in_bootloader() {
    let sb = Sandbox::new();
    let p = pty::open();
    sb.plug("ttyACM0", &p.slave_path, "1-1.2", "1d50:614e", "Klipper");
    let _fake = PtyDevice::serve(p.master, FakeBootloader::new(MCU, 64), true, None);
    let fw = sb.dir.path().join("klipper.bin");
    std::fs::write(&fw, image_of(100)).unwrap();
    let by_id = sb
        .discovery
        .dev
        .0
        .join("serial/by-id/usb-Klipper_stm32f103xe_ABC-if00");
    let mut opts = opts_for(&by_id, &fw, &sb.discovery);
    opts.timing.reenumerate = Duration::from_millis(300);
    let err = flash_serial(&opts, &Cancel::new(), &events::discard()).unwrap_err();
    assert!(err.is_timeout());
    assert!(err.to_string().starts_with("not in bootloader:"), "{err}");
    assert!(
        err.to_string()
            .contains("did not re-enumerate as Katapult within 0.3 s"),
        "{err}"
    );
}

#[test]
fn pty_uart_board_gets_the_request_string_then_is_flashed() {
    let dir = tempfile::tempdir().unwrap();
    let p = pty::open();
    let master = p.master.try_clone().unwrap();
    let fake = PtyDevice::serve(p.master, FakeBootloader::new(MCU, 64), true, None);
    let fw = dir.path().join("klipper.bin");
    let image = image_of(3000);
    std::fs::write(&fw, &image).unwrap();
    let mut opts = opts_for(&p.slave_path, &fw, &empty_roots(dir.path()));
    opts.baud = Some(115_200);
    flash_serial(&opts, &Cancel::new(), &events::discard()).unwrap();
    assert_eq!(
        fake.device.lock().unwrap().read(0x0800_2000, image.len()),
        image
    );
    assert_eq!(pty::speed(std::os::fd::AsFd::as_fd(&master)), 115_200);
}

#[test]
fn pty_board_that_never_answers_gets_a_hint_about_uart_baud() {
    let dir = tempfile::tempdir().unwrap();
    let p = pty::open();
    let mut dev = FakeBootloader::new(MCU, 64);
    dev.faults.silent = true;
    let _fake = PtyDevice::serve(p.master, dev, false, None);
    let fw = dir.path().join("klipper.bin");
    std::fs::write(&fw, image_of(100)).unwrap();
    let mut opts = opts_for(&p.slave_path, &fw, &empty_roots(dir.path()));
    opts.timing.connect_tries = 2;
    opts.timing.connect = Duration::from_millis(100);
    let err = flash_serial(&opts, &Cancel::new(), &events::discard()).unwrap_err();
    assert!(err.is_timeout());
    let text = err.to_string();
    assert!(
        text.starts_with("timeout in connect: no Katapult bootloader answered"),
        "{text}"
    );
    assert!(text.contains("give its baud rate (-b)"), "{text}");
}

#[test]
fn pty_status_connects_reports_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let p = pty::open();
    let fake = PtyDevice::serve(p.master, FakeBootloader::new(MCU, 128), false, None);
    let opts = SerialStatusOptions {
        device: p.slave_path.clone(),
        baud: None,
        stable: None,
        discovery: empty_roots(dir.path()),
        timing: quick_timing(),
    };
    let info = status_serial(&opts, &Cancel::new(), &events::discard()).unwrap();
    assert_eq!(info.mcu, MCU);
    assert_eq!(info.block_size, 128);
    assert_eq!(info.proto_version, "1.1.0");
    assert_eq!(info.app_start, 0x0800_2000);
    assert_eq!(info.bootloader_version.as_deref(), Some("v0.0.1-fake"));
    let dev = fake.device.lock().unwrap();
    assert_eq!(dev.log, vec![Command::Connect, Command::Complete]);
}

#[test]
fn a_freshly_enumerated_tty_gets_a_grace_to_appear_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let p = pty::open();
    let link = dir.path().join("ttyACM7");
    let entered = |fresh| Entered {
        path: link.clone(),
        prime: false,
        fresh,
    };
    let err = open_session_port(&entered(false), None, &Cancel::new()).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    let (target, at) = (p.slave_path.clone(), link.clone());
    let udev = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        std::os::unix::fs::symlink(target, at).unwrap();
    });
    open_session_port(&entered(true), None, &Cancel::new()).unwrap();
    udev.join().unwrap();
}

#[test]
fn missing_and_empty_firmware_are_refused_before_touching_the_board() {
    let dir = tempfile::tempdir().unwrap();
    let roots = empty_roots(dir.path());
    let missing = flash_serial(
        &opts_for(Path::new("/dev/null"), &dir.path().join("nope.bin"), &roots),
        &Cancel::new(),
        &events::discard(),
    );
    assert!(matches!(missing, Err(Error::Firmware { .. })));
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let err = flash_serial(
        &opts_for(Path::new("/dev/null"), &empty, &roots),
        &Cancel::new(),
        &events::discard(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("is empty"), "{err}");
}

#[test]
fn pty_a_bootloader_that_starts_the_application_elsewhere_gets_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let roots = empty_roots(dir.path());
    let fw = dir.path().join("klipper.bin");
    std::fs::write(&fw, image_of(4096)).unwrap();
    let p = pty::open();
    // The fake bootloader starts the application at 0x08002000 (an 8 KiB Katapult).
    let fake = PtyDevice::serve(p.master, FakeBootloader::new(MCU, 64), false, None);
    let mut opts = opts_for(&p.slave_path, &fw, &roots);
    opts.app_start = Some(AppStart {
        address: 0x0800_8000,
        flash_start: 0x0800_0000,
    });
    let err = flash_serial(&opts, &Cancel::new(), &events::discard()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::AppStartMismatch { .. }), "{msg}");
    assert!(
        msg.contains("0x08002000") && msg.contains("0x08008000"),
        "{msg}"
    );
    assert!(msg.contains("\"8KiB bootloader\""), "{msg}");
    assert_eq!(err.offset_to_choose().as_deref(), Some("8KiB bootloader"));
    assert!(
        !err.worth_another_flasher(),
        "flashtool.py would write at the wrong offset"
    );
    let dev = fake.device.lock().unwrap();
    assert!(dev.flash.is_empty(), "nothing written");
    assert!(dev.completed, "sent back to its application");
}

#[test]
fn pty_an_abandoned_flash_with_nothing_written_sends_complete() {
    let dir = tempfile::tempdir().unwrap();
    let roots = empty_roots(dir.path());
    let fw = dir.path().join("klipper.bin");
    std::fs::write(&fw, image_of(4096)).unwrap();
    let p = pty::open();
    let fake = PtyDevice::serve(p.master, FakeBootloader::new(MCU, 64), false, None);
    let cancel = Cancel::new();
    cancel.abandon();
    let err = flash_serial(
        &opts_for(&p.slave_path, &fw, &roots),
        &cancel,
        &events::discard(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err}");
    let dev = fake.device.lock().unwrap();
    assert!(dev.flash.is_empty());
    assert!(
        dev.completed,
        "a board in Katapult with nothing written gets COMPLETE"
    );
}
