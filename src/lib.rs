//! kflash's Rust core, compiled as the Python extension `kflash._core`.
//!
//! Domain modules are plain Rust and never touch pyo3; `py/` is the only layer that does.
//! From the bottom up:
//! - `process`: running external commands safely (process groups, deadlines, output tails).
//! - `events`: typed progress events and the one callback they go through.
//! - `registry`: the state dir, devices.json (devices + settings), atomic writes, import.
//! - `kconfig`: firmware `.config` files and the target they build for.
//! - `discovery`: serial devices under the device root and sysfs, across re-enumeration.
//! - `versions`: Klipper/Kalico version strings and firmware dictionary comparison.
//! - `firmware`: out-of-tree parallel firmware builds with a content-hash cache.
//! - `moonraker`: Moonraker's HTTP API.
//! - `service`: stopping and starting klipper, the stop guard.
//! - `katapult`: Katapult's protocol and the native serial flasher.
//! - `flash`: flash methods (Katapult, make flash, linux MCU) and the fallback chain.
//! - `prewarm`: building what klippy would build at its next start, before the stop.
//! - `pipeline`: plan -> pre-flight -> build -> one stop window -> restart -> verify -> report,
//!   against ports (traits) so it runs on fakes in tests.
//! - `flash_run`: the run on a real host: where it runs, how its helper and watchdog leave
//!   klipper's cgroup, the run lock, the run record and progress.
//! - `commands`: what each front-end command does over one state dir, its one error type,
//!   the one `ExitStatus`, and the pipeline's ports on a real printer.
//! - `snapshot`: the lock-free status snapshot store and its shared-memory mirror.
//!
//! Every domain keeps its own error enum; errors keep their type across every seam up to
//! `commands::Error`, and become Python exceptions in exactly one place (`py/errors.rs`).
//!
//! The `#[pymodule]` below only declares what Python sees; the classes and functions live in
//! `py/`.

pub mod commands;
pub mod discovery;
pub mod events;
pub mod firmware;
pub mod flash;
pub mod flash_run;
pub mod katapult;
pub mod kconfig;
pub mod moonraker;
pub mod pipeline;
pub mod prewarm;
pub mod process;
pub mod py;
pub mod registry;
pub mod service;
pub mod snapshot;
pub mod versions;

use pyo3::prelude::*;

/// kflash's native core: build and flash every MCU of a Klipper printer.
#[pymodule]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::py::engine::{validate_key, Engine};
    #[pymodule_export]
    use crate::py::errors::{
        BuildError, CommandTimeout, ConfigError, DeviceNotFound, FlashError, KflashError,
        MoonrakerError, PreflightRefused, RegistryError, ServiceError,
    };
    #[pymodule_export]
    use crate::py::exit_status::ExitStatus;
    #[pymodule_export]
    use crate::py::flash_run::Runs;
    #[pymodule_export]
    use crate::py::katapult::{katapult_decode, katapult_encode, katapult_flash, katapult_status};
    #[pymodule_export]
    use crate::py::moonraker::wait_klippy_ready;
    #[pymodule_export]
    use crate::py::snapshot::{SnapshotReader, SnapshotStore};
    #[pymodule_export]
    use crate::py::versions::compare_versions;

    /// `__version__` (Cargo.toml's version, the one the wheel's metadata carries too)
    /// and the exception classes with two bases (`BuildTimeout`, `FlashTimeout`,
    /// `ServiceUnavailable`, `MoonrakerUnavailable`).
    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        crate::py::errors::add_combined_classes(m)
    }
}
