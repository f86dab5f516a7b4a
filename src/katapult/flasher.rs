//! The Katapult flash session and the serial flasher built on it.
//!
//! Owns the host algorithm: CONNECT with retries (draining between tries), the MCU check
//! against the image's embedded dictionary before anything is written, SEND_BLOCK from the
//! application start in block-size steps (last block padded with 0xFF) with retries and
//! address-echo checks, SEND_EOF, a byte-for-byte read-back of every block, and COMPLETE.
//! Serial specifics: bootloader entry (USB 1200-baud touch or the UART request string),
//! re-resolving the device through `crate::discovery` after re-enumeration (its stable
//! identity, not the tty number; a new ROM loader on the bus means it fell into DFU or
//! BOOTSEL), and finding a board that already sits in Katapult from its application's
//! by-id name. A damaged reply ends a try early (after a short grace for a good reply
//! right behind the noise), so bit errors cost a retry, not a timeout.
//!
//! COMPLETE is sent after success and after any error that left the flash untouched (the
//! board returns to its old, intact application). After a failed write or verify the board
//! is deliberately left in Katapult: jumping into a partial image could hang it beyond the
//! reach of any flasher, while a board waiting in Katapult can be flashed again at once
//! (natively or by the flashtool.py fallback).
//!
//! Invariants: `flash_serial` returns `Ok` only when every block was acknowledged at its
//! address and read back identical. Timeouts are measured per try in port time (`Port::read`
//! returning 0 means its whole timeout passed), so fakes can run in virtual time.
//!
//! Thread-safety: runs on the caller's thread; `Cancel` is checked between frames and at
//! least every 100 ms while waiting.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::events::{Event, Level, Sink, Stage};
use crate::process::Cancel;

use super::codec::{code, Ack, Command, ConnectInfo, Decoder, Response};
use super::image::{image_info, read_image, ImageInfo};
use super::port::{uart_request_bootloader, usb_touch_1200, Port, SerialPort};
use super::{Error, Step};
use crate::discovery::{usb_mode, Discovery, StableId, UsbMode};

/// Default UART baud (flashtool's default, Klipper's usual).
pub const DEFAULT_BAUD: u32 = 250_000;
const SLICE: Duration = Duration::from_millis(100);
/// How long opening a freshly enumerated tty is retried (udev permissions, links).
const OPEN_GRACE: Duration = Duration::from_secs(2);

/// Timeouts and retry counts of a flash (defaults follow flashtool.py).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// How long a USB device may take to come back as Katapult after the 1200-baud touch.
    pub reenumerate: Duration,
    /// How long a UART application needs to reboot into Katapult after the request.
    pub uart_reboot: Duration,
    /// Per CONNECT try.
    pub connect: Duration,
    pub connect_tries: u32,
    /// Per SEND_BLOCK / SEND_EOF try (erasing a page is slow).
    pub block: Duration,
    pub block_tries: u32,
    /// Per REQUEST_BLOCK / COMPLETE try.
    pub read: Duration,
    pub read_tries: u32,
    /// Quiet time that ends draining stale input between tries.
    pub settle: Duration,
    /// Interval of re-checking the device tree while waiting for re-enumeration.
    pub poll: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            reenumerate: Duration::from_secs(10),
            uart_reboot: Duration::from_secs(1),
            connect: Duration::from_secs(2),
            connect_tries: 5,
            block: Duration::from_secs(5),
            block_tries: 3,
            read: Duration::from_secs(2),
            read_tries: 3,
            settle: Duration::from_millis(100),
            poll: Duration::from_millis(20),
        }
    }
}

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

/// A finished, verified flash.
#[derive(Debug, Clone, PartialEq)]
pub struct FlashReport {
    pub device: PathBuf,
    /// Size of the image.
    pub bytes: usize,
    pub blocks: usize,
    pub block_size: u32,
    pub app_start: u32,
    pub mcu: String,
    pub bootloader_version: Option<String>,
    /// The image's embedded version (what the MCU will report), if it has a dictionary.
    pub firmware_version: Option<String>,
    /// Pages the bootloader reported at SEND_EOF.
    pub pages: u32,
    /// False when COMPLETE was not acknowledged (the board may still sit in Katapult).
    pub completed: bool,
    /// Commands that had to be sent again (NACKs, garbled or missing replies).
    pub retries: u32,
    pub duration: Duration,
}

impl FlashReport {
    /// Image bytes per second over the whole write + verify.
    pub fn rate(&self) -> f64 {
        self.bytes as f64 / self.duration.as_secs_f64().max(1e-9)
    }
}

/// Progress of a write or verify pass, throttled to about one event per percent.
struct Progress<'a> {
    sink: &'a Sink,
    device: String,
    total_blocks: usize,
    block_size: usize,
    image_len: usize,
    started: Instant,
    last: f64,
}

impl Progress<'_> {
    fn info(&self, message: String) {
        (self.sink)(&Event::info(Stage::Flash, Some(&self.device), message));
    }
    fn warn(&self, message: String) {
        (self.sink)(
            &Event::info(Stage::Flash, Some(&self.device), message).with_level(Level::Warning),
        );
    }
    fn block(&mut self, pass: &str, done: usize) {
        let total = self.total_blocks.max(1);
        let base = if pass == "verify" { 0.5 } else { 0.0 };
        let fraction = base + 0.5 * done as f64 / total as f64;
        if done != total && fraction - self.last < 0.01 {
            return;
        }
        self.last = fraction;
        let bytes = (done * self.block_size).min(self.image_len);
        let secs = self.started.elapsed().as_secs_f64().max(1e-6);
        let moved = if pass == "verify" {
            self.image_len + bytes
        } else {
            bytes
        };
        let message = format!(
            "{pass} {done}/{total} blocks, {bytes}/{} bytes, {:.1} KiB/s",
            self.image_len,
            moved as f64 / 1024.0 / secs
        );
        (self.sink)(
            &Event::info(Stage::Flash, Some(&self.device), message).with_fraction(fraction),
        );
    }
}

enum Failure {
    Timeout,
    Nack,
    CommandError,
    Busy,
    Garbled(String),
    Protocol(String),
}

/// One conversation with a bootloader over a port.
pub(crate) struct Session<'a> {
    port: &'a mut dyn Port,
    path: PathBuf,
    decoder: Decoder,
    timing: Timing,
    cancel: &'a Cancel,
    discard_first: bool,
    buf: Vec<u8>,
    /// Commands sent again so far (after a NACK, a garbled or a missing reply).
    retries: u32,
}

impl<'a> Session<'a> {
    pub(crate) fn new(
        port: &'a mut dyn Port,
        path: &Path,
        timing: &Timing,
        cancel: &'a Cancel,
    ) -> Self {
        Self {
            port,
            path: path.to_owned(),
            decoder: Decoder::new(),
            timing: timing.clone(),
            cancel,
            discard_first: false,
            buf: vec![0; 4096],
            retries: 0,
        }
    }

    fn io(&self, step: Step, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            step,
            source,
        }
    }

    /// Read into the decoder for at most `budget`; returns the port time used.
    fn fill(&mut self, step: Step, budget: Duration) -> Result<Duration, Error> {
        let slice = budget.min(SLICE);
        let t0 = Instant::now();
        let n = self
            .port
            .read(&mut self.buf, slice)
            .map_err(|e| Error::Io {
                path: self.path.clone(),
                step,
                source: e,
            })?;
        if n == 0 {
            return Ok(slice);
        }
        self.decoder.push(&self.buf[..n]);
        Ok(t0.elapsed().min(budget))
    }

    /// Throw away whatever the device still sends (late answers to earlier tries): read
    /// until the line is quiet for `timing.settle`, for at most about a second.
    fn settle(&mut self, step: Step) -> Result<(), Error> {
        let mut total = Duration::ZERO;
        while total < Duration::from_secs(1) {
            let t0 = Instant::now();
            let n = self
                .port
                .read(&mut self.buf, self.timing.settle)
                .map_err(|e| self.io(step, e))?;
            if n == 0 {
                break;
            }
            // Count at least 1 ms a read, so a device that never stops talking ends this.
            total += t0.elapsed().max(Duration::from_millis(1));
        }
        self.decoder.clear();
        Ok(())
    }

    /// Send the priming command some STM32 USB parts need; its answer is discarded.
    pub(crate) fn prime(&mut self) -> Result<(), Error> {
        let bytes = Command::Other {
            code: code::PRIME,
            payload: Vec::new(),
        }
        .encode()
        .map_err(|e| protocol(Step::Connect, None, e.to_string()))?;
        self.port
            .write_all(&bytes)
            .map_err(|e| self.io(Step::Connect, e))?;
        self.discard_first = true;
        Ok(())
    }

    fn await_reply(
        &mut self,
        step: Step,
        cmd: u8,
        per_try: Duration,
        check: &dyn Fn(&Ack) -> Result<(), String>,
    ) -> Result<Result<Ack, Failure>, Error> {
        let mut budget = per_try;
        let mut mismatch = None;
        let mut garbled = None;
        loop {
            while let Some(item) = self.decoder.next_frame() {
                let frame = match item {
                    Ok(frame) => frame,
                    // Damaged bytes: most likely our reply, so do not wait the whole try;
                    // a good reply right behind stale noise still gets a short grace.
                    Err(garbage) => {
                        garbled = Some(garbage.to_string());
                        budget = budget.min(self.timing.settle);
                        continue;
                    }
                };
                if std::mem::take(&mut self.discard_first) {
                    continue;
                }
                match Response::from_frame(&frame) {
                    Err(e) => return Ok(Err(Failure::Protocol(e.to_string()))),
                    Ok(Response::Nack) => return Ok(Err(Failure::Nack)),
                    Ok(Response::CommandError) => return Ok(Err(Failure::CommandError)),
                    Ok(Response::Busy) => return Ok(Err(Failure::Busy)),
                    Ok(Response::Ack(ack)) => {
                        if ack.acked() != u32::from(cmd) {
                            continue; // a late answer to an earlier command
                        }
                        match check(&ack) {
                            Ok(()) => return Ok(Ok(ack)),
                            Err(why) => mismatch = Some(why),
                        }
                    }
                }
            }
            if self.cancel.is_cancelled() {
                return Err(Error::Cancelled { step });
            }
            if budget.is_zero() {
                return Ok(Err(match (mismatch, garbled) {
                    (Some(why), _) => Failure::Protocol(why),
                    (None, Some(detail)) => Failure::Garbled(detail),
                    (None, None) => Failure::Timeout,
                }));
            }
            let used = self.fill(step, budget)?;
            budget = budget.saturating_sub(used);
        }
    }

    /// Send `cmd` until an ACK passes `check`, at most `tries` times.
    fn transact(
        &mut self,
        step: Step,
        addr: Option<u32>,
        cmd: &Command,
        tries: u32,
        per_try: Duration,
        check: &dyn Fn(&Ack) -> Result<(), String>,
    ) -> Result<Ack, Error> {
        let bytes = cmd
            .encode()
            .map_err(|e| protocol(step, addr, e.to_string()))?;
        let tries = tries.max(1);
        let mut last = Failure::Timeout;
        for attempt in 0..tries {
            if self.cancel.is_cancelled() {
                return Err(Error::Cancelled { step });
            }
            if attempt > 0 {
                self.retries += 1;
                self.settle(step)?;
            }
            self.port.write_all(&bytes).map_err(|e| self.io(step, e))?;
            match self.await_reply(step, cmd.code(), per_try, check)? {
                Ok(ack) => return Ok(ack),
                Err(failure) => last = failure,
            }
        }
        Err(match last {
            Failure::Timeout => Error::Timeout {
                step,
                addr,
                tries,
                per_try,
            },
            Failure::Nack => Error::Nack { step, addr, tries },
            Failure::CommandError => Error::CommandError {
                step,
                addr,
                command: cmd.name(),
                tries,
            },
            Failure::Busy => protocol(
                step,
                addr,
                format!("bootloader still busy after {tries} tries"),
            ),
            Failure::Garbled(detail) => protocol(
                step,
                addr,
                format!("only damaged replies after {tries} tries ({detail})"),
            ),
            Failure::Protocol(detail) => protocol(step, addr, detail),
        })
    }

    /// CONNECT; the bootloader's identity and geometry.
    pub(crate) fn connect(&mut self, tries: u32, per_try: Duration) -> Result<ConnectInfo, Error> {
        let ack = self.transact(
            Step::Connect,
            None,
            &Command::Connect,
            tries,
            per_try,
            &|_| Ok(()),
        )?;
        let Ack::Connect(info) = ack else {
            return Err(protocol(
                Step::Connect,
                None,
                "unexpected CONNECT answer".into(),
            ));
        };
        if !matches!(info.block_size, 64 | 128 | 256 | 512) {
            return Err(protocol(
                Step::Connect,
                None,
                format!(
                    "unsupported block size {} (expected 64, 128, 256 or 512)",
                    info.block_size
                ),
            ));
        }
        Ok(info)
    }

    fn write_block(&mut self, addr: u32, data: Vec<u8>) -> Result<(), Error> {
        let cmd = Command::SendBlock { addr, data };
        self.transact(
            Step::Write,
            Some(addr),
            &cmd,
            self.timing.block_tries,
            self.timing.block,
            &|ack| match ack {
                Ack::SendBlock { addr: echo } if *echo == addr => Ok(()),
                Ack::SendBlock { addr: echo } => Err(format!(
                    "address echo {echo:#010x} for the block sent to {addr:#010x}"
                )),
                _ => Err("unexpected SEND_BLOCK answer".into()),
            },
        )?;
        Ok(())
    }

    fn eof(&mut self) -> Result<u32, Error> {
        match self.transact(
            Step::Eof,
            None,
            &Command::SendEof,
            self.timing.block_tries,
            self.timing.block,
            &|_| Ok(()),
        )? {
            Ack::SendEof { pages } => Ok(pages),
            _ => Err(protocol(
                Step::Eof,
                None,
                "unexpected SEND_EOF answer".into(),
            )),
        }
    }

    fn read_block(&mut self, addr: u32, block_size: usize) -> Result<Vec<u8>, Error> {
        let ack = self.transact(
            Step::Verify,
            Some(addr),
            &Command::RequestBlock { addr },
            self.timing.read_tries,
            self.timing.read,
            &|ack| match ack {
                Ack::RequestBlock { addr: echo, data } if *echo == addr && data.len() == block_size => {
                    Ok(())
                }
                Ack::RequestBlock { addr: echo, data } => Err(format!(
                    "read back {} bytes from {echo:#010x} for a {block_size}-byte block at {addr:#010x}",
                    data.len()
                )),
                _ => Err("unexpected REQUEST_BLOCK answer".into()),
            },
        )?;
        match ack {
            Ack::RequestBlock { data, .. } => Ok(data),
            _ => Err(protocol(
                Step::Verify,
                Some(addr),
                "unexpected REQUEST_BLOCK answer".into(),
            )),
        }
    }

    /// COMPLETE: the bootloader jumps to the application.
    pub(crate) fn complete(&mut self) -> Result<(), Error> {
        self.transact(
            Step::Complete,
            None,
            &Command::Complete,
            2,
            self.timing.read,
            &|_| Ok(()),
        )?;
        Ok(())
    }

    /// GET_CANBUS_ID: the uuid of a CAN node.
    pub(crate) fn canbus_id(&mut self) -> Result<[u8; 6], Error> {
        match self.transact(
            Step::CanbusId,
            None,
            &Command::GetCanbusId,
            self.timing.read_tries,
            self.timing.read,
            &|_| Ok(()),
        )? {
            Ack::CanbusId { uuid } => Ok(uuid),
            _ => Err(protocol(
                Step::CanbusId,
                None,
                "unexpected GET_CANBUS_ID answer".into(),
            )),
        }
    }
}

fn protocol(step: Step, addr: Option<u32>, detail: String) -> Error {
    Error::Protocol { step, addr, detail }
}

/// The blocks of an image from `app_start`, the last padded with 0xFF.
fn blocks(
    image: &[u8],
    app_start: u32,
    block_size: usize,
) -> impl Iterator<Item = (u32, Vec<u8>)> + '_ {
    image.chunks(block_size).enumerate().map(move |(i, chunk)| {
        let mut data = chunk.to_vec();
        data.resize(block_size, 0xFF);
        (app_start.wrapping_add((i * block_size) as u32), data)
    })
}

/// Flash `image` through a connected session: MCU check, write, EOF, verify, COMPLETE.
/// Transport-agnostic (serial and CAN share it).
pub(crate) fn flash_connected(
    session: &mut Session<'_>,
    info: &ConnectInfo,
    image: &[u8],
    dictionary: Option<&ImageInfo>,
    device: &Path,
    sink: &Sink,
) -> Result<FlashReport, Error> {
    let started = Instant::now();
    let bs = info.block_size as usize;
    let mut progress = Progress {
        sink,
        device: device.display().to_string(),
        total_blocks: image.len().div_ceil(bs),
        block_size: bs,
        image_len: image.len(),
        started,
        last: -1.0,
    };
    progress.info(format!(
        "Katapult {} (protocol {}) on {}: MCU {}, application at {:#010x}, {}-byte blocks",
        info.bootloader_version.as_deref().unwrap_or("?"),
        info.proto_version_string(),
        device.display(),
        info.mcu,
        info.app_start,
        bs
    ));
    if let Some(dict) = dictionary {
        if dict.mcu != info.mcu {
            let _ = session.complete();
            return Err(Error::McuMismatch {
                device: device.to_owned(),
                image: dict.mcu.clone(),
                bootloader: info.mcu.clone(),
            });
        }
    }
    let result = (|| {
        for (i, (addr, data)) in blocks(image, info.app_start, bs).enumerate() {
            session.write_block(addr, data)?;
            progress.block("write", i + 1);
        }
        let pages = session.eof()?;
        for (i, (addr, expected)) in blocks(image, info.app_start, bs).enumerate() {
            let got = session.read_block(addr, bs)?;
            if let Some(off) = got.iter().zip(&expected).position(|(a, b)| a != b) {
                return Err(Error::VerifyMismatch {
                    addr: addr.wrapping_add(off as u32),
                    block: addr,
                });
            }
            progress.block("verify", i + 1);
        }
        Ok(pages)
    })();
    let pages = match result {
        Ok(pages) => pages,
        Err(err) => {
            if !err.flash_touched() && !matches!(err, Error::Io { .. }) {
                let _ = session.complete();
            }
            return Err(err);
        }
    };
    let completed = match session.complete() {
        Ok(()) => true,
        Err(err) => {
            progress.warn(format!(
                "flash verified, but COMPLETE was not acknowledged ({err}); if the board stays \
                 in Katapult, power-cycle it"
            ));
            false
        }
    };
    let report = FlashReport {
        device: device.to_owned(),
        bytes: image.len(),
        blocks: progress.total_blocks,
        block_size: info.block_size,
        app_start: info.app_start,
        mcu: info.mcu.clone(),
        bootloader_version: info.bootloader_version.clone(),
        firmware_version: dictionary.map(|d| d.version.clone()),
        pages,
        completed,
        retries: session.retries,
        duration: started.elapsed(),
    };
    let retried = match report.retries {
        0 => String::new(),
        1 => ", 1 command sent again".to_owned(),
        n => format!(", {n} commands sent again"),
    };
    progress.info(format!(
        "flashed and verified {} bytes ({} blocks) in {:.2} s, {:.1} KiB/s{retried}",
        report.bytes,
        report.blocks,
        report.duration.as_secs_f64(),
        report.rate() / 1024.0
    ));
    Ok(report)
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
    let mut entered = wait_for_katapult(opts, &stable, &roms_before, cancel, sink)?;
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
    if let Some(other) = by_id_counterpart(device) {
        if let Ok(port) = disc.resolve(&other.to_string_lossy()) {
            return Some((other, port));
        }
    }
    let port = disc.find(opts.stable.as_ref()?)?;
    let path = port.path()?.to_path_buf();
    Some((path, port))
}

/// `usb-Klipper_<mcu>_<serial>-if00` <-> `usb-katapult_<mcu>_<serial>-if00`, same dir.
fn by_id_counterpart(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let other = if let Some(rest) = name.strip_prefix("usb-Klipper_") {
        format!("usb-katapult_{rest}")
    } else {
        format!("usb-Klipper_{}", name.strip_prefix("usb-katapult_")?)
    };
    Some(device.with_file_name(other))
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
            sleep_cancellable(opts.timing.uart_reboot, Step::EnterBootloader, cancel)?;
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
                    source.raw_os_error(),
                    Some(libc::ENOENT | libc::EACCES | libc::EBUSY | libc::EWOULDBLOCK)
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
    let mut port = open_session_port(&entered, opts.baud, cancel)?;
    let mut session = Session::new(&mut port, &entered.path, &opts.timing, cancel);
    if entered.prime {
        session.prime()?;
    }
    let info = connect_serial(&mut session, &target, &entered)?;
    let report = flash_connected(
        &mut session,
        &info,
        &image,
        dictionary.as_ref(),
        &entered.path,
        sink,
    );
    drop(session);
    let _ = port.close();
    report
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
