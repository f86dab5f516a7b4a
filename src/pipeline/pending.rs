//! The pending record and the recovery of boards a run left behind.
//!
//! Before klipper is stopped, a stop window writes `<state>/pending.json`: per device it
//! will write, the key, how it is reached and flashed, the image (kept in
//! `<state>/pending/<key>/`, so a later build cannot change it), and — for serial boards
//! — the stable identity (by-path, USB serial, USB port) that finds the board again in
//! its bootloader, where its by-id name and tty differ from printer.cfg's. The same
//! identities go to `<state>/identities.json` for every later command. A device leaves the
//! record once it is back running its firmware; when the window ends with none left, the
//! record is removed.
//!
//! A record still there means a run did not finish (SIGKILL, power loss, a board that did
//! not come back). [`recover`] looks for each recorded board by its stable identity: one
//! in Katapult gets the recorded image written (and is back), one running its firmware is
//! done, one in a ROM loader or nowhere is left in the record with a hint for the next
//! run. flash-all calls it first; the watchdog calls it (through
//! `commands::Context::recover`) before it starts klipper after the runner died.
//!
//! Invariants: every write is atomic; a record that cannot be written before the stop
//! means nothing is stopped; `recover` never stops or starts klipper (its caller does).
//! Thread-safety: called with the run lock held (one writer).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::finish::flash_finishing;
use super::{emit, report, warn, Bootloader, Built, Deps, DeviceInfo, Link, Target};
use crate::discovery::{Identity, RomBoard};
use crate::events::{Sink, Stage};
use crate::firmware::kept;
use crate::flash::{Endpoint, Method};
use crate::process::Cancel;
use crate::registry::{write_atomic, StateDir};

const SCHEMA: u32 = 1;

/// Where a recorded device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// Not touched yet.
    Waiting,
    /// Being written (it may sit in its bootloader).
    Writing,
}

/// One device of the pending record: everything needed to flash it without the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDevice {
    pub key: String,
    pub method: Method,
    pub endpoint: Endpoint,
    pub baud: Option<u32>,
    pub mcu_section: String,
    pub config: PathBuf,
    pub mcu: String,
    pub link: Link,
    /// The image to write (in `pending/<key>/`) and the version it reports.
    pub image: PathBuf,
    pub version: String,
    /// How to find a serial board again (empty for CAN and linux).
    #[serde(default)]
    pub identity: Identity,
    pub progress: Progress,
}

impl PendingDevice {
    fn device(&self) -> DeviceInfo {
        DeviceInfo {
            key: self.key.clone(),
            name: None,
            method: self.method,
            endpoint: self.endpoint.clone(),
            baud: self.baud,
            mcu_section: self.mcu_section.clone(),
            config: self.config.clone(),
            target: Ok(Target {
                mcu: self.mcu.clone(),
                link: self.link,
            }),
        }
    }

    fn built(&self) -> Built {
        Built {
            version: self.version.clone(),
            out_dir: self
                .image
                .parent()
                .map_or_else(PathBuf::new, Path::to_path_buf),
            image: self.image.clone(),
            cached: true,
        }
    }
}

/// `pending.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub version: u32,
    /// When the run that wrote it started (UTC).
    pub started: String,
    pub devices: Vec<PendingDevice>,
}

/// What the recovery did with one recorded board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recovered {
    pub key: String,
    /// `flashed` (it was in Katapult and got the recorded image), `running` (it runs its
    /// firmware: nothing to do), `left` (it could not be finished: see `hint`).
    pub outcome: &'static str,
    /// The version written (`flashed`) or that would have been.
    pub version: String,
    pub detail: String,
    pub hint: Option<String>,
}

/// The pending record, if a run left one.
pub fn load(state: &StateDir) -> Option<Pending> {
    let bytes = std::fs::read(state.pending_json()).ok()?;
    let pending: Pending = serde_json::from_slice(&bytes).ok()?;
    (pending.version == SCHEMA).then_some(pending)
}

fn save(state: &StateDir, pending: &Pending) -> io::Result<()> {
    if pending.devices.is_empty() {
        match std::fs::remove_file(state.pending_json()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        return kept::forget(&state.root().join("pending"));
    }
    std::fs::create_dir_all(state.root())?;
    let mut bytes = serde_json::to_vec_pretty(pending).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(&state.pending_json(), &bytes)
}

/// `identities.json`: `{"version": 1, "devices": {key: identity}}`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Identities {
    version: u32,
    devices: BTreeMap<String, Identity>,
}

/// Every kept board identity (empty when none was kept yet).
pub fn identities(state: &StateDir) -> BTreeMap<String, Identity> {
    std::fs::read(state.identities_json())
        .ok()
        .and_then(|b| serde_json::from_slice::<Identities>(&b).ok())
        .filter(|i| i.version == SCHEMA)
        .map(|i| i.devices)
        .unwrap_or_default()
}

fn keep_identities(state: &StateDir, fresh: &BTreeMap<String, Identity>) -> io::Result<()> {
    let mut all = identities(state);
    let before = all.clone();
    all.extend(fresh.iter().map(|(k, v)| (k.clone(), v.clone())));
    if all == before {
        return Ok(());
    }
    std::fs::create_dir_all(state.root())?;
    let mut bytes = serde_json::to_vec_pretty(&Identities {
        version: SCHEMA,
        devices: all,
    })
    .map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(&state.identities_json(), &bytes)
}

/// Before the stop: keep each image and identity, and write the record.
pub(super) fn record(
    deps: &Deps,
    devices: &[DeviceInfo],
    built: &[(usize, Built)],
) -> io::Result<Pending> {
    let now = report::utc_now();
    let mut fresh = BTreeMap::new();
    let mut out = Vec::new();
    for (i, b) in built {
        let dev = &devices[*i];
        let Ok(target) = &dev.target else { continue };
        let image = kept::keep(&b.image, &deps.state.pending_image_dir(&dev.key), &now)?;
        let identity = deps.inventory.identity(dev).unwrap_or_default();
        if !identity.is_empty() {
            fresh.insert(dev.key.clone(), identity.clone());
        }
        out.push(PendingDevice {
            key: dev.key.clone(),
            method: dev.method,
            endpoint: dev.endpoint.clone(),
            baud: dev.baud,
            mcu_section: dev.mcu_section.clone(),
            config: dev.config.clone(),
            mcu: target.mcu.clone(),
            link: target.link,
            image: image.image,
            version: b.version.clone(),
            identity,
            progress: Progress::Waiting,
        });
    }
    keep_identities(&deps.state, &fresh)?;
    let pending = Pending {
        version: SCHEMA,
        started: now,
        devices: out,
    };
    save(&deps.state, &pending)?;
    Ok(pending)
}

impl Pending {
    /// Mark a device as being written (it may now sit in its bootloader).
    pub(super) fn writing(&mut self, deps: &Deps, key: &str, sink: &Sink) {
        if let Some(d) = self.devices.iter_mut().find(|d| d.key == key) {
            d.progress = Progress::Writing;
        }
        self.store(deps, key, sink);
    }

    /// A device is back running its firmware: it leaves the record.
    pub(super) fn done(&mut self, deps: &Deps, key: &str, sink: &Sink) {
        self.devices.retain(|d| d.key != key);
        self.store(deps, key, sink);
    }

    /// The stop window ends: boards it never touched leave the record (they run their
    /// firmware); what is left had a write begun and did not come back.
    pub(super) fn finish(&mut self, deps: &Deps, sink: &Sink) {
        self.devices.retain(|d| d.progress == Progress::Writing);
        if let Err(e) = save(&deps.state, self) {
            warn(
                sink,
                Stage::Restart,
                None,
                format!(
                    "could not update the pending record {}: {e}",
                    deps.state.pending_json().display()
                ),
            );
        }
    }

    fn store(&self, deps: &Deps, key: &str, sink: &Sink) {
        if let Err(e) = save(&deps.state, self) {
            warn(
                sink,
                Stage::Flash,
                Some(key),
                format!(
                    "could not update the pending record {}: {e}",
                    deps.state.pending_json().display()
                ),
            );
        }
    }
}

/// A short recovery hint for a board left in a ROM loader or not found.
fn left_hint(deps: &Deps, rec: &PendingDevice, rom: Option<&RomBoard>) -> Option<String> {
    deps.flasher
        .hint(&rec.device(), Some(&rec.built()), rom.map(|r| r.loader))
}

/// Find every board the pending record lists and finish what can be finished: a board in
/// Katapult gets the recorded image. Leaves in the record only the boards it could not
/// finish. Does not stop or start klipper. See the module doc.
pub fn recover(deps: &Deps, cancel: &Cancel, sink: &Sink) -> Vec<Recovered> {
    let Some(mut pending) = load(&deps.state) else {
        return Vec::new();
    };
    emit(
        sink,
        Stage::Preflight,
        None,
        format!(
            "a run started {} did not finish: looking for its boards",
            pending.started
        ),
    );
    let mut out = Vec::new();
    for rec in pending.devices.clone() {
        if cancel.is_cancelled() {
            break;
        }
        let dev = rec.device();
        let entry = |outcome, detail: String, hint| Recovered {
            key: rec.key.clone(),
            outcome,
            version: rec.version.clone(),
            detail,
            hint,
        };
        let whereabouts = deps.inventory.bootloader(&dev);
        let result = match (&whereabouts, rec.link) {
            (Some(Bootloader::Katapult { path }), _) => {
                emit(
                    sink,
                    Stage::Preflight,
                    Some(&rec.key),
                    format!(
                        "{} is in its bootloader ({path}): writing {}",
                        rec.key, rec.version
                    ),
                );
                Some(flash_finishing(deps, &dev, &rec.built(), cancel, sink))
            }
            (Some(Bootloader::RomLoader(rom)), _) => {
                out.push(entry(
                    "left",
                    format!("{} is in its bootloader ({})", rec.key, rom.describe()),
                    left_hint(deps, &rec, Some(rom)),
                ));
                continue;
            }
            // Unseen links: write again what was being written (harmless when it landed).
            (None, Link::Can | Link::Linux) if rec.progress == Progress::Writing => {
                Some(flash_finishing(deps, &dev, &rec.built(), cancel, sink))
            }
            (None, _) => None,
        };
        match result {
            Some(Ok(_)) => {
                super::stop_window::record_flashed(deps, &rec.key, &rec.built(), sink);
                pending.done(deps, &rec.key, sink);
                out.push(entry(
                    "flashed",
                    format!(
                        "{} was back in its bootloader: flashed {}",
                        rec.key, rec.version
                    ),
                    None,
                ));
            }
            Some(Err(failure)) => out.push(entry(
                "left",
                format!("{} could not be flashed: {}", rec.key, failure.error),
                failure.hint.or_else(|| left_hint(deps, &rec, None)),
            )),
            None => match deps.inventory.resolve(&dev) {
                Ok(_) => {
                    pending.done(deps, &rec.key, sink);
                    out.push(entry(
                        "running",
                        format!("{} runs its firmware", rec.key),
                        None,
                    ));
                }
                Err(e) => out.push(entry(
                    "left",
                    format!("{} was not found: {e}", rec.key),
                    left_hint(deps, &rec, None),
                )),
            },
        }
    }
    for r in &out {
        if r.outcome == "left" {
            warn(sink, Stage::Preflight, Some(&r.key), r.detail.clone());
        } else {
            emit(sink, Stage::Preflight, Some(&r.key), r.detail.clone());
        }
    }
    out
}
