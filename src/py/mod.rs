//! The thin PyO3 layer: the only module of the crate that uses pyo3.
//!
//! Owns the Python exception hierarchy and the conversion of every domain error into it,
//! plus the `#[pyclass]`/`#[pyfunction]` wrappers over the domain modules. Wrappers convert
//! inputs to owned Rust values, release the GIL (`py.detach`) around anything that can take
//! milliseconds, and run long calls through the one worker loop (`worker`), which
//! re-attaches periodically to deliver progress and call `py.check_signals()`.

pub mod engine;
pub mod errors;
pub mod exit_status;
pub mod flash_run;
pub mod katapult;
pub mod moonraker;
pub mod snapshot;
pub mod versions;
pub mod worker;
