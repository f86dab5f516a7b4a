//! The run lock: one kflash run at a time per state dir.
//!
//! `flock(LOCK_EX | LOCK_NB)` on `<state>/lock`, held by an open file for the whole run and
//! released by the kernel when the process dies (so a SIGKILLed runner never leaves a stale
//! lock). The holder's pid is written into the file so a refusal can name it. The file is
//! opened close-on-exec: children (make, flashtool, the watchdog) never inherit it.
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

impl RunLock {
    /// Take the lock at `path` without waiting.
    pub fn acquire(path: &Path) -> Result<RunLock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
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
            Err(err) => return Err(io(err.into())),
        }
        // Best effort: the pid is only for messages.
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = writeln!(file, "{}", std::process::id());
        Ok(RunLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = RunLock::acquire(&path).unwrap();
        let err = RunLock::acquire(&path).unwrap_err();
        assert!(
            matches!(err, LockError::Held { holder: Some(pid), .. } if pid == std::process::id()),
            "{err}"
        );
        assert!(err.to_string().contains("another kflash run"));
        drop(first);
        RunLock::acquire(&path).unwrap();
    }
}
