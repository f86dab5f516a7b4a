//! Fuzz Katapult's streaming decoder and response/command parsers: arbitrary bytes, split
//! at an arbitrary point, must never panic; every frame decoded re-encodes to itself.
#![no_main]

use _core::katapult::codec::{Command, Decoder, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut decoder = Decoder::new();
    for chunk in [&data[..split], &data[split..]] {
        decoder.push(chunk);
        while let Some(item) = decoder.next_frame() {
            if let Ok(frame) = item {
                let mut again = Decoder::new();
                again.push(&frame.encode());
                assert_eq!(again.next_frame(), Some(Ok(frame.clone())));
                let _ = Response::from_frame(&frame);
                let _ = Command::from_frame(&frame);
            }
        }
    }
});
