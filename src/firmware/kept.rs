//! Images kept outside the build cache, one directory per use and device:
//! `pending/<key>/` (what a stop window is writing to that board, kept for a recovery
//! after a crash) and `good/<key>/` (last-known-good: the image last flashed to THAT board
//! and verified there). A later build never changes them: the build cache's
//! `firmware/previous/` is only the last different successful build, which may never
//! have been on the board.
//!
//! A kept directory holds the image, its `klipper.dict` (when the build had one) and
//! `kept.json` (`"version": 1`, image file name, firmware version, MCU, sha256, when).
//!
//! Invariant: a directory is replaced as a whole — written under `<dir>.new`, synced,
//! then renamed over — so a reader sees the old or the new image, never a mix; a
//! directory whose image does not match its sha256 is treated as absent.
//!
//! Thread-safety: one writer per directory (the run lock); readers may run any time.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::registry::write_atomic;

const SCHEMA: u32 = 1;
const META: &str = "kept.json";

/// What `kept.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    version: u32,
    image: String,
    firmware_version: String,
    mcu: String,
    sha256: String,
    recorded: String,
}

/// A kept image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptImage {
    /// The image file (klipper.bin / .uf2 / .elf.hex, or klipper.elf for linux).
    pub image: PathBuf,
    /// What the MCU reports once it runs this image (`klipper.dict`'s version, else `?`).
    pub version: String,
    /// The dictionary's `config.MCU` (empty when unknown).
    pub mcu: String,
    /// When it was kept (UTC).
    pub recorded: String,
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

fn dict_fields(dict: &[u8]) -> (String, String) {
    let value: serde_json::Value = serde_json::from_slice(dict).unwrap_or_default();
    let text = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    (
        text(value.get("version")),
        text(value.get("config").and_then(|c| c.get("MCU"))),
    )
}

/// Keep `image` (and the `klipper.dict` next to it) in `dir`, replacing what was there.
pub fn keep(image: &Path, dir: &Path, recorded: &str) -> io::Result<KeptImage> {
    let name = image
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} is not a file", image.display())))?
        .to_owned();
    let bytes = fs::read(image)?;
    let dict = fs::read(image.with_file_name("klipper.dict")).ok();
    let (version, mcu) = dict.as_deref().map(dict_fields).unwrap_or_default();
    let version = if version.is_empty() {
        "?".to_owned()
    } else {
        version
    };
    let parent = dir
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no parent", dir.display())))?;
    fs::create_dir_all(parent)?;
    let new = with_suffix(dir, ".new");
    let old = with_suffix(dir, ".old");
    for stale in [&new, &old] {
        if stale.exists() {
            fs::remove_dir_all(stale)?;
        }
    }
    fs::create_dir_all(&new)?;
    write_atomic(&new.join(&name), &bytes)?;
    if let Some(dict) = &dict {
        write_atomic(&new.join("klipper.dict"), dict)?;
    }
    let meta = Meta {
        version: SCHEMA,
        image: name.to_string_lossy().into_owned(),
        firmware_version: version.clone(),
        mcu: mcu.clone(),
        sha256: sha256(&bytes),
        recorded: recorded.to_owned(),
    };
    let mut text = serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?;
    text.push(b'\n');
    write_atomic(&new.join(META), &text)?;
    if dir.exists() {
        fs::rename(dir, &old)?;
    }
    fs::rename(&new, dir)?;
    sync_dir(parent)?;
    if old.exists() {
        fs::remove_dir_all(&old)?;
    }
    Ok(KeptImage {
        image: dir.join(name),
        version,
        mcu,
        recorded: recorded.to_owned(),
    })
}

/// The image kept in `dir`, if there is a whole one.
pub fn kept(dir: &Path) -> Option<KeptImage> {
    let meta: Meta = serde_json::from_slice(&fs::read(dir.join(META)).ok()?).ok()?;
    if meta.version != SCHEMA || meta.image.contains('/') {
        return None;
    }
    let image = dir.join(&meta.image);
    let bytes = fs::read(&image).ok()?;
    (sha256(&bytes) == meta.sha256).then_some(KeptImage {
        image,
        version: meta.firmware_version,
        mcu: meta.mcu,
        recorded: meta.recorded,
    })
}

/// Forget what `dir` keeps.
pub fn forget(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn with_suffix(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_an_image_with_its_dictionary_and_replaces_it_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let build = tmp.path().join("build");
        fs::create_dir_all(&build).unwrap();
        let dict = r#"{"version": "v1", "config": {"MCU": "rp2040"}}"#;
        fs::write(build.join("klipper.bin"), b"image one").unwrap();
        fs::write(build.join("klipper.dict"), dict).unwrap();
        let dir = tmp.path().join("good/toolhead");
        let one = keep(&build.join("klipper.bin"), &dir, "2026-01-01T00:00:00Z").unwrap();
        assert_eq!((one.version.as_str(), one.mcu.as_str()), ("v1", "rp2040"));
        assert_eq!(kept(&dir), Some(one));
        // A later build changes nothing kept.
        fs::write(build.join("klipper.bin"), b"image two").unwrap();
        assert_eq!(fs::read(dir.join("klipper.bin")).unwrap(), b"image one");
        // Replaced as a whole.
        fs::write(build.join("klipper.dict"), dict.replace("v1", "v2")).unwrap();
        let two = keep(&build.join("klipper.bin"), &dir, "2026-01-02T00:00:00Z").unwrap();
        assert_eq!(two.version, "v2");
        assert_eq!(fs::read(&two.image).unwrap(), b"image two");
        // A damaged image is not offered.
        fs::write(&two.image, b"bit rot").unwrap();
        assert_eq!(kept(&dir), None);
        forget(&dir).unwrap();
        forget(&dir).unwrap();
        assert!(!dir.exists());
    }
}
