//! The flash methods themselves: flashtool.py, `make flash`, the linux-process MCU.
//!
//! Each function runs its commands through `crate::process` with the caller's `Cancel`
//! and reports progress lines to the sink. See the parent module for the invariants.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Endpoint, Error, Job, NativeKatapult, Tools};
use crate::events::{Event, Sink, Stage};
use crate::katapult;
use crate::kconfig::KConfig;
use crate::process::{self, Cancel, Cmd};

/// One `make flash` at a time in this process: it builds helper tools in the shared tree.
static MAKE_FLASH: Mutex<()> = Mutex::new(());

/// Where flashtool.py may live, in the order searched.
pub(super) fn flashtool_candidates(tools: &Tools) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = &tools.katapult_dir {
        out.push(dir.join("scripts").join("flashtool.py"));
    }
    out.push(
        tools
            .klipper_dir
            .join("lib")
            .join("katapult")
            .join("flashtool.py"),
    );
    out
}

/// The first flashtool.py found: `katapult_dir/scripts`, then the Klipper tree's copy.
pub fn find_flashtool(tools: &Tools) -> Option<PathBuf> {
    flashtool_candidates(tools)
        .into_iter()
        .find(|p| p.is_file())
}

/// What flashtool's output says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashtoolVerdict {
    /// `Programming Complete`: the image was written and verified.
    Programmed,
    /// `Device is not Katapult`: nothing was flashed (even though it exits 0).
    NotKatapult,
    /// Anything else: not a flash.
    Unconfirmed,
}

/// Judge flashtool's stdout. Success only on the `Programming Complete` line.
pub fn flashtool_verdict(output: &str) -> FlashtoolVerdict {
    let mut verdict = FlashtoolVerdict::Unconfirmed;
    for line in output.lines() {
        let line = line.trim();
        if line.contains("Device is not Katapult") {
            return FlashtoolVerdict::NotKatapult;
        }
        if line == "Programming Complete" {
            verdict = FlashtoolVerdict::Programmed;
        }
    }
    verdict
}

fn progress(sink: &Sink, key: &str) -> impl Fn(&str) + Send + Sync + 'static {
    let sink = Arc::clone(sink);
    let key = key.to_owned();
    move |line: &str| {
        let line = line.trim();
        if !line.is_empty() {
            sink(&Event::info(Stage::Flash, Some(&key), line));
        }
    }
}

fn command_error(e: process::Error) -> Error {
    match e {
        process::Error::Cancelled { .. } => Error::Cancelled,
        other => Error::Command(other),
    }
}

/// Flash a serial board with the native Katapult flasher. `Err((error, try_flashtool))`.
pub(super) fn native_katapult(
    native: &NativeKatapult,
    job: &Job<'_>,
    dev: &Path,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<(), (Error, bool)> {
    let firmware = katapult_image(job).map_err(|e| (e, false))?;
    let Endpoint::Serial { .. } = job.endpoint else {
        let what = job.endpoint.describe();
        return Err((
            Error::Unsupported {
                method: "katapult",
                what,
            },
            false,
        ));
    };
    sink(&Event::info(
        Stage::Flash,
        Some(job.key),
        format!("flashing {} with Katapult (native)", dev.display()),
    ));
    // The flasher names the tty it talks to; the user knows the board by its key.
    let key = job.key.to_owned();
    let outer = Arc::clone(sink);
    let sink: Sink = Arc::new(move |event: &Event| {
        let mut event = event.clone();
        event.device = Some(key.clone());
        outer(&event);
    });
    let req = katapult::Request {
        device: dev,
        baud: job.baud,
        firmware: &firmware,
        app_start: app_start(job.kconfig),
    };
    native(&req, cancel, &sink).map_err(|e| {
        if cancel.is_cancelled() {
            (Error::Cancelled, false)
        } else {
            let another = e.worth_another_flasher();
            (Error::Native(Box::new(e)), another)
        }
    })
}

/// Where the device's config says the application starts (`None` when unknown: the
/// check is then skipped).
fn app_start(kconfig: &Path) -> Option<katapult::AppStart> {
    let target = KConfig::load(kconfig).ok()?.target().ok()?;
    Some(katapult::AppStart {
        address: u32::try_from(target.app_start?).ok()?,
        flash_start: u32::try_from(target.flash_start?).ok()?,
    })
}

/// The raw image Katapult writes (klipper.bin next to a .uf2/.elf.hex build).
fn katapult_image(job: &Job<'_>) -> Result<PathBuf, Error> {
    let firmware = if job.image.extension().is_some_and(|e| e == "bin") {
        job.image.to_path_buf()
    } else {
        job.out_dir.join("klipper.bin")
    };
    if firmware.is_file() {
        Ok(firmware)
    } else {
        Err(Error::NoFirmware(firmware))
    }
}

/// Flash with Katapult's flashtool.py (serial `-d`, CAN `-i/-u`).
pub(super) fn katapult(
    tools: &Tools,
    job: &Job<'_>,
    dev: Option<&Path>,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<(), Error> {
    let firmware = katapult_image(job)?;
    let Some(flashtool) = find_flashtool(tools) else {
        return Err(Error::NoFlashtool {
            searched: flashtool_candidates(tools),
        });
    };
    let mut cmd = Cmd::new(&tools.python).arg(&flashtool);
    match (job.endpoint, dev) {
        (Endpoint::Serial { .. }, Some(dev)) => {
            cmd = cmd.arg("-d").arg(dev);
            if let Some(baud) = job.baud {
                cmd = cmd.arg("-b").arg(baud.to_string());
            }
        }
        (Endpoint::Can { interface, uuid }, _) => {
            cmd = cmd.arg("-i").arg(interface).arg("-u").arg(uuid);
        }
        (endpoint, _) => {
            return Err(Error::Unsupported {
                method: "katapult",
                what: endpoint.describe(),
            })
        }
    }
    let cmd = cmd
        .arg("-f")
        .arg(&firmware)
        .timeout(tools.flash_timeout)
        .cancel(cancel)
        .on_line(progress(sink, job.key));
    sink(&Event::info(
        Stage::Flash,
        Some(job.key),
        format!("flashing with Katapult: {}", cmd.display()),
    ));
    let out = cmd.run_unchecked().map_err(command_error)?;
    match flashtool_verdict(&out.stdout) {
        FlashtoolVerdict::NotKatapult => Err(Error::NotKatapult {
            device: job.endpoint.describe(),
        }),
        FlashtoolVerdict::Programmed if out.status.success() => Ok(()),
        FlashtoolVerdict::Programmed | FlashtoolVerdict::Unconfirmed if !out.status.success() => {
            Err(Error::Command(process::Error::Failed {
                cmd: cmd.display(),
                status: out.status,
                tail: out.tail,
            }))
        }
        _ => Err(Error::NotConfirmed { tail: out.tail }),
    }
}

/// `make flash FLASH_DEVICE=<dev>` in the Klipper tree, one at a time, without sudo.
pub(super) fn make_flash(
    tools: &Tools,
    job: &Job<'_>,
    dev: &Path,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<(), Error> {
    let mut out = job.out_dir.as_os_str().to_owned();
    if !out.to_string_lossy().ends_with('/') {
        out.push("/");
    }
    let mut flash_device = std::ffi::OsString::from("FLASH_DEVICE=");
    flash_device.push(dev);
    let mut kconfig = std::ffi::OsString::from("KCONFIG_CONFIG=");
    kconfig.push(job.kconfig);
    let mut out_arg = std::ffi::OsString::from("OUT=");
    out_arg.push(out);
    let cmd = Cmd::new("make")
        .arg("flash")
        .arg(flash_device)
        .arg(kconfig)
        .arg(out_arg)
        .arg("NOSUDO=1")
        .env("NOSUDO", "1")
        .cwd(&tools.klipper_dir)
        .timeout(tools.flash_timeout)
        .cancel(cancel)
        .on_line(progress(sink, job.key));
    // The lock only guards the shared tree; a poisoned lock still serialises.
    let _one_at_a_time = MAKE_FLASH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    sink(&Event::info(
        Stage::Flash,
        Some(job.key),
        format!("flashing with {}", cmd.display()),
    ));
    cmd.run().map(|_| ()).map_err(command_error)
}

/// Replace the linux-process MCU binary with the new klipper.elf (new inode: no ETXTBSY),
/// then restart its service.
pub(super) fn linux(
    tools: &Tools,
    job: &Job<'_>,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<(), Error> {
    let elf = if job.image.extension().is_some_and(|e| e == "elf") {
        job.image.to_path_buf()
    } else {
        job.out_dir.join("klipper.elf")
    };
    if !elf.is_file() {
        return Err(Error::NoFirmware(elf));
    }
    let dest = &tools.linux_mcu_binary;
    install_binary(&elf, dest).map_err(|source| Error::Install {
        path: dest.clone(),
        source,
    })?;
    sink(&Event::info(
        Stage::Flash,
        Some(job.key),
        format!("installed {}", dest.display()),
    ));
    if cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    match &tools.linux_restart {
        Some(restart) => match restart(cancel) {
            Ok(Some(unit)) => {
                sink(&Event::info(
                    Stage::Flash,
                    Some(job.key),
                    format!("restarted {unit}"),
                ));
                Ok(())
            }
            Ok(None) => {
                sink(&Event::info(
                    Stage::Flash,
                    Some(job.key),
                    "no klipper-mcu/klipper_mcu service: the new binary runs at its next start",
                ));
                Ok(())
            }
            Err(e) => Err(Error::LinuxRestart(Box::new(e))),
        },
        None => Ok(()),
    }
}

/// Copy `src` next to `dest`, make it executable, rename it over `dest`, fsync the dir:
/// a new inode, so a running binary is never written in place (ETXTBSY), and the mode is
/// set before the rename, so `dest` is never there without being executable.
fn install_binary(src: &Path, dest: &Path) -> std::io::Result<()> {
    let data = fs::read(src)?;
    crate::registry::write_atomic_with(dest, |f| {
        f.write_all(&data)?;
        f.set_permissions(fs::Permissions::from_mode(0o755))
    })
}
