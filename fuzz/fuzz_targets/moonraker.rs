//! Fuzz what kflash reads from outside about Moonraker: the `moonraker_url` rule and every
//! answer the client parses. Nothing may panic; a URL the rule accepts is in normal form
//! (parsing it again gives itself), ASCII, and a URI the HTTP stack accepts with any path
//! the client appends.
//!
//! Input: byte 0 and 1 are the HTTP status, byte 2 the length of the URL text that follows,
//! the rest is the answer's body.
#![no_main]

use _core::moonraker::{answer, parse_url};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let status = u16::from_be_bytes([head[0], head[1]]) % 600;
    let url_len = usize::from(head[2]).min(rest.len());
    let (url, body) = rest.split_at(url_len);

    let text = String::from_utf8_lossy(url);
    if let Ok(normal) = parse_url(&text) {
        assert!(normal.is_ascii(), "{normal}");
        assert_eq!(parse_url(&normal).as_deref(), Ok(normal.as_str()));
        for path in [
            "/server/info",
            "/printer/objects/query?webhooks=state,state_message&mcu%20EBB36=mcu_version",
        ] {
            let full = format!("{normal}{path}");
            assert!(http::Uri::try_from(full.as_str()).is_ok(), "{full}");
        }
    }

    let Ok(result) = answer::result(status, body) else {
        return;
    };
    if let Ok(info) = answer::object(result.clone(), "an object") {
        let _ = answer::server_klippy(&info);
    }
    if let Ok(status) = answer::query_status(&result) {
        let _ = answer::print_state(status);
        let _ = answer::mcu_versions(status, &["mcu", "mcu EBB36"]);
        let _ = answer::webhooks(status);
    }
    if let Ok(info) = answer::system_info(&result) {
        let _ = answer::klipper_unit(&info);
        let _ = answer::available_services(&info);
        let _ = answer::service_state(&info, "klipper");
    }
});
