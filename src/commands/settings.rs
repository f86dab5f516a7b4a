//! `kflash settings` and `kflash settings set KEY VALUE`.
//!
//! A rejected value changes nothing: `Settings::set` validates before the registry is
//! saved (atomically).

use std::collections::BTreeMap;

use super::{Context, Error};
use crate::registry::{Registry, Settings};

impl Context {
    /// Every setting as text.
    pub fn settings(&self) -> Result<BTreeMap<String, String>, Error> {
        settings_map(&self.registry()?)
    }

    /// Change one setting (validated) and save.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<BTreeMap<String, String>, Error> {
        let mut reg = self.registry()?;
        reg.settings.set(key, value)?;
        reg.save(&self.state)?;
        settings_map(&reg)
    }
}

fn settings_map(reg: &Registry) -> Result<BTreeMap<String, String>, Error> {
    Settings::keys()
        .iter()
        .map(|k| Ok(((*k).to_owned(), reg.settings.get(k)?)))
        .collect()
}
