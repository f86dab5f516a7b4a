//! A small blocking HTTP/1.1 client for Moonraker's JSON API.
//!
//! Owns: parsing the Moonraker URL (`http://host:port[/prefix]`), one request per TCP
//! connection (`Connection: close`) with a connect timeout and a deadline on the whole
//! exchange, `Content-Length`, chunked and read-to-EOF bodies, unwrapping Moonraker's
//! `{"result": ...}` envelope and its `{"error": {"message": ...}}` answers, and the few
//! endpoints kflash uses (versions, print state, service control, configured MCUs).
//!
//! Invariants: no request outlives the client's timeout; every error names the URL and says
//! whether Moonraker was unreachable, answered with an HTTP error (with Moonraker's own
//! message), or sent something that is not the expected JSON (and what was expected).
//! `https` is refused with a clear error (Moonraker on the printer host is plain HTTP).
//!
//! Thread-safety: `Client` is immutable and `Send + Sync`; share it freely. Each call opens
//! its own connection and blocks the calling thread.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::process::Cancel;

/// Largest response body accepted (Moonraker answers are small; this bounds garbage).
const MAX_BODY: usize = 16 << 20;
/// Longest header section accepted.
const MAX_HEAD: usize = 64 << 10;
/// How often `wait_klippy_ready` polls.
const POLL: Duration = Duration::from_millis(250);

/// Errors talking to Moonraker. Every variant names the URL it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Moonraker URL itself is unusable.
    #[error("invalid Moonraker URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    /// Nothing answered (connection refused, timeout, reset, name not resolvable).
    #[error("Moonraker is unreachable at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// Moonraker answered with an HTTP error; `message` is Moonraker's own explanation.
    #[error("Moonraker answered HTTP {status} for {url}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
    },
    /// The answer is not HTTP, not JSON, or not the expected shape.
    #[error("unexpected answer from Moonraker at {url}: expected {expected}, got {got}")]
    Garbage {
        url: String,
        expected: String,
        got: String,
    },
    /// klippy did not reach `ready` in time, or reported an error/shutdown state.
    #[error(
        "klippy is not ready after {waited:?} (via {url}): state `{state}`{}",
        fmt_message(message)
    )]
    NotReady {
        url: String,
        waited: Duration,
        state: String,
        message: String,
    },
    /// The wait was cancelled by the caller.
    #[error("cancelled while waiting for klippy (via {url})")]
    Cancelled { url: String },
}

fn fmt_message(message: &str) -> String {
    if message.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", message.trim())
    }
}

impl Error {
    /// True when Moonraker could not be reached at all (as opposed to answering badly).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unreachable { .. })
    }
    /// The HTTP status Moonraker answered with, if the error is an HTTP error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What a service action asks Moonraker's `/machine/services/<action>` to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceAction {
    Stop,
    Start,
    Restart,
}

impl ServiceAction {
    /// The path component Moonraker uses (`stop`, `start`, `restart`).
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceAction::Stop => "stop",
            ServiceAction::Start => "start",
            ServiceAction::Restart => "restart",
        }
    }
}

impl fmt::Display for ServiceAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the printer is busy: `print_stats.state` and `idle_timeout.state` as reported.
/// `None` means klippy did not report that object (not configured, or not loaded).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrintState {
    pub print_stats: Option<String>,
    pub idle_timeout: Option<String>,
}

impl PrintState {
    /// True while a print is running or paused: flashing now would ruin it.
    pub fn is_busy(&self) -> bool {
        matches!(self.print_stats.as_deref(), Some("printing" | "paused"))
    }
}

/// A blocking Moonraker client for one base URL.
#[derive(Debug, Clone)]
pub struct Client {
    base_url: String,
    host: String,
    port: u16,
    prefix: String,
    timeout: Duration,
}

impl Client {
    /// A client for `http://host[:port][/prefix]` (port defaults to 80); every request
    /// (connect, send, read) must finish within `timeout`.
    pub fn new(base_url: &str, timeout: Duration) -> Result<Client, Error> {
        let bad = |reason: &str| Error::BadUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let url = base_url.trim();
        if url.len() >= 8 && url[..8].eq_ignore_ascii_case("https://") {
            return Err(bad(
                "https is not supported; use Moonraker's plain http address on the printer host, \
                 e.g. http://127.0.0.1:7125",
            ));
        }
        let rest = if url.len() >= 7 && url[..7].eq_ignore_ascii_case("http://") {
            &url[7..]
        } else if url.contains("://") {
            return Err(bad("only http:// URLs are supported"));
        } else {
            return Err(bad("expected http://host:port, e.g. http://127.0.0.1:7125"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(bad("the URL must not carry a query or fragment"));
        }
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or_else(|| bad("unclosed '[' in host"))?;
            let host = &v6[..end];
            let after = &v6[end + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => p,
                None if after.is_empty() => "80",
                None => return Err(bad("garbage after ']' in host")),
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p),
                None => (authority.to_owned(), "80"),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| bad(&format!("`{port}` is not a port number")))?;
        if port == 0 {
            return Err(bad("port 0 is not a port to connect to"));
        }
        let prefix = path.trim_end_matches('/').to_owned();
        Ok(Client {
            base_url: format!("http://{authority}{prefix}"),
            host,
            port,
            prefix,
            timeout,
        })
    }

    /// The normalised base URL (for messages).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET /server/info`: `klippy_connected`, `klippy_state`, `moonraker_version`, ...
    pub fn server_info(&self) -> Result<Value, Error> {
        let path = "/server/info";
        let result = self.get(path)?;
        expect_object(self, path, result, "a server info object")
    }

    /// `GET /printer/info`: `state`, `software_version`, `app`, ... (HTTP 503 while klippy
    /// is disconnected).
    pub fn printer_info(&self) -> Result<Value, Error> {
        let path = "/printer/info";
        let result = self.get(path)?;
        expect_object(self, path, result, "a printer info object")
    }

    /// Whether a print is running or paused (`print_stats` and `idle_timeout` states).
    pub fn print_state(&self) -> Result<PrintState, Error> {
        let path = "/printer/objects/query?print_stats=state&idle_timeout=state";
        let status = self.query_status(path)?;
        let state_of = |obj: &str| -> Result<Option<String>, Error> {
            match status.get(obj).and_then(|o| o.get("state")) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(self.garbage(
                    path,
                    &format!("a string for {obj}.state"),
                    &other.to_string(),
                )),
            }
        };
        Ok(PrintState {
            print_stats: state_of("print_stats")?,
            idle_timeout: state_of("idle_timeout")?,
        })
    }

    /// The `mcu_version` of each named MCU section (`mcu`, `mcu EBB36`, ...). A section
    /// klippy does not know, or one that did not report a version, maps to `None`.
    pub fn mcu_versions(
        &self,
        sections: &[&str],
    ) -> Result<HashMap<String, Option<String>>, Error> {
        if sections.is_empty() {
            return Ok(HashMap::new());
        }
        let query = sections
            .iter()
            .map(|s| url_encode(s))
            .collect::<Vec<_>>()
            .join("&");
        let path = format!("/printer/objects/query?{query}");
        let status = self.query_status(&path)?;
        Ok(sections
            .iter()
            .map(|s| {
                let version = status
                    .get(*s)
                    .and_then(|o| o.get("mcu_version"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                ((*s).to_owned(), version)
            })
            .collect())
    }

    /// The settings of every `[mcu]` / `[mcu NAME]` section of klippy's loaded config
    /// (`configfile.settings`), keyed by the section name as klippy reports it (lower case).
    pub fn configfile_mcus(&self) -> Result<BTreeMap<String, Map<String, Value>>, Error> {
        let path = "/printer/objects/query?configfile=settings";
        let status = self.query_status(path)?;
        let settings = status
            .get("configfile")
            .and_then(|c| c.get("settings"))
            .and_then(Value::as_object)
            .ok_or_else(|| {
                self.garbage(
                    path,
                    "an object at status.configfile.settings",
                    &short(&Value::Object(status.clone())),
                )
            })?;
        Ok(settings
            .iter()
            .filter(|(name, _)| *name == "mcu" || name.starts_with("mcu "))
            .map(|(name, v)| (name.clone(), v.as_object().cloned().unwrap_or_default()))
            .collect())
    }

    /// `GET /machine/system_info` -> `system_info` (instance ids, available services, states).
    pub fn system_info(&self) -> Result<Map<String, Value>, Error> {
        let path = "/machine/system_info";
        let result = self.get(path)?;
        match result.get("system_info") {
            Some(Value::Object(info)) => Ok(info.clone()),
            _ => Err(self.garbage(path, "an object at system_info", &short(&result))),
        }
    }

    /// The klipper unit Moonraker controls (`system_info.instance_ids.klipper`, e.g.
    /// `klipper-1` on multi-instance hosts); `"klipper"` when Moonraker does not say.
    pub fn klipper_unit(&self) -> Result<String, Error> {
        let info = self.system_info()?;
        Ok(info
            .get("instance_ids")
            .and_then(|ids| ids.get("klipper"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("klipper")
            .to_owned())
    }

    /// The services Moonraker is allowed to control (`system_info.available_services`).
    pub fn available_services(&self) -> Result<Vec<String>, Error> {
        let info = self.system_info()?;
        match info.get("available_services") {
            Some(Value::Array(list)) => Ok(list
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()),
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(other) => Err(self.garbage(
                "/machine/system_info",
                "a list at system_info.available_services",
                &short(other),
            )),
        }
    }

    /// `POST /machine/services/<action>` for `unit` (no sudo: Moonraker's provider does it).
    pub fn service_action(&self, action: ServiceAction, unit: &str) -> Result<(), Error> {
        let path = format!("/machine/services/{}", action.as_str());
        self.post(&path, &json!({ "service": unit }))?;
        Ok(())
    }

    /// `(active_state, sub_state)` of `unit` from `system_info.service_state`; `None` when
    /// Moonraker does not track that unit.
    pub fn service_state(&self, unit: &str) -> Result<Option<(String, String)>, Error> {
        let info = self.system_info()?;
        let Some(state) = info.get("service_state").and_then(|s| s.get(unit)) else {
            return Ok(None);
        };
        let field = |name: &str| state.get(name).and_then(Value::as_str).map(str::to_owned);
        match (field("active_state"), field("sub_state")) {
            (Some(active), sub) => Ok(Some((active, sub.unwrap_or_default()))),
            (None, _) => Err(self.garbage(
                "/machine/system_info",
                &format!("active_state in system_info.service_state.{unit}"),
                &short(state),
            )),
        }
    }

    /// Wait until klippy is `ready` behind Moonraker: polls `/server/info`, then
    /// `/printer/objects/query?webhooks=state`. Unreachable Moonraker and HTTP 503 while
    /// klippy is disconnected are expected and retried; `error`/`shutdown` end the wait at
    /// once with klippy's message.
    pub fn wait_klippy_ready(&self, timeout: Duration, cancel: &Cancel) -> Result<(), Error> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut last_state;
        let mut last_message;
        loop {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled {
                    url: self.base_url.clone(),
                });
            }
            match self.klippy_state() {
                Ok((state, message)) => {
                    if state == "ready" {
                        return Ok(());
                    }
                    if state == "error" || state == "shutdown" {
                        return Err(Error::NotReady {
                            url: self.base_url.clone(),
                            waited: started.elapsed(),
                            state,
                            message,
                        });
                    }
                    last_state = state;
                    last_message = message;
                }
                Err(err @ Error::Garbage { .. }) => return Err(err),
                Err(err) => {
                    last_state = "unavailable".into();
                    last_message = err.to_string();
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::NotReady {
                    url: self.base_url.clone(),
                    waited: started.elapsed(),
                    state: last_state,
                    message: last_message,
                });
            }
            // Sleep in small steps so a cancel is noticed quickly.
            let until = (now + POLL).min(deadline);
            while Instant::now() < until && !cancel.is_cancelled() {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// One look at klippy's state: Moonraker's view first, then klippy's own webhooks state.
    fn klippy_state(&self) -> Result<(String, String), Error> {
        let info = self.server_info()?;
        let server_state = info
            .get("klippy_state")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        if info.get("klippy_connected") == Some(&Value::Bool(false)) || server_state != "ready" {
            return Ok((server_state, String::new()));
        }
        let path = "/printer/objects/query?webhooks=state&webhooks=state_message";
        let status = self.query_status(path)?;
        let webhooks = status.get("webhooks");
        let state = webhooks
            .and_then(|w| w.get("state"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                self.garbage(
                    path,
                    "a string at status.webhooks.state",
                    &short(&Value::Object(status.clone())),
                )
            })?
            .to_owned();
        let message = webhooks
            .and_then(|w| w.get("state_message"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Ok((state, message))
    }

    /// `GET` a `/printer/objects/query?...` path and return `result.status`.
    fn query_status(&self, path: &str) -> Result<Map<String, Value>, Error> {
        let result = self.get(path)?;
        match result.get("status") {
            Some(Value::Object(status)) => Ok(status.clone()),
            _ => Err(self.garbage(path, "an object at result.status", &short(&result))),
        }
    }

    /// `GET path` and return the unwrapped `result`.
    pub fn get(&self, path: &str) -> Result<Value, Error> {
        self.call("GET", path, None)
    }

    /// `POST path` with a JSON body and return the unwrapped `result`.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, Error> {
        self.call("POST", path, Some(&body.to_string()))
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<Value, Error> {
        let url = self.url(path);
        let (status, body) = self.exchange(method, path, body, &url)?;
        let parsed: Option<Value> = serde_json::from_slice(&body).ok();
        if !(200..300).contains(&status) {
            let message = parsed
                .as_ref()
                .and_then(|v| v.get("error"))
                .and_then(|e| e.get("message").or(Some(e)))
                .map_or_else(
                    || snippet(&body),
                    |m| m.as_str().map_or_else(|| m.to_string(), str::to_owned),
                );
            return Err(Error::Http {
                url,
                status,
                message,
            });
        }
        let Some(value) = parsed else {
            return Err(Error::Garbage {
                url,
                expected: "a JSON document".into(),
                got: snippet(&body),
            });
        };
        match value {
            Value::Object(mut obj) if obj.contains_key("result") => {
                Ok(obj.remove("result").unwrap_or(Value::Null))
            }
            other => Err(Error::Garbage {
                url,
                expected: "a JSON object with a \"result\" field".into(),
                got: short(&other),
            }),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    fn garbage(&self, path: &str, expected: &str, got: &str) -> Error {
        Error::Garbage {
            url: self.url(path),
            expected: expected.to_owned(),
            got: got.to_owned(),
        }
    }

    /// One HTTP exchange: connect, send, read status and body (within `self.timeout`).
    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        url: &str,
    ) -> Result<(u16, Vec<u8>), Error> {
        let deadline = Instant::now() + self.timeout;
        let unreachable = |reason: String| Error::Unreachable {
            url: url.to_owned(),
            reason,
        };
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| unreachable(format!("cannot resolve {}: {e}", self.host)))?
            .collect();
        let mut last_err = None;
        let mut stream = None;
        for addr in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(addr, left) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let mut stream = stream.ok_or_else(|| {
            unreachable(match last_err {
                Some(e) if is_timeout(&e) => format!("connect timed out after {:?}", self.timeout),
                Some(e) => e.to_string(),
                None => format!("connect timed out after {:?}", self.timeout),
            })
        })?;
        let _ = stream.set_nodelay(true);
        let host_header = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut request = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: kflash\r\n\
             Accept: application/json\r\nConnection: close\r\n",
            self.prefix
        );
        if let Some(body) = body {
            request.push_str("Content-Type: application/json\r\n");
            let _ = write!(request, "Content-Length: {}\r\n\r\n{body}", body.len());
        } else {
            request.push_str("\r\n");
        }
        let io_err = |e: io::Error| {
            if is_timeout(&e) {
                unreachable(format!("no answer within {:?}", self.timeout))
            } else {
                unreachable(e.to_string())
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_write_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(io_err)?;
        stream.write_all(request.as_bytes()).map_err(io_err)?;
        let mut reader = BufReader::new(DeadlineReader { stream, deadline });
        read_response(&mut reader).map_err(|e| match e {
            ReadError::Io(e) => io_err(e),
            ReadError::Bad(what) => Error::Garbage {
                url: url.to_owned(),
                expected: "an HTTP/1.1 response".into(),
                got: what,
            },
        })
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// A TcpStream whose every read is bounded by what is left of one overall deadline.
struct DeadlineReader {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

enum ReadError {
    Io(io::Error),
    Bad(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Read one line (up to CRLF) of the header section, bounded.
fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> Result<String, ReadError> {
    let mut line = Vec::new();
    let n = reader
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n > *budget {
        return Err(ReadError::Bad("an oversized header section".into()));
    }
    *budget -= n;
    if n == 0 {
        return Err(ReadError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a complete response",
        )));
    }
    let text = String::from_utf8_lossy(&line);
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

fn read_response(reader: &mut impl BufRead) -> Result<(u16, Vec<u8>), ReadError> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(reader, &mut budget)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad(format!("`{}`", truncate(&status_line, 80))));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| ReadError::Bad(format!("status line `{}`", truncate(&status_line, 80))))?;
    let mut content_length = None;
    let mut chunked = false;
    loop {
        let line = read_line(reader, &mut budget)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Bad(format!(
                "header line `{}`",
                truncate(&line, 80)
            )));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| ReadError::Bad(format!("Content-Length `{value}`")))?;
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    let body = if chunked {
        read_chunked(reader)?
    } else if let Some(n) = content_length {
        if n > MAX_BODY {
            return Err(ReadError::Bad(format!("a body of {n} bytes")));
        }
        let mut body = vec![0; n];
        reader.read_exact(&mut body)?;
        body
    } else {
        let mut body = Vec::new();
        reader.take(MAX_BODY as u64 + 1).read_to_end(&mut body)?;
        if body.len() > MAX_BODY {
            return Err(ReadError::Bad("an oversized body".into()));
        }
        body
    };
    Ok((status, body))
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    let mut budget = MAX_HEAD;
    loop {
        let line = read_line(reader, &mut budget)?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ReadError::Bad(format!("chunk size `{}`", truncate(&line, 40))))?;
        if size == 0 {
            // Trailers (if any) end with an empty line; the connection closes anyway.
            while !read_line(reader, &mut budget)?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(ReadError::Bad("an oversized chunked body".into()));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(ReadError::Bad("a chunk not followed by CRLF".into()));
        }
    }
}

fn expect_object(client: &Client, path: &str, value: Value, what: &str) -> Result<Value, Error> {
    if value.is_object() {
        Ok(value)
    } else {
        Err(client.garbage(path, what, &short(&value)))
    }
}

/// Percent-encode a query key/value (RFC 3986 unreserved characters stay).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "an empty body".into()
    } else {
        format!("`{}`", truncate(text, 120))
    }
}

fn short(value: &Value) -> String {
    format!("`{}`", truncate(&value.to_string(), 120))
}

#[cfg(test)]
pub(crate) mod testserver {
    //! A tiny HTTP server on 127.0.0.1:0 answering canned responses, for tests.

    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::Duration;

    /// One request as the server saw it.
    #[derive(Debug, Clone)]
    pub struct Request {
        pub method: String,
        pub path: String,
        pub body: String,
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
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            }
        }
        pub fn result(value: &serde_json::Value) -> Reply {
            Reply::json(200, &serde_json::json!({ "result": value }).to_string())
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
}

#[cfg(test)]
mod tests {
    use super::testserver::{Reply, Server};
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn client(server: &Server) -> Client {
        Client::new(&server.url, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn url_parsing() {
        let c = Client::new("http://127.0.0.1:7125/", Duration::from_secs(1)).unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:7125");
        let c = Client::new("http://localhost/moonraker/", Duration::from_secs(1)).unwrap();
        assert_eq!(c.port, 80);
        assert_eq!(c.prefix, "/moonraker");
        let c = Client::new("http://[::1]:7125", Duration::from_secs(1)).unwrap();
        assert_eq!(c.host, "::1");
        let err = Client::new("https://printer.local", Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("https is not supported"), "{err}");
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
    }

    #[test]
    fn prefix_is_sent_and_result_unwrapped() {
        let server = Server::start(|_| {
            Reply::result(&json!({"klippy_state": "ready", "klippy_connected": true}))
        });
        let c = Client::new(&format!("{}/mr", server.url), Duration::from_secs(5)).unwrap();
        let info = c.server_info().unwrap();
        assert_eq!(info["klippy_state"], "ready");
        assert_eq!(server.paths(), vec!["/mr/server/info"]);
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
        let err = c.server_info().unwrap_err();
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
        let err = c.server_info().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(err.is_unreachable(), "{err}");
        assert!(err.to_string().contains("no answer within"), "{err}");
    }

    #[test]
    fn http_error_carries_moonrakers_message() {
        let server = Server::start(|_| {
            Reply::json(
                503,
                r#"{"error": {"code": 503, "message": "Klippy Disconnected", "traceback": ""}}"#,
            )
        });
        let err = client(&server).printer_info().unwrap_err();
        assert_eq!(err.status(), Some(503));
        assert!(err.to_string().contains("Klippy Disconnected"), "{err}");
        assert!(err.to_string().contains("/printer/info"), "{err}");
    }

    #[test]
    fn garbage_says_what_was_expected() {
        let server = Server::start(|r| match r.path.as_str() {
            "/server/info" => Reply::json(200, "<html>hello</html>"),
            "/printer/info" => Reply::json(200, r#"{"no_result": 1}"#),
            _ => Reply::raw(b"SSH-2.0-OpenSSH\r\n"),
        });
        let c = client(&server);
        let err = c.server_info().unwrap_err();
        assert!(
            err.to_string().contains("expected a JSON document"),
            "{err}"
        );
        assert!(err.to_string().contains("<html>"), "{err}");
        let err = c.printer_info().unwrap_err();
        assert!(err.to_string().contains("\"result\""), "{err}");
        let err = c.system_info().unwrap_err();
        assert!(matches!(err, Error::Garbage { .. }), "{err}");
        assert!(err.to_string().contains("HTTP/1.1 response"), "{err}");
    }

    #[test]
    fn chunked_body_is_decoded() {
        let body =
            json!({"result": {"status": {"print_stats": {"state": "printing"}}}}).to_string();
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
                b"HTTP/1.1 200 OK\r\n\r\n{\"result\": {\"status\": {\"print_stats\": {\"state\": \"standby\"}, \"idle_timeout\": {\"state\": \"Idle\"}}}}",
            )
        });
        let state = client(&server).print_state().unwrap();
        assert!(!state.is_busy());
        assert_eq!(state.idle_timeout.as_deref(), Some("Idle"));
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

    #[test]
    fn mcu_versions_encodes_sections_and_maps_missing_to_none() {
        let server = Server::start(|_| {
            Reply::result(&json!({"eventtime": 1.0, "status": {
                "mcu": {"mcu_version": "v0.13.0-1-gabc"},
                "mcu EBB36": {"mcu_version": "v0.12.0"}
            }}))
        });
        let v = client(&server)
            .mcu_versions(&["mcu", "mcu EBB36", "mcu gone"])
            .unwrap();
        assert_eq!(v["mcu"].as_deref(), Some("v0.13.0-1-gabc"));
        assert_eq!(v["mcu EBB36"].as_deref(), Some("v0.12.0"));
        assert_eq!(v["mcu gone"], None);
        assert_eq!(
            server.paths(),
            vec!["/printer/objects/query?mcu&mcu%20EBB36&mcu%20gone"]
        );
    }

    #[test]
    fn configfile_mcus_keeps_only_mcu_sections() {
        let server = Server::start(|_| {
            Reply::result(&json!({"status": {"configfile": {"settings": {
                "mcu": {"serial": "/dev/serial/by-id/usb-Klipper_stm32-if00"},
                "mcu ebb36": {"canbus_uuid": "aabbccddeeff"},
                "mcu_extra": {"x": 1},
                "printer": {"kinematics": "none"}
            }}}}))
        });
        let mcus = client(&server).configfile_mcus().unwrap();
        assert_eq!(mcus.keys().collect::<Vec<_>>(), vec!["mcu", "mcu ebb36"]);
        assert_eq!(mcus["mcu ebb36"]["canbus_uuid"], "aabbccddeeff");
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
    fn wait_ready_rides_out_503_and_startup() {
        let calls = Arc::new(AtomicUsize::new(0));
        let n = calls.clone();
        let server = Server::start(move |r| {
            let i = n.fetch_add(1, Ordering::SeqCst);
            match (r.path.as_str(), i) {
                ("/server/info", 0..=1) => Reply::result(
                    &json!({"klippy_connected": false, "klippy_state": "disconnected"}),
                ),
                ("/server/info", _) => {
                    Reply::result(&json!({"klippy_connected": true, "klippy_state": "ready"}))
                }
                (_, 0..=3) => Reply::json(503, r#"{"error": {"message": "Klippy Disconnected"}}"#),
                _ => Reply::result(&json!({"status": {"webhooks": {"state": "ready"}}})),
            }
        });
        client(&server)
            .wait_klippy_ready(Duration::from_secs(10), &Cancel::new())
            .unwrap();
        assert!(server
            .paths()
            .iter()
            .any(|p| p.starts_with("/printer/objects/query?webhooks=state")));
    }

    #[test]
    fn wait_ready_reports_klippy_error_at_once() {
        let server = Server::start(|r| match r.path.as_str() {
            "/server/info" => {
                Reply::result(&json!({"klippy_connected": true, "klippy_state": "ready"}))
            }
            _ => Reply::result(&json!({"status": {"webhooks": {
                "state": "error", "state_message": "mcu 'mcu': Unable to connect"}}})),
        });
        let started = Instant::now();
        let err = client(&server)
            .wait_klippy_ready(Duration::from_secs(20), &Cancel::new())
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("Unable to connect"), "{err}");
    }

    #[test]
    fn wait_ready_times_out_and_can_be_cancelled() {
        let server = Server::start(|_| {
            Reply::result(&json!({"klippy_connected": false, "klippy_state": "disconnected"}))
        });
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
    fn url_encoding() {
        assert_eq!(url_encode("mcu EBB36"), "mcu%20EBB36");
        assert_eq!(url_encode("a&b=c/é"), "a%26b%3Dc%2F%C3%A9");
    }
}
