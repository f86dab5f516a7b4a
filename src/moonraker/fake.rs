//! Test-only HTTP servers on 127.0.0.1:0: a raw one answering whatever a test's closure
//! returns (for transport traps: garbage, chunked bodies, slow answers), and a fake
//! Moonraker built on it that keeps Moonraker's traps.
//!
//! The fake Moonraker reads query arguments as Tornado's `get_argument` does — only the
//! LAST value of a repeated argument counts, `+` and `%20` are spaces — answers an object
//! argument with the comma-separated fields it names (all fields when empty), omits
//! unknown objects and fields, and answers HTTP 503 on every `/printer/*` path while klippy
//! is disconnected.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Map, Value};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The request target: path and query.
    pub path: String,
    pub body: String,
}

impl Request {
    /// The path without the query.
    pub fn route(&self) -> &str {
        self.path.split('?').next().unwrap_or_default()
    }

    /// The query arguments as Moonraker (Tornado) reads them: the last value of a
    /// repeated argument wins.
    pub fn query(&self) -> BTreeMap<String, String> {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        let Some((_, query)) = self.path.split_once('?') else {
            return BTreeMap::new();
        };
        query
            .split('&')
            .filter(|arg| !arg.is_empty())
            .map(|arg| {
                let (k, v) = arg.split_once('=').unwrap_or((arg, ""));
                (decode(k), decode(v))
            })
            .collect()
    }
}

/// What to answer: raw bytes, optionally after a delay.
pub struct Reply {
    pub delay: Duration,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Reply {
        Reply {
            delay: Duration::ZERO,
            bytes: format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        }
    }
    pub fn result(value: &Value) -> Reply {
        Reply::json(200, &json!({ "result": value }).to_string())
    }
    pub fn error(status: u16, message: &str) -> Reply {
        Reply::json(
            status,
            &json!({"error": {"code": status, "message": message}}).to_string(),
        )
    }
    pub fn raw(bytes: &[u8]) -> Reply {
        Reply {
            delay: Duration::ZERO,
            bytes: bytes.to_vec(),
        }
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

pub struct Server {
    pub url: String,
    pub requests: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let handler: Arc<Handler> = Arc::new(handler);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let handler = handler.clone();
                let seen = seen.clone();
                thread::spawn(move || serve(stream, &*handler, &seen));
            }
        });
        Server { url, requests }
    }

    pub fn paths(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.path.clone())
            .collect()
    }
}

fn serve(mut stream: TcpStream, handler: &Handler, seen: &Mutex<Vec<Request>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut length = 0;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let request = Request {
        method,
        path,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    seen.lock().unwrap().push(request.clone());
    let reply = handler(&request);
    thread::sleep(reply.delay);
    let _ = stream.write_all(&reply.bytes);
    let _ = stream.flush();
}

/// The printer behind a [`moonraker`] fake.
#[derive(Debug, Clone)]
pub struct Printer {
    /// klippy's state (`disconnected`, `startup`, `ready`, `error`, `shutdown`); when more
    /// than one is queued, each `/server/info` moves on to the next (the last one stays).
    pub states: VecDeque<&'static str>,
    /// klippy's `state_message`.
    pub message: String,
    /// Printer objects other than `webhooks`, with all their fields.
    pub objects: Map<String, Value>,
}

impl Printer {
    /// A ready printer with these objects.
    pub fn ready(objects: &Value) -> Printer {
        Printer {
            states: VecDeque::from(["ready"]),
            message: "Printer is ready".into(),
            objects: objects.as_object().cloned().unwrap_or_default(),
        }
    }
    fn state(&self) -> &'static str {
        self.states.front().copied().unwrap_or("disconnected")
    }
}

/// A fake Moonraker serving `printer` (which a test may change while it runs).
pub fn moonraker(printer: Printer) -> (Server, Arc<Mutex<Printer>>) {
    let printer = Arc::new(Mutex::new(printer));
    let shared = printer.clone();
    let server = Server::start(move |r| {
        let mut p = shared.lock().unwrap();
        let state = p.state();
        let connected = state != "disconnected";
        match r.route() {
            "/server/info" => {
                if p.states.len() > 1 {
                    p.states.pop_front();
                }
                Reply::result(&json!({"klippy_connected": connected, "klippy_state": state}))
            }
            route if route.starts_with("/printer/") && !connected => {
                Reply::error(503, "Klippy Host not connected")
            }
            "/printer/objects/query" => {
                let mut status = Map::new();
                for (object, fields) in r.query() {
                    let all = if object == "webhooks" {
                        json!({"state": state, "state_message": p.message})
                    } else if let Some(v) = p.objects.get(&object) {
                        v.clone()
                    } else {
                        continue;
                    };
                    let picked = if fields.is_empty() {
                        all
                    } else {
                        let wanted: Vec<&str> = fields.split(',').collect();
                        Value::Object(
                            all.as_object()
                                .into_iter()
                                .flatten()
                                .filter(|(k, _)| wanted.contains(&k.as_str()))
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                        )
                    };
                    status.insert(object, picked);
                }
                Reply::result(&json!({"eventtime": 1.0, "status": status}))
            }
            _ => Reply::error(404, "Not Found"),
        }
    });
    (server, printer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_repeated_argument_wins_like_tornado() {
        let r = Request {
            method: "GET".into(),
            path:
                "/printer/objects/query?webhooks=state&webhooks=state_message&mcu+EBB36&a%20b=x,y"
                    .into(),
            body: String::new(),
        };
        let q = r.query();
        assert_eq!(q["webhooks"], "state_message");
        assert_eq!(q["mcu EBB36"], "");
        assert_eq!(q["a b"], "x,y");
        assert_eq!(r.route(), "/printer/objects/query");
    }
}
