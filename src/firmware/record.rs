//! `build.json`: what a device's `out/` was last built from, and the cache keys.
//!
//! Invariant: written atomically (temp file in the same directory, `sync_all`, rename, fsync
//! of the directory), so a crash leaves the old record or the new one, never a torn file.
//! An unreadable or foreign record is treated as absent: the device is simply rebuilt.
//! Thread-safety: one record per device directory; only that device's build touches it.

use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::toolchain::Tool;
use super::Error;
use crate::registry::write_atomic;

/// Schema version of `build.json`.
pub(super) const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    pub version: u32,
    /// sha256 of raw config bytes, source version, tree path and compiler stats.
    pub fast_key: String,
    /// sha256 of config after olddefconfig, source version, toolchain identity.
    pub cache_key: String,
    /// The tree's version `out/` was built from (the TRAP check compares with it).
    pub source_version: String,
    /// sha256 of the working config `out/` was built from.
    pub config_sha256: String,
    pub toolchain: Vec<Tool>,
    /// File name of the image in `firmware/current/`.
    pub image: String,
    /// The dictionary's version.
    pub firmware_version: String,
    /// The dictionary's `config.MCU`.
    pub mcu: String,
    /// Object files in `out/` after the build (the denominator of progress fractions).
    pub objects: usize,
}

impl Record {
    pub fn load(path: &Path) -> Option<Record> {
        let bytes = fs::read(path).ok()?;
        let record: Record = serde_json::from_slice(&bytes).ok()?;
        (record.version == SCHEMA).then_some(record)
    }

    pub fn save(&self, key: &str, path: &Path) -> Result<(), Error> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::Io {
            key: key.to_owned(),
            action: "encode",
            path: path.to_owned(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        write_atomic(path, &bytes).map_err(|source| Error::Io {
            key: key.to_owned(),
            action: "write",
            path: path.to_owned(),
            source,
        })
    }
}

/// fsync a directory so renames inside it are durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}
