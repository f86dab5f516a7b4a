//! What to tell a user whose board did not end up running Klipper: one line that says
//! what to do, then the one command that does it.
//!
//! The hint fits the board: chosen from how it is reached (a CAN node, the linux-process
//! MCU, a USB/UART board) and, for USB/UART boards, its MCU family or the ROM loader it
//! fell into (STM32 DFU, RP2040 BOOTSEL). A CAN node or an RP2040 never gets an STM32
//! DFU/BOOT0 line. Hints name the real device key and paths, never a placeholder.
//!
//! Pure functions; thread-safe.

use super::{Endpoint, Family, Job, Tools};
use crate::discovery::RomLoader;

/// `<line>\n  <command>`.
fn hint(line: &str, command: &str) -> String {
    format!("{line}\n  {command}")
}

fn make_flash(tools: &Tools, job: &Job<'_>, usb_id: &str) -> String {
    format!(
        "cd {} && make flash FLASH_DEVICE={usb_id} KCONFIG_CONFIG={} OUT={}/",
        tools.klipper_dir.display(),
        job.kconfig.display(),
        job.out_dir.display()
    )
}

/// The hint for a board that did not come back running Klipper.
pub fn recovery_hint(family: Family, job: &Job<'_>, tools: &Tools) -> String {
    match job.endpoint {
        Endpoint::Linux { .. } => hint(
            "Start the linux MCU's service again and look at its log if it fails:",
            &format!(
                "sudo systemctl restart {}",
                tools.linux_mcu_service.as_deref().unwrap_or("klipper-mcu")
            ),
        ),
        Endpoint::Can { interface, uuid } => hint(
            &format!(
                "Power-cycle the node (double-tap its reset to keep it in Katapult), then \
                 flash it over {interface}:"
            ),
            &format!(
                "python3 ~/katapult/scripts/flashtool.py -i {interface} -u {uuid} -f {}",
                job.image.display()
            ),
        ),
        Endpoint::Serial { .. } => match family {
            Family::Stm32 => hint(
                "Set the BOOT0 jumper and power-cycle it (it enumerates as DFU 0483:df11), \
                 then flash it there and remove the jumper:",
                &make_flash(tools, job, "0483:df11"),
            ),
            Family::Rp2040 => hint(
                "Hold BOOTSEL while plugging it in (it mounts as RPI-RP2), then flash it \
                 there:",
                &make_flash(tools, job, "2e8a:0003"),
            ),
            Family::Generic => hint(
                "Power-cycle it; if it does not come back running Klipper, flash it again:",
                &format!("kflash flash {}", job.key),
            ),
        },
    }
}

/// The hint for a board sitting in its ROM loader now.
pub fn rom_loader_hint(loader: RomLoader, job: &Job<'_>, tools: &Tools) -> String {
    match loader {
        RomLoader::StmDfu => hint(
            "It is in STM32 DFU (0483:df11): flash it there, then power-cycle it without \
             BOOT0:",
            &make_flash(tools, job, "0483:df11"),
        ),
        RomLoader::RpBootsel => hint(
            "It is in RP2040 BOOTSEL (2e8a:0003): flash it there (or copy klipper.uf2 to \
             the RPI-RP2 drive):",
            &make_flash(tools, job, "2e8a:0003"),
        ),
    }
}

/// The hint for a config to fix (nothing was written): what to choose, then the command.
pub fn config_hint(what: &str, key: &str) -> String {
    hint(what, &format!("kflash config {key}"))
}

/// The hint for a board left waiting in Katapult: the next run writes it first.
pub fn in_katapult_hint() -> String {
    hint(
        "It waits in Katapult; the next run flashes it before anything else:",
        "kflash flash-all",
    )
}

/// The hint for a board the run did not get to (interrupted before it).
pub fn not_flashed_hint(key: &str) -> String {
    hint(
        "Not flashed: the run was interrupted before it. To flash it:",
        &format!("kflash flash {key}"),
    )
}

/// The hint for a board that was not found.
pub fn unreached_hint(key: &str) -> String {
    hint(
        &format!("{key} was not found: is it plugged in and powered? Its registered path:"),
        "kflash devices list",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flash::Method;
    use std::path::{Path, PathBuf};

    fn job<'a>(endpoint: &'a Endpoint, mcu: &'a str, paths: &'a (PathBuf, PathBuf)) -> Job<'a> {
        Job {
            key: "ebb",
            method: Method::Auto,
            endpoint,
            baud: None,
            mcu,
            out_dir: &paths.0,
            image: &paths.1,
            kconfig: Path::new("/state/configs/ebb.config"),
        }
    }

    #[test]
    fn hints_fit_the_board_and_stay_short() {
        let paths = (
            PathBuf::from("/b/ebb/out"),
            PathBuf::from("/b/ebb/klipper.bin"),
        );
        let serial = Endpoint::Serial {
            path: "/dev/serial/by-id/x".into(),
        };
        let can = Endpoint::Can {
            uuid: "0a1b2c3d4e5f".into(),
            interface: "can1".into(),
        };
        let linux = Endpoint::Linux {
            path: "/tmp/klipper_host_mcu".into(),
        };
        let tree = &Tools::new("/home/pi/klipper");
        let stm = recovery_hint(Family::Stm32, &job(&serial, "stm32f446xx", &paths), tree);
        assert!(stm.contains("BOOT0") && stm.contains("0483:df11"), "{stm}");
        let rp = recovery_hint(Family::Rp2040, &job(&serial, "rp2040", &paths), tree);
        let can_stm = recovery_hint(Family::Stm32, &job(&can, "stm32g0b1xx", &paths), tree);
        let host = recovery_hint(Family::Generic, &job(&linux, "linux", &paths), tree);
        for (h, never) in [
            (&rp, "BOOT0"),
            (&rp, "df11"),
            (&can_stm, "BOOT0"),
            (&can_stm, "DFU"),
        ] {
            assert!(!h.contains(never), "{h}");
        }
        assert!(rp.contains("BOOTSEL") && rp.contains("2e8a:0003"), "{rp}");
        assert!(can_stm.contains("-i can1 -u 0a1b2c3d4e5f"), "{can_stm}");
        assert!(host.contains("klipper-mcu"), "{host}");
        let all = [
            stm,
            rp,
            can_stm,
            host,
            in_katapult_hint(),
            not_flashed_hint("ebb"),
            unreached_hint("ebb"),
            rom_loader_hint(RomLoader::RpBootsel, &job(&serial, "rp2040", &paths), tree),
        ];
        for h in &all {
            // One line, then the command; no placeholder key.
            assert_eq!(h.lines().count(), 2, "{h}");
            assert!(h.lines().nth(1).unwrap().starts_with("  "), "{h}");
            assert!(!h.contains("KEY"), "{h}");
        }
    }
}
