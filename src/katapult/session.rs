//! A Katapult session over any byte stream: CONNECT, the MCU check, write, verify, COMPLETE.
//!
//! Owns the host algorithm of reference/katapult.md: CONNECT with retries (draining stale
//! input between tries), the MCU check against the image's embedded dictionary before
//! anything is written, SEND_BLOCK from the application start in block-size steps (last
//! block padded with 0xFF) with retries and address-echo checks, SEND_EOF, a byte-for-byte
//! read-back of every block (REQUEST_BLOCK), and COMPLETE. A damaged reply ends a try early
//! (after a short grace for a good reply right behind the noise), so bit errors cost a
//! retry, not a timeout. The session does not know what the bytes travel over: a tty
//! (`serial`) or a fake in tests.
//!
//! COMPLETE is sent after success and after any error that left the flash untouched (the
//! board returns to its old, intact application). After a failed write or verify the board
//! is deliberately left in Katapult: jumping into a partial image could hang it beyond the
//! reach of any flasher, while a board waiting in Katapult can be flashed again at once
//! (natively or by the flashtool.py fallback).
//!
//! Invariants: [`flash_connected`] returns `Ok` only when every block was acknowledged at
//! its address and read back identical. Timeouts are measured per try in port time
//! (`Port::read` returning 0 means its whole timeout passed), so fakes can run in virtual
//! time.
//!
//! Thread-safety: runs on the caller's thread; `Cancel` is checked between frames and at
//! least every 100 ms while waiting.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::events::{Event, Level, Sink, Stage};
use crate::process::Cancel;

use super::codec::{code, Ack, Command, ConnectInfo, Decoder, Response};
use super::image::ImageInfo;
use super::port::Port;
use super::{AppStart, Error, Step};

const SLICE: Duration = Duration::from_millis(100);

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
    /// Whether a SEND_BLOCK went out (the flash may be erased from then on).
    wrote: bool,
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
            wrote: false,
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

    /// Whether anything was sent that may have changed the flash.
    pub(crate) fn wrote(&self) -> bool {
        self.wrote
    }

    fn write_block(&mut self, addr: u32, data: Vec<u8>) -> Result<(), Error> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled { step: Step::Write });
        }
        self.wrote = true;
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

/// The checks before anything is written: the image is for this chip, and Katapult starts
/// the application where the config builds it for (written elsewhere it would not run,
/// or would overwrite the bootloader).
fn check(checks: &Checks<'_>, info: &ConnectInfo, device: &Path) -> Result<(), Error> {
    if let Some(dict) = checks.dictionary {
        if dict.mcu != info.mcu {
            return Err(Error::McuMismatch {
                device: device.to_owned(),
                image: dict.mcu.clone(),
                bootloader: info.mcu.clone(),
            });
        }
    }
    if let Some(want) = checks.app_start {
        if want.address != info.app_start {
            return Err(Error::AppStartMismatch {
                device: device.to_owned(),
                bootloader: info.app_start,
                config: want.address,
                flash_start: want.flash_start,
            });
        }
    }
    Ok(())
}

/// What is checked against CONNECT before anything is written.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Checks<'a> {
    /// The image's embedded dictionary: its MCU must be the bootloader's.
    pub dictionary: Option<&'a ImageInfo>,
    /// Where the config says the application starts: it must be where Katapult starts it.
    pub app_start: Option<AppStart>,
}

/// Flash `image` through a connected session: MCU and application start checks, write,
/// EOF, verify, COMPLETE. The transport does not matter: any [`Port`] will do.
pub(crate) fn flash_connected(
    session: &mut Session<'_>,
    info: &ConnectInfo,
    image: &[u8],
    checks: &Checks<'_>,
    device: &Path,
    sink: &Sink,
) -> Result<FlashReport, Error> {
    let dictionary = checks.dictionary;
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
    if let Err(err) = check(checks, info, device) {
        // Nothing written: the board returns to its old, intact application.
        let _ = session.complete();
        return Err(err);
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

#[cfg(test)]
mod tests;
