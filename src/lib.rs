//! kflash's Rust core, compiled as the Python extension `kflash._core`.
//!
//! Domain modules are plain Rust and never touch pyo3; `py/` is the only layer that does.
//! - `events`: typed progress events and the one callback they go through.
//! - `process`: running external commands safely (process groups, deadlines, output tails).
//! - `snapshot`: the lock-free status snapshot store and its shared-memory mirror.
//!
//! The `#[pymodule]` below only declares what Python sees; the classes and functions live in
//! `py/`.

pub mod events;
pub mod process;
pub mod py;
pub mod snapshot;

use pyo3::prelude::*;

/// kflash's native core: build and flash every MCU of a Klipper printer.
#[pymodule]
mod _core {
    #[pymodule_export]
    use crate::py::errors::{
        BuildError, CommandTimeout, ConfigError, DeviceNotFound, FlashError, KflashError,
        PreflightRefused, RegistryError, ServiceError,
    };
    #[pymodule_export]
    use crate::py::snapshot::{SnapshotReader, SnapshotStore};
}
