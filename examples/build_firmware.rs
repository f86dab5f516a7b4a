//! Build firmware for several devices with kflash's build engine, from the command line.
//!
//! `cargo run --example build_firmware -- --klipper DIR --builds DIR [--jobs N]
//! [--timeout SECS] KEY=CONFIG...` prints one JSON document: the wall time and, per device,
//! key, ok, cached, version, mcu, image, seconds and error. Used by benches/bench_build.py.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use _core::firmware::{build_all, BuildRequest};
use _core::process::Cancel;

fn main() -> ExitCode {
    let mut klipper = None;
    let mut builds = None;
    let mut jobs = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut timeout = Duration::from_secs(600);
    let mut devices = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--klipper" => klipper = args.next().map(PathBuf::from),
            "--builds" => builds = args.next().map(PathBuf::from),
            "--jobs" => jobs = args.next().and_then(|j| j.parse().ok()).unwrap_or(jobs),
            "--timeout" => {
                let secs = args.next().and_then(|t| t.parse().ok()).unwrap_or(600);
                timeout = Duration::from_secs(secs);
            }
            other => {
                let Some((key, config)) = other.split_once('=') else {
                    eprintln!("usage: build_firmware --klipper DIR --builds DIR KEY=CONFIG...");
                    return ExitCode::from(2);
                };
                devices.push((key.to_owned(), PathBuf::from(config)));
            }
        }
    }
    let (Some(klipper), Some(builds)) = (klipper, builds) else {
        eprintln!("--klipper and --builds are required");
        return ExitCode::from(2);
    };
    let reqs: Vec<BuildRequest> = devices
        .into_iter()
        .map(|(key, config)| BuildRequest {
            key,
            config,
            klipper_dir: klipper.clone(),
            builds_dir: builds.clone(),
            timeout,
        })
        .collect();
    let started = Instant::now();
    let results = build_all(&reqs, jobs, &Cancel::new(), &_core::events::discard());
    let wall = started.elapsed();
    let mut all_ok = true;
    let devices: Vec<serde_json::Value> = reqs
        .iter()
        .zip(&results)
        .map(|(req, result)| match result {
            Ok(fw) => serde_json::json!({
                "key": fw.key, "ok": true, "cached": fw.cached, "version": fw.version,
                "mcu": fw.mcu, "image": fw.image, "seconds": fw.duration.as_secs_f64(),
            }),
            Err(e) => {
                all_ok = false;
                serde_json::json!({"key": req.key, "ok": false, "error": e.to_string()})
            }
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({"seconds": wall.as_secs_f64(), "jobs": jobs, "devices": devices})
    );
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
