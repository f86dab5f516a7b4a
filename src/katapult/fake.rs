//! Test-only fake Katapult bootloader: the device side of the protocol with injectable
//! faults, an in-memory port running in virtual time, and a runner that serves it on a pty
//! so the real serial port code is exercised.
//!
//! Behaviour follows reference/katapult.md "Device behaviour": garbage earns one NACK per
//! run, unknown commands and bad SEND_BLOCKs a command error, REQUEST_BLOCK reads anything,
//! flash starts erased (0xFF).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::codec::{
    Ack, Command, ConnectInfo, DecodeError, Decoder, Response, DEVICE_MAX_FRAME, PROTO_1_1_0,
};
use super::port::Port;
use crate::discovery::Discovery;
use crate::events::{Event, Sink};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

/// The MCU the fake boards run (and test images are built for).
pub(crate) const MCU: &str = "stm32f103xe";

/// How long the pty device waits for input before looking at its baud rate again.
const FIVE_MS: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 5_000_000,
};

/// A deterministic image, not all 0xFF, so padding and offsets matter.
pub(crate) fn image_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

/// A sink that keeps every event, and the events it kept.
pub(crate) fn collect() -> (Sink, Arc<Mutex<Vec<Event>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = events.clone();
    (
        Arc::new(move |e: &Event| e2.lock().unwrap().push(e.clone())),
        events,
    )
}

/// Faults to inject; counters are 1-based over valid command frames.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    /// Answer NACK instead of processing every n-th frame.
    pub nack_every: Option<usize>,
    /// Process but do not answer every n-th frame (a dropped reply).
    pub drop_reply_every: Option<usize>,
    /// Ignore every n-th frame entirely (a dropped request).
    pub drop_request_every: Option<usize>,
    /// Flip a bit in every n-th reply (the host sees a CRC error).
    pub corrupt_reply_every: Option<usize>,
    /// Store a wrong byte at this address (bad flash; verify must catch it).
    pub bad_flash_at: Option<u32>,
    /// Refuse every SEND_BLOCK to this address with a command error.
    pub refuse_block_at: Option<u32>,
    /// Delay of the first SEND_BLOCK into each erase page (1 KiB).
    pub erase_delay: Duration,
    /// Delay of every reply.
    pub reply_delay: Duration,
    /// Echo a wrong address for the first SEND_BLOCK.
    pub wrong_echo_once: bool,
    /// Never answer anything (a board that is not in Katapult).
    pub silent: bool,
    /// Stale bytes (no frame) in front of every reply.
    pub noise_before_reply: bool,
}

/// The device side of Katapult.
#[derive(Debug)]
pub(crate) struct FakeBootloader {
    pub info: ConnectInfo,
    pub flash: BTreeMap<u32, u8>,
    pub faults: Faults,
    /// Every command processed, in order.
    pub log: Vec<Command>,
    pub completed: bool,
    pub nacks_sent: usize,
    decoder: Decoder,
    frames: usize,
    replies: usize,
    erased_pages: std::collections::BTreeSet<u32>,
}

impl FakeBootloader {
    pub(crate) fn new(mcu: &str, block_size: u32) -> Self {
        Self {
            info: ConnectInfo {
                proto_version: PROTO_1_1_0,
                app_start: 0x0800_2000,
                block_size,
                mcu: mcu.into(),
                bootloader_version: Some("v0.0.1-fake".into()),
            },
            flash: BTreeMap::new(),
            faults: Faults::default(),
            log: Vec::new(),
            completed: false,
            nacks_sent: 0,
            decoder: Decoder::with_max_frame(DEVICE_MAX_FRAME.max(12 + block_size as usize)),
            frames: 0,
            replies: 0,
            erased_pages: std::collections::BTreeSet::new(),
        }
    }

    /// Bytes of flash from `addr` (0xFF where never written).
    pub(crate) fn read(&self, addr: u32, len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| *self.flash.get(&(addr + i)).unwrap_or(&0xFF))
            .collect()
    }

    fn hits(every: Option<usize>, n: usize) -> bool {
        every.is_some_and(|k| k > 0 && n % k == 0)
    }

    /// Feed received bytes; the replies to send, each after its delay.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<(Duration, Vec<u8>)> {
        self.decoder.push(bytes);
        let mut out = Vec::new();
        while let Some(item) = self.decoder.next_frame() {
            let frame = match item {
                Ok(frame) => frame,
                Err(DecodeError::Garbage { .. } | DecodeError::Malformed { .. }) => {
                    if !self.faults.silent {
                        self.nacks_sent += 1;
                        out.push((Duration::ZERO, Response::Nack.encode().unwrap()));
                    }
                    continue;
                }
            };
            self.frames += 1;
            let n = self.frames;
            if self.faults.silent || Self::hits(self.faults.drop_request_every, n) {
                continue;
            }
            if Self::hits(self.faults.nack_every, n) {
                self.nacks_sent += 1;
                out.push((self.faults.reply_delay, Response::Nack.encode().unwrap()));
                continue;
            }
            let Ok(cmd) = Command::from_frame(&frame) else {
                out.push((
                    self.faults.reply_delay,
                    Response::CommandError.encode().unwrap(),
                ));
                continue;
            };
            let (delay, resp) = self.process(&cmd);
            self.log.push(cmd);
            if Self::hits(self.faults.drop_reply_every, n) {
                continue;
            }
            let mut bytes = resp.encode().unwrap();
            if self.faults.noise_before_reply {
                bytes.splice(0..0, b"ok\n\x99\x03".iter().copied());
            }
            self.replies += 1;
            if Self::hits(self.faults.corrupt_reply_every, self.replies) {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x10;
            }
            out.push((delay + self.faults.reply_delay, bytes));
        }
        out
    }

    fn process(&mut self, cmd: &Command) -> (Duration, Response) {
        let bs = self.info.block_size as usize;
        match cmd {
            Command::Connect => (
                Duration::ZERO,
                Response::Ack(Ack::Connect(self.info.clone())),
            ),
            Command::SendBlock { addr, data } => {
                if data.len() != bs
                    || *addr < self.info.app_start
                    || self.faults.refuse_block_at == Some(*addr)
                {
                    return (Duration::ZERO, Response::CommandError);
                }
                let mut delay = Duration::ZERO;
                if self.erased_pages.insert(addr / 1024) {
                    delay = self.faults.erase_delay;
                }
                for (i, b) in data.iter().enumerate() {
                    let a = addr + i as u32;
                    let v = if self.faults.bad_flash_at == Some(a) {
                        !b
                    } else {
                        *b
                    };
                    self.flash.insert(a, v);
                }
                let mut echo = *addr;
                if std::mem::take(&mut self.faults.wrong_echo_once) {
                    echo = addr.wrapping_add(0x40_0000);
                }
                (delay, Response::Ack(Ack::SendBlock { addr: echo }))
            }
            Command::SendEof => {
                let pages = self.erased_pages.len() as u32;
                (Duration::ZERO, Response::Ack(Ack::SendEof { pages }))
            }
            Command::RequestBlock { addr } => (
                Duration::ZERO,
                Response::Ack(Ack::RequestBlock {
                    addr: *addr,
                    data: self.read(*addr, bs),
                }),
            ),
            Command::Complete => {
                self.completed = true;
                (Duration::ZERO, Response::Ack(Ack::Complete))
            }
            Command::Other { .. } => (Duration::ZERO, Response::CommandError),
        }
    }
}

/// An in-memory port to a fake bootloader, in virtual time: waiting costs nothing.
pub(crate) struct FakePort {
    pub device: Arc<Mutex<FakeBootloader>>,
    now: Duration,
    outbox: VecDeque<(Duration, Vec<u8>)>,
    /// Fail every I/O after this many writes (a board that vanished).
    pub disconnect_after_writes: Option<usize>,
    writes: usize,
}

impl FakePort {
    pub(crate) fn new(device: FakeBootloader) -> Self {
        Self {
            device: Arc::new(Mutex::new(device)),
            now: Duration::ZERO,
            outbox: VecDeque::new(),
            disconnect_after_writes: None,
            writes: 0,
        }
    }
    /// Virtual time spent waiting so far.
    pub(crate) fn elapsed(&self) -> Duration {
        self.now
    }
    fn gone(&self) -> bool {
        self.disconnect_after_writes
            .is_some_and(|n| self.writes > n)
    }
}

impl Port for FakePort {
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        if self.gone() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "fake board disconnected",
            ));
        }
        match self.outbox.front_mut() {
            Some((ready, bytes)) if *ready <= self.now + timeout => {
                self.now = self.now.max(*ready);
                let n = bytes.len().min(buf.len());
                buf[..n].copy_from_slice(&bytes[..n]);
                bytes.drain(..n);
                if bytes.is_empty() {
                    self.outbox.pop_front();
                }
                Ok(n)
            }
            _ => {
                self.now += timeout;
                Ok(0)
            }
        }
    }
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.writes += 1;
        if self.gone() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "fake board disconnected",
            ));
        }
        let replies = self.device.lock().unwrap().feed(data);
        // A device answers in order: a reply is never ready before the previous one.
        let mut at = self
            .outbox
            .back()
            .map_or(self.now, |(t, _)| *t)
            .max(self.now);
        for (delay, bytes) in replies {
            at += delay;
            self.outbox.push_back((at, bytes));
        }
        Ok(())
    }
    fn close(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A fake bootloader served on the master side of a pty by a thread, in real time.
pub(crate) struct PtyDevice {
    pub device: Arc<Mutex<FakeBootloader>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PtyDevice {
    /// Serve `device` on `master`. `on_1200` runs once when the slave is set to 1200 baud
    /// (the USB touch); until then the device is "the application" and ignores frames when
    /// `app_first` is set.
    pub(crate) fn serve(
        master: OwnedFd,
        device: FakeBootloader,
        app_first: bool,
        on_1200: Option<Box<dyn FnOnce() + Send>>,
    ) -> Self {
        let device = Arc::new(Mutex::new(device));
        let stop = Arc::new(AtomicBool::new(false));
        let (dev, stop2) = (device.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut in_app = app_first;
            let mut on_1200 = on_1200;
            let mut buf = vec![0u8; 8192];
            while !stop2.load(Ordering::SeqCst) {
                if in_app && super::port::pty::speed(master.as_fd()) == 1200 {
                    in_app = false;
                    if let Some(f) = on_1200.take() {
                        f();
                    }
                }
                let mut fds = [PollFd::new(&master, PollFlags::IN)];
                if !matches!(poll(&mut fds, Some(&FIVE_MS)), Ok(n) if n > 0) {
                    continue;
                }
                let got = match rustix::io::read(&master, &mut buf[..]) {
                    Ok(n) if n > 0 => n,
                    _ => continue,
                };
                if in_app {
                    // The application does not speak Katapult; it reboots on the UART request.
                    let req = super::port::UART_BOOTLOADER_REQUEST;
                    if buf[..got].windows(req.len()).any(|w| w == req) {
                        in_app = false;
                    }
                    continue;
                }
                let replies = dev.lock().unwrap().feed(&buf[..got]);
                for (delay, bytes) in replies {
                    if !delay.is_zero() {
                        std::thread::sleep(delay);
                    }
                    let mut off = 0;
                    while off < bytes.len() {
                        match rustix::io::write(&master, &bytes[off..]) {
                            Ok(n) if n > 0 => off += n,
                            _ => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                }
            }
        });
        Self {
            device,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PtyDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The one-hop tty name of a by-id/by-path link.
fn link_tty(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// A sandbox laid out like the virtual printer bench for one USB board.
pub(crate) struct Sandbox {
    pub dir: tempfile::TempDir,
    pub discovery: Discovery,
}

impl Sandbox {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let discovery = Discovery::at(dir.path().join("dev"), dir.path().join("sys"));
        let (dev, sys) = (&discovery.dev.0, &discovery.sys.0);
        fs::create_dir_all(dev.join("serial/by-id")).unwrap();
        fs::create_dir_all(dev.join("serial/by-path")).unwrap();
        fs::create_dir_all(sys.join("class/tty")).unwrap();
        fs::create_dir_all(sys.join("bus/usb/devices")).unwrap();
        Self { dir, discovery }
    }

    /// Present `tty` (pointing at `target`) as a USB device with these ids on `port`.
    pub(crate) fn plug(&self, tty: &str, target: &Path, port: &str, vid_pid: &str, mfr: &str) {
        let dev = &self.discovery.dev.0;
        let _ = fs::remove_file(dev.join(tty));
        symlink(target, dev.join(tty)).unwrap();
        let by_id = dev.join("serial/by-id");
        for e in fs::read_dir(&by_id).unwrap().flatten() {
            if link_tty(&e.path()).as_deref() == Some(tty) {
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
        let usbdir = self.discovery.sys.0.join("devices").join(port);
        let iface = usbdir.join(format!("{port}:1.0"));
        fs::create_dir_all(&iface).unwrap();
        let (vid, pid) = vid_pid.split_once(':').unwrap();
        fs::write(usbdir.join("idVendor"), format!("{vid}\n")).unwrap();
        fs::write(usbdir.join("idProduct"), format!("{pid}\n")).unwrap();
        fs::write(usbdir.join("manufacturer"), format!("{mfr}\n")).unwrap();
        fs::write(usbdir.join("product"), "stm32f103xe\n").unwrap();
        let class = self.discovery.sys.0.join("class/tty").join(tty);
        fs::create_dir_all(&class).unwrap();
        let _ = fs::remove_file(class.join("device"));
        symlink(&iface, class.join("device")).unwrap();
        let bus = self.discovery.sys.0.join("bus/usb/devices").join(port);
        if !bus.exists() {
            symlink(&usbdir, bus).unwrap();
        }
    }

    /// The tty vanished (the board resets and re-enumerates).
    pub(crate) fn unplug(&self, tty: &str) {
        let _ = fs::remove_file(self.discovery.dev.0.join(tty));
        for sub in ["serial/by-id", "serial/by-path"] {
            for e in fs::read_dir(self.discovery.dev.0.join(sub))
                .unwrap()
                .flatten()
            {
                if link_tty(&e.path()).as_deref() == Some(tty) {
                    fs::remove_file(e.path()).unwrap();
                }
            }
        }
        let _ = fs::remove_dir_all(self.discovery.sys.0.join("class/tty").join(tty));
    }

    /// The board fell into a ROM loader: no tty, just USB ids on the port.
    pub(crate) fn rom(&self, tty: &str, port: &str, vid_pid: &str) {
        let _ = fs::remove_file(self.discovery.dev.0.join(tty));
        for sub in ["serial/by-id", "serial/by-path"] {
            for e in fs::read_dir(self.discovery.dev.0.join(sub))
                .unwrap()
                .flatten()
            {
                fs::remove_file(e.path()).unwrap();
            }
        }
        let usbdir = self.discovery.sys.0.join("devices").join(port);
        let (vid, pid) = vid_pid.split_once(':').unwrap();
        fs::write(usbdir.join("idVendor"), format!("{vid}\n")).unwrap();
        fs::write(usbdir.join("idProduct"), format!("{pid}\n")).unwrap();
        fs::write(usbdir.join("manufacturer"), "STMicroelectronics\n").unwrap();
    }
}
