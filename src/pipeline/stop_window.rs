//! The stop window: stop klipper once, flash every built device, start klipper again
//! exactly once.
//!
//! Everything between the stop and the restart runs while the service's guard is alive:
//! any early exit or panic restarts klipper. A failing device never stops the others.
//! Before the stop the pending record is written (`pending`): nothing is stopped without
//! it. The devices are flashed in the groups of `flash_order` (one group in safe order
//! unless `flash_parallel`); each device's events carry its key. A first interrupt
//! finishes the boards being written (`finish`), skips the rest (each with a hint) and
//! restarts; after a USB-CAN bridge the CAN interfaces are waited for, so klippy finds the
//! nodes behind it. The stop, flashing and start parts of the outage are recorded here;
//! `verify` adds klippy's start-up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::finish::flash_finishing;
use super::pending::{self, Pending};
use super::{emit, flash_order, warn, Built, Deps, DeviceInfo, InterfaceState, Link, Report};
use crate::events::{Event, Level, Sink, Stage};
use crate::flash;
use crate::process::Cancel;

/// How long the CAN interfaces may take to come back after a USB-CAN bridge was flashed.
const CAN_COMEBACK: Duration = Duration::from_secs(20);

/// Stop, flash, start. Returns when the stop was asked for (the outage's start), or
/// `None` when klipper could not be stopped.
pub(super) fn stop_window(
    deps: &Deps,
    devices: &[DeviceInfo],
    built: &[(usize, Built)],
    report: &mut Report,
    cancel: &Cancel,
    sink: &Sink,
) -> Option<Instant> {
    if let Err(e) = deps.watchdog.arm() {
        // No watchdog, no stop: a killed runner would leave klipper down.
        not_stopped(
            report,
            built,
            sink,
            &format!("the watchdog could not be armed: {e}"),
        );
        return None;
    }
    // The safety net first: without it a crash could leave a board nobody finishes.
    let pending = match pending::record(deps, devices, built) {
        Ok(pending) => Mutex::new(pending),
        Err(e) => {
            not_stopped(
                report,
                built,
                sink,
                &format!(
                    "could not write the pending record {} ({e})",
                    deps.state.pending_json().display()
                ),
            );
            deps.watchdog.disarm();
            return None;
        }
    };
    emit(sink, Stage::Stop, None, "stopping klipper");
    let stopped_at = Instant::now();
    let guard = match deps.service.stop() {
        Ok(guard) => guard,
        Err(e) => {
            // A failed stop may have half-stopped it: make sure it runs.
            report.service.error = Some(format!("could not stop klipper: {e}"));
            for (i, _) in built {
                report.devices[*i].flash = "fail".into();
                report.devices[*i].error = Some("klipper could not be stopped".into());
            }
            lock(&pending).finish(deps, sink);
            deps.watchdog.disarm();
            return None;
        }
    };
    report.service.stopped = true;
    report.service.stop_s = tenths(stopped_at.elapsed());
    // Everything below runs with the guard alive: any early exit or panic restarts.
    let flashing_at = Instant::now();
    flash_built(deps, devices, built, report, &pending, cancel, sink);
    report.service.flash_s = tenths(flashing_at.elapsed());
    emit(sink, Stage::Restart, None, "starting klipper");
    let starting_at = Instant::now();
    let restarted = guard.restart();
    report.service.start_s = tenths(starting_at.elapsed());
    match restarted {
        Ok(_) => {
            report.service.restarted = true;
            deps.watchdog.disarm();
        }
        Err(e) => {
            // Leave the watchdog armed: it keeps trying after we are gone.
            report.service.error = Some(e.to_string());
            sink(
                &Event::info(
                    Stage::Restart,
                    None,
                    format!("KLIPPER COULD NOT BE RESTARTED: {e}"),
                )
                .with_level(Level::Error),
            );
        }
    }
    // Until klippy is ready, verify extends it.
    report.service.downtime_s = tenths(stopped_at.elapsed());
    Some(stopped_at)
}

/// Flash every built device in its `flash_order` group, the pending record kept up to
/// date; each outcome goes into the report.
fn flash_built(
    deps: &Deps,
    devices: &[DeviceInfo],
    built: &[(usize, Built)],
    report: &mut Report,
    pending: &Mutex<Pending>,
    cancel: &Cancel,
    sink: &Sink,
) {
    let groups = flash_order::groups(devices, built, deps.flash_parallel);
    if groups.len() > 1 {
        emit(
            sink,
            Stage::Flash,
            None,
            format!(
                "flashing {} devices in {} groups at once (flash_parallel)",
                built.len(),
                groups.len()
            ),
        );
    }
    let started = AtomicUsize::new(0);
    let outcomes = flash_order::run(&groups, |pos, first| {
        let (i, b) = &built[pos];
        if cancel.is_cancelled() {
            return Outcome::NotStarted;
        }
        if !first && !deps.stagger.is_zero() {
            std::thread::sleep(deps.stagger);
        }
        let n = started.fetch_add(1, Ordering::SeqCst);
        let dev = &devices[*i];
        lock(pending).writing(deps, &dev.key, sink);
        let outcome = flash_one(deps, dev, b, (n, built.len()), cancel, sink);
        if matches!(outcome, Outcome::Flashed { .. }) {
            lock(pending).done(deps, &dev.key, sink);
            if link_of(dev) == Link::UsbCanBridge {
                wait_for_can_interfaces(deps, &dev.key, sink);
            }
        }
        outcome
    });
    for (pos, outcome) in outcomes {
        let i = built[pos].0;
        record(report, i, &devices[i].key, outcome);
    }
    if cancel.is_cancelled() {
        report.cancelled = true;
    }
    lock(pending).finish(deps, sink);
}

/// How flashing one device ended.
enum Outcome {
    /// Cancelled before its turn.
    NotStarted,
    Flashed {
        method: flash::Method,
        seconds: f64,
    },
    Failed {
        failure: flash::Failure,
        seconds: f64,
    },
}

/// Flash one device (`n` of `total` started); its events carry its key.
fn flash_one(
    deps: &Deps,
    dev: &DeviceInfo,
    b: &Built,
    (n, total): (usize, usize),
    cancel: &Cancel,
    sink: &Sink,
) -> Outcome {
    let sink = device_sink(sink, &dev.key);
    sink(
        &Event::info(
            Stage::Flash,
            Some(&dev.key),
            format!("flashing ({}/{total})", n + 1),
        )
        .with_fraction(n as f64 / total as f64),
    );
    let started = Instant::now();
    // A first interrupt lets this board finish; a second abandons it.
    let result = flash_finishing(deps, dev, b, cancel, &sink);
    let seconds = (started.elapsed().as_secs_f64() * 100.0).round() / 100.0;
    match result {
        Ok(done) => {
            record_flashed(deps, &dev.key, b, &sink);
            emit(&sink, Stage::Flash, Some(&dev.key), "flashed");
            Outcome::Flashed {
                method: done.method,
                seconds,
            }
        }
        Err(failure) => {
            sink(
                &Event::info(
                    Stage::Flash,
                    Some(&dev.key),
                    format!("flash failed: {}", failure.error),
                )
                .with_level(Level::Error),
            );
            Outcome::Failed { failure, seconds }
        }
    }
}

/// Put one device's outcome into the report.
fn record(report: &mut Report, i: usize, key: &str, outcome: Outcome) {
    let r = &mut report.devices[i];
    match outcome {
        Outcome::NotStarted => {
            report.cancelled = true;
            r.reason = "cancelled before flashing".into();
            r.hint = Some(flash::not_flashed_hint(key));
        }
        Outcome::Flashed { method, seconds } => {
            r.flash_s = Some(seconds);
            r.flash = "pass".into();
            r.method = method.as_str().into();
        }
        Outcome::Failed { failure, seconds } => {
            let abandoned = matches!(failure.error, flash::Error::Cancelled);
            report.cancelled |= abandoned;
            r.flash_s = Some(seconds);
            r.flash = "fail".into();
            if let Some(last) = failure.tried.last() {
                r.method = last.as_str().into();
            }
            if abandoned {
                r.error = Some("abandoned: interrupted again while it was being written".into());
                r.hint = Some(flash::in_katapult_hint());
            } else {
                r.error = Some(failure.error.to_string());
                r.hint = failure.hint;
            }
        }
    }
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn link_of(dev: &DeviceInfo) -> Link {
    dev.target.as_ref().map_or(Link::Serial, |t| t.link)
}

/// After a USB-CAN bridge was flashed: wait until the CAN interfaces of the registered
/// CAN devices are back up (the bridge's reset takes them down), so klippy finds the
/// nodes behind it when it starts. Bounded; a warning says what to do when one stays down.
fn wait_for_can_interfaces(deps: &Deps, bridge: &str, sink: &Sink) {
    let mut names: Vec<String> = deps
        .inventory
        .devices()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|d| match d.endpoint {
            flash::Endpoint::Can { interface, .. } => Some(interface),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return;
    }
    emit(
        sink,
        Stage::Flash,
        Some(bridge),
        format!("waiting for {} to come back up", names.join(", ")),
    );
    let deadline = Instant::now() + CAN_COMEBACK;
    loop {
        let down: Vec<&String> = names
            .iter()
            .filter(|n| deps.inventory.interface(n) != InterfaceState::Up)
            .collect();
        if down.is_empty() {
            emit(sink, Stage::Flash, Some(bridge), "CAN interfaces are up");
            return;
        }
        if Instant::now() >= deadline {
            let list: Vec<&str> = down.iter().map(|s| s.as_str()).collect();
            warn(
                sink,
                Stage::Flash,
                Some(bridge),
                format!(
                    "{} did not come back up within {} s after the bridge was flashed: klippy \
                     will not reach the CAN nodes behind it (`ip -details link show {}` shows \
                     why)",
                    list.join(", "),
                    CAN_COMEBACK.as_secs(),
                    list[0]
                ),
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A sink that labels every event with the device being flashed (the flashers name the
/// port they talk to), so parallel progress reads one line per board.
fn device_sink(sink: &Sink, key: &str) -> Sink {
    let sink = sink.clone();
    let key = key.to_owned();
    Arc::new(move |event: &Event| {
        if event.device.as_deref() == Some(key.as_str()) {
            sink(event);
        } else {
            let mut event = event.clone();
            event.device = Some(key.clone());
            sink(&event);
        }
    })
}

/// klipper was not stopped because of `why`: the built devices are not flashed.
fn not_stopped(report: &mut Report, built: &[(usize, Built)], sink: &Sink, why: &str) {
    warn(
        sink,
        Stage::Stop,
        None,
        format!("klipper was not stopped: {why}"),
    );
    report.service.error = Some(format!("klipper was not stopped: {why}"));
    for (i, _) in built {
        report.devices[*i].flash = "fail".into();
        report.devices[*i].error = Some(format!("not flashed: {why}"));
    }
}

/// Seconds rounded to a tenth, as reports show them.
pub(super) fn tenths(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// Keep the dictionary of what was just flashed to a device (best effort).
pub(super) fn record_flashed(deps: &Deps, key: &str, built: &Built, sink: &Sink) {
    let dict = built.image.with_file_name("klipper.dict");
    let result = std::fs::read(&dict).and_then(|bytes| {
        std::fs::create_dir_all(&deps.flashed_dir)?;
        crate::registry::write_atomic(&deps.flashed_dir.join(format!("{key}.dict")), &bytes)
    });
    if let Err(e) = result {
        warn(
            sink,
            Stage::Flash,
            Some(key),
            format!(
                "could not keep the flashed dictionary {}: {e}",
                dict.display()
            ),
        );
    }
}
