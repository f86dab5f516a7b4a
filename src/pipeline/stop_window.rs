//! The stop window: stop klipper once, flash every built device in safe order, start
//! klipper again exactly once.
//!
//! Everything between the stop and the restart runs while the service's guard is alive:
//! any early exit or panic restarts klipper. A failing device never stops the others.
//! The devices are flashed in the groups of `flash_order` (one group in safe order unless
//! `flash_parallel`); each device's events carry its key. The stop, flashing and start
//! parts of the outage are recorded here; `verify` adds klippy's start-up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{emit, flash_order, warn, Built, Deps, DeviceInfo, Report};
use crate::events::{Event, Level, Sink, Stage};
use crate::flash;
use crate::process::Cancel;

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
            deps.watchdog.disarm();
            return None;
        }
    };
    report.service.stopped = true;
    report.service.stop_s = tenths(stopped_at.elapsed());
    // Everything below runs with the guard alive: any early exit or panic restarts.
    let flashing_at = Instant::now();
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
        flash_one(deps, &devices[*i], b, (n, built.len()), cancel, sink)
    });
    for (pos, outcome) in outcomes {
        record(report, built[pos].0, outcome);
    }
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
    let result = deps.flasher.flash(dev, b, cancel, &sink);
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
fn record(report: &mut Report, i: usize, outcome: Outcome) {
    let r = &mut report.devices[i];
    match outcome {
        Outcome::NotStarted => {
            report.cancelled = true;
            r.reason = "cancelled before flashing".into();
        }
        Outcome::Flashed { method, seconds } => {
            r.flash_s = Some(seconds);
            r.flash = "pass".into();
            r.method = method.as_str().into();
        }
        Outcome::Failed { failure, seconds } => {
            if matches!(failure.error, flash::Error::Cancelled) {
                report.cancelled = true;
            }
            r.flash_s = Some(seconds);
            r.flash = "fail".into();
            if let Some(last) = failure.tried.last() {
                r.method = last.as_str().into();
            }
            r.error = Some(failure.error.to_string());
            r.hint = failure.hint;
        }
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
fn record_flashed(deps: &Deps, key: &str, built: &Built, sink: &Sink) {
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
