//! The stop window: stop klipper once, flash every built device in safe order, start
//! klipper again exactly once.
//!
//! Everything between the stop and the restart runs while the service's guard is alive:
//! any early exit or panic restarts klipper. A failing device never stops the others.
//! Before the stop the pending record is written (`pending`): nothing is stopped without
//! it. A first interrupt finishes the board being written (`finish`), skips the rest
//! (each with a hint) and restarts; after a USB-CAN bridge the CAN interfaces are waited
//! for, so klippy finds the nodes behind it.

use std::time::{Duration, Instant};

use super::finish::flash_finishing;
use super::pending;
use super::{emit, warn, Built, Deps, DeviceInfo, DeviceReport, InterfaceState, Link, Report};
use crate::events::{Event, Level, Sink, Stage};
use crate::flash;
use crate::process::Cancel;

/// How long the CAN interfaces may take to come back after a USB-CAN bridge was flashed.
const CAN_COMEBACK: Duration = Duration::from_secs(20);

pub(super) fn stop_window(
    deps: &Deps,
    devices: &[DeviceInfo],
    built: &[(usize, Built)],
    report: &mut Report,
    cancel: &Cancel,
    sink: &Sink,
) {
    if let Err(e) = deps.watchdog.arm() {
        warn(sink, Stage::Stop, None, format!("watchdog not armed: {e}"));
    }
    // The safety net first: without it a crash could leave a board nobody finishes.
    let mut pending = match pending::record(deps, devices, built) {
        Ok(pending) => pending,
        Err(e) => {
            let why = format!(
                "could not write the pending record {} ({e}): klipper was not stopped",
                deps.state.pending_json().display()
            );
            report.service.error = Some(why.clone());
            for (i, _) in built {
                report.devices[*i].flash = "fail".into();
                report.devices[*i].error = Some(why.clone());
            }
            deps.watchdog.disarm();
            return;
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
            pending.finish(deps, sink);
            deps.watchdog.disarm();
            return;
        }
    };
    report.service.stopped = true;
    report.service.stop_s = tenths(stopped_at.elapsed());
    // Everything below runs with the guard alive: any early exit or panic restarts.
    let mut order: Vec<&(usize, Built)> = built.iter().collect();
    order.sort_by_key(|(i, _)| link_of(&devices[*i]));
    let total = order.len();
    for (n, (i, b)) in order.into_iter().enumerate() {
        let dev = &devices[*i];
        if cancel.is_cancelled() {
            report.cancelled = true;
            let r = &mut report.devices[*i];
            r.reason = "cancelled before flashing".into();
            r.hint = Some(flash::not_flashed_hint(&dev.key));
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
        pending.writing(deps, &dev.key, sink);
        flash_device(deps, dev, b, &mut report.devices[*i], cancel, sink);
        if cancel.is_cancelled() {
            report.cancelled = true;
        }
        if report.devices[*i].flash == "pass" {
            pending.done(deps, &dev.key, sink);
            if link_of(dev) == Link::UsbCanBridge {
                wait_for_can_interfaces(deps, &dev.key, sink);
            }
        }
    }
    pending.finish(deps, sink);
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

/// Flash one device inside the window (a first interrupt finishes it) and put the
/// outcome into its report entry.
fn flash_device(
    deps: &Deps,
    dev: &DeviceInfo,
    built: &Built,
    r: &mut DeviceReport,
    cancel: &Cancel,
    sink: &Sink,
) {
    let started = Instant::now();
    let result = flash_finishing(deps, dev, built, cancel, sink);
    r.flash_s = Some((started.elapsed().as_secs_f64() * 100.0).round() / 100.0);
    match result {
        Ok(done) => {
            record_flashed(deps, &dev.key, built, sink);
            r.flash = "pass".into();
            r.method = done.method.as_str().into();
            emit(sink, Stage::Flash, Some(&dev.key), "flashed");
        }
        Err(failure) => {
            let abandoned = matches!(failure.error, flash::Error::Cancelled);
            r.flash = "fail".into();
            if let Some(last) = failure.tried.last() {
                r.method = last.as_str().into();
            }
            r.error = Some(if abandoned {
                "abandoned: interrupted again while it was being written".into()
            } else {
                failure.error.to_string()
            });
            r.hint = if abandoned {
                Some(flash::in_katapult_hint())
            } else {
                failure.hint
            };
            sink(
                &Event::info(
                    Stage::Flash,
                    Some(&dev.key),
                    format!("flash failed: {}", r.error.as_deref().unwrap_or_default()),
                )
                .with_level(Level::Error),
            );
        }
    }
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

/// Seconds rounded to a tenth, as reports show them.
fn tenths(d: Duration) -> f64 {
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
