//! The shared-memory mirror of a snapshot: one writer process, any number of reader processes.
//!
//! Owns the file layout and the seqlock protocol. The file (best kept on a tmpfs such as
//! `/dev/shm`) holds one snapshot:
//!
//! ```text
//! offset  size  field
//!      0     8  magic      b"KFSNAP2\0"
//!      8     8  seq        u64: even = stable, odd = a write is in progress
//!     16     8  len        payload length in bytes
//!     24     8  version    snapshot version (0: nothing published yet)
//!     32     8  eventtime  f64 bits
//!     40     8  published  wall-clock time of the publish, ns since the Unix epoch
//!     48     8  capacity   payload bytes available after the header (fixed per file)
//!     56     4  checksum   CRC-32 (zlib's) of bytes 16..56 followed by the payload
//!     60     4  reserved   0
//!     64   cap  payload    the snapshot as JSON bytes
//! ```
//! Native byte order (the mirror never leaves the machine).
//!
//! Nobody maps the file. A mapping turns every file size change into a fault: a store
//! through a mapping past the end of a truncated file, or a load from it, is a SIGBUS that
//! kills the process (klippy, for the writer), and no check of the size before the access
//! closes the window between the check and the access. So the writer uses `pwrite` and
//! readers use `pread`: on a truncated file they get a short read, never a signal.
//!
//! Invariants:
//! - The writer makes `seq` odd, writes the fields, checksum and payload, then makes `seq`
//!   even again. A reader copies the header and payload between two reads of `seq` and keeps
//!   the copy only when both reads are equal and even AND the checksum matches. `pread` and
//!   `pwrite` are not atomic against each other (the kernel copies byte runs), so the
//!   checksum is what rules out a torn copy; `seq` makes a clash cheap to detect and retry.
//! - The whole file is allocated when it is made (`fallocate`), so a full tmpfs is an error
//!   at creation or growth, never a write that fails halfway through a publish.
//! - A file is made complete under a temporary name (created `O_EXCL | O_NOFOLLOW` with mode
//!   0644 whatever the umask: a planted symlink or file is never followed or reused) and
//!   renamed over the path, so a reader opening the path never sees a half-made file.
//! - A payload larger than the capacity, or a path that disappeared, makes the writer build a
//!   new file already holding that snapshot and rename it over the path. Readers check on every read whether the path
//!   still names the file they hold, and move to the new one. A path that now names a file
//!   the writer did not make is an error for the writer (another process owns it), which
//!   stops writing rather than fight over it. A file truncated under the writer is sized
//!   and allocated again on the next publish; readers report it as truncated meanwhile.
//! - Readers refuse anything but a regular file (a FIFO would block an open, a device could
//!   be anything) and never block on opening one.
//!
//! The mirror is a live view, not a record: it is not fsynced.
//!
//! Thread-safety: a [`ShmWriter`] needs `&mut` to publish (one writer per file); a
//! [`ShmReader`] is `Send` and needs `&mut` to read (it keeps its buffer and may reopen).

use super::Error;
use std::ffi::OsString;
use std::fs::{File, Metadata, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: [u8; 8] = *b"KFSNAP2\0";
/// The first format (a mapped seqlock without a checksum), refused by name.
const MAGIC_V1: [u8; 8] = *b"KFSNAP1\0";
const HEADER: usize = 64;
const OFF_SEQ: usize = 8;
const OFF_LEN: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_EVENTTIME: usize = 32;
const OFF_PUBLISHED: usize = 40;
const OFF_CAPACITY: usize = 48;
const OFF_CHECKSUM: usize = 56;
/// Smallest payload area a new file gets.
pub const MIN_CAPACITY: usize = 64 * 1024;
/// The mode of every mirror file (readable by the display or monitor of another user).
pub const FILE_MODE: u32 = 0o644;
/// How many times a reader retries a read the writer overlapped before giving up.
const READ_ATTEMPTS: u32 = 20_000;
/// How many temporary names the writer tries before giving up.
const TEMP_ATTEMPTS: u32 = 16;

fn io_err(path: &Path, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn get_u64(buf: &[u8], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[offset..offset + 8]);
    u64::from_ne_bytes(bytes)
}

fn put_u64(buf: &mut [u8], offset: usize, value: u64) {
    buf[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
}

/// The checksum stored at `OFF_CHECKSUM`: CRC-32 of the fields after `seq` and the payload.
fn checksum(fields: &[u8], payload: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(fields);
    crc.update(payload);
    crc.sum()
}

/// Which file a path or descriptor names (device and inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
}

impl From<&Metadata> for Identity {
    fn from(meta: &Metadata) -> Self {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// What kind of file `meta` describes, for messages.
fn kind_of(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Allocates `len` bytes of `file` from offset 0 (its size becomes at least `len`).
fn allocate(file: &File, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    match fallocate(file, FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        // A filesystem without fallocate: allocate by writing (ENOSPC shows up the same).
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
            let zeros = vec![0u8; 64 * 1024];
            let mut offset = 0u64;
            while offset < len {
                let n = (len - offset).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], offset)?;
                offset += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Names for the temporary file beside `name`: never the same twice in a process, and not
/// guessable from the pid alone.
fn temp_names(name: &std::ffi::OsStr) -> impl Iterator<Item = OsString> + '_ {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    (0..TEMP_ATTEMPTS).map(move |_| {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(format!(".{pid}.{n}.{nanos:08x}.tmp"));
        tmp
    })
}

/// Creates a new file in `dir` under the first of `names` that is free: `O_CREAT | O_EXCL |
/// O_NOFOLLOW` (an existing name, symlink or not, is skipped and left alone), then mode
/// [`FILE_MODE`] whatever the umask.
fn create_exclusive(
    dir: &Path,
    names: impl IntoIterator<Item = OsString>,
    for_path: &Path,
) -> Result<(File, PathBuf), Error> {
    let mut tried = 0;
    for name in names {
        tried += 1;
        let tmp = dir.join(&name);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        match opened {
            Ok(file) => {
                let pinned = file.set_permissions(Permissions::from_mode(FILE_MODE));
                if let Err(e) = pinned {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(io_err(&tmp, e));
                }
                return Ok((file, tmp));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&tmp, e)),
        }
    }
    Err(io_err(
        for_path,
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no free temporary name beside it ({tried} tried)"),
        ),
    ))
}

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Publishes snapshots into a shared-memory file.
pub struct ShmWriter {
    path: PathBuf,
    file: File,
    identity: Identity,
    capacity: usize,
    seq: u64,
    /// Header fields and payload of one publish (kept to avoid an allocation per publish).
    buf: Vec<u8>,
}

impl std::fmt::Debug for ShmWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmWriter")
            .field("path", &self.path)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl ShmWriter {
    /// Creates (or replaces) the mirror file at `path`, empty (version 0). Readers of a file
    /// already there (a previous klippy run) move to the new one on their next read.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let (file, identity) = Self::make_file(&path, MIN_CAPACITY, None, temp_names)?;
        Ok(ShmWriter {
            path,
            file,
            identity,
            capacity: MIN_CAPACITY,
            seq: 0,
            buf: Vec::new(),
        })
    }

    /// The file this writer publishes into.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Payload bytes the current file can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Builds a complete, allocated mirror beside `path` holding `content` (the bytes from
    /// offset 16: fields, checksum and payload, as [`ShmWriter::encode`] makes them; `None`
    /// for an empty mirror) and renames it over `path`.
    fn make_file<'a, I: IntoIterator<Item = OsString>>(
        path: &'a Path,
        capacity: usize,
        content: Option<&[u8]>,
        names: impl FnOnce(&'a std::ffi::OsStr) -> I,
    ) -> Result<(File, Identity), Error> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path.file_name().ok_or_else(|| Error::NotASnapshot {
            path: path.to_path_buf(),
            reason: "no file name".into(),
        })?;
        let (file, tmp) = create_exclusive(dir, names(name), path)?;
        let made = Self::init_file(&file, capacity, content)
            .map_err(|e| io_err(path, e))
            .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| io_err(path, e)))
            .and_then(|()| file.metadata().map_err(|e| io_err(path, e)));
        match made {
            Ok(meta) => Ok((file, Identity::from(&meta))),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Sizes and allocates `file` for `capacity` and writes the header and `content` (an
    /// empty mirror without content) with a stable (even) sequence number.
    fn init_file(file: &File, capacity: usize, content: Option<&[u8]>) -> io::Result<()> {
        allocate(file, (HEADER + capacity) as u64)?;
        let mut bytes = vec![0u8; HEADER];
        bytes[..8].copy_from_slice(&MAGIC);
        if let Some(content) = content {
            put_u64(&mut bytes, OFF_SEQ, 2);
            bytes.truncate(OFF_LEN);
            bytes.extend_from_slice(content);
        } else {
            put_u64(&mut bytes, OFF_CAPACITY, capacity as u64);
            let sum = checksum(&bytes[OFF_LEN..OFF_CHECKSUM], &[]);
            bytes[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_ne_bytes());
        }
        file.write_all_at(&bytes, 0)
    }

    /// Fills `self.buf` with what goes at offset 16: the fields, the checksum and `payload`.
    fn encode(&mut self, capacity: usize, version: u64, eventtime: f64, payload: &[u8]) {
        let fields = &mut self.buf;
        fields.clear();
        fields.resize(HEADER - OFF_LEN, 0);
        put_u64(fields, 0, payload.len() as u64);
        put_u64(fields, OFF_VERSION - OFF_LEN, version);
        put_u64(fields, OFF_EVENTTIME - OFF_LEN, eventtime.to_bits());
        put_u64(fields, OFF_PUBLISHED - OFF_LEN, now_unix_ns());
        put_u64(fields, OFF_CAPACITY - OFF_LEN, capacity as u64);
        let sum = checksum(&fields[..OFF_CHECKSUM - OFF_LEN], payload);
        fields[OFF_CHECKSUM - OFF_LEN..OFF_CHECKSUM - OFF_LEN + 4]
            .copy_from_slice(&sum.to_ne_bytes());
        fields.extend_from_slice(payload);
    }

    /// Whether the path still names this writer's file, whole (repairing a truncation):
    /// `Ok(true)` when a new file must be made (the path was removed).
    fn check_file(&mut self) -> Result<bool, Error> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if Identity::from(&meta) == self.identity => {}
            Ok(_) => {
                return Err(Error::Replaced {
                    path: self.path.clone(),
                })
            }
            // Removed (a cleaner, a user): put a mirror back where readers look for it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(io_err(&self.path, e)),
        }
        let size = self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, e))?
            .len();
        if size < (HEADER + self.capacity) as u64 {
            // Truncated under us: allocate again and rewrite the header. Readers saw a
            // truncated file meanwhile and said so; the publish that follows makes it whole.
            Self::init_file(&self.file, self.capacity, None).map_err(|e| io_err(&self.path, e))?;
        }
        Ok(false)
    }

    /// Publishes one snapshot: `payload` (JSON bytes) with its version and eventtime.
    pub fn publish(&mut self, version: u64, eventtime: f64, payload: &[u8]) -> Result<(), Error> {
        let gone = self.check_file()?;
        if gone || payload.len() > self.capacity {
            // A new file, made complete with this snapshot before readers can open it.
            let capacity = if payload.len() > self.capacity {
                payload.len().next_power_of_two().max(MIN_CAPACITY) * 2
            } else {
                self.capacity
            };
            self.encode(capacity, version, eventtime, payload);
            let (file, identity) =
                Self::make_file(&self.path, capacity, Some(&self.buf), temp_names)?;
            self.file = file;
            self.identity = identity;
            self.capacity = capacity;
            self.seq = 2;
            return Ok(());
        }
        self.encode(self.capacity, version, eventtime, payload);
        let write =
            |file: &File, bytes: &[u8], offset: usize| file.write_all_at(bytes, offset as u64);
        self.seq = self.seq.wrapping_add(1) | 1;
        let written = write(&self.file, &self.seq.to_ne_bytes(), OFF_SEQ)
            .and_then(|()| {
                // Readers that see the data below must also see the odd sequence number.
                fence(Ordering::Release);
                write(&self.file, &self.buf, OFF_LEN)
            })
            .and_then(|()| {
                fence(Ordering::Release);
                self.seq = self.seq.wrapping_add(1);
                write(&self.file, &self.seq.to_ne_bytes(), OFF_SEQ)
            });
        written.map_err(|e| io_err(&self.path, e))
    }
}

/// One consistent read of the mirror.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Snapshot version (increases by one per publish of the writing store).
    pub version: u64,
    /// The publisher's eventtime for the snapshot.
    pub eventtime: f64,
    /// Wall-clock time of the publish.
    pub published: SystemTime,
    /// The payload (JSON bytes).
    pub payload: Vec<u8>,
}

impl Reading {
    /// Time since the publish by the wall clock (zero if the clock went backwards).
    pub fn age(&self) -> Duration {
        self.published.elapsed().unwrap_or_default()
    }
}

/// Reads a mirror file, possibly while another process writes it.
pub struct ShmReader {
    path: PathBuf,
    file: File,
    identity: Identity,
    buf: Vec<u8>,
}

impl std::fmt::Debug for ShmReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Reads as much of `buf` as the file holds from `offset`; returns the byte count.
fn read_full_at(file: &File, buf: &mut [u8], offset: usize) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], (offset + done) as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl ShmReader {
    /// Opens the mirror at `path` (read-only). Refuses, without blocking, anything that is
    /// not a regular file holding a mirror of this format.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let (file, identity) = Self::open_file(&path)?;
        Ok(ShmReader {
            path,
            file,
            identity,
            buf: Vec::with_capacity(4096),
        })
    }

    fn open_file(path: &Path) -> Result<(File, Identity), Error> {
        let not = |reason: String| Error::NotASnapshot {
            path: path.to_path_buf(),
            reason,
        };
        // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        let meta = file.metadata().map_err(|e| io_err(path, e))?;
        if !meta.is_file() {
            return Err(not(kind_of(&meta).into()));
        }
        let mut header = [0u8; HEADER];
        let n = read_full_at(&file, &mut header, 0).map_err(|e| io_err(path, e))?;
        if n < 8 || (header[..8] != MAGIC && header[..8] != MAGIC_V1) {
            return Err(not("bad magic".into()));
        }
        if header[..8] == MAGIC_V1 {
            return Err(not(
                "written by an older kflash (format 1); restart klippy with this one".into(),
            ));
        }
        if n < HEADER {
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                size: n as u64,
                expected: HEADER as u64,
            });
        }
        Ok((file, Identity::from(&meta)))
    }

    /// The file this reader reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves to the file the path names now, if the writer replaced it.
    fn follow_path(&mut self) -> Result<(), Error> {
        let meta = std::fs::metadata(&self.path).map_err(|e| io_err(&self.path, e))?;
        if Identity::from(&meta) != self.identity {
            let (file, identity) = Self::open_file(&self.path)?;
            self.file = file;
            self.identity = identity;
        }
        Ok(())
    }

    fn truncated(&self, expected: usize) -> Error {
        let size = self.file.metadata().map_or(0, |m| m.len());
        Error::Truncated {
            path: self.path.clone(),
            size,
            expected: expected as u64,
        }
    }

    /// The latest snapshot, or `None` if nothing was published yet. Never blocks the writer;
    /// retries while a write overlaps the copy, and follows the writer to a new file.
    pub fn read(&mut self) -> Result<Option<Reading>, Error> {
        self.follow_path()?;
        let size = self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, e))?
            .len();
        let mut want = self.buf.capacity().max(4096);
        for attempt in 0..READ_ATTEMPTS {
            self.buf.resize(want, 0);
            let n =
                read_full_at(&self.file, &mut self.buf, 0).map_err(|e| io_err(&self.path, e))?;
            if n < HEADER {
                return Err(self.truncated(HEADER));
            }
            if self.buf[..8] != MAGIC {
                return Err(Error::NotASnapshot {
                    path: self.path.clone(),
                    reason: "bad magic".into(),
                });
            }
            let before = get_u64(&self.buf, OFF_SEQ);
            if before & 1 == 1 {
                if attempt % 64 == 63 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let len = get_u64(&self.buf, OFF_LEN) as usize;
            let capacity = get_u64(&self.buf, OFF_CAPACITY) as usize;
            if size < (HEADER + capacity) as u64 {
                return Err(self.truncated(HEADER + capacity));
            }
            if len > capacity {
                continue; // torn: a retry settles it
            }
            let end = HEADER + len;
            if n < end {
                if n < want {
                    // The file ends before the payload it announces.
                    return Err(self.truncated(HEADER + capacity));
                }
                want = end.next_power_of_two();
                continue;
            }
            // The copy above must complete before `seq` is read again.
            fence(Ordering::Acquire);
            let mut seq = [0u8; 8];
            let got =
                read_full_at(&self.file, &mut seq, OFF_SEQ).map_err(|e| io_err(&self.path, e))?;
            if got < 8 {
                return Err(self.truncated(HEADER + capacity));
            }
            if u64::from_ne_bytes(seq) != before {
                continue;
            }
            let stored = u32::from_ne_bytes(
                self.buf[OFF_CHECKSUM..OFF_CHECKSUM + 4]
                    .try_into()
                    .expect("4 bytes"),
            );
            if checksum(&self.buf[OFF_LEN..OFF_CHECKSUM], &self.buf[HEADER..end]) != stored {
                continue; // a torn copy the sequence numbers did not catch
            }
            let version = get_u64(&self.buf, OFF_VERSION);
            if version == 0 {
                return Ok(None);
            }
            return Ok(Some(Reading {
                version,
                eventtime: f64::from_bits(get_u64(&self.buf, OFF_EVENTTIME)),
                published: UNIX_EPOCH + Duration::from_nanos(get_u64(&self.buf, OFF_PUBLISHED)),
                payload: self.buf[HEADER..end].to_vec(),
            }));
        }
        Err(Error::Contended {
            path: self.path.clone(),
            attempts: READ_ATTEMPTS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::thread;

    /// A payload whose consistency a reader can check: the version, repeated `n` times.
    fn payload(version: u64, n: usize) -> Vec<u8> {
        use std::fmt::Write;
        let mut text = String::new();
        for _ in 0..n {
            let _ = write!(text, "{version:08},");
        }
        text.into_bytes()
    }

    fn check(reading: &Reading) {
        let text = std::str::from_utf8(&reading.payload).expect("utf-8 payload");
        let want = format!("{:08},", reading.version);
        assert!(!text.is_empty());
        assert!(
            text.split_inclusive(',').all(|part| part == want),
            "torn payload for version {}",
            reading.version
        );
        assert_eq!(
            reading.eventtime.to_bits(),
            (reading.version as f64 / 10.0).to_bits()
        );
    }

    #[test]
    fn reader_sees_nothing_then_the_latest_publish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let mut writer = ShmWriter::create(&path).unwrap();
        let mut reader = ShmReader::open(&path).unwrap();
        assert_eq!(reader.read().unwrap(), None);
        writer.publish(1, 0.1, &payload(1, 3)).unwrap();
        writer.publish(2, 0.2, &payload(2, 5)).unwrap();
        let reading = reader.read().unwrap().unwrap();
        assert_eq!(reading.version, 2);
        check(&reading);
        assert!(reading.age() < Duration::from_secs(5));
    }

    #[test]
    fn the_file_is_allocated_up_front_with_a_pinned_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let _writer = ShmWriter::create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), (HEADER + MIN_CAPACITY) as u64);
        // Allocated, not sparse: the blocks are there before the first publish.
        assert!(
            meta.blocks() * 512 >= meta.len(),
            "{} blocks",
            meta.blocks()
        );
        assert_eq!(meta.permissions().mode() & 0o777, FILE_MODE);
    }

    #[test]
    fn a_payload_beyond_capacity_moves_readers_to_a_bigger_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let mut writer = ShmWriter::create(&path).unwrap();
        let mut reader = ShmReader::open(&path).unwrap();
        writer.publish(1, 0.1, &payload(1, 2)).unwrap();
        let big = payload(2, MIN_CAPACITY / 9 + 10);
        assert!(big.len() > MIN_CAPACITY);
        writer.publish(2, 0.2, &big).unwrap();
        assert!(writer.capacity() >= big.len());
        let reading = reader.read().unwrap().unwrap();
        assert_eq!(reading.version, 2);
        assert_eq!(reading.payload.len(), big.len());
        check(&reading);
        // No temp file left beside the mirror.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_new_writer_on_the_same_path_moves_open_readers_to_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let mut old = ShmWriter::create(&path).unwrap();
        old.publish(7, 0.7, &payload(7, 2)).unwrap();
        let mut reader = ShmReader::open(&path).unwrap();
        assert_eq!(reader.read().unwrap().unwrap().version, 7);
        // klippy restarts: a new store writes the same path, starting again at 1.
        let mut new = ShmWriter::create(&path).unwrap();
        assert_eq!(reader.read().unwrap(), None);
        new.publish(1, 0.1, &payload(1, 2)).unwrap();
        assert_eq!(reader.read().unwrap().unwrap().version, 1);
        // The old writer finds its file replaced and stops rather than fight over the path.
        let err = old.publish(8, 0.8, &payload(8, 2)).unwrap_err();
        assert!(matches!(err, Error::Replaced { .. }), "{err}");
        assert_eq!(reader.read().unwrap().unwrap().version, 1);
    }

    #[test]
    fn a_file_truncated_under_a_reader_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let mut writer = ShmWriter::create(&path).unwrap();
        writer.publish(1, 0.1, &payload(1, 50)).unwrap();
        let mut reader = ShmReader::open(&path).unwrap();
        assert_eq!(reader.read().unwrap().unwrap().version, 1);
        for size in [HEADER as u64 + 100, 40, 0] {
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(size)
                .unwrap();
            let err = reader.read().unwrap_err();
            let text = err.to_string();
            if size == 0 {
                assert!(matches!(err, Error::Truncated { size: 0, .. }), "{text}");
            } else {
                assert!(matches!(err, Error::Truncated { .. }), "{text}");
            }
            assert!(text.contains("truncated"), "{text}");
        }
        // A reader opening the truncated file is refused too.
        assert!(ShmReader::open(&path).is_err());
        // The writer notices, sizes the file again and publishes: readers recover.
        writer.publish(2, 0.2, &payload(2, 50)).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (HEADER + MIN_CAPACITY) as u64
        );
        let reading = reader.read().unwrap().unwrap();
        assert_eq!(reading.version, 2);
        check(&reading);
    }

    #[test]
    fn a_removed_file_is_put_back_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let mut writer = ShmWriter::create(&path).unwrap();
        writer.publish(1, 0.1, &payload(1, 2)).unwrap();
        let mut reader = ShmReader::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(reader.read().unwrap_err(), Error::Io { .. }));
        writer.publish(2, 0.2, &payload(2, 2)).unwrap();
        assert_eq!(reader.read().unwrap().unwrap().version, 2);
        assert_eq!(
            ShmReader::open(&path)
                .unwrap()
                .read()
                .unwrap()
                .unwrap()
                .version,
            2
        );
    }

    #[test]
    fn a_planted_temp_name_is_skipped_and_its_target_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let planted = OsString::from(".status.shm.planted.tmp");
        std::os::unix::fs::symlink(&victim, dir.path().join(&planted)).unwrap();
        let taken = OsString::from(".status.shm.taken.tmp");
        std::fs::write(dir.path().join(&taken), b"someone's").unwrap();
        let fresh = OsString::from(".status.shm.fresh.tmp");
        let names = [planted.clone(), taken.clone(), fresh];
        let (file, _) = ShmWriter::make_file(&path, 1024, None, |_| names).unwrap();
        drop(file);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            std::fs::read(dir.path().join(&taken)).unwrap(),
            b"someone's"
        );
        assert!(std::fs::symlink_metadata(dir.path().join(&planted))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(ShmReader::open(&path).unwrap().read().unwrap().is_none());
        // Every name taken: a clear error, nothing followed.
        let names = [planted, taken];
        let err = ShmWriter::make_file(&path, 1024, None, |_| names).unwrap_err();
        assert!(err.to_string().contains("temporary name"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn the_writer_never_follows_a_symlink_at_its_temp_names() {
        // The names the writer really uses: plant symlinks at the old predictable one and
        // check that creating a mirror leaves the target alone.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let old_style = format!(".status.shm.{}.tmp", std::process::id());
        std::os::unix::fs::symlink(&victim, dir.path().join(old_style)).unwrap();
        let mut writer = ShmWriter::create(&path).unwrap();
        writer.publish(1, 0.1, &payload(1, 2)).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn things_that_are_not_a_mirror_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other");
        std::fs::write(&path, vec![7u8; 200]).unwrap();
        let err = ShmReader::open(&path).unwrap_err();
        assert!(matches!(err, Error::NotASnapshot { .. }), "{err}");
        let err = ShmReader::open(dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        let err = ShmReader::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
        let err = ShmReader::open("/dev/zero").unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
        let mut v1 = b"KFSNAP1\0".to_vec();
        v1.resize(HEADER + 100, 0);
        std::fs::write(&path, v1).unwrap();
        let err = ShmReader::open(&path).unwrap_err();
        assert!(err.to_string().contains("format 1"), "{err}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &path,
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .unwrap();
        let err = ShmReader::open(&path).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
    }

    #[test]
    fn a_corrupted_payload_is_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let mut writer = ShmWriter::create(&path).unwrap();
        writer.publish(1, 0.1, &payload(1, 4)).unwrap();
        // Flip a payload byte behind the writer's back: the checksum no longer matches, the
        // reader keeps retrying and then says the writer kept overwriting it.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", (HEADER + 3) as u64).unwrap();
        let err = ShmReader::open(&path).unwrap().read().unwrap_err();
        assert!(matches!(err, Error::Contended { .. }), "{err}");
    }

    /// Reader threads against a writer publishing payloads of varying size (including growth
    /// into a bigger file): no torn payload, versions never go backwards, and a read started
    /// after publish N returns N or later.
    #[test]
    fn readers_in_threads_never_see_torn_or_stale_payloads() {
        const PUBLISHES: u64 = 3_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let mut writer = ShmWriter::create(&path).unwrap();
        writer.publish(1, 0.1, &payload(1, 1)).unwrap();
        let published = Arc::new(AtomicU64::new(1));
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let path = path.clone();
                let published = Arc::clone(&published);
                let done = Arc::clone(&done);
                thread::spawn(move || {
                    let mut reader = ShmReader::open(&path).unwrap();
                    let mut last = 0;
                    let mut reads = 0u64;
                    while !done.load(Ordering::Acquire) {
                        let floor = published.load(Ordering::Acquire);
                        let reading = match reader.read() {
                            Ok(r) => r.unwrap(),
                            Err(Error::Contended { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        };
                        check(&reading);
                        assert!(reading.version >= last, "version went backwards");
                        assert!(reading.version >= floor, "stale beyond the last publish");
                        last = reading.version;
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for v in 2..=PUBLISHES {
            // Sizes cycle up to well beyond the first file's capacity.
            let n = if v == PUBLISHES / 2 {
                MIN_CAPACITY / 9 + 10
            } else {
                1 + (v as usize * 37) % 400
            };
            writer.publish(v, v as f64 / 10.0, &payload(v, n)).unwrap();
            published.store(v, Ordering::Release);
        }
        done.store(true, Ordering::Release);
        for reader in readers {
            assert!(reader.join().unwrap() > 0);
        }
    }

    const CHILD_ENV: &str = "KFLASH_SHM_CHILD_READER";
    const FINAL_VERSION: u64 = 20_000;

    /// The reader side of `readers_in_other_processes_never_see_torn_or_stale_payloads`,
    /// run in a child process (ignored when run on its own).
    #[test]
    #[ignore = "run as a child process by the cross-process test"]
    fn child_reader_process() {
        let path = std::env::var(CHILD_ENV).expect("run by the cross-process test");
        let mut reader = ShmReader::open(&path).unwrap();
        let mut last = 0;
        let mut reads = 0u64;
        println!("ready");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "writer never finished"
            );
            // A writer publishing back to back (far faster than klippy's 0.1 s timer) may
            // keep a reader out for a while on a loaded machine: that is `Contended`, a
            // retry, never a torn or stale payload.
            let reading = match reader.read() {
                Ok(Some(reading)) => reading,
                Err(Error::Contended { .. }) => continue,
                other => panic!("unexpected read result: {other:?}"),
            };
            check(&reading);
            assert!(reading.version >= last, "version went backwards");
            last = reading.version;
            reads += 1;
            if last == FINAL_VERSION {
                break;
            }
        }
        println!("reads {reads}");
    }

    #[test]
    fn readers_in_other_processes_never_see_torn_or_stale_payloads() {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.shm");
        let mut writer = ShmWriter::create(&path).unwrap();
        writer.publish(1, 0.1, &payload(1, 1)).unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut children: Vec<_> = (0..2)
            .map(|_| {
                Command::new(&exe)
                    .args([
                        "--ignored",
                        "--exact",
                        "snapshot::shm::tests::child_reader_process",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(CHILD_ENV, &path)
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut outputs: Vec<_> = children
            .iter_mut()
            .map(|c| BufReader::new(c.stdout.take().unwrap()))
            .collect();
        for out in &mut outputs {
            // Wait until each child reads (its test harness prints other lines first).
            let mut line = String::new();
            while !line.trim_end().ends_with("ready") {
                line.clear();
                assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
            }
        }
        for v in 2..=FINAL_VERSION {
            let n = 1 + (v as usize * 53) % 300;
            writer.publish(v, v as f64 / 10.0, &payload(v, n)).unwrap();
        }
        for (child, mut out) in children.iter_mut().zip(outputs) {
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
            assert!(
                child.wait().unwrap().success(),
                "child reader failed:\n{rest}"
            );
            assert!(rest.contains("reads "), "{rest}");
        }
    }
}
