//! Session tests: an in-memory fake bootloader in virtual time (faults, sizes, progress).

use super::*;
use crate::events;
use crate::katapult::codec::Command;
use crate::katapult::fake::{collect, image_of, FakeBootloader, FakePort, Faults, MCU};
use crate::katapult::image::{image_info, tests::fake_image};
use std::sync::Arc;

/// Connect and flash through a fake port; the fake board comes back for inspection.
fn flash_fake(
    device: FakeBootloader,
    image: &[u8],
    dict: Option<&ImageInfo>,
    cancel: &Cancel,
    sink: &Sink,
) -> (Result<FlashReport, Error>, FakePort) {
    let mut port = FakePort::new(device);
    let result = {
        let mut s = Session::new(
            &mut port,
            Path::new("/dev/fake"),
            &Timing::default(),
            cancel,
        );
        s.connect(5, Duration::from_secs(2)).and_then(|info| {
            let checks = Checks {
                dictionary: dict,
                app_start: None,
            };
            flash_connected(&mut s, &info, image, &checks, Path::new("/dev/fake"), sink)
        })
    };
    (result, port)
}

fn board(port: &FakePort) -> std::sync::MutexGuard<'_, FakeBootloader> {
    port.device.lock().unwrap()
}

fn assert_holds(port: &FakePort, image: &[u8], block_size: usize) {
    let dev = board(port);
    assert_eq!(dev.read(0x0800_2000, image.len()), image);
    let padded = image.len().div_ceil(block_size) * block_size;
    assert!(dev
        .read(0x0800_2000 + image.len() as u32, padded - image.len())
        .iter()
        .all(|&b| b == 0xFF));
}

#[test]
fn flashes_and_verifies_every_size_and_block_size() {
    for bs in [64u32, 128, 256, 512] {
        for len in [1usize, 63, 64, 65, 4096, 4097] {
            let image = image_of(len);
            let (result, port) = flash_fake(
                FakeBootloader::new(MCU, bs),
                &image,
                None,
                &Cancel::new(),
                &events::discard(),
            );
            let report = result.unwrap_or_else(|e| panic!("bs {bs} len {len}: {e}"));
            assert_eq!(report.blocks, len.div_ceil(bs as usize));
            assert_eq!(report.bytes, len);
            assert!(report.completed);
            assert_holds(&port, &image, bs as usize);
            let dev = board(&port);
            assert!(dev.completed);
            let writes = dev
                .log
                .iter()
                .filter(|c| matches!(c, Command::SendBlock { .. }))
                .count();
            let reads = dev
                .log
                .iter()
                .filter(|c| matches!(c, Command::RequestBlock { .. }))
                .count();
            assert_eq!((writes, reads), (report.blocks, report.blocks));
            // The order a bootloader relies on: CONNECT, blocks, EOF, read-back, COMPLETE.
            assert_eq!(dev.log[0], Command::Connect);
            assert_eq!(dev.log[1 + writes], Command::SendEof);
            assert_eq!(dev.log.last(), Some(&Command::Complete));
        }
    }
}

#[test]
fn a_firmware_for_another_mcu_is_refused_before_anything_is_written() {
    let img = fake_image("rp2040", "v0.13.0-730-g84104bbbd", 6, 500);
    let dict = image_info(&img).unwrap();
    let (result, port) = flash_fake(
        FakeBootloader::new(MCU, 64),
        &img,
        Some(&dict),
        &Cancel::new(),
        &events::discard(),
    );
    let err = result.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::McuMismatch { .. }));
    assert!(text.contains("rp2040") && text.contains(MCU), "{text}");
    let dev = board(&port);
    assert!(dev.flash.is_empty());
    assert_eq!(
        dev.log,
        vec![Command::Connect, Command::Complete],
        "left for its old application"
    );
}

#[test]
fn the_matching_dictionary_is_accepted_and_its_version_reported() {
    let img = fake_image(MCU, "v0.13.0-730-g84104bbbd", 9, 2000);
    let dict = image_info(&img).unwrap();
    let (result, port) = flash_fake(
        FakeBootloader::new(MCU, 64),
        &img,
        Some(&dict),
        &Cancel::new(),
        &events::discard(),
    );
    let report = result.unwrap();
    assert_eq!(
        report.firmware_version.as_deref(),
        Some("v0.13.0-730-g84104bbbd")
    );
    assert_eq!(report.bootloader_version.as_deref(), Some("v0.0.1-fake"));
    assert_holds(&port, &img, 64);
}

#[test]
fn transient_faults_are_recovered_by_retries() {
    let cases: Vec<(&str, Faults)> = vec![
        (
            "nack",
            Faults {
                nack_every: Some(7),
                ..Faults::default()
            },
        ),
        (
            "dropped reply",
            Faults {
                drop_reply_every: Some(5),
                ..Faults::default()
            },
        ),
        (
            "dropped request",
            Faults {
                drop_request_every: Some(9),
                ..Faults::default()
            },
        ),
        (
            "bit error",
            Faults {
                corrupt_reply_every: Some(4),
                ..Faults::default()
            },
        ),
        (
            "slow erase",
            Faults {
                erase_delay: Duration::from_secs(4),
                ..Faults::default()
            },
        ),
        (
            "slower erase",
            Faults {
                erase_delay: Duration::from_secs(7),
                ..Faults::default()
            },
        ),
        (
            "wrong echo",
            Faults {
                wrong_echo_once: true,
                ..Faults::default()
            },
        ),
    ];
    let image = image_of(5000);
    for (name, faults) in cases {
        let mut dev = FakeBootloader::new(MCU, 64);
        dev.faults = faults;
        let (result, port) = flash_fake(dev, &image, None, &Cancel::new(), &events::discard());
        let report = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.bytes, image.len(), "{name}");
        assert_holds(&port, &image, 64);
        // An erase within the block timeout is waited out; every other fault (an erase
        // beyond the timeout included) costs commands sent again.
        if name == "slow erase" {
            assert_eq!(report.retries, 0, "{name}");
        } else {
            assert!(report.retries > 0, "{name}: the fault never fired");
        }
    }
}

#[test]
fn noise_in_front_of_a_good_reply_costs_no_retry() {
    let mut dev = FakeBootloader::new(MCU, 64);
    dev.faults.noise_before_reply = true;
    let image = image_of(2000);
    let (result, port) = flash_fake(dev, &image, None, &Cancel::new(), &events::discard());
    let report = result.unwrap();
    assert_holds(&port, &image, 64);
    let dev = board(&port);
    let writes = dev
        .log
        .iter()
        .filter(|c| matches!(c, Command::SendBlock { .. }))
        .count();
    assert_eq!(writes, report.blocks, "every block written exactly once");
}

#[test]
fn a_refused_block_fails_naming_its_address_and_stays_in_the_bootloader() {
    let mut dev = FakeBootloader::new(MCU, 64);
    dev.faults.refuse_block_at = Some(0x0800_2400);
    let (result, port) = flash_fake(
        dev,
        &image_of(4096),
        None,
        &Cancel::new(),
        &events::discard(),
    );
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            Error::CommandError {
                step: Step::Write,
                addr: Some(0x0800_2400),
                tries: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("0x08002400"), "{err}");
    let dev = board(&port);
    assert!(
        !dev.completed,
        "a half-written board must not jump to its application"
    );
    assert!(!dev.log.contains(&Command::SendEof));
}

#[test]
fn a_bad_flash_cell_is_a_verify_mismatch_at_that_address() {
    let mut dev = FakeBootloader::new(MCU, 128);
    dev.faults.bad_flash_at = Some(0x0800_2000 + 1000);
    let (result, port) = flash_fake(
        dev,
        &image_of(3000),
        None,
        &Cancel::new(),
        &events::discard(),
    );
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            Error::VerifyMismatch {
                addr: 0x0800_23e8,
                block: 0x0800_2380
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("verify mismatch at address 0x080023e8"),
        "{err}"
    );
    assert!(!board(&port).completed);
}

#[test]
fn a_silent_board_times_out_in_connect() {
    let mut dev = FakeBootloader::new(MCU, 64);
    dev.faults.silent = true;
    let (result, port) = flash_fake(
        dev,
        &image_of(100),
        None,
        &Cancel::new(),
        &events::discard(),
    );
    let err = result.unwrap_err();
    assert!(err.is_timeout());
    assert!(
        matches!(
            err,
            Error::Timeout {
                step: Step::Connect,
                tries: 5,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("timeout in connect"), "{err}");
    // Five tries of 2 s each, waited in port time (plus the settle pauses).
    assert!(port.elapsed() >= Duration::from_secs(10));
}

#[test]
fn a_board_that_vanishes_mid_write_is_an_io_error_in_write() {
    let mut port = FakePort::new(FakeBootloader::new(MCU, 64));
    port.disconnect_after_writes = Some(10);
    let cancel = Cancel::new();
    let mut s = Session::new(
        &mut port,
        Path::new("/dev/fake"),
        &Timing::default(),
        &cancel,
    );
    let info = s.connect(5, Duration::from_secs(2)).unwrap();
    let err = flash_connected(
        &mut s,
        &info,
        &image_of(4096),
        &Checks::default(),
        Path::new("/dev/fake"),
        &events::discard(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Io {
                step: Step::Write,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn cancel_stops_between_frames() {
    let cancel = Cancel::new();
    let c2 = cancel.clone();
    let sink: Sink = Arc::new(move |e: &Event| {
        if e.fraction.is_some_and(|f| f > 0.2) {
            c2.cancel();
        }
    });
    let (result, port) = flash_fake(
        FakeBootloader::new(MCU, 64),
        &image_of(20_000),
        None,
        &cancel,
        &sink,
    );
    assert!(matches!(
        result,
        Err(Error::Cancelled { step: Step::Write })
    ));
    assert!(!board(&port).completed);
}

#[test]
fn progress_is_monotonic_and_reports_bytes_blocks_and_rate() {
    let (sink, events) = collect();
    let (result, _port) = flash_fake(
        FakeBootloader::new(MCU, 64),
        &image_of(64 * 300 + 5),
        None,
        &Cancel::new(),
        &sink,
    );
    result.unwrap();
    let events = events.lock().unwrap();
    let fractions: Vec<f64> = events.iter().filter_map(|e| e.fraction).collect();
    assert!(
        fractions.len() >= 50 && fractions.len() <= 250,
        "{}",
        fractions.len()
    );
    assert!(fractions.windows(2).all(|w| w[0] < w[1]));
    assert!((fractions.last().unwrap() - 1.0).abs() < 1e-9);
    assert!(events
        .iter()
        .all(|e| e.stage == Stage::Flash && e.device.as_deref() == Some("/dev/fake")));
    let last_write = events
        .iter()
        .rfind(|e| e.message.starts_with("write"))
        .unwrap();
    assert!(
        last_write
            .message
            .contains("301/301 blocks, 19205/19205 bytes"),
        "{}",
        last_write.message
    );
    assert!(last_write.message.contains("KiB/s"));
    assert!(events
        .last()
        .unwrap()
        .message
        .starts_with("flashed and verified 19205 bytes (301 blocks)"));
}

#[test]
fn priming_discards_the_first_answer() {
    let mut port = FakePort::new(FakeBootloader::new(MCU, 64));
    let cancel = Cancel::new();
    let mut s = Session::new(
        &mut port,
        Path::new("/dev/fake"),
        &Timing::default(),
        &cancel,
    );
    s.prime().unwrap();
    let info = s.connect(1, Duration::from_secs(1)).unwrap();
    assert_eq!(info.mcu, MCU);
    drop(s);
    assert!(matches!(
        board(&port).log[0],
        Command::Other { code: 0x90, .. }
    ));
}

mod never_reports_flashed_when_not {
    use super::*;
    use proptest::prelude::*;

    fn every() -> impl Strategy<Value = Option<usize>> {
        proptest::option::of(1usize..12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn ok_means_the_board_holds_the_image(
            len in 1usize..2500,
            bs in prop_oneof![Just(64u32), Just(128), Just(256), Just(512)],
            nack in every(),
            drop_reply in every(),
            drop_request in every(),
            corrupt in every(),
            bad_at in proptest::option::of(0u32..3000),
            noise in any::<bool>(),
        ) {
            let mut dev = FakeBootloader::new(MCU, bs);
            dev.faults = Faults {
                nack_every: nack,
                drop_reply_every: drop_reply,
                drop_request_every: drop_request,
                corrupt_reply_every: corrupt,
                bad_flash_at: bad_at.map(|off| 0x0800_2000 + off),
                noise_before_reply: noise,
                ..Faults::default()
            };
            let image = image_of(len);
            let (result, port) =
                flash_fake(dev, &image, None, &Cancel::new(), &events::discard());
            let dev = board(&port);
            let holds = dev.read(0x0800_2000, len) == image;
            match result {
                Ok(report) => {
                    prop_assert!(holds, "reported flashed but the board differs");
                    prop_assert_eq!(report.bytes, len);
                }
                Err(err) => {
                    // A failure says where; a board with a bad cell inside the image
                    // always fails verify at that cell (or earlier on comms).
                    let text = err.to_string();
                    prop_assert!(!text.is_empty());
                    if let Error::VerifyMismatch { addr, .. } = err {
                        prop_assert_eq!(Some(addr), bad_at.map(|o| 0x0800_2000 + o));
                    }
                    prop_assert!(!dev.completed || !err.flash_touched());
                }
            }
            if let Some(off) = bad_at {
                if (off as usize) < len {
                    prop_assert!(!holds);
                }
            }
        }
    }
}
