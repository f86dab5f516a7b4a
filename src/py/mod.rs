//! The thin PyO3 layer: the only module of the crate that uses pyo3.
//!
//! Owns the Python exception hierarchy and the conversion of every domain error into it,
//! plus the `#[pyclass]`/`#[pyfunction]` wrappers over the domain modules. Wrappers convert
//! inputs to owned Rust values, release the GIL (`py.detach`) around anything that can take
//! milliseconds, and re-attach periodically to call `py.check_signals()` in long waits.

pub mod engine;
pub mod errors;
pub mod katapult;
pub mod moonraker;
pub mod snapshot;
pub mod versions;
