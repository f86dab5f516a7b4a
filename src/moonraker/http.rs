//! HTTP to Moonraker: the one rule for Moonraker URLs, and plain-HTTP requests (ureq).
//!
//! Owns [`parse_url`], the rule every Moonraker URL follows — the `moonraker_url` setting
//! is checked with it when it is set, and the client parses with it again — and the
//! exchange itself: one request per connection, a deadline on the whole exchange (name
//! lookup, connect, send, answer), no proxy (Moonraker is on the printer host or the local
//! network; `HTTP_PROXY` must not reroute it), no redirects, a bounded body.
//!
//! The rule: `http://HOST[:PORT][/PREFIX]`. HOST is a name, an IPv4 address or a bracketed
//! IPv6 address; a name is letters, digits, `-`, `.` (and `_`); a non-ASCII name is
//! accepted and stored in its IDNA (punycode) form, which is what name resolution uses.
//! PORT defaults to 80 and may not be 0. PREFIX is for a Moonraker behind a reverse proxy
//! or with `route_prefix` set. `https`, credentials, a query and a fragment are refused,
//! each with its own reason. The normal form has no trailing slash.
//!
//! Invariants: nothing here panics on any input; HTTP error statuses are answers, not
//! errors (the caller reads Moonraker's own message from the body); transport failures are
//! `Unreachable` and malformed HTTP is `Garbage`, both naming the URL.
//!
//! Thread-safety: `Http` is immutable and `Send + Sync`; each request blocks its thread.

use std::io;
use std::time::Duration;

use url::Url;

use super::Error;

/// Largest answer accepted (Moonraker answers are small; this bounds garbage).
const MAX_BODY: u64 = 16 << 20;

/// Check `text` against the Moonraker URL rule; `Ok` is the normal form
/// (`http://host[:port][/prefix]`, no trailing slash). `Err` is the reason, for a user.
pub fn parse_url(text: &str) -> Result<String, String> {
    const EXAMPLE: &str = "e.g. http://127.0.0.1:7125";
    let text = text.trim();
    let url = match Url::parse(text) {
        Ok(url) => url,
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            return Err(format!("expected http://HOST[:PORT], {EXAMPLE}"));
        }
        Err(e) => return Err(format!("{e}, expected http://HOST[:PORT], {EXAMPLE}")),
    };
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(format!(
                "https is not supported; use Moonraker's plain http address on the \
                 printer host, {EXAMPLE}"
            ))
        }
        _ if text.contains("://") => {
            return Err(format!("only http:// URLs are supported, {EXAMPLE}"))
        }
        _ => return Err(format!("expected http://HOST[:PORT], {EXAMPLE}")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL are not supported".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not carry a query (?...) or a fragment (#...)".into());
    }
    match url.host() {
        None => return Err(format!("no host, {EXAMPLE}")),
        // The URL standard lets `"`, `{`, `!`, ... into a host name; DNS and HTTP do not.
        Some(url::Host::Domain(name))
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')) =>
        {
            return Err(format!(
                "`{name}` is not a host name (letters, digits, '-' and '.'), {EXAMPLE}"
            ))
        }
        Some(_) => {}
    }
    if url.port() == Some(0) {
        return Err("port 0 is not a port to connect to".into());
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// What Moonraker answered: the HTTP status and the body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Plain HTTP to one Moonraker.
#[derive(Debug, Clone)]
pub struct Http {
    agent: ureq::Agent,
    base: String,
    timeout: Duration,
}

impl Http {
    /// Requests under `base` (already in the normal form of [`parse_url`]), each one
    /// finished within `timeout`.
    pub fn new(base: String, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            .max_idle_connections(0)
            .user_agent("kflash")
            .accept("application/json")
            .build()
            .new_agent();
        Http {
            agent,
            base,
            timeout,
        }
    }

    /// The normalised base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The full URL of `path` (which starts with `/` and may carry a query).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Answer, Error> {
        let url = self.url(path);
        let response = self.agent.get(&url).call();
        self.answer(&url, response)
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, json: &str) -> Result<Answer, Error> {
        let url = self.url(path);
        let response = self
            .agent
            .post(&url)
            .content_type("application/json")
            .send(json);
        self.answer(&url, response)
    }

    fn answer(
        &self,
        url: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Answer, Error> {
        let mut response = response.map_err(|e| self.error(url, e))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| self.error(url, e))?;
        Ok(Answer { status, body })
    }

    fn error(&self, url: &str, err: ureq::Error) -> Error {
        let unreachable = |reason: String| Error::Unreachable {
            url: url.to_owned(),
            reason,
        };
        let garbage = |got: String| Error::Garbage {
            url: url.to_owned(),
            expected: "an HTTP/1.1 response".into(),
            got,
        };
        match err {
            ureq::Error::Timeout(_) => unreachable(format!("no answer within {:?}", self.timeout)),
            ureq::Error::Io(e) if is_timeout(&e) => {
                unreachable(format!("no answer within {:?}", self.timeout))
            }
            ureq::Error::Io(e) => unreachable(e.to_string()),
            ureq::Error::HostNotFound => unreachable("the host name does not resolve".into()),
            ureq::Error::ConnectionFailed => unreachable("the connection failed".into()),
            ureq::Error::Protocol(e) => garbage(e.to_string()),
            ureq::Error::BodyExceedsLimit(_) => garbage(format!("a body over {MAX_BODY} bytes")),
            ureq::Error::LargeResponseHeader(n, _) => garbage(format!("a header of {n} bytes")),
            other => unreachable(other.to_string()),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_accepts_hosts_ports_and_prefixes_in_normal_form() {
        for (given, normal) in [
            ("http://127.0.0.1:7125", "http://127.0.0.1:7125"),
            (" http://127.0.0.1:7125/ ", "http://127.0.0.1:7125"),
            ("HTTP://Printer.Local:7125", "http://printer.local:7125"),
            ("http://localhost/moonraker/", "http://localhost/moonraker"),
            ("http://[::1]:7125", "http://[::1]:7125"),
            ("http://printer:80", "http://printer"),
            // A non-ASCII name is kept in the form name resolution uses.
            ("http://éx:7125", "http://xn--x-9fa:7125"),
            (
                "http://drucker-küche.local",
                "http://xn--drucker-kche-llb.local",
            ),
        ] {
            assert_eq!(parse_url(given).as_deref(), Ok(normal), "{given}");
            assert_eq!(parse_url(normal).as_deref(), Ok(normal), "{normal}");
        }
    }

    #[test]
    fn the_rule_refuses_with_a_reason() {
        for (given, reason) in [
            ("https://printer.local", "https is not supported"),
            ("ftp://x", "only http://"),
            ("localhost:7125", "expected http://HOST[:PORT]"),
            ("127.0.0.1:7125", "expected http://HOST[:PORT]"),
            ("", "expected http://HOST[:PORT]"),
            ("http://:7125", "empty host"),
            ("http://host:notaport", "invalid port"),
            ("http://host:0", "port 0"),
            ("http://pi:secret@host", "credentials"),
            ("http://host/?x=1", "query"),
            ("http://host/#top", "fragment"),
            ("http://a b", "invalid"),
            ("http://é\u{0}x", "invalid"),
            // Found by fuzzing: the URL standard accepts these host names.
            ("http://1te\"print_sta", "not a host name"),
            ("http://a{b}.local", "not a host name"),
        ] {
            let err = parse_url(given).unwrap_err();
            assert!(err.contains(reason), "{given}: {err}");
        }
    }
}
