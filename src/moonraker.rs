//! Moonraker's API as kflash uses it: print state, MCU versions, klippy's state and the
//! wait for `ready`, service control and system info.
//!
//! Every query uses the form real Moonraker reads: one argument per printer object with its
//! fields comma-separated (`?webhooks=state,state_message`) and object names percent-encoded
//! (`mcu%20EBB36`). Moonraker (Tornado's `get_argument`) keeps only the LAST value of a
//! repeated argument, so `webhooks=state&webhooks=state_message` would lose `state`.
//! `/printer/*` answers HTTP 503 while klippy is disconnected: for the ready-wait that means
//! "not ready yet", never an error.
//!
//! Parts: `http` (the URL rule and the HTTP exchange through ureq), `answer` (reading each
//! answer; pure, fuzzed). Invariants: no request outlives the client's timeout; every error
//! names the URL and says whether Moonraker was unreachable, answered with an HTTP error
//! (with Moonraker's own message), or sent something that is not the expected JSON (and
//! what was expected).
//!
//! Thread-safety: `Client` is immutable and `Send + Sync`; share it freely. Each call
//! blocks the calling thread.

pub mod answer;
mod http;

#[cfg(test)]
pub(crate) mod fake;

use std::collections::HashMap;
use std::fmt;
use std::thread;
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Map, Value};

use crate::process::Cancel;
use answer::Unexpected;

pub use http::parse_url;

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
    /// True when a ready-wait ran out of time while klippy was stopped or starting (or
    /// Moonraker away), as opposed to klippy stopping on an error or a shutdown.
    pub fn is_ready_timeout(&self) -> bool {
        matches!(self, Error::NotReady { state, .. } if !failed_state(state))
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

/// klippy's state as seen through Moonraker at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Klippy {
    /// `ready`, `startup`, `error`, `shutdown`, or `disconnected` (klippy not running or
    /// not connected to Moonraker: `/printer/*` answers 503).
    pub state: String,
    /// klippy's `state_message` (or Moonraker's, when klippy is disconnected).
    pub message: String,
}

impl Klippy {
    /// klippy is `ready`.
    pub fn is_ready(&self) -> bool {
        self.state == "ready"
    }
    /// klippy stopped on an error or a shutdown: waiting longer will not help.
    pub fn has_failed(&self) -> bool {
        failed_state(&self.state)
    }
}

fn failed_state(state: &str) -> bool {
    matches!(state, "error" | "shutdown")
}

/// A query argument name or value: unreserved characters stay, everything else is
/// percent-encoded (a space is `%20`).
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `/printer/objects/query?...` for `objects`: one argument per object (first mention
/// wins), fields comma-separated, all names percent-encoded.
fn objects_query(objects: &[(&str, &[&str])]) -> String {
    let mut seen = Vec::new();
    let mut args = Vec::new();
    for (object, fields) in objects {
        if seen.contains(object) {
            continue;
        }
        seen.push(object);
        let fields: Vec<String> = fields
            .iter()
            .map(|f| utf8_percent_encode(f, QUERY).to_string())
            .collect();
        args.push(format!(
            "{}={}",
            utf8_percent_encode(object, QUERY),
            fields.join(",")
        ));
    }
    format!("/printer/objects/query?{}", args.join("&"))
}

/// A blocking Moonraker client for one base URL.
#[derive(Debug, Clone)]
pub struct Client {
    http: http::Http,
}

impl Client {
    /// A client for a URL that follows [`parse_url`]'s rule; every request (connect, send,
    /// answer) must finish within `timeout`.
    pub fn new(base_url: &str, timeout: Duration) -> Result<Client, Error> {
        let base = parse_url(base_url).map_err(|reason| Error::BadUrl {
            url: base_url.to_owned(),
            reason,
        })?;
        Ok(Client {
            http: http::Http::new(base, timeout),
        })
    }

    /// The normalised base URL (for messages).
    pub fn base_url(&self) -> &str {
        self.http.base()
    }

    /// Whether a print is running or paused (`print_stats` and `idle_timeout` states).
    pub fn print_state(&self) -> Result<PrintState, Error> {
        let path = objects_query(&[("print_stats", &["state"]), ("idle_timeout", &["state"])]);
        let result = self.get(&path)?;
        let status = answer::query_status(&result).map_err(|e| self.error(&path, e))?;
        answer::print_state(status).map_err(|e| self.error(&path, e))
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
        let objects: Vec<(&str, &[&str])> = sections
            .iter()
            .map(|s| (*s, &["mcu_version"][..]))
            .collect();
        let path = objects_query(&objects);
        let result = self.get(&path)?;
        let status = answer::query_status(&result).map_err(|e| self.error(&path, e))?;
        answer::mcu_versions(status, sections).map_err(|e| self.error(&path, e))
    }

    /// The chip each named MCU section reports (`mcu_constants.MCU`); `None` for a section
    /// that did not identify.
    pub fn mcu_chips(&self, sections: &[&str]) -> Result<HashMap<String, Option<String>>, Error> {
        if sections.is_empty() {
            return Ok(HashMap::new());
        }
        let objects: Vec<(&str, &[&str])> = sections
            .iter()
            .map(|s| (*s, &["mcu_constants"][..]))
            .collect();
        let path = objects_query(&objects);
        let result = self.get(&path)?;
        let status = answer::query_status(&result).map_err(|e| self.error(&path, e))?;
        Ok(answer::mcu_chips(status, sections))
    }

    /// `GET /machine/system_info` -> `system_info` (instance ids, available services, states).
    pub fn system_info(&self) -> Result<Map<String, Value>, Error> {
        let path = "/machine/system_info";
        let result = self.get(path)?;
        answer::system_info(&result).map_err(|e| self.error(path, e))
    }

    /// The klipper unit Moonraker controls (`system_info.instance_ids.klipper`, e.g.
    /// `klipper-1` on multi-instance hosts); `"klipper"` when Moonraker does not say.
    pub fn klipper_unit(&self) -> Result<String, Error> {
        Ok(answer::klipper_unit(&self.system_info()?))
    }

    /// The services Moonraker is allowed to control (`system_info.available_services`).
    pub fn available_services(&self) -> Result<Vec<String>, Error> {
        let info = self.system_info()?;
        answer::available_services(&info).map_err(|e| self.error("/machine/system_info", e))
    }

    /// `POST /machine/services/<action>` for `unit` (no sudo: Moonraker's provider does it).
    pub fn service_action(&self, action: ServiceAction, unit: &str) -> Result<(), Error> {
        let path = format!("/machine/services/{}", action.as_str());
        let body = json!({ "service": unit }).to_string();
        let got = self.http.post_json(&path, &body)?;
        answer::result(got.status, &got.body).map_err(|e| self.error(&path, e))?;
        Ok(())
    }

    /// Moonraker's own warnings (`/server/info` `warnings`), e.g. that PolicyKit does not
    /// let it manage units.
    pub fn warnings(&self) -> Result<Vec<String>, Error> {
        let info = self.get("/server/info")?;
        Ok(info
            .get("warnings")
            .and_then(Value::as_array)
            .map(|all| {
                all.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `(active_state, sub_state)` of `unit` from `system_info.service_state`; `None` when
    /// Moonraker does not track that unit.
    pub fn service_state(&self, unit: &str) -> Result<Option<(String, String)>, Error> {
        let info = self.system_info()?;
        answer::service_state(&info, unit).map_err(|e| self.error("/machine/system_info", e))
    }

    /// klippy's own `info` through Moonraker (`GET /printer/info`): `klipper_path` (the
    /// directory holding `klippy/`), `python_path` (the interpreter running it), `state`,
    /// `software_version`, ... (503 while klippy is disconnected).
    pub fn klippy_info(&self) -> Result<Map<String, Value>, Error> {
        let path = "/printer/info";
        let result = self.get(path)?;
        answer::object(result, "klippy's info object").map_err(|e| self.error(path, e))
    }

    /// One look at klippy: Moonraker's view (`/server/info`), then klippy's own
    /// (`webhooks.state,state_message`). klippy stopped or not yet connected is an `Ok`
    /// state (`disconnected`, also when `/printer/*` answers 503), not an error.
    pub fn klippy(&self) -> Result<Klippy, Error> {
        let path = "/server/info";
        let info = self.get(path)?;
        let info = answer::object(info, "a server info object").map_err(|e| self.error(path, e))?;
        if let Some(klippy) = answer::server_klippy(&info).map_err(|e| self.error(path, e))? {
            return Ok(klippy);
        }
        let path = objects_query(&[("webhooks", &["state", "state_message"])]);
        let result = match self.get(&path) {
            Ok(result) => result,
            // klippy went away between the two requests.
            Err(Error::Http {
                status: 503,
                message,
                ..
            }) => {
                return Ok(Klippy {
                    state: "disconnected".into(),
                    message,
                })
            }
            Err(e) => return Err(e),
        };
        let status = answer::query_status(&result).map_err(|e| self.error(&path, e))?;
        answer::webhooks(status).map_err(|e| self.error(&path, e))
    }

    /// Wait until klippy is `ready` behind Moonraker. klippy disconnected or starting,
    /// HTTP errors (503 while klippy is down) and an unreachable Moonraker (restarting)
    /// are "not ready yet" and polled again; `error`/`shutdown` end the wait at once with
    /// klippy's message, and so does an answer that is not Moonraker's. `Err(NotReady)`
    /// after `timeout` names the last state seen.
    pub fn wait_klippy_ready(&self, timeout: Duration, cancel: &Cancel) -> Result<(), Error> {
        let started = Instant::now();
        let deadline = started + timeout;
        let not_ready = |klippy: Klippy| Error::NotReady {
            url: self.base_url().to_owned(),
            waited: started.elapsed(),
            state: klippy.state,
            message: klippy.message,
        };
        loop {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled {
                    url: self.base_url().to_owned(),
                });
            }
            let last = match self.klippy() {
                Ok(klippy) if klippy.is_ready() => return Ok(()),
                Ok(klippy) if klippy.has_failed() => return Err(not_ready(klippy)),
                Ok(klippy) => klippy,
                Err(err @ (Error::Garbage { .. } | Error::BadUrl { .. })) => return Err(err),
                Err(err) => Klippy {
                    state: "unavailable".into(),
                    message: err.to_string(),
                },
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(not_ready(last));
            }
            // Sleep in small steps so a cancel is noticed quickly.
            let until = (now + POLL).min(deadline);
            while Instant::now() < until && !cancel.is_cancelled() {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// `GET path` and return the unwrapped `result`.
    fn get(&self, path: &str) -> Result<Value, Error> {
        let got = self.http.get(path)?;
        answer::result(got.status, &got.body).map_err(|e| self.error(path, e))
    }

    fn error(&self, path: &str, unexpected: Unexpected) -> Error {
        let url = self.http.url(path);
        match unexpected {
            Unexpected::Http { status, message } => Error::Http {
                url,
                status,
                message,
            },
            Unexpected::Garbage { expected, got } => Error::Garbage { url, expected, got },
        }
    }
}

#[cfg(test)]
mod tests;
