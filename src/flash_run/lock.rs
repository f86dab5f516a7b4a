//! The run lock: one kflash run at a time per state dir.
//!
//! `flock(LOCK_EX)` on `<state>/lock`, held by an open file for the whole run and
//! released by the kernel when the process dies (so a SIGKILLed runner never leaves a stale
//! lock, and the watchdog, blocked on the same lock, wakes the moment the runner is gone).
//! The holder's pid is written into the file so a refusal can name it. The file is opened
//! close-on-exec: children (make, flashtool, the watchdog) never inherit it.
//!
//! Thread-safety: a `RunLock` is an owned handle; dropping it releases the lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another kflash run is in progress (lock {path} held{})", holder.map(|p| format!(" by pid {p}")).unwrap_or_default())]
    Held { path: PathBuf, holder: Option<u32> },
    #[error("cannot open the lock file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held run lock; released on drop.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

fn open(path: &Path) -> Result<File, LockError> {
    let io = |source| LockError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io)
}

impl RunLock {
    /// Take the lock at `path` without waiting.
    pub fn acquire(path: &Path) -> Result<RunLock, LockError> {
        let mut file = open(path)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    path: path.to_owned(),
                    holder: text.trim().parse().ok(),
                });
            }
            Err(err) => {
                return Err(LockError::Io {
                    path: path.to_owned(),
                    source: err.into(),
                })
            }
        }
        // Best effort: the pid is only for messages.
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = writeln!(file, "{}", std::process::id());
        Ok(RunLock { _file: file })
    }

    /// Wait until the lock is free, then take it (the watchdog: it wakes when the run's
    /// process ends, however it ends). The holder's pid in the file is left alone.
    pub fn wait(path: &Path) -> Result<RunLock, LockError> {
        let file = open(path)?;
        loop {
            match flock(&file, FlockOperation::LockExclusive) {
                Ok(()) => return Ok(RunLock { _file: file }),
                Err(Errno::INTR) => {}
                Err(err) => {
                    return Err(LockError::Io {
                        path: path.to_owned(),
                        source: err.into(),
                    })
                }
            }
        }
    }

    /// Whether a run holds the lock now (taken and released at once when free).
    pub fn is_held(path: &Path) -> Option<LockError> {
        if !path.exists() {
            return None;
        }
        match RunLock::acquire(path) {
            Ok(_released) => None,
            Err(held @ LockError::Held { .. }) => Some(held),
            Err(LockError::Io { .. }) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        assert!(RunLock::is_held(&path).is_none());
        let first = RunLock::acquire(&path).unwrap();
        let err = RunLock::acquire(&path).unwrap_err();
        assert!(
            matches!(err, LockError::Held { holder: Some(pid), .. } if pid == std::process::id()),
            "{err}"
        );
        assert!(err.to_string().contains("another kflash run"));
        assert!(RunLock::is_held(&path).is_some());
        drop(first);
        assert!(RunLock::is_held(&path).is_none());
        RunLock::acquire(&path).unwrap();
    }

    #[test]
    fn wait_returns_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = RunLock::acquire(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                let got = RunLock::wait(&path).unwrap();
                tx.send(()).unwrap();
                got
            })
        };
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        drop(waiter.join().unwrap());
    }
}
