//! Which compiler and linker a Klipper tree uses for a config, and who they are.
//!
//! The tree decides (`CROSS_PREFIX` comes from the board's Makefile), so we ask it:
//! `make -s ... --eval='kflash-print-toolchain: ; ...' kflash-print-toolchain` prints `$(CC)`
//! and `$(LD)`; each program is then found on PATH and asked `--version`. Its identity (path
//! and first version line) goes into the cache key; its size and mtime into the fast pre-check.
//! Thread-safety: stateless functions.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Error, QUICK};
use crate::process::Cmd;

const PRINT_TARGET: &str = "kflash-print-toolchain";

/// One tool of the toolchain (compiler or linker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Tool {
    /// As the Makefile names it (`arm-none-eabi-gcc`).
    pub name: String,
    /// Where it was found.
    pub path: PathBuf,
    /// First line of `--version`.
    pub version: String,
}

impl Tool {
    /// What goes into the cache key.
    pub fn identity(&self) -> String {
        format!("{}\t{}\t{}", self.name, self.path.display(), self.version)
    }

    /// Path, size and mtime as they are now (missing: "absent").
    pub fn stat_now(&self) -> String {
        match std::fs::metadata(&self.path) {
            Ok(m) => format!(
                "{}\t{}\t{}.{}",
                self.path.display(),
                m.size(),
                m.mtime(),
                m.mtime_nsec()
            ),
            Err(_) => format!("{}\tabsent", self.path.display()),
        }
    }
}

/// Find an executable on PATH (or check a path containing '/').
pub(super) fn which(program: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// The Debian packages that provide a compiler or linker.
pub(super) fn packages_for(program: &str) -> &'static str {
    if program.contains("arm-none-eabi") {
        "gcc-arm-none-eabi binutils-arm-none-eabi libnewlib-arm-none-eabi"
    } else if program.contains("avr") {
        "gcc-avr avr-libc"
    } else if program.contains("or1k") {
        "gcc-or1k-elf binutils-or1k-elf"
    } else {
        "build-essential"
    }
}

/// The program of a make variable like `ccache arm-none-eabi-gcc -foo`.
fn program_of(value: &str) -> Option<&str> {
    value
        .split_whitespace()
        .filter(|w| !w.starts_with('-'))
        .find(|w| !matches!(*w, "ccache" | "distcc"))
}

/// Ask the tree (through `make`, already pointed at OUT and the working config) which
/// compiler and linker it uses, and identify them.
pub(super) fn identify(key: &str, make: &Cmd, deadline: Instant) -> Result<Vec<Tool>, Error> {
    let out = make
        .clone()
        .arg("-s")
        .arg(format!(
            "--eval={PRINT_TARGET}: ; @echo 'kflash-cc=$(CC)'; echo 'kflash-ld=$(LD)'"
        ))
        .arg(PRINT_TARGET)
        .run()
        .map_err(|e| Error::from_process(key, e))?;
    let mut tools = Vec::new();
    for (tag, fallback) in [("kflash-cc=", "gcc"), ("kflash-ld=", "ld")] {
        let value = out
            .stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or(fallback);
        let Some(name) = program_of(value) else {
            continue;
        };
        let Some(path) = which(name) else {
            return Err(Error::ToolchainMissing {
                key: key.to_owned(),
                compiler: name.to_owned(),
                packages: packages_for(name).to_owned(),
            });
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let version = Cmd::new(&path)
            .arg("--version")
            .timeout(left.min(QUICK).max(Duration::from_millis(1)))
            .run_unchecked()
            .map(|o| o.stdout.lines().next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        tools.push(Tool {
            name: name.to_owned(),
            path,
            version,
        });
    }
    Ok(tools)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_skips_wrappers_and_flags() {
        assert_eq!(
            program_of("ccache arm-none-eabi-gcc -mthumb"),
            Some("arm-none-eabi-gcc")
        );
        assert_eq!(program_of("avr-gcc"), Some("avr-gcc"));
        assert_eq!(program_of("  "), None);
    }

    #[test]
    fn packages_name_the_debian_toolchains() {
        assert!(packages_for("arm-none-eabi-gcc").contains("gcc-arm-none-eabi"));
        assert!(packages_for("arm-none-eabi-ld").contains("binutils-arm-none-eabi"));
        assert_eq!(packages_for("avr-gcc"), "gcc-avr avr-libc");
        assert_eq!(packages_for("gcc"), "build-essential");
    }
}
