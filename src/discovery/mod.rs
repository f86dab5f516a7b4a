//! Finding serial devices under the device root and sysfs, and finding them again after
//! they re-enumerate.

mod glob;

pub use glob::{glob_match, has_wildcard};
