//! The stop window: stop klipper once, flash every built device in safe order, start
//! klipper again exactly once.
//!
//! Everything between the stop and the restart runs while the service's guard is alive:
//! any early exit or panic restarts klipper. A failing device never stops the others.

use std::time::{Duration, Instant};

use super::{emit, warn, Built, Deps, DeviceInfo, Link, Report};
use crate::events::{Event, Level, Sink, Stage};
use crate::flash;
use crate::process::Cancel;

pub(super) fn stop_window(
    deps: &Deps,
    devices: &[DeviceInfo],
    built: &[(usize, Built)],
    report: &mut Report,
    cancel: &Cancel,
    sink: &Sink,
) {
    if let Err(e) = deps.watchdog.arm() {
        // No watchdog, no stop: a killed runner would leave klipper down.
        return not_stopped(
            report,
            built,
            sink,
            &format!("the watchdog could not be armed: {e}"),
        );
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
            return;
        }
    };
    report.service.stopped = true;
    report.service.stop_s = tenths(stopped_at.elapsed());
    // Everything below runs with the guard alive: any early exit or panic restarts.
    let mut order: Vec<&(usize, Built)> = built.iter().collect();
    order.sort_by_key(|(i, _)| devices[*i].target.as_ref().map_or(Link::Serial, |t| t.link));
    let total = order.len();
    for (n, (i, b)) in order.into_iter().enumerate() {
        let dev = &devices[*i];
        if cancel.is_cancelled() {
            report.cancelled = true;
            report.devices[*i].reason = "cancelled before flashing".into();
            continue;
        }
        if n > 0 && !deps.stagger.is_zero() {
            std::thread::sleep(deps.stagger);
        }
        sink(
            &Event::info(
                Stage::Flash,
                Some(&dev.key),
                format!("flashing ({}/{total})", n + 1),
            )
            .with_fraction(n as f64 / total as f64),
        );
        let r = &mut report.devices[*i];
        let started = std::time::Instant::now();
        let result = deps.flasher.flash(dev, b, cancel, sink);
        r.flash_s = Some((started.elapsed().as_secs_f64() * 100.0).round() / 100.0);
        match result {
            Ok(done) => {
                record_flashed(deps, &dev.key, b, sink);
                r.flash = "pass".into();
                r.method = done.method.as_str().into();
                emit(sink, Stage::Flash, Some(&dev.key), "flashed");
            }
            Err(failure) => {
                if matches!(failure.error, flash::Error::Cancelled) {
                    report.cancelled = true;
                }
                r.flash = "fail".into();
                if let Some(last) = failure.tried.last() {
                    r.method = last.as_str().into();
                }
                r.error = Some(failure.error.to_string());
                r.hint = failure.hint;
                sink(
                    &Event::info(
                        Stage::Flash,
                        Some(&dev.key),
                        format!("flash failed: {}", failure.error),
                    )
                    .with_level(Level::Error),
                );
            }
        }
    }
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
    report.service.downtime_s = tenths(stopped_at.elapsed());
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
fn tenths(d: Duration) -> f64 {
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
