//! The client against the fake Moonraker (which keeps Moonraker's traps) and against raw
//! HTTP servers for the transport's traps.

use super::fake::{moonraker, Printer, Reply, Server};
use super::*;
use std::collections::VecDeque;

fn client(server: &Server) -> Client {
    Client::new(&server.url, Duration::from_secs(5)).unwrap()
}

#[test]
fn a_bad_url_is_refused_naming_it() {
    for bad in [
        "127.0.0.1:7125",
        "http://:7125",
        "http://host:notaport",
        "ftp://x",
    ] {
        let err = Client::new(bad, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, Error::BadUrl { .. }), "{bad}: {err}");
        assert!(err.to_string().contains(bad), "{err}");
    }
    let err = Client::new("https://printer.local", Duration::from_secs(1)).unwrap_err();
    assert!(err.to_string().contains("https is not supported"), "{err}");
}

#[test]
fn a_non_ascii_host_is_looked_up_in_idna_form_without_panicking() {
    let c = Client::new("http://éx:7125", Duration::from_millis(300)).unwrap();
    assert_eq!(c.base_url(), "http://xn--x-9fa:7125");
    let err = c.print_state().unwrap_err();
    assert!(err.is_unreachable(), "{err}");
    assert!(err.to_string().contains("http://xn--x-9fa:7125"), "{err}");
}

#[test]
fn prefix_is_sent_and_result_unwrapped() {
    let (server, _) = moonraker(Printer::ready(
        &json!({"print_stats": {"state": "standby"}}),
    ));
    let c = Client::new(&format!("{}/mr/", server.url), Duration::from_secs(5)).unwrap();
    // The fake serves no /mr prefix: Moonraker's 404 message comes back.
    let err = c.print_state().unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert!(err.to_string().contains("Not Found"), "{err}");
    assert_eq!(
        server.paths(),
        vec!["/mr/printer/objects/query?print_stats=state&idle_timeout=state"]
    );
}

#[test]
fn refused_connection_is_unreachable_and_names_url() {
    // Bind then drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let c = Client::new(&url, Duration::from_secs(2)).unwrap();
    let err = c.system_info().unwrap_err();
    assert!(err.is_unreachable(), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
}

#[test]
fn slow_server_times_out_quickly() {
    let server = Server::start(|_| Reply {
        delay: Duration::from_secs(3),
        bytes: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
    });
    let c = Client::new(&server.url, Duration::from_millis(300)).unwrap();
    let started = Instant::now();
    let err = c.system_info().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(err.is_unreachable(), "{err}");
    assert!(err.to_string().contains("no answer within"), "{err}");
}

#[test]
fn http_error_carries_moonrakers_message() {
    let mut printer = Printer::ready(&json!({}));
    printer.states = VecDeque::from(["disconnected"]);
    let (server, _) = moonraker(printer);
    let err = client(&server).print_state().unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert!(
        err.to_string().contains("Klippy Host not connected"),
        "{err}"
    );
    assert!(err.to_string().contains("/printer/objects/query"), "{err}");
}

#[test]
fn garbage_says_what_was_expected() {
    let server = Server::start(|r| match r.route() {
        "/machine/system_info" => Reply::json(200, "<html>hello</html>"),
        "/printer/objects/query" => Reply::json(200, r#"{"no_result": 1}"#),
        _ => Reply::raw(b"SSH-2.0-OpenSSH\r\n"),
    });
    let c = client(&server);
    let err = c.system_info().unwrap_err();
    assert!(
        err.to_string().contains("expected a JSON document"),
        "{err}"
    );
    assert!(err.to_string().contains("<html>"), "{err}");
    let err = c.print_state().unwrap_err();
    assert!(err.to_string().contains("\"result\""), "{err}");
    let err = c.klippy().unwrap_err();
    assert!(matches!(err, Error::Garbage { .. }), "{err}");
    assert!(err.to_string().contains("HTTP/1.1 response"), "{err}");
}

#[test]
fn chunked_body_is_decoded() {
    let body = json!({"result": {"status": {"print_stats": {"state": "printing"}}}}).to_string();
    let (a, b) = body.split_at(10);
    let raw = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let server = Server::start(move |_| Reply::raw(raw.as_bytes()));
    let state = client(&server).print_state().unwrap();
    assert_eq!(state.print_stats.as_deref(), Some("printing"));
    assert_eq!(state.idle_timeout, None);
    assert!(state.is_busy());
}

#[test]
fn body_without_length_is_read_to_eof() {
    let server = Server::start(|_| {
        Reply::raw(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"result\": {\"status\": {\"print_stats\": {\"state\": \"standby\"}, \"idle_timeout\": {\"state\": \"Idle\"}}}}",
        )
    });
    let state = client(&server).print_state().unwrap();
    assert!(!state.is_busy());
    assert_eq!(state.idle_timeout.as_deref(), Some("Idle"));
}

#[test]
fn print_state_asks_each_object_once_with_its_field() {
    let (server, printer) = moonraker(Printer::ready(&json!({
        "print_stats": {"state": "paused", "filename": "x.gcode"},
        "idle_timeout": {"state": "Printing", "printing_time": 3.0}
    })));
    let state = client(&server).print_state().unwrap();
    assert!(state.is_busy());
    assert_eq!(state.idle_timeout.as_deref(), Some("Printing"));
    printer.lock().unwrap().objects.clear();
    assert_eq!(
        client(&server).print_state().unwrap(),
        PrintState::default()
    );
}

#[test]
fn mcu_versions_encodes_sections_and_maps_missing_to_none() {
    let (server, _) = moonraker(Printer::ready(&json!({
        "mcu": {"mcu_version": "v0.13.0-1-gabc", "mcu_build_versions": "gcc"},
        "mcu EBB36": {"mcu_version": "v0.12.0"}
    })));
    let v = client(&server)
        .mcu_versions(&["mcu", "mcu EBB36", "mcu gone", "mcu"])
        .unwrap();
    assert_eq!(v["mcu"].as_deref(), Some("v0.13.0-1-gabc"));
    assert_eq!(v["mcu EBB36"].as_deref(), Some("v0.12.0"));
    assert_eq!(v["mcu gone"], None);
    assert_eq!(
        server.paths(),
        vec![
            "/printer/objects/query?mcu=mcu_version&mcu%20EBB36=mcu_version&mcu%20gone=mcu_version"
        ]
    );
}

#[test]
fn klipper_unit_and_service_state() {
    let server = Server::start(|_| {
        Reply::result(&json!({"system_info": {
            "instance_ids": {"moonraker": "moonraker-1", "klipper": "klipper-1"},
            "available_services": ["klipper-1", "moonraker-1"],
            "service_state": {"klipper-1": {"active_state": "inactive", "sub_state": "dead"}}
        }}))
    });
    let c = client(&server);
    assert_eq!(c.klipper_unit().unwrap(), "klipper-1");
    assert_eq!(
        c.available_services().unwrap(),
        vec!["klipper-1", "moonraker-1"]
    );
    assert_eq!(
        c.service_state("klipper-1").unwrap(),
        Some(("inactive".into(), "dead".into()))
    );
    assert_eq!(c.service_state("other").unwrap(), None);
    let server = Server::start(|_| Reply::result(&json!({"system_info": {}})));
    assert_eq!(client(&server).klipper_unit().unwrap(), "klipper");
}

#[test]
fn service_action_posts_the_unit() {
    let server = Server::start(|_| Reply::result(&json!("ok")));
    client(&server)
        .service_action(ServiceAction::Stop, "klipper-1")
        .unwrap();
    let reqs = server.requests.lock().unwrap().clone();
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/machine/services/stop");
    let body: Value = serde_json::from_str(&reqs[0].body).unwrap();
    assert_eq!(body, json!({"service": "klipper-1"}));
}

#[test]
fn klippy_asks_state_and_message_in_one_argument() {
    let (server, _) = moonraker(Printer::ready(&json!({})));
    let klippy = client(&server).klippy().unwrap();
    assert!(klippy.is_ready(), "{klippy:?}");
    assert_eq!(klippy.message, "Printer is ready");
    assert_eq!(
        server.paths(),
        vec![
            "/server/info",
            "/printer/objects/query?webhooks=state,state_message"
        ]
    );
}

#[test]
fn klippy_down_is_a_state_not_an_error() {
    let mut printer = Printer::ready(&json!({}));
    printer.states = VecDeque::from(["disconnected"]);
    let (server, _) = moonraker(printer);
    let klippy = client(&server).klippy().unwrap();
    assert_eq!(klippy.state, "disconnected");
    assert!(!klippy.is_ready() && !klippy.has_failed());
    // Moonraker says ready, but klippy is gone by the time /printer/* is asked: 503.
    let server = Server::start(|r| match r.route() {
        "/server/info" => {
            Reply::result(&json!({"klippy_connected": true, "klippy_state": "ready"}))
        }
        _ => Reply::error(503, "Klippy Host not connected"),
    });
    let klippy = client(&server).klippy().unwrap();
    assert_eq!(klippy.state, "disconnected");
    assert_eq!(klippy.message, "Klippy Host not connected");
}

#[test]
fn wait_ready_rides_out_disconnected_503_and_startup() {
    let mut printer = Printer::ready(&json!({}));
    printer.states = VecDeque::from(["disconnected", "disconnected", "startup", "ready"]);
    let (server, _) = moonraker(printer);
    client(&server)
        .wait_klippy_ready(Duration::from_secs(10), &Cancel::new())
        .unwrap();
    let paths = server.paths();
    assert_eq!(paths.iter().filter(|p| *p == "/server/info").count(), 4);
    assert_eq!(
        paths.last().unwrap(),
        "/printer/objects/query?webhooks=state,state_message"
    );
}

#[test]
fn wait_ready_reports_klippy_error_at_once() {
    let mut printer = Printer::ready(&json!({}));
    printer.states = VecDeque::from(["error"]);
    printer.message = "mcu 'mcu': Unable to connect".into();
    let (server, _) = moonraker(printer);
    let started = Instant::now();
    let err = client(&server)
        .wait_klippy_ready(Duration::from_secs(20), &Cancel::new())
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, Error::NotReady { .. }), "{err}");
    // Moonraker's /server/info carries no message; klippy's comes from webhooks when the
    // state is seen there.
    assert!(err.to_string().contains("`error`"), "{err}");
    let server = Server::start(|r| match r.route() {
        "/server/info" => {
            Reply::result(&json!({"klippy_connected": true, "klippy_state": "ready"}))
        }
        _ => Reply::result(&json!({"status": {"webhooks": {
            "state": "shutdown", "state_message": "Lost communication with MCU 'mcu'"}}})),
    });
    let err = client(&server)
        .wait_klippy_ready(Duration::from_secs(20), &Cancel::new())
        .unwrap_err();
    assert!(err.to_string().contains("Lost communication"), "{err}");
}

#[test]
fn wait_ready_times_out_and_can_be_cancelled() {
    let mut printer = Printer::ready(&json!({}));
    printer.states = VecDeque::from(["disconnected"]);
    let (server, _) = moonraker(printer);
    let err = client(&server)
        .wait_klippy_ready(Duration::from_millis(600), &Cancel::new())
        .unwrap_err();
    assert!(matches!(err, Error::NotReady { .. }), "{err}");
    assert!(err.to_string().contains("disconnected"), "{err}");
    let cancel = Cancel::new();
    cancel.cancel();
    let err = client(&server)
        .wait_klippy_ready(Duration::from_secs(30), &cancel)
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err}");
}

#[test]
fn wait_ready_waits_for_moonraker_itself_to_come_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Client::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(1)).unwrap();
    let err = c
        .wait_klippy_ready(Duration::from_millis(400), &Cancel::new())
        .unwrap_err();
    let Error::NotReady { state, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(state, "unavailable");
}

#[test]
fn objects_query_is_the_form_moonraker_reads() {
    assert_eq!(
        objects_query(&[
            ("webhooks", &["state", "state_message"]),
            ("mcu EBB36", &[])
        ]),
        "/printer/objects/query?webhooks=state,state_message&mcu%20EBB36="
    );
    assert_eq!(
        objects_query(&[("a&b=c/é", &["x y"])]),
        "/printer/objects/query?a%26b%3Dc%2F%C3%A9=x%20y"
    );
}

#[test]
fn paused_is_busy() {
    let s = PrintState {
        print_stats: Some("paused".into()),
        idle_timeout: None,
    };
    assert!(s.is_busy());
    assert!(!PrintState::default().is_busy());
}
