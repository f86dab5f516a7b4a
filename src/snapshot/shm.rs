//! The shared-memory mirror of a snapshot: one writer process, any number of reader processes.
//!
//! Owns the file layout and the seqlock protocol. The file (best kept on a tmpfs such as
//! `/dev/shm`) is mapped `MAP_SHARED` by the writer and every reader:
//!
//! ```text
//! offset  size  field
//!      0     8  magic  b"KFSNAP1\0"
//!      8     4  seq    u32: even = stable, odd = a write is in progress
//!     12     4  retired u32: 1 once the writer replaced this file by a bigger one
//!     16     8  len        payload length in bytes
//!     24     8  version    snapshot version (0: nothing published yet)
//!     32     8  eventtime  f64 bits
//!     40     8  published  wall-clock time of the publish, ns since the Unix epoch
//!     48     8  capacity   payload bytes available after the header (fixed per file)
//!     56     8  reserved
//!     64   cap  payload    the snapshot as JSON bytes
//! ```
//! Native byte order (the mirror never leaves the machine).
//!
//! Invariants: the writer makes `seq` odd, writes the fields and the payload, then makes it
//! even again (release); a reader copies everything between two reads of `seq` and keeps the
//! copy only when both reads are equal and even, so it never returns a torn payload. A payload
//! larger than the capacity makes the writer build a bigger file beside the old one, rename it
//! over the path (readers opening the path never see a half-made file) and mark the old one
//! `retired`, which makes its readers reopen the path. A new writer on the same path (klippy
//! restarted) retires the previous file the same way. The mirror is a live view, not a
//! record: it is not fsynced.
//!
//! Thread-safety: a [`ShmWriter`] needs `&mut` to publish (one writer per file); a
//! [`ShmReader`] is `Send` and reads through `&self` without ever blocking the writer.

use super::Error;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: [u8; 8] = *b"KFSNAP1\0";
const HEADER: usize = 64;
const OFF_SEQ: usize = 8;
const OFF_RETIRED: usize = 12;
const OFF_LEN: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_EVENTTIME: usize = 32;
const OFF_PUBLISHED: usize = 40;
const OFF_CAPACITY: usize = 48;
/// Smallest payload area a new file gets.
pub const MIN_CAPACITY: usize = 64 * 1024;
/// How many times a reader retries a read the writer overlapped before giving up.
const READ_ATTEMPTS: u32 = 100_000;

fn io_err(path: &Path, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A `MAP_SHARED` mapping of a whole file; unmapped on drop.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all concurrent access to it goes through the
// seqlock protocol (atomics for `seq`/`retired`, torn-tolerant copies for the rest).
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out raw pointers, used under the protocol.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: usize, writable: bool, path: &Path) -> Result<Self, Error> {
        use std::os::fd::AsRawFd;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: mapping a file descriptor we own for its current length; the result is
        // checked before use.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io_err(path, io::Error::last_os_error()));
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or_else(|| Error::NotASnapshot {
            path: path.to_path_buf(),
            reason: "mapped at address 0".into(),
        })?;
        Ok(Mapping { base, len })
    }

    fn at(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset < self.len);
        // SAFETY: every offset used is inside the mapping (header offsets < HEADER <= len,
        // payload offsets checked against the capacity, which fits the mapping).
        unsafe { self.base.as_ptr().add(offset) }
    }

    fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: offsets 8 and 12 are 4-byte aligned in a page-aligned mapping, inside it,
        // and only ever accessed atomically by every process.
        #[allow(clippy::cast_ptr_alignment)]
        unsafe {
            &*self.at(offset).cast::<AtomicU32>()
        }
    }

    fn read_u64(&self, offset: usize) -> u64 {
        // SAFETY: in bounds and 8-aligned; a torn value is discarded by the seqlock check.
        #[allow(clippy::cast_ptr_alignment)]
        unsafe {
            ptr::read_volatile(self.at(offset).cast::<u64>())
        }
    }

    fn write_u64(&self, offset: usize, value: u64) {
        // SAFETY: in bounds and 8-aligned; only the single writer writes, inside the seqlock.
        #[allow(clippy::cast_ptr_alignment)]
        unsafe {
            ptr::write_volatile(self.at(offset).cast::<u64>(), value);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no reference into it outlives self.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Publishes snapshots into a shared-memory file.
pub struct ShmWriter {
    path: PathBuf,
    map: Mapping,
    capacity: usize,
    seq: u32,
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
    /// Creates (or replaces) the mirror file at `path`, empty (version 0). A mirror already
    /// there (a previous klippy run) is marked retired, so its readers move to the new file.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let previous = Self::open_previous(&path);
        let (map, capacity) = Self::make_file(&path, MIN_CAPACITY)?;
        if let Some(previous) = previous {
            previous.atomic_u32(OFF_RETIRED).store(1, Ordering::Release);
        }
        Ok(ShmWriter {
            path,
            map,
            capacity,
            seq: 0,
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

    /// A writable mapping of the mirror at `path`, if one is there.
    fn open_previous(path: &Path) -> Option<Mapping> {
        let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
        let len = file.metadata().ok()?.len() as usize;
        if len < HEADER {
            return None;
        }
        let map = Mapping::new(&file, len, true, path).ok()?;
        let mut magic = [0u8; 8];
        // SAFETY: 8 bytes at offset 0 of a mapping of at least HEADER bytes.
        unsafe { ptr::copy_nonoverlapping(map.at(0), magic.as_mut_ptr(), 8) };
        (magic == MAGIC).then_some(map)
    }

    /// Builds a complete file beside `path` and renames it over `path`.
    fn make_file(path: &Path, capacity: usize) -> Result<(Mapping, usize), Error> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let name = path.file_name().ok_or_else(|| Error::NotASnapshot {
            path: path.to_path_buf(),
            reason: "no file name".into(),
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = dir.map_or_else(|| PathBuf::from(&tmp_name), |d| d.join(&tmp_name));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        let len = HEADER + capacity;
        let made = file
            .set_len(len as u64)
            .map_err(|e| io_err(&tmp, e))
            .and_then(|()| Mapping::new(&file, len, true, &tmp))
            .and_then(|map| {
                // SAFETY: fresh private file, nobody else maps it yet; 8 bytes in bounds.
                unsafe { ptr::copy_nonoverlapping(MAGIC.as_ptr(), map.at(0), MAGIC.len()) };
                map.write_u64(OFF_CAPACITY, capacity as u64);
                std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
                Ok(map)
            });
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        Ok((made?, capacity))
    }

    /// Publishes one snapshot: `payload` (JSON bytes) with its version and eventtime.
    pub fn publish(&mut self, version: u64, eventtime: f64, payload: &[u8]) -> Result<(), Error> {
        if payload.len() > self.capacity {
            let capacity = payload.len().next_power_of_two().max(MIN_CAPACITY) * 2;
            let (map, capacity) = Self::make_file(&self.path, capacity)?;
            let old = std::mem::replace(&mut self.map, map);
            self.capacity = capacity;
            self.seq = 0;
            old.atomic_u32(OFF_RETIRED).store(1, Ordering::Release);
        }
        let seq = self.map.atomic_u32(OFF_SEQ);
        self.seq = self.seq.wrapping_add(1) | 1;
        seq.store(self.seq, Ordering::Relaxed);
        // Readers that see the data below must also see the odd sequence number.
        fence(Ordering::Release);
        self.map.write_u64(OFF_LEN, payload.len() as u64);
        self.map.write_u64(OFF_VERSION, version);
        self.map.write_u64(OFF_EVENTTIME, eventtime.to_bits());
        self.map.write_u64(OFF_PUBLISHED, now_unix_ns());
        // SAFETY: payload.len() <= capacity, so HEADER..HEADER+len is inside the mapping.
        unsafe {
            ptr::copy_nonoverlapping(payload.as_ptr(), self.map.at(HEADER), payload.len());
        }
        self.seq = self.seq.wrapping_add(1);
        seq.store(self.seq, Ordering::Release);
        Ok(())
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
    map: Mapping,
    capacity: usize,
}

impl std::fmt::Debug for ShmReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ShmReader {
    /// Opens and maps the mirror at `path` (read-only).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let (map, capacity) = Self::map_file(&path)?;
        Ok(ShmReader {
            path,
            map,
            capacity,
        })
    }

    fn map_file(path: &Path) -> Result<(Mapping, usize), Error> {
        let not = |reason: String| Error::NotASnapshot {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        let len = file.metadata().map_err(|e| io_err(path, e))?.len() as usize;
        if len < HEADER {
            return Err(not(format!("{len} bytes, shorter than the header")));
        }
        let map = Mapping::new(&file, len, false, path)?;
        let mut magic = [0u8; 8];
        // SAFETY: 8 bytes at offset 0 of a mapping of at least HEADER bytes.
        unsafe { ptr::copy_nonoverlapping(map.at(0), magic.as_mut_ptr(), 8) };
        if magic != MAGIC {
            return Err(not("bad magic".into()));
        }
        let capacity = map.read_u64(OFF_CAPACITY) as usize;
        if HEADER.checked_add(capacity) != Some(len) {
            return Err(not(format!(
                "capacity {capacity} does not match the file size {len}"
            )));
        }
        Ok((map, capacity))
    }

    /// The file this reader maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The latest snapshot, or `None` if nothing was published yet. Never blocks the writer;
    /// retries while a write overlaps the copy, and follows the writer to a bigger file.
    pub fn read(&mut self) -> Result<Option<Reading>, Error> {
        let mut payload = Vec::new();
        for attempt in 0..READ_ATTEMPTS {
            if self.map.atomic_u32(OFF_RETIRED).load(Ordering::Acquire) != 0 {
                let (map, capacity) = Self::map_file(&self.path)?;
                if map.atomic_u32(OFF_RETIRED).load(Ordering::Acquire) != 0 {
                    return Err(Error::NotASnapshot {
                        path: self.path.clone(),
                        reason: "retired by its writer and not replaced".into(),
                    });
                }
                self.map = map;
                self.capacity = capacity;
                continue;
            }
            let seq = self.map.atomic_u32(OFF_SEQ);
            let before = seq.load(Ordering::Acquire);
            if before & 1 == 1 {
                if attempt % 64 == 63 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let len = self.map.read_u64(OFF_LEN) as usize;
            let version = self.map.read_u64(OFF_VERSION);
            let eventtime = f64::from_bits(self.map.read_u64(OFF_EVENTTIME));
            let published = self.map.read_u64(OFF_PUBLISHED);
            if len > self.capacity {
                continue; // torn: the sequence check below would fail too
            }
            payload.clear();
            payload.reserve(len);
            // SAFETY: len <= capacity keeps the source inside the mapping; the destination
            // has `len` reserved bytes. The bytes may be overwritten concurrently; such a copy
            // is discarded by the sequence check.
            unsafe {
                ptr::copy_nonoverlapping(self.map.at(HEADER), payload.as_mut_ptr(), len);
                payload.set_len(len);
            }
            // The copy above must complete before `seq` is read again.
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) != before {
                continue;
            }
            if version == 0 {
                return Ok(None);
            }
            return Ok(Some(Reading {
                version,
                eventtime,
                published: UNIX_EPOCH + Duration::from_nanos(published),
                payload,
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
        drop(old);
    }

    #[test]
    fn a_file_that_is_not_a_mirror_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other");
        std::fs::write(&path, vec![7u8; 200]).unwrap();
        let err = ShmReader::open(&path).unwrap_err();
        assert!(matches!(err, Error::NotASnapshot { .. }), "{err}");
        let err = ShmReader::open(dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
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
        let published = Arc::new(std::sync::atomic::AtomicU64::new(1));
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
                        let reading = reader.read().unwrap().unwrap();
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
