//! Pre-warm klippy before the stop window: do, while klipper keeps running, what klippy
//! would otherwise do at its next start because the host code changed.
//!
//! After a Klipper update that changes host code, klippy's first start rebuilds
//! `klippy/chelper/c_helper.so` (its chelper compiles the C helper with gcc when a source
//! is newer than the library: 2-3 s on a 2-core x86 build machine, more on a slower
//! host) and byte-compiles the changed Python. Pre-warming does both before klipper is stopped:
//! - c_helper.so: the klippy's OWN chelper is asked, under klippy's own Python (it imports
//!   cffi), whether it would build and with which command (`chelper_build.py`: its
//!   `do_build_code` is swapped for one that only reports the command). That command, with
//!   only its output name changed to a temporary file next to the library, is run as
//!   klippy would run it (`sh -c`), and the result is renamed over `c_helper.so`. Nothing
//!   of chelper's flag list or source list is written down here: a Klipper or Kalico
//!   update that changes them is followed as is.
//! - Python: `python -m compileall <klippy dir>` with klippy's Python (the same
//!   interpreter, so the same bytecode tag; compileall writes each file atomically).
//!
//! Invariants: the running klippy is never disturbed: the new library is a new inode
//! (rename), so klippy keeps its mapping of the old one, and .pyc files are replaced by
//! rename too. Only the klippy the service runs is pre-warmed (`locate`); anything else
//! is one clear line. A failure is never fatal to a run: klippy builds the helper itself.
//!
//! Thread-safety: plain functions; `warm` blocks its thread (run it next to the build).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::events::{Event, Sink, Stage};
use crate::process::{self, Cancel, Cmd};
use crate::registry::expand_home;

/// The program that asks a klippy's chelper what it would build.
const CHELPER_BUILD: &str = include_str!("chelper_build.py");
/// The prefix of its answer line.
const ANSWER: &str = "KFLASH-CHELPER ";
/// Where KIAUH and Klipper's install scripts put klippy's Python.
pub const DEFAULT_PYTHON: &str = "~/klippy-env/bin/python";

/// A klippy to pre-warm: its directory (`~/klipper/klippy`) and the Python that runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Klippy {
    pub dir: PathBuf,
    pub python: PathBuf,
}

/// The klippy the service runs, as klippy itself reports it (Moonraker's
/// `/printer/info`: `klipper_path`, `python_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// The directory holding `klippy/` (the Klipper tree, or site-packages).
    pub klipper_path: PathBuf,
    pub python: PathBuf,
}

/// Where to look: the settings and what the running klippy says.
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    /// The Klipper tree kflash builds from (`klipper_dir`).
    pub klipper_dir: PathBuf,
    /// The setting `klippy_dir` (`None`: the service's, else `<klipper_dir>/klippy`).
    pub klippy_dir: Option<PathBuf>,
    /// The setting `klippy_python` (`None`: the service's, else `~/klippy-env/bin/python`).
    pub klippy_python: Option<PathBuf>,
    /// The running klippy, when Moonraker could say.
    pub running: Option<Running>,
}

/// Why nothing is pre-warmed: one line for the user, not a failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Skip(pub String);

/// The klippy to pre-warm: the setting `klippy_dir`, else the klippy the service runs
/// when that is the Klipper tree's, else `<klipper_dir>/klippy`. `Err` when the service
/// runs another klippy than the tree's, or there is no klippy or no Python there.
pub fn locate(lookup: &Lookup) -> Result<Klippy, Skip> {
    let tree_klippy = lookup.klipper_dir.join("klippy");
    let dir = match (&lookup.klippy_dir, &lookup.running) {
        (Some(dir), _) => dir.clone(),
        (None, Some(running)) => {
            let runs = running.klipper_path.join("klippy");
            if !same_path(&runs, &tree_klippy) {
                return Err(Skip(format!(
                    "klipper runs klippy from {}, not from the Klipper tree kflash builds \
                     ({}): not pre-warmed (set klippy_dir to pre-warm that klippy)",
                    runs.display(),
                    tree_klippy.display()
                )));
            }
            runs
        }
        (None, None) => tree_klippy,
    };
    if !dir.join("chelper").join("__init__.py").is_file() {
        return Err(Skip(format!(
            "{} holds no klippy (no chelper/__init__.py): not pre-warmed (set klippy_dir)",
            dir.display()
        )));
    }
    let python = lookup
        .klippy_python
        .clone()
        .or_else(|| lookup.running.as_ref().map(|r| r.python.clone()))
        .unwrap_or_else(|| expand_home(DEFAULT_PYTHON));
    if !python.is_file() {
        return Err(Skip(format!(
            "klippy's Python {} does not exist: not pre-warmed (set klippy_python)",
            python.display()
        )));
    }
    Ok(Klippy { dir, python })
}

fn same_path(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(a) == canon(b)
}

/// What pre-warming did.
#[derive(Debug, Clone, PartialEq)]
pub struct Warmed {
    /// How long building c_helper.so took; `None` when it was up to date.
    pub c_helper: Option<Duration>,
    /// How many Python files were byte-compiled (0: all were current).
    pub compiled: usize,
}

impl Warmed {
    /// True when anything was built.
    pub fn built_anything(&self) -> bool {
        self.c_helper.is_some() || self.compiled > 0
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        let helper = match self.c_helper {
            Some(took) => format!("c_helper.so built ({:.1} s)", took.as_secs_f64()),
            None => "c_helper.so up to date".into(),
        };
        let python = match self.compiled {
            0 => "Python byte-code up to date".into(),
            1 => "1 Python file byte-compiled".into(),
            n => format!("{n} Python files byte-compiled"),
        };
        format!("{helper}, {python}")
    }
}

/// Why pre-warming failed (klippy will do it itself at its start).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("asking klippy's chelper what it would build failed: {0}")]
    Ask(#[source] process::Error),
    #[error("klippy's chelper gave no answer kflash understands: {got}")]
    Answer { got: String },
    #[error(
        "klippy's chelper build command does not name `-o {}` once: {command}",
        dest.display()
    )]
    Command { command: String, dest: PathBuf },
    #[error("building c_helper.so failed: {0}")]
    Build(#[source] process::Error),
    #[error("cannot put the new c_helper.so in place at {}: {source}", dest.display())]
    Replace {
        dest: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("byte-compiling klippy failed: {0}")]
    ByteCompile(#[source] process::Error),
}

/// Pre-warm `klippy`: build c_helper.so if its chelper would, then byte-compile. Each
/// command gets `timeout`; progress goes to `sink` as `Stage::Prewarm` events.
pub fn warm(
    klippy: &Klippy,
    timeout: Duration,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Warmed, Error> {
    let c_helper = build_c_helper(klippy, timeout, cancel, sink)?;
    let compiled = byte_compile(klippy, timeout, cancel)?;
    Ok(Warmed { c_helper, compiled })
}

/// `chelper_build.py`'s answer.
#[derive(serde::Deserialize)]
struct Answer {
    command: Option<String>,
    dest: PathBuf,
}

/// What the klippy's chelper would run: `(command, library)`, command `None` when the
/// library is up to date.
fn ask_chelper(
    klippy: &Klippy,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<(Option<String>, PathBuf), Error> {
    let out = Cmd::new(&klippy.python)
        .arg("-c")
        .arg(CHELPER_BUILD)
        .arg(&klippy.dir)
        .timeout(timeout)
        .cancel(cancel)
        .run()
        .map_err(Error::Ask)?;
    let line = out
        .stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(ANSWER))
        .ok_or_else(|| Error::Answer {
            got: out.tail.trim().to_owned(),
        })?;
    let answer: Answer = serde_json::from_str(line).map_err(|_| Error::Answer {
        got: line.to_owned(),
    })?;
    Ok((answer.command, answer.dest))
}

fn build_c_helper(
    klippy: &Klippy,
    timeout: Duration,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<Option<Duration>, Error> {
    let (command, dest) = ask_chelper(klippy, timeout, cancel)?;
    let Some(command) = command else {
        return Ok(None);
    };
    let mut temp = dest.clone().into_os_string();
    temp.push(".kflash-new");
    let temp = PathBuf::from(temp);
    let output = format!("-o {} ", dest.display());
    if command.matches(&output).count() != 1 {
        return Err(Error::Command { command, dest });
    }
    let command = command.replacen(&output, &format!("-o {} ", temp.display()), 1);
    sink(&Event::info(
        Stage::Prewarm,
        None,
        format!(
            "building {} with klippy's own command (klipper keeps running)",
            dest.display()
        ),
    ));
    let started = Instant::now();
    let built = Cmd::new("sh")
        .arg("-c")
        .arg(&command)
        .cwd(dest.parent().unwrap_or(Path::new("/")))
        .timeout(timeout)
        .cancel(cancel)
        .run();
    if let Err(e) = built {
        let _ = std::fs::remove_file(&temp);
        return Err(Error::Build(e));
    }
    // A new inode: the running klippy keeps its mapping of the old library.
    std::fs::rename(&temp, &dest).map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        Error::Replace {
            dest: dest.clone(),
            source,
        }
    })?;
    Ok(Some(started.elapsed()))
}

/// `python -m compileall <klippy dir>`; how many files it compiled.
fn byte_compile(klippy: &Klippy, timeout: Duration, cancel: &Cancel) -> Result<usize, Error> {
    let out = Cmd::new(&klippy.python)
        .args(["-m", "compileall"])
        .arg(&klippy.dir)
        .timeout(timeout)
        .cancel(cancel)
        .run()
        .map_err(Error::ByteCompile)?;
    Ok(out
        .stdout
        .lines()
        .filter(|l| l.starts_with("Compiling "))
        .count())
}

#[cfg(test)]
mod tests;
