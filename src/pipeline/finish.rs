//! Finishing a board on a signal: the one place that decides what an interrupt means
//! while a board is being written.
//!
//! The first interrupt (Ctrl+C, SIGTERM, SIGHUP) lets the board being written finish —
//! bounded by the flasher's time limit for one board — and the stop window then starts
//! klipper; a second interrupt abandons the board (and says so). The flasher is handed
//! `Cancel::finishing`, which trips only on the second level; a watcher thread tells the
//! user what is happening and escalates to `abandon` when the bound is exceeded.
//!
//! Thread-safety: `flash_finishing` blocks its thread; its watcher is a scoped thread
//! that ends with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Built, Deps, DeviceInfo};
use crate::events::{Event, Level, Sink, Stage};
use crate::flash;
use crate::process::Cancel;

/// How often the watcher looks at the cancel request.
const WATCH: Duration = Duration::from_millis(50);

/// Flash one device so that a first interrupt finishes it and a second abandons it.
pub(super) fn flash_finishing(
    deps: &Deps,
    dev: &DeviceInfo,
    built: &Built,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<flash::Flashed, flash::Failure> {
    let finishing = cancel.finishing();
    let done = AtomicBool::new(false);
    let bound = deps.flasher.finish_timeout();
    std::thread::scope(|scope| {
        scope.spawn(|| watch(&dev.key, cancel, &done, bound, sink));
        // Set also when the flasher panics, so the watcher ends and the panic unwinds.
        let _done = Done(&done);
        deps.flasher.flash(dev, built, &finishing, sink)
    })
}

/// Marks the flash as over when dropped.
struct Done<'a>(&'a AtomicBool);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn warn(sink: &Sink, key: &str, msg: String) {
    sink(&Event::info(Stage::Flash, Some(key), msg).with_level(Level::Warning));
}

/// Tell the user about the first and the second interrupt; abandon the board when
/// finishing it takes longer than `bound`.
fn watch(key: &str, cancel: &Cancel, done: &AtomicBool, bound: Duration, sink: &Sink) {
    let mut asked: Option<Instant> = None;
    while !done.load(Ordering::SeqCst) {
        if cancel.is_abandoned() {
            warn(
                sink,
                key,
                format!("interrupted again: abandoning {key}; it may be left in its bootloader"),
            );
            return;
        }
        match asked {
            None if cancel.is_cancelled() => {
                asked = Some(Instant::now());
                warn(
                    sink,
                    key,
                    format!(
                        "interrupted: finishing {key} first (at most {} s), then klipper starts \
                         again; interrupt again to abandon it",
                        bound.as_secs()
                    ),
                );
            }
            Some(at) if at.elapsed() >= bound => {
                warn(
                    sink,
                    key,
                    format!(
                        "{key} did not finish within {} s: abandoning it",
                        bound.as_secs()
                    ),
                );
                cancel.abandon();
                return;
            }
            _ => {}
        }
        std::thread::sleep(WATCH);
    }
}
