//! Flashing a serial board: enter its bootloader, find it again, run a Katapult session.
//!
//! Owns what happens on a serial port around a session: asking a board that runs Klipper to
//! reboot into Katapult (USB 1200-baud touch, or the UART request string at the board's
//! baud), finding it again after it re-enumerates through `crate::discovery` (its stable
//! identity, not the tty number; a new ROM loader on the bus means it fell into DFU or
//! BOOTSEL), finding a board that already sits in Katapult from its application's by-id
//! name, opening the bootloader's tty (with a grace while udev finishes it), and the two
//! entry points [`flash_serial`] and [`status_serial`].
//!
//! Invariants: `flash_serial` returns `Ok` only after a verified write (see `session`);
//! every wait is bounded by [`Timing`] and ends early on `Cancel`.
//!
//! Thread-safety: runs on the caller's thread.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::discovery::{by_id_counterpart, usb_mode, Discovery, StableId, UsbMode};
use crate::events::{Event, Level, Sink, Stage};
use crate::process::Cancel;

use super::codec::ConnectInfo;
use super::image::{image_info, read_image};
use super::port::{uart_request_bootloader, usb_touch_1200, Port, SerialPort};
use super::session::{flash_connected, Checks, FlashReport, Session, Timing};
use super::{AppStart, Error, Step};

/// Default UART baud (flashtool's default, Klipper's usual).
pub const DEFAULT_BAUD: u32 = 250_000;
/// How long opening a freshly enumerated tty is retried (udev permissions, links).
const OPEN_GRACE: Duration = Duration::from_secs(2);
/// How long a board touched into its bootloader may take to appear when the flash was
/// abandoned meanwhile (it is then sent back to its application).
const RELEASE_WAIT: Duration = Duration::from_secs(3);

/// Which board to talk to (for [`status_serial`]; [`SerialFlashOptions`] embeds the same).
#[derive(Debug, Clone)]
pub struct SerialStatusOptions {
    /// The tty (a by-id, by-path or /dev/ttyX path).
    pub device: PathBuf,
    /// `Some(baud)`: a UART board; `None`: USB (the baud does not matter).
    pub baud: Option<u32>,
    /// The board's identity across re-enumeration; `StableId::of` the device when `None`.
    pub stable: Option<StableId>,
    /// Where devices are found (`$KFLASH_DEV_ROOT`, `$KFLASH_SYS_ROOT` by default).
    pub discovery: Discovery,
    pub timing: Timing,
}

impl SerialStatusOptions {
    /// Options for `device` with every default.
    pub fn new(device: impl Into<PathBuf>) -> Self {
        Self {
            device: device.into(),
            baud: None,
            stable: None,
            discovery: Discovery::from_env(),
            timing: Timing::default(),
        }
    }
}

/// What to flash where.
#[derive(Debug, Clone)]
pub struct SerialFlashOptions {
    pub device: PathBuf,
    /// The image (klipper.bin).
    pub firmware: PathBuf,
    pub baud: Option<u32>,
    pub stable: Option<StableId>,
    pub discovery: Discovery,
    pub timing: Timing,
    /// Where the config says the application starts (checked before writing).
    pub app_start: Option<AppStart>,
}

impl SerialFlashOptions {
    /// Options for flashing `firmware` to `device` with every default.
    pub fn new(device: impl Into<PathBuf>, firmware: impl Into<PathBuf>) -> Self {
        Self {
            device: device.into(),
            firmware: firmware.into(),
            baud: None,
            stable: None,
            discovery: Discovery::from_env(),
            timing: Timing::default(),
            app_start: None,
        }
    }

    fn target(&self) -> SerialStatusOptions {
        SerialStatusOptions {
            device: self.device.clone(),
            baud: self.baud,
            stable: self.stable.clone(),
            discovery: self.discovery.clone(),
            timing: self.timing.clone(),
        }
    }
}

/// What a bootloader reported when we connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootloaderInfo {
    /// The path we talked to (after re-enumeration).
    pub device: PathBuf,
    pub mcu: String,
    pub bootloader_version: Option<String>,
    /// "major.minor.patch".
    pub proto_version: String,
    pub app_start: u32,
    pub block_size: u32,
}

impl BootloaderInfo {
    fn new(device: &Path, info: &ConnectInfo) -> Self {
        Self {
            device: device.to_owned(),
            mcu: info.mcu.clone(),
            bootloader_version: info.bootloader_version.clone(),
            proto_version: info.proto_version_string(),
            app_start: info.app_start,
            block_size: info.block_size,
        }
    }
}

pub(crate) fn sleep_cancellable(total: Duration, step: Step, cancel: &Cancel) -> Result<(), Error> {
    let end = Instant::now() + total;
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled { step });
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// Whether an STM32 USB part needs the priming command (double-buffered USB endpoints).
fn needs_priming(product: &str) -> bool {
    let p = product.to_lowercase();
    p.strip_prefix("stm32").is_some_and(|rest| {
        !(rest.starts_with("f2") || rest.starts_with("f4") || rest.starts_with("h7"))
    })
}

/// Where the board's Katapult answers, and whether to prime it.
struct Entered {
    path: PathBuf,
    prime: bool,
    /// Just re-enumerated: udev may still be finishing the tty.
    fresh: bool,
}

fn say(sink: &Sink, device: &Path, msg: String) {
    sink(&Event::info(
        Stage::Flash,
        Some(&device.display().to_string()),
        msg,
    ));
}

/// Bring the board into Katapult if it runs its application; find it again afterwards.
fn enter_bootloader(
    opts: &SerialStatusOptions,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Entered, Error> {
    let device = &opts.device;
    if let Some(baud) = opts.baud {
        return enter_uart(opts, baud, cancel, sink);
    }
    let disc = &opts.discovery;
    // Not a device discovery knows: talk to it as it is (like flashtool.py).
    let Some((device, port)) = locate(opts) else {
        return Ok(Entered {
            path: device.clone(),
            prime: false,
            fresh: false,
        });
    };
    if device != opts.device {
        say(
            sink,
            &opts.device,
            format!(
                "{} is gone; the board is now {}",
                opts.device.display(),
                device.display()
            ),
        );
    }
    let device = &device;
    let product = port.usb.as_ref().and_then(|u| u.product_name.clone());
    if usb_mode(&port) != UsbMode::Klipper {
        return Ok(Entered {
            path: device.clone(),
            prime: product.as_deref().is_some_and(needs_priming),
            fresh: false,
        });
    }
    let stable = opts.stable.clone().unwrap_or_else(|| StableId::of(&port));
    let roms_before = disc.find_rom_loaders();
    say(
        sink,
        device,
        "requesting the USB bootloader (1200-baud touch)".into(),
    );
    usb_touch_1200(device).map_err(|source| Error::Io {
        path: device.clone(),
        step: Step::EnterBootloader,
        source,
    })?;
    let mut entered = match wait_for_katapult(opts, &stable, &roms_before, cancel, sink) {
        Err(Error::Cancelled { step }) => {
            release_after_touch(opts, &stable, sink);
            return Err(Error::Cancelled { step });
        }
        other => other?,
    };
    // The application's product string names the chip too (Klipper reports CONFIG_MCU).
    entered.prime |= product.as_deref().is_some_and(needs_priming);
    Ok(entered)
}

/// The board behind `opts.device` now: that path, else (a board that stayed in Katapult
/// after a failed flash, or already left it) its by-id link under the other maker name,
/// else its stable identity.
fn locate(opts: &SerialStatusOptions) -> Option<(PathBuf, crate::discovery::SerialPort)> {
    let disc = &opts.discovery;
    let device = &opts.device;
    if let Ok(port) = disc.resolve(&device.to_string_lossy()) {
        return Some((device.clone(), port));
    }
    if let Some(other) = by_id_counterpart(&device.to_string_lossy()) {
        if let Ok(port) = disc.resolve(&other) {
            return Some((PathBuf::from(other), port));
        }
    }
    let port = disc.find(opts.stable.as_ref()?)?;
    let path = port.path()?.to_path_buf();
    Some((path, port))
}

/// UART: probe first (a board already in Katapult answers CONNECT at once), else send the
/// request string and give the board time to reboot.
fn enter_uart(
    opts: &SerialStatusOptions,
    baud: u32,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Entered, Error> {
    let device = &opts.device;
    let mut port = SerialPort::open(device, baud).map_err(|source| Error::Open {
        path: device.clone(),
        source,
    })?;
    let probe = {
        let mut s = Session::new(&mut port, device, &opts.timing, cancel);
        s.connect(1, opts.timing.connect.min(Duration::from_millis(500)))
    };
    drop(port);
    match probe {
        Ok(_) => {}
        Err(Error::Cancelled { step }) => return Err(Error::Cancelled { step }),
        Err(_) => {
            say(
                sink,
                device,
                format!("requesting the serial bootloader at {baud} baud"),
            );
            uart_request_bootloader(device, baud).map_err(|source| Error::Io {
                path: device.clone(),
                step: Step::EnterBootloader,
                source,
            })?;
            if let Err(e) =
                sleep_cancellable(opts.timing.uart_reboot, Step::EnterBootloader, cancel)
            {
                // Requested: it will sit in Katapult with nothing written.
                std::thread::sleep(opts.timing.uart_reboot);
                release_untouched(device, Some(baud), &opts.timing, sink);
                return Err(e);
            }
        }
    }
    Ok(Entered {
        path: device.clone(),
        prime: false,
        fresh: false,
    })
}

/// After the touch: wait until the board is back as Katapult under its stable identity,
/// or a new ROM loader appeared (it fell into DFU/BOOTSEL), or the time is up.
fn wait_for_katapult(
    opts: &SerialStatusOptions,
    stable: &StableId,
    roms_before: &[crate::discovery::RomBoard],
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Entered, Error> {
    let (device, disc) = (&opts.device, &opts.discovery);
    let started = Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled {
                step: Step::EnterBootloader,
            });
        }
        if let Some(port) = disc.find(stable) {
            let path = port
                .path()
                .map_or_else(|| disc.dev.0.join(&port.tty), Path::to_path_buf);
            if usb_mode(&port) == UsbMode::Katapult && path.exists() {
                say(
                    sink,
                    device,
                    format!(
                        "Katapult appeared on {} after {:.2} s",
                        path.display(),
                        started.elapsed().as_secs_f64()
                    ),
                );
                let product = port.usb.as_ref().and_then(|u| u.product_name.as_deref());
                return Ok(Entered {
                    path,
                    prime: product.is_some_and(needs_priming),
                    fresh: true,
                });
            }
        }
        if let Some(rom) = disc
            .find_rom_loaders()
            .into_iter()
            .find(|r| !roms_before.contains(r))
        {
            return Err(Error::RomLoader {
                device: device.clone(),
                loader: rom.loader,
                usb_id: rom.usb_id,
            });
        }
        if started.elapsed() >= opts.timing.reenumerate {
            return Err(Error::NotInBootloader {
                device: device.clone(),
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(opts.timing.poll);
    }
}

/// Open the bootloader's tty. Right after re-enumeration udev may still be setting its
/// permissions or links: absent, denied and busy are retried for a short grace.
fn open_session_port(
    entered: &Entered,
    baud: Option<u32>,
    cancel: &Cancel,
) -> Result<SerialPort, Error> {
    let path = &entered.path;
    let grace = if entered.fresh {
        OPEN_GRACE
    } else {
        Duration::ZERO
    };
    let deadline = Instant::now() + grace;
    loop {
        match SerialPort::open(path, baud.unwrap_or(DEFAULT_BAUD)) {
            Ok(port) => return Ok(port),
            Err(source) => {
                let transient = matches!(
                    source.kind(),
                    io::ErrorKind::NotFound
                        | io::ErrorKind::PermissionDenied
                        | io::ErrorKind::ResourceBusy
                        | io::ErrorKind::WouldBlock
                );
                if !transient || Instant::now() >= deadline || cancel.is_cancelled() {
                    return Err(Error::Open {
                        path: path.clone(),
                        source,
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// CONNECT for the serial entry points: a board that never answers gets a hint on why.
fn connect_serial(
    session: &mut Session<'_>,
    opts: &SerialStatusOptions,
    entered: &Entered,
) -> Result<ConnectInfo, Error> {
    let timing = &opts.timing;
    session
        .connect(timing.connect_tries, timing.connect)
        .map_err(|err| match err {
            Error::Timeout {
                step: Step::Connect,
                tries,
                per_try,
                ..
            } => Error::NoBootloader {
                device: entered.path.clone(),
                tries,
                per_try,
                hint: if opts.baud.is_some() {
                    "check the baud rate and wiring; if the board runs Klipper, its firmware \
                     may lack the serial bootloader request (double-tap reset to enter \
                     Katapult by hand)"
                } else if entered.fresh {
                    "Katapult enumerated but does not answer: power-cycle the board"
                } else {
                    "if this is a UART board (or a USB-serial adapter), give its baud rate \
                     (-b) so kflash can ask the application to enter the bootloader"
                },
            },
            other => other,
        })
}

/// Flash `opts.firmware` to the board on `opts.device` through Katapult, natively.
///
/// Enters the bootloader if the board runs its application, refuses before writing when the
/// image's MCU differs from the bootloader's, writes, verifies every block, and sends
/// COMPLETE. Progress goes to `sink` as `Stage::Flash` events.
pub fn flash_serial(
    opts: &SerialFlashOptions,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<FlashReport, Error> {
    let image = read_image(&opts.firmware)?;
    let dictionary = image_info(&image).ok();
    let label = opts.device.display().to_string();
    match &dictionary {
        Some(d) => sink(&Event::info(
            Stage::Flash,
            Some(&label),
            format!(
                "firmware {}: {} bytes, MCU {}, version {}",
                opts.firmware.display(),
                image.len(),
                d.mcu,
                d.version
            ),
        )),
        None => sink(
            &Event::info(
                Stage::Flash,
                Some(&label),
                format!(
                    "firmware {} has no embedded data dictionary: its MCU cannot be checked",
                    opts.firmware.display()
                ),
            )
            .with_level(Level::Warning),
        ),
    }
    let target = opts.target();
    let entered = enter_bootloader(&target, cancel, sink)?;
    let mut port = match open_session_port(&entered, opts.baud, cancel) {
        Err(Error::Cancelled { step }) => {
            release_untouched(&entered.path, opts.baud, &opts.timing, sink);
            return Err(Error::Cancelled { step });
        }
        other => other?,
    };
    let mut session = Session::new(&mut port, &entered.path, &opts.timing, cancel);
    let report = (|| {
        if entered.prime {
            session.prime()?;
        }
        let info = connect_serial(&mut session, &target, &entered)?;
        flash_connected(
            &mut session,
            &info,
            &image,
            &Checks {
                dictionary: dictionary.as_ref(),
                app_start: opts.app_start,
            },
            &entered.path,
            sink,
        )
    })();
    let untouched = !session.wrote();
    drop(session);
    if untouched && matches!(report, Err(Error::Cancelled { .. })) {
        // Abandoned before a block went out: the old application is intact.
        complete_on(&mut port, &entered.path, &opts.timing, sink);
    }
    let _ = port.close();
    report
}

/// Send COMPLETE to a bootloader nothing was written to, so the board returns to its old,
/// intact application instead of waiting in Katapult. Not cancellable (the caller was just
/// cancelled); bounded by a short timeout.
fn complete_on(port: &mut SerialPort, path: &Path, timing: &Timing, sink: &Sink) {
    let fresh = Cancel::new();
    let short = Timing {
        read: timing.read.min(Duration::from_millis(500)),
        ..timing.clone()
    };
    let mut session = Session::new(port, path, &short, &fresh);
    let label = path.display().to_string();
    match session.complete() {
        Ok(()) => sink(&Event::info(
            Stage::Flash,
            Some(&label),
            "nothing was written: sent COMPLETE, the board returns to its application",
        )),
        Err(err) => sink(
            &Event::info(
                Stage::Flash,
                Some(&label),
                format!(
                    "nothing was written, but COMPLETE failed ({err}): the board waits in Katapult"
                ),
            )
            .with_level(Level::Warning),
        ),
    }
}

/// `complete_on` for a board whose tty was not opened yet.
fn release_untouched(path: &Path, baud: Option<u32>, timing: &Timing, sink: &Sink) {
    if let Ok(mut port) = SerialPort::open(path, baud.unwrap_or(DEFAULT_BAUD)) {
        complete_on(&mut port, path, timing, sink);
        let _ = port.close();
    }
}

/// After the 1200-baud touch the board is on its way into Katapult: when the wait for it
/// is cancelled, give it a short while to appear and send it back to its application.
fn release_after_touch(opts: &SerialStatusOptions, stable: &StableId, sink: &Sink) {
    let deadline = Instant::now() + RELEASE_WAIT.min(opts.timing.reenumerate);
    while Instant::now() < deadline {
        if let Some(port) = opts.discovery.find(stable) {
            if usb_mode(&port) == UsbMode::Katapult {
                if let Some(path) = port.path() {
                    let path = path.to_path_buf();
                    // Give udev a moment, as `open_session_port` does.
                    let until = Instant::now() + OPEN_GRACE;
                    while Instant::now() < until {
                        if SerialPort::open(&path, DEFAULT_BAUD).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    release_untouched(&path, None, &opts.timing, sink);
                }
                return;
            }
        }
        std::thread::sleep(opts.timing.poll);
    }
}

/// Connect to the board's Katapult (entering it if needed), report what it says, flash
/// nothing, and send COMPLETE so the board returns to its application.
pub fn status_serial(
    opts: &SerialStatusOptions,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<BootloaderInfo, Error> {
    let entered = enter_bootloader(opts, cancel, sink)?;
    let mut port = open_session_port(&entered, opts.baud, cancel)?;
    let mut session = Session::new(&mut port, &entered.path, &opts.timing, cancel);
    if entered.prime {
        session.prime()?;
    }
    let info = connect_serial(&mut session, opts, &entered)?;
    let status = BootloaderInfo::new(&entered.path, &info);
    if let Err(err) = session.complete() {
        sink(
            &Event::info(
                Stage::Flash,
                Some(&entered.path.display().to_string()),
                format!("COMPLETE was not acknowledged ({err})"),
            )
            .with_level(Level::Warning),
        );
    }
    Ok(status)
}

#[cfg(test)]
mod tests;
