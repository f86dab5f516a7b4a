//! Python bindings of `crate::versions`: version comparison for the extras and scripts.
//!
//! Pure, allocation-light functions; they hold the GIL only for microseconds.

use pyo3::prelude::*;

use crate::versions;

/// Compare the version an MCU reports (`mcu_version`) with the version of the firmware
/// kflash would build (the build's `klipper.dict`).
///
/// Returns ``"current"``, ``"outdated"``, ``"newer"`` (flashing would downgrade) or
/// ``"unknown"`` (the MCU did not identify: flash it). ``-dirty`` and the
/// ``-YYYYMMDD_HHMMSS-host`` suffix are ignored.
#[pyfunction]
pub fn compare_versions(mcu: &str, target: &str) -> &'static str {
    versions::compare(mcu, target).as_str()
}
