//! Where kflash keeps its state, and how files that matter are written.
//!
//! `StateDir` resolves the state directory once (`$KFLASH_HOME`, else
//! `~/printer_data/kflash` when `~/printer_data` exists, else `$XDG_CONFIG_HOME/kflash`,
//! default `~/.config/kflash`) and names every file in it. It never creates anything by
//! itself; writers create what they need.
//!
//! `write_atomic` is the one way to write a file that matters: readers see either the old
//! or the new content, never a torn file, even on power loss or a full disk.
//!
//! Thread-safety: `StateDir` is an immutable value; `write_atomic` uses a unique temp name
//! per call, so concurrent writers of different files never collide.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The kflash state directory and the names of the files in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Resolve the state directory from the process environment.
    ///
    /// Returns `None` only when neither `KFLASH_HOME` nor `HOME` is set.
    pub fn resolve() -> Option<StateDir> {
        Self::resolve_with(|name| std::env::var_os(name))
    }

    /// `resolve()`, or `Error::NoStateDir` when it cannot be resolved.
    pub fn from_env() -> Result<StateDir, super::Error> {
        Self::resolve().ok_or(super::Error::NoStateDir)
    }

    /// Resolve with an explicit environment lookup (for tests and embedding).
    pub fn resolve_with(env: impl Fn(&str) -> Option<OsString>) -> Option<StateDir> {
        let set = |name: &str| env(name).filter(|v| !v.is_empty());
        if let Some(home) = set("KFLASH_HOME") {
            return Some(StateDir::at(home));
        }
        let home = set("HOME").map(PathBuf::from);
        if let Some(home) = &home {
            let printer_data = home.join("printer_data");
            if printer_data.is_dir() {
                return Some(StateDir::at(printer_data.join("kflash")));
            }
        }
        let config = set("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(".config")))?;
        Some(StateDir::at(config.join("kflash")))
    }

    /// A state directory at an explicit path (tests, `--home`).
    pub fn at(path: impl Into<PathBuf>) -> StateDir {
        StateDir { root: path.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `devices.json`: the registry (settings and devices).
    pub fn devices_json(&self) -> PathBuf {
        self.root.join("devices.json")
    }

    /// `configs/`: one Kconfig `.config` per device.
    pub fn configs_dir(&self) -> PathBuf {
        self.root.join("configs")
    }

    /// `configs/<key>.config`. The key must have passed `validate_key`.
    pub fn config_path(&self, key: &str) -> PathBuf {
        self.configs_dir().join(format!("{key}.config"))
    }

    /// `builds/`: per-device build output and firmware artefacts.
    pub fn builds_dir(&self) -> PathBuf {
        self.root.join("builds")
    }

    /// `runs/`: one record per flash-all run.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// `lock`: held by the one run allowed at a time.
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// `flashed/`: the dictionary of the firmware last flashed to each device
    /// (`<key>.dict`).
    pub fn flashed_dir(&self) -> PathBuf {
        self.root.join("flashed")
    }

    /// `pending.json`: the boards a stop window is writing (removed when it ends with
    /// every board back), for a recovery after a crash.
    pub fn pending_json(&self) -> PathBuf {
        self.root.join("pending.json")
    }

    /// `pending/<key>/`: the image a stop window is writing to that board.
    pub fn pending_image_dir(&self, key: &str) -> PathBuf {
        self.root.join("pending").join(key)
    }

    /// `identities.json`: each serial board's stable identity (by-path, USB serial, USB
    /// port), learnt while it ran Klipper, to find it again in a bootloader.
    pub fn identities_json(&self) -> PathBuf {
        self.root.join("identities.json")
    }

    /// `good/<key>/`: the last-known-good image of a board (last flashed AND verified).
    pub fn good_dir(&self, key: &str) -> PathBuf {
        self.root.join("good").join(key)
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Write `bytes` to `path` atomically: a temp file in the same directory, `sync_all`,
/// rename over `path`, then fsync the directory. On any error the temp file is removed and
/// the previous content of `path` is left untouched. The parent directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// `write_atomic` with the content produced by `fill` (also the test seam for failures).
pub(crate) fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = dir.join(temp_name);
    let result = (|| {
        let mut temp_file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        fill(&mut temp_file)?;
        temp_file.sync_all()?;
        drop(temp_file);
        fs::rename(&temp, path)
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&temp);
        return Err(err);
    }
    // The rename is done; make it durable. A failure here cannot be undone, report it.
    File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &Path)]) -> impl Fn(&str) -> Option<OsString> {
        let owned: Vec<(String, OsString)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.as_os_str().to_owned()))
            .collect();
        move |name| {
            owned
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn kflash_home_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        fs::create_dir_all(home.join("printer_data")).unwrap();
        let custom = tmp.path().join("custom");
        let dir =
            StateDir::resolve_with(env_of(&[("KFLASH_HOME", &custom), ("HOME", &home)])).unwrap();
        assert_eq!(dir.root(), custom);
    }

    #[test]
    fn printer_data_is_used_when_it_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().to_path_buf();
        let xdg = tmp.path().join("xdg");
        let env = env_of(&[("HOME", &home), ("XDG_CONFIG_HOME", &xdg)]);
        let dir = StateDir::resolve_with(&env).unwrap();
        assert_eq!(dir.root(), xdg.join("kflash"));
        fs::create_dir(home.join("printer_data")).unwrap();
        let dir = StateDir::resolve_with(&env).unwrap();
        assert_eq!(dir.root(), home.join("printer_data/kflash"));
    }

    #[test]
    fn xdg_defaults_to_dot_config() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::resolve_with(env_of(&[("HOME", tmp.path())])).unwrap();
        assert_eq!(dir.root(), tmp.path().join(".config/kflash"));
        assert!(StateDir::resolve_with(|_| None).is_none());
    }

    #[test]
    fn paths_live_under_the_root() {
        let dir = StateDir::at("/s");
        assert_eq!(dir.devices_json(), Path::new("/s/devices.json"));
        assert_eq!(
            dir.config_path("EBB36"),
            Path::new("/s/configs/EBB36.config")
        );
        assert_eq!(dir.builds_dir(), Path::new("/s/builds"));
        assert_eq!(dir.runs_dir(), Path::new("/s/runs"));
        assert_eq!(dir.lock_path(), Path::new("/s/lock"));
    }

    #[test]
    fn write_atomic_replaces_content() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1, "no temp left");
    }

    #[test]
    fn disk_full_mid_write_keeps_the_old_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f.json");
        write_atomic(&path, b"old content").unwrap();
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"half")?;
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        })
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(fs::read(&path).unwrap(), b"old content");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1, "temp removed");
    }

    #[test]
    fn missing_directory_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = write_atomic(&tmp.path().join("nope/f.json"), b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
