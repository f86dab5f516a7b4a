use super::*;
use crate::discovery::RomLoader;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex;

struct FakeWatch {
    comeback: Comeback,
    roms: Vec<RomBoard>,
    path: Option<PathBuf>,
    waited: Mutex<u32>,
}

impl Watch for FakeWatch {
    fn locate(&self, _key: &str, _endpoint: &Endpoint) -> Option<PathBuf> {
        self.path.clone()
    }
    fn wait_back(&self, _: &str, _: &Endpoint, _: Duration, _: &Cancel) -> Comeback {
        *self.waited.lock().unwrap() += 1;
        self.comeback.clone()
    }
    fn rom_loaders(&self) -> Vec<RomBoard> {
        self.roms.clone()
    }
}

fn watch(comeback: Comeback, roms: Vec<RomBoard>) -> Arc<FakeWatch> {
    Arc::new(FakeWatch {
        comeback,
        roms,
        path: Some(PathBuf::from("/dev/ttyACM0")),
        waited: Mutex::new(0),
    })
}

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    /// A Klipper tree whose flashtool prints `script_body`'s output; OUT with a firmware.
    fn new(flashtool_body: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("klipper");
        fs::create_dir_all(tree.join("lib/katapult")).unwrap();
        fs::write(
            tree.join("lib/katapult/flashtool.py"),
            format!(
                "import sys\nopen(sys.argv[0] + '.args', 'w').write(' '.join(sys.argv[1:]))\n{flashtool_body}\n"
            ),
        )
        .unwrap();
        fs::write(
            tree.join("Makefile"),
            "flash:\n\t@echo make-flash $(FLASH_DEVICE) $(OUT) NOSUDO=$(NOSUDO) > $(OUT)made\n",
        )
        .unwrap();
        let out = dir.path().join("out");
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join("klipper.bin"), b"firmware").unwrap();
        fs::write(out.join("klipper.elf"), b"\x7fELF new").unwrap();
        fs::write(
            dir.path().join("board.config"),
            "CONFIG_MCU=\"stm32f446xx\"\n",
        )
        .unwrap();
        Self { dir }
    }
    fn tools(&self) -> Tools {
        let mut t = Tools::new(self.dir.path().join("klipper"));
        t.flash_timeout = Duration::from_secs(20);
        t
    }
    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }
    fn cfg(&self) -> PathBuf {
        self.dir.path().join("board.config")
    }
    fn flashtool_args(&self) -> String {
        fs::read_to_string(
            self.dir
                .path()
                .join("klipper/lib/katapult/flashtool.py.args"),
        )
        .unwrap_or_default()
    }
}

fn serial() -> Endpoint {
    Endpoint::Serial {
        path: "/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00".into(),
    }
}

fn job<'a>(
    sb: &'a Sandbox,
    endpoint: &'a Endpoint,
    method: Method,
    out: &'a Path,
    cfg: &'a Path,
) -> Job<'a> {
    let _ = sb;
    Job {
        key: "octopus",
        method,
        endpoint,
        baud: None,
        mcu: "stm32f446xx",
        out_dir: out,
        image: Path::new("/nonexistent/klipper.uf2"),
        kconfig: cfg,
    }
}

#[test]
fn verdict_requires_programming_complete() {
    assert_eq!(
        flashtool_verdict("Connecting...\nProgramming Complete\n"),
        FlashtoolVerdict::Programmed
    );
    assert_eq!(
        flashtool_verdict("Device is not Katapult, exiting...\nBootloader Request Complete\n"),
        FlashtoolVerdict::NotKatapult
    );
    assert_eq!(
        flashtool_verdict("Bootloader Request Complete\n"),
        FlashtoolVerdict::Unconfirmed
    );
}

#[test]
fn katapult_success_waits_for_the_board() {
    let sb = Sandbox::new("print('Flashing...')\nprint('Programming Complete')");
    let w = watch(Comeback::Klipper(PathBuf::from("/dev/ttyACM1")), vec![]);
    let flasher = Flasher::new(sb.tools(), w.clone());
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let done = flasher
        .flash(
            &job(&sb, &ep, Method::Auto, &out, &cfg),
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap();
    assert_eq!(done.method, Method::Katapult);
    assert_eq!(done.path, Some(PathBuf::from("/dev/ttyACM1")));
    assert_eq!(*w.waited.lock().unwrap(), 1);
    let args = sb.flashtool_args();
    assert!(args.contains("-d /dev/ttyACM0"), "{args}");
    assert!(args.contains("klipper.bin"), "{args}");
}

#[test]
fn not_katapult_with_rc0_is_a_failure_with_dfu_hint() {
    let sb = Sandbox::new(
        "print('Device is not Katapult, exiting...')\nprint('Bootloader Request Complete')",
    );
    let w = watch(
        Comeback::Gone,
        vec![RomBoard {
            loader: RomLoader::StmDfu,
            usb_id: "0483:df11".into(),
            path: "/sys/bus/usb/devices/1-9".into(),
        }],
    );
    let flasher = Flasher::new(sb.tools(), w.clone());
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let err = flasher
        .flash(
            &job(&sb, &ep, Method::Auto, &out, &cfg),
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap_err();
    assert!(matches!(err.error, Error::NotKatapult { .. }), "{err}");
    let hint = err.hint.unwrap();
    assert!(
        hint.contains("BOOT0") && hint.contains("0483:df11"),
        "{hint}"
    );
    // No fallback to make flash after "not Katapult", and no waiting.
    assert!(!out.join("made").exists());
    assert_eq!(err.tried, vec![Method::Katapult]);
}

#[test]
fn katapult_error_falls_back_to_make_flash() {
    let sb = Sandbox::new("import sys\nprint('ERROR: no response')\nsys.exit(1)");
    let w = watch(Comeback::Klipper(PathBuf::from("/dev/ttyACM0")), vec![]);
    let flasher = Flasher::new(sb.tools(), w);
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let done = flasher
        .flash(
            &job(&sb, &ep, Method::Auto, &out, &cfg),
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap();
    assert_eq!(done.method, Method::Make);
    let made = fs::read_to_string(out.join("made")).unwrap();
    assert!(made.contains("make-flash /dev/ttyACM0"), "{made}");
    assert!(made.contains("NOSUDO=1"), "{made}");
}

#[test]
fn rc0_without_confirmation_is_not_a_flash() {
    let sb = Sandbox::new("print('Bootloader Request Complete')");
    let w = watch(Comeback::Klipper(PathBuf::from("/dev/ttyACM0")), vec![]);
    let flasher = Flasher::new(sb.tools(), w);
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let err = flasher
        .flash(
            &job(&sb, &ep, Method::Katapult, &out, &cfg),
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap_err();
    assert!(matches!(err.error, Error::NotConfirmed { .. }), "{err}");
}

#[test]
fn came_back_in_bootsel_gives_rp2040_steps() {
    let sb = Sandbox::new("print('Programming Complete')");
    let w = watch(
        Comeback::RomLoader(RomBoard {
            loader: RomLoader::RpBootsel,
            usb_id: "2e8a:0003".into(),
            path: "/sys/bus/usb/devices/1-9".into(),
        }),
        vec![],
    );
    let flasher = Flasher::new(sb.tools(), w);
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let err = flasher
        .flash(
            &job(&sb, &ep, Method::Katapult, &out, &cfg),
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap_err();
    assert!(matches!(err.error, Error::CameBackInRomLoader(_)));
    let hint = err.hint.unwrap();
    assert!(
        hint.contains("BOOTSEL") && hint.contains("klipper.uf2"),
        "{hint}"
    );
}

#[test]
fn board_that_never_returns_is_a_failure() {
    let sb = Sandbox::new("print('Programming Complete')");
    let flasher = Flasher::new(sb.tools(), watch(Comeback::Gone, vec![]));
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let err = flasher
        .flash(
            &job(&sb, &ep, Method::Katapult, &out, &cfg),
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap_err();
    assert!(matches!(err.error, Error::DidNotReturn(_)));
    assert!(err.hint.unwrap().contains("BOOT0"));
}

#[test]
fn can_uses_interface_and_uuid() {
    let sb = Sandbox::new("print('Programming Complete')");
    let flasher = Flasher::new(sb.tools(), watch(Comeback::Gone, vec![]));
    let ep = Endpoint::Can {
        interface: "can0".into(),
        uuid: "aabbccddeeff".into(),
    };
    let (out, cfg) = (sb.out(), sb.cfg());
    let done = flasher
        .flash(
            &job(&sb, &ep, Method::Auto, &out, &cfg),
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap();
    assert_eq!(done.method, Method::Katapult);
    assert!(sb.flashtool_args().contains("-i can0 -u aabbccddeeff"));
}

#[test]
fn katapult_dir_wins_over_klipper_copy() {
    let sb = Sandbox::new("print('Programming Complete')");
    let kat = sb.dir.path().join("katapult/scripts");
    fs::create_dir_all(&kat).unwrap();
    fs::write(kat.join("flashtool.py"), "print('x')").unwrap();
    let mut tools = sb.tools();
    tools.katapult_dir = Some(sb.dir.path().join("katapult"));
    assert_eq!(find_flashtool(&tools), Some(kat.join("flashtool.py")));
    tools.katapult_dir = Some(sb.dir.path().join("nowhere"));
    assert_eq!(
        find_flashtool(&tools),
        Some(sb.dir.path().join("klipper/lib/katapult/flashtool.py"))
    );
}

#[test]
fn native_seam_replaces_flashtool_for_serial() {
    let sb = Sandbox::new("print('Programming Complete')");
    let called = Arc::new(Mutex::new(None));
    let seen = called.clone();
    let mut tools = sb.tools();
    tools.native_katapult = Some(Arc::new(move |req, _c, _s| {
        *seen.lock().unwrap() = Some((req.device.to_path_buf(), req.firmware.to_path_buf()));
        Ok(())
    }));
    let flasher = Flasher::new(
        tools,
        watch(Comeback::Klipper(PathBuf::from("/dev/ttyACM0")), vec![]),
    );
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    flasher
        .flash(
            &job(&sb, &ep, Method::Auto, &out, &cfg),
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap();
    let (dev, fw) = called.lock().unwrap().clone().unwrap();
    assert_eq!(dev, PathBuf::from("/dev/ttyACM0"));
    assert_eq!(fw, out.join("klipper.bin"));
    assert_eq!(sb.flashtool_args(), "", "flashtool must not run");
}

/// Flash a serial board whose native flasher fails (`try_flashtool` as given), with a
/// flashtool.py whose body is `flashtool_body`.
fn flash_after_native_failure(
    flashtool_body: &str,
    try_flashtool: bool,
    method: Method,
) -> (Sandbox, Result<Flashed, Failure>) {
    let sb = Sandbox::new(flashtool_body);
    let mut tools = sb.tools();
    tools.native_katapult = Some(Arc::new(move |_req, _c, _s| {
        Err(if try_flashtool {
            katapult::Error::VerifyMismatch {
                addr: 0x0800_8040,
                block: 0x0800_8000,
            }
        } else {
            katapult::Error::McuMismatch {
                device: "/dev/ttyACM0".into(),
                image: "rp2040".into(),
                bootloader: "stm32f446xx".into(),
            }
        })
    }));
    let flasher = Flasher::new(
        tools,
        watch(Comeback::Klipper(PathBuf::from("/dev/ttyACM0")), vec![]),
    );
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let result = flasher.flash(
        &job(&sb, &ep, method, &out, &cfg),
        &Cancel::new(),
        &crate::events::discard(),
    );
    (sb, result)
}

#[test]
fn native_communication_failure_falls_back_to_flashtool() {
    let (sb, result) =
        flash_after_native_failure("print('Programming Complete')", true, Method::Auto);
    assert_eq!(result.unwrap().method, Method::Katapult);
    assert!(
        sb.flashtool_args().contains("-d /dev/ttyACM0"),
        "flashtool must run"
    );
}

#[test]
fn both_katapult_flashers_failing_report_both_errors() {
    let (_sb, result) = flash_after_native_failure("print('Flashing...')", true, Method::Katapult);
    let msg = result.unwrap_err().error.to_string();
    assert!(msg.contains("0x08008040"), "native error lost: {msg}");
    assert!(
        msg.contains("Programming Complete"),
        "flashtool error lost: {msg}"
    );
}

#[test]
fn the_configs_application_start_goes_to_the_native_flasher_and_a_mismatch_says_what_to_choose() {
    let sb = Sandbox::new("print('Programming Complete')");
    fs::write(
        sb.cfg(),
        "CONFIG_MACH_STM32=y\nCONFIG_MCU=\"stm32f446xx\"\nCONFIG_FLASH_APPLICATION_ADDRESS=0x8008000\n",
    )
    .unwrap();
    let seen = Arc::new(Mutex::new(None));
    let got = seen.clone();
    let mut tools = sb.tools();
    tools.native_katapult = Some(Arc::new(move |req, _c, _s| {
        *got.lock().unwrap() = req.app_start;
        let want = req.app_start.unwrap();
        Err(katapult::Error::AppStartMismatch {
            device: req.device.to_path_buf(),
            bootloader: 0x0800_2000,
            config: want.address,
            flash_start: want.flash_start,
        })
    }));
    let flasher = Flasher::new(
        tools,
        watch(Comeback::Klipper(PathBuf::from("/dev/ttyACM0")), vec![]),
    );
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let failure = flasher
        .flash(
            &job(&sb, &ep, Method::Auto, &out, &cfg),
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap_err();
    assert_eq!(
        *seen.lock().unwrap(),
        Some(katapult::AppStart {
            address: 0x0800_8000,
            flash_start: 0x0800_0000
        })
    );
    let hint = failure.hint.unwrap();
    assert!(hint.contains("\"8KiB bootloader\""), "{hint}");
    assert!(hint.ends_with("kflash config octopus"), "{hint}");
    assert_eq!(sb.flashtool_args(), "", "nothing else may write it");
    assert!(!sb.out().join("made").exists(), "make flash must not run");
}

#[test]
fn native_final_failure_tries_nothing_else() {
    let (sb, result) =
        flash_after_native_failure("print('Programming Complete')", false, Method::Auto);
    let err = result.unwrap_err().error;
    assert!(matches!(err, Error::Native(_)), "{err}");
    assert!(err.to_string().contains("MCU mismatch"), "{err}");
    assert_eq!(sb.flashtool_args(), "", "flashtool must not run");
    assert!(!sb.out().join("made").exists(), "make flash must not run");
}

#[test]
fn linux_replaces_a_running_binary_and_restarts() {
    let sb = Sandbox::new("");
    let bin = sb.dir.path().join("klipper_mcu");
    // A running copy of the old binary: writing over it in place would fail (ETXTBSY).
    fs::copy("/bin/sleep", &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let mut running = std::process::Command::new(&bin).arg("30").spawn().unwrap();
    let restarted = Arc::new(Mutex::new(0));
    let count = restarted.clone();
    let mut tools = sb.tools();
    tools.linux_mcu_binary = bin.clone();
    tools.linux_restart = Some(Arc::new(move |_c| {
        *count.lock().unwrap() += 1;
        Ok(Some("klipper-mcu".into()))
    }));
    let flasher = Flasher::new(tools, watch(Comeback::Gone, vec![]));
    let ep = Endpoint::Linux {
        path: "/tmp/klipper_host_mcu".into(),
    };
    let (out, cfg) = (sb.out(), sb.cfg());
    let done = flasher.flash(
        &job(&sb, &ep, Method::Auto, &out, &cfg),
        &Cancel::new(),
        &crate::events::discard(),
    );
    running.kill().unwrap();
    running.wait().unwrap();
    assert_eq!(done.unwrap().method, Method::Linux);
    assert_eq!(fs::read(&bin).unwrap(), b"\x7fELF new");
    assert_eq!(*restarted.lock().unwrap(), 1);
}

#[test]
fn check_reports_missing_flash_tool_for_can() {
    let sb = Sandbox::new("");
    fs::remove_file(sb.dir.path().join("klipper/lib/katapult/flashtool.py")).unwrap();
    let flasher = Flasher::new(sb.tools(), watch(Comeback::Gone, vec![]));
    let ep = Endpoint::Can {
        interface: "can0".into(),
        uuid: "aabbccddeeff".into(),
    };
    let (out, cfg) = (sb.out(), sb.cfg());
    let err = flasher
        .check(&job(&sb, &ep, Method::Auto, &out, &cfg))
        .unwrap_err();
    assert!(matches!(err, Error::NoFlashtool { .. }), "{err}");
    assert!(err.to_string().contains("flashtool.py"), "{err}");
    // Serial still has make flash.
    let ep = serial();
    flasher
        .check(&job(&sb, &ep, Method::Auto, &out, &cfg))
        .unwrap();
}

#[test]
fn cancel_stops_a_hanging_flashtool() {
    let sb = Sandbox::new("import time\ntime.sleep(30)");
    let flasher = Flasher::new(sb.tools(), watch(Comeback::Gone, vec![]));
    let cancel = Cancel::new();
    let c = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c.cancel();
    });
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let started = std::time::Instant::now();
    let err = flasher
        .flash(
            &job(&sb, &ep, Method::Auto, &out, &cfg),
            &cancel,
            &crate::events::discard(),
        )
        .unwrap_err();
    t.join().unwrap();
    assert!(matches!(err.error, Error::Cancelled), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!out.join("made").exists(), "no fallback after cancel");
}

#[test]
fn when_both_methods_fail_the_katapult_error_is_kept() {
    let sb =
        Sandbox::new("import sys\nprint('Verification failed: checksum mismatch')\nsys.exit(1)");
    fs::write(
        sb.dir.path().join("klipper/Makefile"),
        "flash:\n\t@echo no way; exit 2\n",
    )
    .unwrap();
    let flasher = Flasher::new(sb.tools(), watch(Comeback::Gone, vec![]));
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let err = flasher
        .flash(
            &job(&sb, &ep, Method::Auto, &out, &cfg),
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("checksum mismatch") && msg.contains("make flash"),
        "{msg}"
    );
    assert_eq!(err.tried, vec![Method::Katapult, Method::Make]);
}

#[test]
fn another_familys_rom_loader_on_the_bus_is_not_this_boards_hint() {
    let sb = Sandbox::new("import sys\nprint('ERROR: no response')\nsys.exit(1)");
    let w = watch(
        Comeback::Gone,
        vec![RomBoard {
            loader: RomLoader::StmDfu,
            usb_id: "0483:df11".into(),
            path: "/sys/bus/usb/devices/1-9".into(),
        }],
    );
    let flasher = Flasher::new(sb.tools(), w);
    let (ep, out, cfg) = (serial(), sb.out(), sb.cfg());
    let rp2040 = Job {
        mcu: "rp2040",
        ..job(&sb, &ep, Method::Katapult, &out, &cfg)
    };
    let err = flasher
        .flash(&rp2040, &Cancel::new(), &crate::events::discard())
        .unwrap_err();
    let hint = err.hint.unwrap();
    assert!(hint.contains("BOOTSEL"), "{hint}");
    assert!(!hint.contains("BOOT0") && !hint.contains("df11"), "{hint}");
}
