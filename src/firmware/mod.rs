//! Firmware builds: out of tree, in parallel, with a content-hash cache.
//!
//! Owns everything under `<state>/builds/<key>/` for each device:
//! - `config`: the working copy of the device's config after `make olddefconfig` (the user's
//!   saved config is only ever read; `config.new` is the scratch copy olddefconfig runs on,
//!   with `query-out/` as its OUT so the real OUT keeps its dependency files);
//! - `out/`: Klipper's `OUT` for this device, kept between runs so that after a Klipper
//!   update only the changed sources recompile (never `make clean`);
//! - `firmware/current/` (image + `klipper.dict` of the last good build) and
//!   `firmware/previous/` (the last different successful build: NOT last-known-good, it
//!   may never have been on the board; that one is kept per board by `kept`);
//! - `build.json`: what `out/` was last built from (schema `"version": 1`), written atomically.
//!
//! Invariants:
//! - the cache key is sha256(config after olddefconfig, source version incl. dirty state,
//!   toolchain identity); when it matches `build.json` and the artefacts exist, nothing is run
//!   (a faster pre-check on the raw config bytes avoids even olddefconfig). Trees whose
//!   version cannot vouch for their content (dirty, or not git) always run an incremental make.
//! - Klipper's TRAP: an incremental make after a version-only change does not relink, so the
//!   dictionary would keep the old version. Whenever the tree's version (or the config) differs
//!   from what `out/` was built from, the version object and the linked outputs are removed
//!   first; after every build the dictionary's version is checked against the tree's.
//! - A toolchain whose identity changed empties `out/` first (make does not track the compiler).
//! - `firmware/current` changes only after a build fully succeeded; a failure leaves it alone,
//!   and so does a make that relinked nothing (so `previous` stays a different, older build).
//!
//! Thread-safety: `build_all` runs up to `jobs` builds on scoped threads, one directory per
//! device, so builds never share files; events are sent from those threads. Two processes
//! must not build the same device at once (the state dir's run lock prevents it).

pub mod kept;
mod record;
mod toolchain;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::events::{Event, Level, Sink, Stage};
use crate::kconfig;
use crate::process::{self, Cancel, Cmd};
use record::Record;
use toolchain::Tool;

/// Files `make` links from the objects; removed (with `compile_time_request.*`) whenever the
/// tree's version or the config changed since `out/` was last built.
const LINKED_OUTPUTS: [&str; 5] = [
    "klipper.elf",
    "klipper.bin",
    "klipper.dict",
    "klipper.uf2",
    "klipper.elf.hex",
];
/// Image files in order of preference for MCUs other than the linux process.
const IMAGES: [&str; 3] = ["klipper.uf2", "klipper.bin", "klipper.elf.hex"];
/// Deadline for quick helper commands (git describe, `cc --version`).
const QUICK: Duration = Duration::from_secs(20);

/// One device to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The device key (names its directory under `builds_dir`).
    pub key: String,
    /// The device's saved `.config`; read only, never modified.
    pub config: PathBuf,
    /// The Klipper (or Kalico) source tree.
    pub klipper_dir: PathBuf,
    /// `<state>/builds`.
    pub builds_dir: PathBuf,
    /// Deadline for the whole build of this device (olddefconfig + make).
    pub timeout: Duration,
}

/// A built (or cached) firmware, ready to flash.
#[derive(Debug, Clone, PartialEq)]
pub struct Firmware {
    /// The device key.
    pub key: String,
    /// Klipper's `OUT` for this device (`<builds>/<key>/out`).
    pub out_dir: PathBuf,
    /// The image to flash, in `firmware/current/`: klipper.bin | klipper.uf2 |
    /// klipper.elf.hex, or klipper.elf for the linux-process MCU.
    pub image: PathBuf,
    /// The firmware's data dictionary, in `firmware/current/`.
    pub dict_path: PathBuf,
    /// The dictionary's `version`: what the MCU will report as `mcu_version`.
    pub version: String,
    /// The dictionary's `config.MCU` ("linux" for the linux-process MCU).
    pub mcu: String,
    /// Hex sha256 of (config after olddefconfig, source version, toolchain identity).
    pub cache_key: String,
    /// True when nothing was built because the cache key matched.
    pub cached: bool,
    /// Wall time spent on this device.
    pub duration: Duration,
}

impl Firmware {
    /// The firmware's data dictionary (Klipper's `klipper.dict`) as JSON.
    pub fn dict(&self) -> Result<serde_json::Value, Error> {
        read_dict(&self.key, &self.dict_path).map(|(value, _, _)| value)
    }
}

/// Why a device's firmware could not be built. Every variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{key}: `make` was not found on PATH; install it with \
         `sudo apt install build-essential`"
    )]
    MakeMissing { key: String },
    #[error(
        "{key}: the compiler `{compiler}` was not found; install it with \
         `sudo apt install {packages}`"
    )]
    ToolchainMissing {
        key: String,
        compiler: String,
        packages: String,
    },
    #[error(
        "{key}: the Klipper source tree {} is missing or has no Makefile; \
         set it with `kflash settings set klipper_dir DIR`",
        path.display()
    )]
    KlipperDirMissing { key: String, path: PathBuf },
    #[error(
        "{key}: cannot read the firmware config {}: {source}; \
         save one with `make menuconfig KCONFIG_CONFIG={}`",
        path.display(), path.display()
    )]
    ConfigMissing {
        key: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{key}: building the firmware failed: {source}")]
    Make {
        key: String,
        #[source]
        source: process::Error,
    },
    #[error(
        "{key}: `{cmd}` timed out after {after:?} and was stopped{}",
        crate::process::fmt_tail(tail)
    )]
    Timeout {
        key: String,
        cmd: String,
        after: Duration,
        tail: String,
    },
    #[error("{key}: the build was cancelled")]
    Cancelled { key: String },
    #[error("{key}: make succeeded but left no firmware dictionary at {}", path.display())]
    DictMissing { key: String, path: PathBuf },
    #[error("{key}: the firmware dictionary {} is not usable: {reason}", path.display())]
    DictInvalid {
        key: String,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{key}: the built firmware reports version {built:?} but the Klipper tree is at \
         {expected:?}; the build output is stale (remove {} and build again)",
        out.display()
    )]
    VersionMismatch {
        key: String,
        built: String,
        expected: String,
        out: PathBuf,
    },
    #[error(
        "{key}: the config {} is for MCU {config_mcu:?} but the firmware built from it \
         is for {dict_mcu:?}",
        config.display()
    )]
    McuMismatch {
        key: String,
        config: PathBuf,
        config_mcu: String,
        dict_mcu: String,
    },
    #[error(
        "{key}: make produced no firmware image (klipper.uf2, klipper.bin, klipper.elf.hex \
         or klipper.elf) in {}",
        out.display()
    )]
    ImageMissing { key: String, out: PathBuf },
    #[error("{key}: cannot {action} {}: {source}", path.display())]
    Io {
        key: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{key}: the device was asked for twice in one build")]
    DuplicateKey { key: String },
}

impl Error {
    /// The device the error is about.
    pub fn key(&self) -> &str {
        match self {
            Error::MakeMissing { key }
            | Error::ToolchainMissing { key, .. }
            | Error::KlipperDirMissing { key, .. }
            | Error::ConfigMissing { key, .. }
            | Error::Make { key, .. }
            | Error::Timeout { key, .. }
            | Error::Cancelled { key }
            | Error::DictMissing { key, .. }
            | Error::DictInvalid { key, .. }
            | Error::VersionMismatch { key, .. }
            | Error::McuMismatch { key, .. }
            | Error::ImageMissing { key, .. }
            | Error::Io { key, .. }
            | Error::DuplicateKey { key } => key,
        }
    }

    fn from_process(key: &str, err: process::Error) -> Self {
        match err {
            process::Error::Timeout { cmd, after, tail } => Error::Timeout {
                key: key.to_owned(),
                cmd,
                after,
                tail,
            },
            process::Error::Cancelled { .. } => Error::Cancelled {
                key: key.to_owned(),
            },
            source => Error::Make {
                key: key.to_owned(),
                source,
            },
        }
    }
}

fn io_err(key: &str, action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let key = key.to_owned();
    let path = path.to_owned();
    move |source| Error::Io {
        key,
        action,
        path,
        source,
    }
}

/// The version Klipper's build would embed for the tree, without the date-host suffix:
/// `git describe --always --tags --long --dirty`, else `klippy/.version`, else `?`.
pub fn source_version(klipper_dir: &Path) -> String {
    source_version_detail(klipper_dir).0
}

/// The source version and whether it vouches for the tree's content (clean git checkout).
fn source_version_detail(klipper_dir: &Path) -> (String, bool) {
    let described = Cmd::new("git")
        .arg("-C")
        .arg(klipper_dir)
        .args(["describe", "--always", "--tags", "--long", "--dirty"])
        .timeout(QUICK)
        .run();
    if let Ok(out) = described {
        let version = out.stdout.trim();
        if !version.is_empty() {
            return (version.to_owned(), !version.ends_with("-dirty"));
        }
    }
    match fs::read_to_string(klipper_dir.join("klippy").join(".version")) {
        Ok(text) if !text.trim().is_empty() => (text.trim().to_owned(), false),
        _ => ("?".to_owned(), false),
    }
}

/// True when `built` (a dictionary's version) is `expected` (the tree's source version),
/// possibly followed by Klipper's `-YYYYMMDD_HHMMSS-<host>` suffix for dirty/non-git trees.
fn version_matches(expected: &str, built: &str) -> bool {
    built == expected || crate::versions::strip_date_suffix(built) == expected
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let mut hex = String::with_capacity(64);
    for byte in hasher.finalize() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// The MCU a config targets: `CONFIG_MCU`, or "linux" for the linux-process target
/// (which defines none); `None` when the config names neither.
fn config_mcu(config: &[u8]) -> Option<String> {
    kconfig::KConfig::parse(&String::from_utf8_lossy(config))
        .target()
        .ok()
        .map(|t| t.mcu)
}

/// Read a dictionary: (json, version, config.MCU).
fn read_dict(key: &str, path: &Path) -> Result<(serde_json::Value, String, String), Error> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::DictMissing {
                key: key.to_owned(),
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(io_err(key, "read", path)(e)),
    };
    let invalid = |reason: String| Error::DictInvalid {
        key: key.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not JSON ({e})")))?;
    let version = value
        .get("version")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| invalid("no \"version\" string".to_owned()))?
        .to_owned();
    let mcu = value
        .get("config")
        .and_then(|c| c.get("MCU"))
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| invalid("no \"config.MCU\" string".to_owned()))?
        .to_owned();
    Ok((value, version, mcu))
}

/// Where one device's build lives.
struct Layout {
    dir: PathBuf,
    out: PathBuf,
    /// `out` as make wants it: absolute, with a trailing slash.
    out_arg: String,
    /// OUT for olddefconfig and the toolchain query: Klipper's Makefile re-creates
    /// `$(OUT)board-link` and deletes the `.d` dependency files in OUT whenever the config
    /// it is given is newer, so those must never run against the real OUT.
    query_out_arg: String,
    work_config: PathBuf,
    record: PathBuf,
    current: PathBuf,
}

impl Layout {
    fn new(builds_dir: &Path, key: &str) -> Self {
        let builds = std::path::absolute(builds_dir).unwrap_or_else(|_| builds_dir.to_owned());
        let dir = builds.join(key);
        let out = dir.join("out");
        let out_arg = format!("{}/", out.display());
        let query_out_arg = format!("{}/", dir.join("query-out").display());
        Self {
            work_config: dir.join("config"),
            record: dir.join("build.json"),
            current: dir.join("firmware").join("current"),
            out,
            out_arg,
            query_out_arg,
            dir,
        }
    }
}

/// Shared, read-only facts for one `build_all` call.
struct Context<'a> {
    cancel: &'a Cancel,
    sink: &'a Sink,
    make: Option<PathBuf>,
    /// `-j` for each make.
    make_jobs: usize,
}

/// What the quick pre-check found for one device.
struct Prepared {
    req: BuildRequest,
    klipper_dir: PathBuf,
    layout: Layout,
    raw_config: Vec<u8>,
    version: String,
    trusted: bool,
    record: Option<Record>,
    started: Instant,
}

/// Build every request, at most `jobs` at a time; results in the order of `reqs`.
///
/// A device whose cache key is unchanged is not rebuilt at all (`cached: true`). One device
/// failing never stops the others. `cancel` stops running makes (their group is killed).
pub fn build_all(
    reqs: &[BuildRequest],
    jobs: usize,
    cancel: &Cancel,
    sink: &Sink,
) -> Vec<Result<Firmware, Error>> {
    let mut results: Vec<Option<Result<Firmware, Error>>> = reqs.iter().map(|_| None).collect();
    let mut versions: HashMap<PathBuf, (String, bool)> = HashMap::new();
    let mut seen = HashSet::new();
    let mut todo = Vec::new();
    for (i, req) in reqs.iter().enumerate() {
        let started = Instant::now();
        if !seen.insert(req.key.clone()) {
            let err = Error::DuplicateKey {
                key: req.key.clone(),
            };
            report_error(sink, &err);
            results[i] = Some(Err(err));
            continue;
        }
        match prepare(req, &mut versions, started) {
            Ok(prep) => match try_cached(&prep) {
                Some(fw) => {
                    sink(
                        &Event::info(Stage::Build, Some(&req.key), "firmware up to date (cached)")
                            .with_fraction(1.0),
                    );
                    results[i] = Some(Ok(fw));
                }
                None => todo.push((i, prep)),
            },
            Err(e) => {
                report_error(sink, &e);
                results[i] = Some(Err(e));
            }
        }
    }
    for (i, result) in run_builds(todo, jobs, cancel, sink) {
        if let Err(e) = &result {
            report_error(sink, e);
        }
        results[i] = Some(result);
    }
    results
        .into_iter()
        .zip(reqs)
        .map(|(r, req)| {
            // Invariant: every index is filled above (pre-check, duplicate, or a build).
            r.unwrap_or_else(|| {
                Err(Error::Cancelled {
                    key: req.key.clone(),
                })
            })
        })
        .collect()
}

/// The firmware `build_all` would return as cached for `req`, found without running
/// anything but `git describe` (for `kflash plan`); `None` when it would build.
pub fn up_to_date(req: &BuildRequest) -> Option<Firmware> {
    let prep = prepare(req, &mut HashMap::new(), Instant::now()).ok()?;
    try_cached(&prep)
}

fn report_error(sink: &Sink, err: &Error) {
    sink(
        &Event::info(Stage::Build, Some(err.key()), err.to_string())
            .with_level(Level::Error)
            .with_fraction(1.0),
    );
}

fn run_builds(
    todo: Vec<(usize, Prepared)>,
    jobs: usize,
    cancel: &Cancel,
    sink: &Sink,
) -> Vec<(usize, Result<Firmware, Error>)> {
    if todo.is_empty() {
        return Vec::new();
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let workers = jobs.max(1).min(todo.len());
    let ctx = Context {
        cancel,
        sink,
        make: toolchain::which("make"),
        make_jobs: cores.div_ceil(workers).max(1),
    };
    let queue = Mutex::new(todo.into_iter());
    let done = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let next = queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .next();
                let Some((i, mut prep)) = next else { break };
                prep.started = Instant::now();
                let result = build_one(&ctx, &prep);
                done.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((i, result));
            });
        }
    });
    done.into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Read the config, find the tree's version and the last record: no commands but git.
fn prepare(
    req: &BuildRequest,
    versions: &mut HashMap<PathBuf, (String, bool)>,
    started: Instant,
) -> Result<Prepared, Error> {
    let klipper_dir =
        std::path::absolute(&req.klipper_dir).unwrap_or_else(|_| req.klipper_dir.clone());
    if !klipper_dir.join("Makefile").is_file() {
        return Err(Error::KlipperDirMissing {
            key: req.key.clone(),
            path: req.klipper_dir.clone(),
        });
    }
    let raw_config = fs::read(&req.config).map_err(|source| Error::ConfigMissing {
        key: req.key.clone(),
        path: req.config.clone(),
        source,
    })?;
    let (version, trusted) = versions
        .entry(klipper_dir.clone())
        .or_insert_with(|| source_version_detail(&klipper_dir))
        .clone();
    let layout = Layout::new(&req.builds_dir, &req.key);
    let record = Record::load(&layout.record);
    Ok(Prepared {
        req: req.clone(),
        klipper_dir,
        layout,
        raw_config,
        version,
        trusted,
        record,
        started,
    })
}

/// The quick key: raw config bytes, source version, tree path, and the recorded compilers
/// as they are on disk now (path, size, mtime).
fn fast_key(prep: &Prepared, tools: &[Tool]) -> String {
    let stats: Vec<String> = tools.iter().map(Tool::stat_now).collect();
    let stats = stats.join("\n");
    sha256_hex(&[
        b"kflash-fast-v1",
        &prep.raw_config,
        prep.version.as_bytes(),
        prep.klipper_dir.as_os_str().as_encoded_bytes(),
        stats.as_bytes(),
    ])
}

fn try_cached(prep: &Prepared) -> Option<Firmware> {
    let record = prep.record.as_ref()?;
    if !prep.trusted || record.fast_key != fast_key(prep, &record.toolchain) {
        return None;
    }
    cached_firmware(prep, record, &record.cache_key)
}

fn cached_firmware(prep: &Prepared, record: &Record, cache_key: &str) -> Option<Firmware> {
    let image = prep.layout.current.join(&record.image);
    let dict_path = prep.layout.current.join("klipper.dict");
    if record.cache_key != cache_key || !image.is_file() || !dict_path.is_file() {
        return None;
    }
    Some(Firmware {
        key: prep.req.key.clone(),
        out_dir: prep.layout.out.clone(),
        image,
        dict_path,
        version: record.firmware_version.clone(),
        mcu: record.mcu.clone(),
        cache_key: record.cache_key.clone(),
        cached: true,
        duration: prep.started.elapsed(),
    })
}

/// `make -C <tree> OUT=<out> KCONFIG_CONFIG=<config>`, bounded by the build's deadline.
fn make_cmd(
    ctx: &Context,
    prep: &Prepared,
    make: &Path,
    (out, config): (&str, &Path),
    deadline: Instant,
) -> Cmd {
    Cmd::new(make)
        .arg("-C")
        .arg(&prep.klipper_dir)
        .arg(format!("OUT={out}"))
        .arg(format!("KCONFIG_CONFIG={}", config.display()))
        // A make we run is not a sub-make of whoever started kflash.
        .env("MAKEFLAGS", "")
        .env("MFLAGS", "")
        .timeout(deadline.saturating_duration_since(Instant::now()))
        .cancel(ctx.cancel)
}

fn build_one(ctx: &Context, prep: &Prepared) -> Result<Firmware, Error> {
    let key = prep.req.key.as_str();
    let layout = &prep.layout;
    if ctx.cancel.is_cancelled() {
        return Err(Error::Cancelled {
            key: key.to_owned(),
        });
    }
    let make = ctx.make.as_deref().ok_or_else(|| Error::MakeMissing {
        key: key.to_owned(),
    })?;
    let deadline = prep.started + prep.req.timeout;
    (ctx.sink)(&Event::info(Stage::Build, Some(key), "building firmware").with_fraction(0.0));
    fs::create_dir_all(&layout.dir).map_err(io_err(key, "create", &layout.dir))?;

    let config = olddefconfig(ctx, prep, make, deadline)?;

    let tools = toolchain::identify(
        key,
        &make_cmd(
            ctx,
            prep,
            make,
            (&layout.query_out_arg, &layout.work_config),
            deadline,
        ),
        deadline,
    )?;
    let identity: String = tools
        .iter()
        .map(Tool::identity)
        .collect::<Vec<_>>()
        .join("\n");
    let cache_key = sha256_hex(&[
        b"kflash-build-v1",
        &config,
        prep.version.as_bytes(),
        identity.as_bytes(),
    ]);
    let config_sha = sha256_hex(&[&config]);
    let fast = fast_key(prep, &tools);

    if prep.trusted {
        if let Some(record) = &prep.record {
            if let Some(mut fw) = cached_firmware(prep, record, &cache_key) {
                let mut record = record.clone();
                record.fast_key = fast;
                record.toolchain = tools;
                record.save(key, &layout.record)?;
                fw.duration = prep.started.elapsed();
                (ctx.sink)(
                    &Event::info(Stage::Build, Some(key), "firmware up to date (cached)")
                        .with_fraction(1.0),
                );
                return Ok(fw);
            }
        }
    }

    invalidate_out(ctx, prep, &tools, &config_sha)?;

    let compiled = compile(ctx, prep, make, deadline)?;

    let (version, mcu, image) = check_outputs(prep, &config)?;
    publish(key, layout, image)?;

    let record = Record {
        version: record::SCHEMA,
        fast_key: fast,
        cache_key: cache_key.clone(),
        source_version: prep.version.clone(),
        config_sha256: config_sha,
        toolchain: tools,
        image: image.to_owned(),
        firmware_version: version.clone(),
        mcu: mcu.clone(),
        objects: count_objects(&layout.out),
    };
    record.save(key, &layout.record)?;
    let duration = prep.started.elapsed();
    (ctx.sink)(
        &Event::info(
            Stage::Build,
            Some(key),
            format!(
                "built {version} for {mcu} in {:.1} s ({} objects compiled)",
                duration.as_secs_f64(),
                compiled
            ),
        )
        .with_fraction(1.0),
    );
    Ok(Firmware {
        key: key.to_owned(),
        out_dir: layout.out.clone(),
        image: layout.current.join(image),
        dict_path: layout.current.join("klipper.dict"),
        version,
        mcu,
        cache_key,
        cached: false,
        duration,
    })
}

/// olddefconfig on a scratch copy of the user's config; the working config is replaced only
/// when the result differs, so an unchanged config keeps its mtime and make rebuilds nothing
/// for it. Returns the working config's bytes.
fn olddefconfig(
    ctx: &Context,
    prep: &Prepared,
    make: &Path,
    deadline: Instant,
) -> Result<Vec<u8>, Error> {
    let key = prep.req.key.as_str();
    let layout = &prep.layout;
    let scratch = layout.dir.join("config.new");
    fs::write(&scratch, &prep.raw_config).map_err(io_err(key, "write", &scratch))?;
    make_cmd(ctx, prep, make, (&layout.query_out_arg, &scratch), deadline)
        .arg("olddefconfig")
        .run()
        .map_err(|e| Error::from_process(key, e))?;
    let config = fs::read(&scratch).map_err(io_err(key, "read", &scratch))?;
    // kconfiglib keeps a backup of a config it rewrote; the scratch copy needs none.
    let _ = fs::remove_file(layout.dir.join("config.new.old"));
    if fs::read(&layout.work_config).ok().as_deref() == Some(&config[..]) {
        let _ = fs::remove_file(&scratch);
    } else {
        fs::rename(&scratch, &layout.work_config).map_err(io_err(
            key,
            "replace",
            &layout.work_config,
        ))?;
    }
    Ok(config)
}

/// The compile itself; returns how many objects were compiled.
fn compile(ctx: &Context, prep: &Prepared, make: &Path, deadline: Instant) -> Result<usize, Error> {
    let key = prep.req.key.as_str();
    let layout = &prep.layout;
    let total = prep.record.as_ref().map_or(0, |r| r.objects);
    let compiled = Arc::new(AtomicUsize::new(0));
    let sink = ctx.sink.clone();
    let line_key = key.to_owned();
    let counter = compiled.clone();
    make_cmd(
        ctx,
        prep,
        make,
        (&layout.out_arg, &layout.work_config),
        deadline,
    )
    .arg(format!("-j{}", ctx.make_jobs))
    .on_line(move |line| {
        if line.trim_start().starts_with("Compiling ") {
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            let mut event = Event::info(Stage::Build, Some(&line_key), line.trim());
            if total > 0 {
                event = event.with_fraction((n as f64 / total as f64).min(0.95));
            }
            sink(&event);
        }
    })
    .run()
    .map_err(|e| Error::from_process(key, e))?;
    Ok(compiled.load(Ordering::Relaxed))
}

/// Check the dictionary against the tree's version and the config's MCU; pick the image.
fn check_outputs(prep: &Prepared, config: &[u8]) -> Result<(String, String, &'static str), Error> {
    let key = prep.req.key.as_str();
    let layout = &prep.layout;
    let (_, version, mcu) = read_dict(key, &layout.out.join("klipper.dict"))?;
    if !version_matches(&prep.version, &version) {
        return Err(Error::VersionMismatch {
            key: key.to_owned(),
            built: version,
            expected: prep.version.clone(),
            out: layout.out.clone(),
        });
    }
    if let Some(expected_mcu) = config_mcu(config).filter(|m| !m.eq_ignore_ascii_case(&mcu)) {
        return Err(Error::McuMismatch {
            key: key.to_owned(),
            config: prep.req.config.clone(),
            config_mcu: expected_mcu,
            dict_mcu: mcu,
        });
    }
    let image = if mcu == "linux" {
        Some("klipper.elf")
    } else {
        IMAGES
            .into_iter()
            .find(|name| layout.out.join(name).is_file())
    }
    .filter(|name| layout.out.join(name).is_file())
    .ok_or_else(|| Error::ImageMissing {
        key: key.to_owned(),
        out: layout.out.clone(),
    })?;
    Ok((version, mcu, image))
}

/// Remove what an incremental make would wrongly keep: every object when the toolchain
/// changed (make does not track the compiler), and the version object plus the linked
/// outputs when the tree's version or the config changed (the TRAP).
fn invalidate_out(
    ctx: &Context,
    prep: &Prepared,
    tools: &[Tool],
    config_sha: &str,
) -> Result<(), Error> {
    let key = prep.req.key.as_str();
    let layout = &prep.layout;
    // make does not know the compiler: objects from another toolchain must all go.
    if prep.record.as_ref().is_some_and(|r| r.toolchain != tools) && layout.out.exists() {
        (ctx.sink)(&Event::info(
            Stage::Build,
            Some(key),
            "toolchain changed since the last build: building from scratch",
        ));
        fs::remove_dir_all(&layout.out).map_err(io_err(key, "remove", &layout.out))?;
    }
    // The TRAP: force the version object and the linked outputs to be made again when the
    // tree's version or the config changed since this OUT was last built.
    let stale = prep
        .record
        .as_ref()
        .is_none_or(|r| r.source_version != prep.version || r.config_sha256 != config_sha);
    if stale {
        remove_linked_outputs(key, &layout.out)?;
    }

    Ok(())
}

fn remove_linked_outputs(key: &str, out: &Path) -> Result<(), Error> {
    let mut victims: Vec<PathBuf> = LINKED_OUTPUTS.iter().map(|n| out.join(n)).collect();
    if let Ok(entries) = fs::read_dir(out) {
        victims.extend(
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("compile_time_request.")
                })
                .map(|e| e.path()),
        );
    }
    for path in victims {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(key, "remove", &path)(e))
            }
            _ => {}
        }
    }
    Ok(())
}

fn count_objects(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_objects(&e.path()),
            Ok(t) if t.is_file() && e.path().extension().is_some_and(|x| x == "o") => 1,
            _ => 0,
        })
        .sum()
}

/// Copy image + dictionary to `firmware/new`, then `current` -> `previous`, `new` -> `current`.
/// When make relinked nothing (the outputs equal `current`), nothing moves, so `previous`
/// stays the last-known-good that differs from `current`.
fn publish(key: &str, layout: &Layout, image: &str) -> Result<(), Error> {
    let same = |name: &str| match (
        fs::read(layout.out.join(name)),
        fs::read(layout.current.join(name)),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(image) && same("klipper.dict") {
        return Ok(());
    }
    let firmware = layout.dir.join("firmware");
    let new = firmware.join("new");
    let previous = firmware.join("previous");
    if new.exists() {
        fs::remove_dir_all(&new).map_err(io_err(key, "remove", &new))?;
    }
    fs::create_dir_all(&new).map_err(io_err(key, "create", &new))?;
    for name in [image, "klipper.dict"] {
        let from = layout.out.join(name);
        let to = new.join(name);
        fs::copy(&from, &to).map_err(io_err(key, "copy", &from))?;
        fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(io_err(key, "sync", &to))?;
    }
    record::sync_dir(&new).map_err(io_err(key, "sync", &new))?;
    if layout.current.exists() {
        if previous.exists() {
            fs::remove_dir_all(&previous).map_err(io_err(key, "remove", &previous))?;
        }
        fs::rename(&layout.current, &previous).map_err(io_err(key, "rename", &layout.current))?;
    }
    fs::rename(&new, &layout.current).map_err(io_err(key, "rename", &new))?;
    record::sync_dir(&firmware).map_err(io_err(key, "sync", &firmware))
}
