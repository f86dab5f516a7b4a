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

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The 33 bytes (flashtool.py's `SERIAL_BL_REQ`; the brief's "34" miscounts) that make a Klipper UART application reboot into Katapult.
pub const UART_BOOTLOADER_REQUEST: &[u8; 33] = b"~ \x1c Request Serial Bootloader!! ~";

/// A byte transport to a bootloader.
pub trait Port: Send {
    /// Read what is available into `buf`, waiting at most `timeout` for the first byte.
    /// `Ok(0)` means nothing arrived within `timeout`.
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize>;
    /// Write every byte of `data`.
    fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
    /// Wait until everything written has left the host (bounded by `timeout`).
    fn drain(&mut self, timeout: Duration) -> io::Result<()>;
    /// Release the device.
    fn close(&mut self) -> io::Result<()>;
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn open_tty(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: `c` is a valid NUL-terminated path; open has no other preconditions.
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Put the tty in raw mode (8N1, no flow control, no echo) at `baud`.
fn set_raw(fd: RawFd, baud: u32) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    check(unsafe { libc::tcgetattr(fd, &raw mut t) })?;
    // SAFETY: `t` is a valid termios filled above.
    unsafe { libc::cfmakeraw(&raw mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cflag &= !(libc::CRTSCTS | libc::CSTOPB | libc::PARENB);
    t.c_iflag &= !(libc::IXON | libc::IXOFF | libc::IXANY);
    t.c_cc[libc::VMIN] = 0;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: valid fd and termios.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw const t) })?;
    set_baud(fd, baud)
}

/// Any baud rate (250000 has no Bxxx constant): termios2 with BOTHER.
fn set_baud(fd: RawFd, baud: u32) -> io::Result<()> {
    // SAFETY: termios2 is plain data; TCGETS2 fills it for a valid tty fd.
    let mut t2: libc::termios2 = unsafe { std::mem::zeroed() };
    check(unsafe { libc::ioctl(fd, libc::TCGETS2, &raw mut t2) })?;
    t2.c_cflag &= !(libc::CBAUD | (libc::CBAUD << libc::IBSHIFT));
    t2.c_cflag |= libc::BOTHER | (libc::BOTHER << libc::IBSHIFT);
    t2.c_ispeed = baud;
    t2.c_ospeed = baud;
    // SAFETY: valid fd and termios2.
    check(unsafe { libc::ioctl(fd, libc::TCSETS2, &raw const t2) })?;
    Ok(())
}

fn poll_fd(fd: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // Round up: poll must never return before the timeout has fully passed.
    let ms = libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        return Ok(if n == 0 { 0 } else { pfd.revents });
    }
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
    /// with `ErrorKind::ResourceBusy`-like errors (`EWOULDBLOCK`/`EBUSY`).
    pub fn open(path: &Path, baud: u32) -> io::Result<Self> {
        let fd = open_tty(path)?;
        let raw = fd.as_raw_fd();
        // SAFETY: valid fd; flock/ioctl have no memory preconditions.
        if unsafe { libc::flock(raw, libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(
                err.kind(),
                format!(
                    "{} is in use by another program ({err}); is klipper stopped?",
                    path.display()
                ),
            ));
        }
        // SAFETY: valid fd.
        check(unsafe { libc::ioctl(raw, libc::TIOCEXCL) })?;
        let port = Self {
            fd: Some(fd),
            path: path.to_owned(),
        };
        set_raw(raw, baud)?;
        // SAFETY: valid fd; discard whatever was queued before we came.
        unsafe { libc::tcflush(raw, libc::TCIOFLUSH) };
        Ok(port)
    }

    /// The path the port was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn raw(&self) -> io::Result<RawFd> {
        self.fd
            .as_ref()
            .map(AsRawFd::as_raw_fd)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "port is closed"))
    }
}

impl Port for SerialPort {
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        let fd = self.raw()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let revents = poll_fd(fd, libc::POLLIN, left)?;
            if revents == 0 {
                if Instant::now() >= deadline {
                    return Ok(0);
                }
                continue;
            }
            // SAFETY: `buf` is valid for `buf.len()` bytes.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(n as usize);
            }
            if n == 0 {
                return Err(disconnected(&self.path));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => {}
                Some(libc::EIO) => return Err(disconnected(&self.path)),
                _ => return Err(err),
            }
            if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(disconnected(&self.path));
            }
            if Instant::now() >= deadline {
                return Ok(0);
            }
        }
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        let fd = self.raw()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !data.is_empty() {
            // SAFETY: `data` is valid for `data.len()` bytes.
            let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
            if n > 0 {
                data = &data[n as usize..];
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("{} does not accept data", self.path.display()),
                        ));
                    }
                    poll_fd(fd, libc::POLLOUT, left)?;
                }
                Some(libc::EIO) => return Err(disconnected(&self.path)),
                _ => return Err(err),
            }
        }
        Ok(())
    }

    fn drain(&mut self, timeout: Duration) -> io::Result<()> {
        let fd = self.raw()?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut queued: libc::c_int = 0;
            // SAFETY: valid fd, TIOCOUTQ writes one c_int.
            check(unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) })?;
            if queued <= 0 || Instant::now() >= deadline {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn close(&mut self) -> io::Result<()> {
        if let Some(fd) = self.fd.take() {
            // Clear exclusivity: it would outlive us on a tty another process keeps open.
            // SAFETY: valid fd.
            unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCNXCL) };
            drop(fd);
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
    let raw = fd.as_raw_fd();
    let dtr: libc::c_int = libc::TIOCM_DTR;
    // Modem lines are not supported everywhere (a pty refuses them): best effort.
    // SAFETY: valid fd; TIOCMBIS/TIOCMBIC read one c_int.
    unsafe { libc::ioctl(raw, libc::TIOCMBIS, &raw const dtr) };
    // SAFETY: termios is plain data, filled by tcgetattr for a valid fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    check(unsafe { libc::tcgetattr(raw, &raw mut t) })?;
    // SAFETY: `t` is a valid termios.
    check(unsafe { libc::cfsetispeed(&raw mut t, libc::B1200) })?;
    check(unsafe { libc::cfsetospeed(&raw mut t, libc::B1200) })?;
    check(unsafe { libc::tcsetattr(raw, libc::TCSANOW, &raw const t) })?;
    // SAFETY: as above.
    unsafe { libc::ioctl(raw, libc::TIOCMBIC, &raw const dtr) };
    drop(fd);
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

    pub(crate) struct Pty {
        pub master: OwnedFd,
        pub slave_path: PathBuf,
        // Keep one slave descriptor open so the master never sees a hang-up between opens.
        _slave: OwnedFd,
    }

    pub(crate) fn open() -> Pty {
        let mut master: libc::c_int = -1;
        let mut slave: libc::c_int = -1;
        // SAFETY: out-pointers are valid; name/termios/winsize may be null.
        let rc = unsafe {
            libc::openpty(
                &raw mut master,
                &raw mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: fresh descriptors from openpty.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let name = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd())).unwrap();
        // Raw on both ends so no byte is translated.
        set_raw(slave.as_raw_fd(), 250_000).unwrap();
        Pty {
            master,
            slave_path: name,
            _slave: slave,
        }
    }

    /// The speed the slave side is set to (what the device "sees").
    pub(crate) fn speed(fd: RawFd) -> u32 {
        // SAFETY: plain data filled by TCGETS2.
        let mut t2: libc::termios2 = unsafe { std::mem::zeroed() };
        check(unsafe { libc::ioctl(fd, libc::TCGETS2, &raw mut t2) }).unwrap();
        t2.c_ospeed
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
        assert_eq!(pty::speed(p.master.as_raw_fd()), 250_000);
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
        assert_eq!(pty::speed(p.master.as_raw_fd()), 1200);
        uart_request_bootloader(&p.slave_path, 115_200).unwrap();
        let mut master = std::fs::File::from(p.master.try_clone().unwrap());
        let mut got = [0u8; 33];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, UART_BOOTLOADER_REQUEST);
        assert_eq!(pty::speed(p.master.as_raw_fd()), 115_200);
    }
}
