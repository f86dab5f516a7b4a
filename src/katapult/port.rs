//! Byte transports the flasher talks through, and the real serial port.
//!
//! Owns the [`Port`] trait (read with timeout, write, drain, close) and its tty
//! implementation [`SerialPort`]: opened raw (cfmakeraw, any baud through termios2/BOTHER),
//! `O_NOCTTY | O_NONBLOCK | O_CLOEXEC`, exclusive (`flock` like pyserial's `exclusive=True`,
//! plus `TIOCEXCL`, released again before close), timeouts by `poll`. Also the two ways of
//! asking an application to reboot into Katapult: the USB 1200-baud touch and the UART
//! request string.
//!
//! Invariants: `read` returns `Ok(0)` only after the whole timeout passed without data;
//! `write_all` either writes every byte or fails. A `SerialPort` owns its descriptor and
//! closes it on drop. Thread-safety: a port is used by one thread at a time (`Send`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{flock, open, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use rustix::termios::{
    ioctl_tiocexcl, ioctl_tiocnxcl, tcflush, tcgetattr, tcsetattr, ControlModes, InputModes,
    OptionalActions, QueueSelector, SpecialCodeIndex,
};

/// The 33 bytes (flashtool.py's `SERIAL_BL_REQ`) that make a Klipper UART application
/// reboot into Katapult.
pub const UART_BOOTLOADER_REQUEST: &[u8; 33] = b"~ \x1c Request Serial Bootloader!! ~";

/// A byte transport to a bootloader.
pub trait Port: Send {
    /// Read what is available into `buf`, waiting at most `timeout` for the first byte.
    /// `Ok(0)` means nothing arrived within `timeout`.
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize>;
    /// Write every byte of `data`.
    fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
    /// Release the device.
    fn close(&mut self) -> io::Result<()>;
}

fn open_tty(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDWR | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    Ok(open(path, flags, Mode::empty())?)
}

/// Put the tty in raw mode (8N1, no flow control, no echo, reads never block) at `baud`
/// (any rate: 250000 has no Bxxx constant; rustix sets it through termios2).
fn set_raw(fd: BorrowedFd<'_>, baud: u32) -> io::Result<()> {
    let mut t = tcgetattr(fd)?;
    t.make_raw();
    t.control_modes |= ControlModes::CLOCAL | ControlModes::CREAD;
    t.control_modes -= ControlModes::CRTSCTS | ControlModes::CSTOPB | ControlModes::PARENB;
    t.input_modes -= InputModes::IXON | InputModes::IXOFF | InputModes::IXANY;
    t.special_codes[SpecialCodeIndex::VMIN] = 0;
    t.special_codes[SpecialCodeIndex::VTIME] = 0;
    t.set_speed(baud)?;
    tcsetattr(fd, OptionalActions::Now, &t)?;
    Ok(())
}

/// Wait up to `timeout` for `events` on `fd`; the events seen (empty after the timeout).
fn poll_fd(fd: BorrowedFd<'_>, events: PollFlags, timeout: Duration) -> io::Result<PollFlags> {
    // Round up to whole milliseconds: poll must never return before the timeout passed.
    let timeout = Duration::from_millis(timeout.as_micros().div_ceil(1000) as u64);
    let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    });
    let mut fds = [PollFd::new(&fd, events)];
    loop {
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => return Ok(PollFlags::empty()),
            Ok(_) => return Ok(fds[0].revents()),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Set (`true`) or clear the DTR modem line. Not every tty has modem lines (a pty
/// refuses them), so this is best effort, like flashtool.py's.
fn set_dtr(fd: BorrowedFd<'_>, on: bool) {
    let dtr: libc::c_int = libc::TIOCM_DTR;
    let request = if on { libc::TIOCMBIS } else { libc::TIOCMBIC };
    // SAFETY: no kept crate wraps TIOCMBIS/TIOCMBIC; both read one c_int through the
    // pointer, which points at `dtr` for the whole call.
    unsafe { libc::ioctl(fd.as_raw_fd(), request, &raw const dtr) };
}

/// Bytes written but not yet sent by the tty (`TIOCOUTQ`).
fn output_queued(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut queued: libc::c_int = 0;
    // SAFETY: no kept crate wraps TIOCOUTQ; it writes one c_int through the pointer, which
    // points at `queued` for the whole call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued)
}

fn disconnected(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        format!("{} disconnected", path.display()),
    )
}

/// A tty opened raw and exclusively.
#[derive(Debug)]
pub struct SerialPort {
    fd: Option<OwnedFd>,
    path: PathBuf,
}

impl SerialPort {
    /// Open `path` raw at `baud`, exclusively. A tty another program holds (klippy) fails
    /// with `EWOULDBLOCK`/`EBUSY` and a message saying so.
    pub fn open(path: &Path, baud: u32) -> io::Result<Self> {
        let fd = open_tty(path)?;
        if let Err(err) = flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            let err = io::Error::from(err);
            return Err(io::Error::new(
                err.kind(),
                format!(
                    "{} is in use by another program ({err}); is klipper stopped?",
                    path.display()
                ),
            ));
        }
        ioctl_tiocexcl(&fd)?;
        set_raw(fd.as_fd(), baud)?;
        // Discard whatever was queued before we came.
        tcflush(&fd, QueueSelector::IOFlush)?;
        Ok(Self {
            fd: Some(fd),
            path: path.to_owned(),
        })
    }

    fn fd(&self) -> io::Result<BorrowedFd<'_>> {
        self.fd
            .as_ref()
            .map(AsFd::as_fd)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "port is closed"))
    }

    /// Wait until everything written has left the host, for at most `timeout`.
    pub fn drain(&mut self, timeout: Duration) -> io::Result<()> {
        let fd = self.fd()?;
        let deadline = Instant::now() + timeout;
        while output_queued(fd)? > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl Port for SerialPort {
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        let fd = self.fd()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let revents = poll_fd(fd, PollFlags::IN, left)?;
            if revents.is_empty() {
                if Instant::now() >= deadline {
                    return Ok(0);
                }
                continue;
            }
            match rustix::io::read(fd, &mut *buf) {
                // End of file or EIO: the device is gone (unplugged, re-enumerating).
                Ok(0) | Err(Errno::IO) => return Err(disconnected(&self.path)),
                Ok(n) => return Ok(n),
                Err(Errno::AGAIN | Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            if revents.intersects(PollFlags::HUP | PollFlags::ERR) {
                return Err(disconnected(&self.path));
            }
            if Instant::now() >= deadline {
                return Ok(0);
            }
        }
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        let fd = self.fd()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !data.is_empty() {
            match rustix::io::write(fd, data) {
                Ok(n) => data = &data[n..],
                Err(Errno::AGAIN | Errno::INTR) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("{} does not accept data", self.path.display()),
                        ));
                    }
                    poll_fd(fd, PollFlags::OUT, left)?;
                }
                Err(Errno::IO) => return Err(disconnected(&self.path)),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn close(&mut self) -> io::Result<()> {
        if let Some(fd) = self.fd.take() {
            // Clear exclusivity: it would outlive us on a tty another process keeps open.
            let _ = ioctl_tiocnxcl(&fd);
        }
        Ok(())
    }
}

impl Drop for SerialPort {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The USB 1200-baud touch: open, set DTR, switch to 1200 baud, clear DTR, close. A Klipper
/// USB application reboots into its bootloader on that line-coding change.
pub fn usb_touch_1200(path: &Path) -> io::Result<()> {
    let fd = open_tty(path)?;
    set_dtr(fd.as_fd(), true);
    let mut t = tcgetattr(&fd)?;
    t.set_speed(1200)?;
    tcsetattr(&fd, OptionalActions::Now, &t)?;
    set_dtr(fd.as_fd(), false);
    Ok(())
}

/// Ask a Klipper UART application to reboot into Katapult: the request string at `baud`.
pub fn uart_request_bootloader(path: &Path, baud: u32) -> io::Result<()> {
    let mut port = SerialPort::open(path, baud)?;
    port.write_all(UART_BOOTLOADER_REQUEST)?;
    port.drain(Duration::from_secs(1))?;
    port.close()
}

#[cfg(test)]
pub(crate) mod pty {
    //! A pty pair for tests: the master plays the device, the slave path is the "tty".
    use super::*;
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};

    pub(crate) struct Pty {
        pub master: OwnedFd,
        pub slave_path: PathBuf,
        // Keep one slave descriptor open so the master never sees a hang-up between opens.
        _slave: OwnedFd,
    }

    pub(crate) fn open() -> Pty {
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).expect("openpt");
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave_path = PathBuf::from(name.to_str().unwrap());
        let slave = open_tty(&slave_path).unwrap();
        // Raw on both ends so no byte is translated.
        set_raw(slave.as_fd(), 250_000).unwrap();
        Pty {
            master,
            slave_path,
            _slave: slave,
        }
    }

    /// The speed the slave side is set to (what the device "sees").
    pub(crate) fn speed(fd: BorrowedFd<'_>) -> u32 {
        tcgetattr(fd).unwrap().output_speed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn serial_port_moves_bytes_both_ways_and_times_out() {
        let p = pty::open();
        let mut port = SerialPort::open(&p.slave_path, 250_000).unwrap();
        let mut master = std::fs::File::from(p.master.try_clone().unwrap());
        port.write_all(b"\x01\x88hello").unwrap();
        port.drain(Duration::from_secs(1)).unwrap();
        let mut got = [0u8; 7];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x01\x88hello");
        master.write_all(b"\x99\x03").unwrap();
        let mut buf = [0u8; 16];
        let n = port.read(&mut buf, Duration::from_secs(2)).unwrap();
        assert_eq!(&buf[..n], b"\x99\x03");
        let t0 = Instant::now();
        assert_eq!(port.read(&mut buf, Duration::from_millis(50)).unwrap(), 0);
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(pty::speed(p.master.as_fd()), 250_000);
    }

    #[test]
    fn a_second_open_is_refused_while_the_port_is_held() {
        let p = pty::open();
        let _held = SerialPort::open(&p.slave_path, 250_000).unwrap();
        let err = SerialPort::open(&p.slave_path, 250_000).unwrap_err();
        assert!(
            err.to_string().contains("in use by another program"),
            "{err}"
        );
    }

    #[test]
    fn usb_touch_sets_1200_baud_and_uart_request_sends_the_string() {
        let p = pty::open();
        usb_touch_1200(&p.slave_path).unwrap();
        assert_eq!(pty::speed(p.master.as_fd()), 1200);
        uart_request_bootloader(&p.slave_path, 115_200).unwrap();
        let mut master = std::fs::File::from(p.master.try_clone().unwrap());
        let mut got = [0u8; 33];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, UART_BOOTLOADER_REQUEST);
        assert_eq!(pty::speed(p.master.as_fd()), 115_200);
    }
}
