//! The lock-free status snapshot store.
//!
//! Owns [`Store<T>`]: the latest immutable [`Snapshot<T>`] of some status payload, published
//! by one side (klippy's reactor timer) and read by any number of others. A publish builds a
//! new `Arc<Snapshot<T>>` and swaps it in (arc-swap); a published snapshot is never mutated,
//! so a reader holding one sees a consistent payload for as long as it keeps it.
//!
//! Invariants:
//! - `version` starts at 1 and increases by exactly one per publish; a reader never sees it go
//!   backwards (publishers are serialised by a mutex that readers never touch).
//! - A snapshot is *current* while no [`Store::invalidate`] happened after the state it was
//!   taken from; invalidations are counted, so one racing a publish is never lost.
//!
//! Thread-safety: `Store<T>` is `Send + Sync` when `T` is. Readers never block and never take
//! a lock: [`Store::latest`] and [`Store::peek`] are a few atomic operations. Publishers wait
//! only for each other.
//!
//! [`shm`] mirrors the latest snapshot into a shared-memory file (seqlock, read and written
//! with `pread`/`pwrite`, checksummed) for other processes.

pub mod shm;

use arc_swap::ArcSwapOption;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Errors of the snapshot domain (the shared-memory mirror; the in-process store cannot fail).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating, opening, sizing or mapping the shared-memory file failed.
    #[error("status snapshot file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a kflash snapshot mirror (wrong magic, size or layout).
    #[error("{path} is not a kflash status snapshot file ({reason})")]
    NotASnapshot { path: PathBuf, reason: String },
    /// A reader kept losing the race against the writer (the writer publishes faster than a
    /// copy of the payload takes, for the whole retry budget; or a writer stopped halfway
    /// through a publish, or the file was altered behind its back).
    #[error(
        "status snapshot file {path}: no consistent copy after {attempts} tries (a writer \
         overwriting it faster than it can be read, or stopped halfway through a publish)"
    )]
    Contended { path: PathBuf, attempts: u32 },
    /// The file is shorter than its header says (truncated by someone else). Readers report
    /// it; the writer sizes the file again on its next publish.
    #[error("status snapshot file {path} was truncated: {size} bytes, expected {expected}")]
    Truncated {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    /// The path now names a file this writer did not make (another process writes the same
    /// mirror path): the writer stops rather than fight over it.
    #[error(
        "status snapshot file {path} was replaced by another process; this writer stopped \
         writing it (is a second klippy using the same shm_path?)"
    )]
    Replaced { path: PathBuf },
}

/// One published state: immutable once published.
#[derive(Debug)]
pub struct Snapshot<T> {
    /// 1 for the first publish, +1 for each one after.
    pub version: u64,
    /// The publisher's clock for the state (klippy: the reactor's `eventtime`).
    pub eventtime: f64,
    /// When it was published (monotonic, this process).
    pub published_at: Instant,
    /// The invalidation count the state was taken at (see [`Store::is_current`]).
    pub generation: u64,
    /// The status itself.
    pub payload: T,
}

impl<T> Snapshot<T> {
    /// Time since this snapshot was published.
    pub fn age(&self) -> Duration {
        self.published_at.elapsed()
    }
}

/// The latest snapshot of a status, swapped atomically on publish.
#[derive(Debug)]
pub struct Store<T> {
    current: ArcSwapOption<Snapshot<T>>,
    /// Number of invalidations so far.
    generation: AtomicU64,
    /// Serialises publishers (assigns versions in order); holds the last version assigned.
    publishers: Mutex<u64>,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Store<T> {
    /// An empty store: nothing published yet (`version() == 0`).
    pub fn new() -> Self {
        Store {
            current: ArcSwapOption::const_empty(),
            generation: AtomicU64::new(0),
            publishers: Mutex::new(0),
        }
    }

    /// The invalidation count now: pass it to [`Store::publish_as_of`] *before* computing the
    /// state to publish, so an invalidation while computing is not lost.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Publishes `payload` taken at `eventtime`, as of the current generation.
    pub fn publish(&self, payload: T, eventtime: f64) -> Arc<Snapshot<T>> {
        let generation = self.generation();
        self.publish_as_of(payload, eventtime, generation)
    }

    /// Publishes `payload`, a state computed after the store's generation was `generation`.
    pub fn publish_as_of(&self, payload: T, eventtime: f64, generation: u64) -> Arc<Snapshot<T>> {
        // A poisoned lock only means another publisher panicked between two integer
        // updates; the counter is still a valid last version.
        let mut last = self
            .publishers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *last += 1;
        let snapshot = Arc::new(Snapshot {
            version: *last,
            eventtime,
            published_at: Instant::now(),
            generation,
            payload,
        });
        self.current.store(Some(Arc::clone(&snapshot)));
        snapshot
    }

    /// Marks the published state as outdated (the source changed): readers that care check
    /// [`Store::is_current`] and refresh.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether no invalidation happened since the state of `snapshot` was taken.
    pub fn is_current(&self, snapshot: &Snapshot<T>) -> bool {
        snapshot.generation == self.generation.load(Ordering::Acquire)
    }

    /// The latest snapshot (an `Arc` the caller may keep), or `None` before the first publish.
    pub fn latest(&self) -> Option<Arc<Snapshot<T>>> {
        self.current.load_full()
    }

    /// Runs `f` on the latest snapshot without touching its reference count (the cheapest
    /// read; keep `f` short).
    pub fn peek<R>(&self, f: impl FnOnce(Option<&Snapshot<T>>) -> R) -> R {
        let guard = self.current.load();
        f(guard.as_deref())
    }

    /// Version of the latest snapshot; 0 before the first publish.
    pub fn version(&self) -> u64 {
        self.peek(|s| s.map_or(0, |s| s.version))
    }

    /// Time since the latest publish, `None` before the first.
    pub fn age(&self) -> Option<Duration> {
        self.peek(|s| s.map(Snapshot::age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::thread;

    #[test]
    fn empty_store_has_version_zero_and_no_age() {
        let store: Store<u32> = Store::new();
        assert_eq!(store.version(), 0);
        assert!(store.latest().is_none());
        assert!(store.age().is_none());
    }

    #[test]
    fn publish_swaps_in_a_new_snapshot_and_keeps_old_ones_intact() {
        let store = Store::new();
        let first = store.publish(vec![1, 2, 3], 10.0);
        let second = store.publish(vec![4], 10.1);
        assert_eq!((first.version, second.version), (1, 2));
        assert_eq!(first.payload, vec![1, 2, 3], "old snapshot unchanged");
        let latest = store.latest().unwrap();
        assert_eq!(latest.payload, vec![4]);
        assert_eq!(latest.eventtime.to_bits(), 10.1f64.to_bits());
        assert_eq!(store.version(), 2);
        assert!(store.age().unwrap() < Duration::from_secs(5));
    }

    #[test]
    fn invalidation_makes_the_snapshot_outdated_until_the_next_publish() {
        let store = Store::new();
        let snap = store.publish("a", 1.0);
        assert!(store.is_current(&snap));
        store.invalidate();
        assert!(!store.is_current(&snap));
        let snap = store.publish("b", 2.0);
        assert!(store.is_current(&snap));
    }

    #[test]
    fn invalidation_while_computing_is_not_lost() {
        let store = Store::new();
        let generation = store.generation();
        store.invalidate(); // the source changed while the publisher computed its state
        let snap = store.publish_as_of("computed before the change", 1.0, generation);
        assert!(!store.is_current(&snap));
    }

    /// Many readers while a writer publishes: every payload a reader sees is internally
    /// consistent (all elements equal its version), versions never go backwards, and a reader
    /// never lags the writer by more than what was published while it looked.
    #[test]
    fn readers_never_see_torn_or_backward_snapshots_under_load() {
        const PUBLISHES: u64 = 20_000;
        let store: Arc<Store<Vec<u64>>> = Arc::new(Store::new());
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let store = Arc::clone(&store);
                let done = Arc::clone(&done);
                thread::spawn(move || {
                    let mut last = 0;
                    let mut reads = 0u64;
                    while !done.load(Ordering::Acquire) || reads == 0 {
                        let published_before = store.version();
                        store.peek(|snap| {
                            if let Some(snap) = snap {
                                assert!(snap.payload.iter().all(|&v| v == snap.version));
                                assert!(snap.version >= last, "version went backwards");
                                assert!(snap.version >= published_before, "stale read");
                                last = snap.version;
                            }
                        });
                        reads += 1;
                    }
                    (reads, last)
                })
            })
            .collect();
        for v in 1..=PUBLISHES {
            store.publish(vec![v; 16], v as f64);
        }
        done.store(true, Ordering::Release);
        for reader in readers {
            let (reads, last) = reader.join().unwrap();
            assert!(reads > 0);
            assert!(last <= PUBLISHES);
        }
        assert_eq!(store.version(), PUBLISHES);
    }

    #[test]
    fn concurrent_publishers_assign_distinct_increasing_versions() {
        let store: Arc<Store<u64>> = Arc::new(Store::new());
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let store = Arc::clone(&store);
                thread::spawn(move || {
                    let mut mine = Vec::new();
                    for _ in 0..1000 {
                        mine.push(store.publish(0, 0.0).version);
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<u64> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4000);
        assert_eq!(store.version(), 4000);
    }
}
