//! Reading Moonraker's answers: the `{"result": ...}` envelope and its `{"error": ...}`
//! form, then the shape of every answer the client reads.
//!
//! Pure functions of bytes and JSON values, so they are tested and fuzzed without a
//! server. Moonraker omits objects and fields klippy does not have: a missing optional
//! value is `None`, never an error; a value of the wrong type is an [`Unexpected`] that says
//! what was expected and shows (a bounded excerpt of) what came.
//!
//! Thread-safety: no state.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::{Klippy, PrintState};

/// An answer that is not the one asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unexpected {
    /// An HTTP error status; `message` is Moonraker's own explanation.
    Http { status: u16, message: String },
    /// Not JSON, or not the expected shape.
    Garbage { expected: String, got: String },
}

fn garbage(expected: &str, got: String) -> Unexpected {
    Unexpected::Garbage {
        expected: expected.to_owned(),
        got,
    }
}

/// The `result` of an answer with HTTP status `status` and body `body`.
pub fn result(status: u16, body: &[u8]) -> Result<Value, Unexpected> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        let message = parsed
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(|e| e.get("message").or(Some(e)))
            .map_or_else(
                || snippet(body),
                |m| m.as_str().map_or_else(|| m.to_string(), str::to_owned),
            );
        return Err(Unexpected::Http { status, message });
    }
    match parsed {
        None => Err(garbage("a JSON document", snippet(body))),
        Some(Value::Object(mut obj)) if obj.contains_key("result") => {
            Ok(obj.remove("result").unwrap_or(Value::Null))
        }
        Some(other) => Err(garbage(
            "a JSON object with a \"result\" field",
            short(&other),
        )),
    }
}

/// A `result` that must be an object (`what` names it for the message).
pub fn object(result: Value, what: &str) -> Result<Map<String, Value>, Unexpected> {
    match result {
        Value::Object(obj) => Ok(obj),
        other => Err(garbage(what, short(&other))),
    }
}

/// `result.status` of `/printer/objects/query`.
pub fn query_status(result: &Value) -> Result<&Map<String, Value>, Unexpected> {
    result
        .get("status")
        .and_then(Value::as_object)
        .ok_or_else(|| garbage("an object at result.status", short(result)))
}

/// An optional string at `status.<object>.<field>`.
fn optional_str(
    status: &Map<String, Value>,
    object: &str,
    field: &str,
) -> Result<Option<String>, Unexpected> {
    match status.get(object).and_then(|o| o.get(field)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(garbage(
            &format!("a string at status.{object}.{field}"),
            short(other),
        )),
    }
}

/// `print_stats.state` and `idle_timeout.state`.
pub fn print_state(status: &Map<String, Value>) -> Result<PrintState, Unexpected> {
    Ok(PrintState {
        print_stats: optional_str(status, "print_stats", "state")?,
        idle_timeout: optional_str(status, "idle_timeout", "state")?,
    })
}

/// `<section>.mcu_version` of every section (`None` when not reported).
pub fn mcu_versions(
    status: &Map<String, Value>,
    sections: &[&str],
) -> Result<HashMap<String, Option<String>>, Unexpected> {
    sections
        .iter()
        .map(|s| Ok(((*s).to_owned(), optional_str(status, s, "mcu_version")?)))
        .collect()
}

/// `<section>.mcu_constants.MCU` of every section: the chip each MCU reports (`None` when
/// not reported, e.g. an MCU that never identified).
pub fn mcu_chips(
    status: &Map<String, Value>,
    sections: &[&str],
) -> HashMap<String, Option<String>> {
    sections
        .iter()
        .map(|s| {
            let chip = status
                .get(*s)
                .and_then(|o| o.get("mcu_constants"))
                .and_then(|c| c.get("MCU"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            ((*s).to_owned(), chip)
        })
        .collect()
}

/// What `/server/info` says about klippy: `None` when klippy is connected and ready (ask
/// klippy itself), else klippy's state as Moonraker sees it.
pub fn server_klippy(info: &Map<String, Value>) -> Result<Option<Klippy>, Unexpected> {
    let state = match info.get("klippy_state") {
        None | Some(Value::Null) => "unknown".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(garbage("a string at klippy_state", short(other))),
    };
    let connected = match info.get("klippy_connected") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(garbage("true or false at klippy_connected", short(other))),
    };
    if connected && state == "ready" {
        return Ok(None);
    }
    Ok(Some(Klippy {
        state: if connected {
            state
        } else {
            "disconnected".into()
        },
        message: String::new(),
    }))
}

/// klippy's own `webhooks.state` and `webhooks.state_message`.
pub fn webhooks(status: &Map<String, Value>) -> Result<Klippy, Unexpected> {
    let state = optional_str(status, "webhooks", "state")?.ok_or_else(|| {
        garbage(
            "a string at status.webhooks.state",
            short(&Value::Object(status.clone())),
        )
    })?;
    Ok(Klippy {
        state,
        message: optional_str(status, "webhooks", "state_message")?.unwrap_or_default(),
    })
}

/// `result.system_info` of `/machine/system_info`.
pub fn system_info(result: &Value) -> Result<Map<String, Value>, Unexpected> {
    match result.get("system_info") {
        Some(Value::Object(info)) => Ok(info.clone()),
        _ => Err(garbage("an object at system_info", short(result))),
    }
}

/// The klipper unit Moonraker controls (`instance_ids.klipper`), `"klipper"` when unsaid.
pub fn klipper_unit(info: &Map<String, Value>) -> String {
    info.get("instance_ids")
        .and_then(|ids| ids.get("klipper"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("klipper")
        .to_owned()
}

/// `available_services` (absent: none).
pub fn available_services(info: &Map<String, Value>) -> Result<Vec<String>, Unexpected> {
    match info.get("available_services") {
        Some(Value::Array(list)) => Ok(list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()),
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(other) => Err(garbage(
            "a list at system_info.available_services",
            short(other),
        )),
    }
}

/// `(active_state, sub_state)` of `unit` in `service_state`; `None` when not tracked.
pub fn service_state(
    info: &Map<String, Value>,
    unit: &str,
) -> Result<Option<(String, String)>, Unexpected> {
    let Some(state) = info.get("service_state").and_then(|s| s.get(unit)) else {
        return Ok(None);
    };
    let field = |name: &str| state.get(name).and_then(Value::as_str).map(str::to_owned);
    match (field("active_state"), field("sub_state")) {
        (Some(active), sub) => Ok(Some((active, sub.unwrap_or_default()))),
        (None, _) => Err(garbage(
            &format!("active_state in system_info.service_state.{unit}"),
            short(state),
        )),
    }
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
mod tests {
    use super::*;
    use serde_json::json;

    fn status(v: &Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn envelope_errors_and_garbage() {
        assert_eq!(result(200, br#"{"result": 1}"#), Ok(json!(1)));
        let err = result(
            503,
            br#"{"error": {"code": 503, "message": "Klippy Host not connected"}}"#,
        );
        assert_eq!(
            err,
            Err(Unexpected::Http {
                status: 503,
                message: "Klippy Host not connected".into()
            })
        );
        let Err(Unexpected::Http { message, .. }) = result(502, b"<html>bad gateway</html>") else {
            panic!()
        };
        assert_eq!(message, "`<html>bad gateway</html>`");
        let Err(Unexpected::Garbage { expected, got }) = result(200, b"<html>hello</html>") else {
            panic!()
        };
        assert_eq!(expected, "a JSON document");
        assert!(got.contains("<html>"));
        let Err(Unexpected::Garbage { expected, .. }) = result(200, br#"{"no_result": 1}"#) else {
            panic!()
        };
        assert!(expected.contains("\"result\""));
        let Err(Unexpected::Garbage { got, .. }) = result(200, b"") else {
            panic!()
        };
        assert_eq!(got, "an empty body");
    }

    #[test]
    fn long_garbage_is_cut_on_a_character_boundary() {
        let body = "é".repeat(500);
        let Err(Unexpected::Garbage { got, .. }) = result(200, body.as_bytes()) else {
            panic!()
        };
        assert_eq!(got.chars().count(), 123);
    }

    #[test]
    fn missing_objects_are_none_wrong_types_are_garbage() {
        let s = status(&json!({"print_stats": {"state": "paused"}}));
        let state = print_state(&s).unwrap();
        assert!(state.is_busy());
        assert_eq!(state.idle_timeout, None);
        let s = status(&json!({"print_stats": {"state": 3}}));
        assert!(matches!(print_state(&s), Err(Unexpected::Garbage { .. })));
        let s = status(&json!({"mcu": {"mcu_version": "v0.13.0"}, "mcu EBB36": {}}));
        let v = mcu_versions(&s, &["mcu", "mcu EBB36", "mcu gone"]).unwrap();
        assert_eq!(v["mcu"].as_deref(), Some("v0.13.0"));
        assert_eq!(v["mcu EBB36"], None);
        assert_eq!(v["mcu gone"], None);
    }

    #[test]
    fn klippy_state_from_server_info_and_webhooks() {
        let info = status(&json!({"klippy_connected": true, "klippy_state": "ready"}));
        assert_eq!(server_klippy(&info), Ok(None));
        let info = status(&json!({"klippy_connected": false, "klippy_state": "ready"}));
        assert_eq!(server_klippy(&info).unwrap().unwrap().state, "disconnected");
        let info = status(&json!({"klippy_connected": true, "klippy_state": "startup"}));
        assert_eq!(server_klippy(&info).unwrap().unwrap().state, "startup");
        // What real Moonraker answers to `webhooks=state&webhooks=state_message`: only
        // the last field. The state is missing, which is garbage, not "ready".
        let s = status(&json!({"webhooks": {"state_message": "Printer is ready"}}));
        assert!(matches!(webhooks(&s), Err(Unexpected::Garbage { .. })));
        let s = status(&json!({"webhooks": {"state": "error", "state_message": "boom"}}));
        let k = webhooks(&s).unwrap();
        assert!(k.has_failed());
        assert_eq!(k.message, "boom");
    }

    #[test]
    fn system_info_fields() {
        let info = system_info(&json!({"system_info": {
            "instance_ids": {"klipper": "klipper-1"},
            "available_services": ["klipper-1", 3, "moonraker"],
            "service_state": {"klipper-1": {"active_state": "active", "sub_state": "running"},
                              "odd": {"sub_state": "x"}}
        }}))
        .unwrap();
        assert_eq!(klipper_unit(&info), "klipper-1");
        assert_eq!(
            available_services(&info).unwrap(),
            ["klipper-1", "moonraker"]
        );
        assert_eq!(
            service_state(&info, "klipper-1").unwrap(),
            Some(("active".into(), "running".into()))
        );
        assert_eq!(service_state(&info, "none").unwrap(), None);
        assert!(service_state(&info, "odd").is_err());
        assert_eq!(klipper_unit(&Map::new()), "klipper");
        assert!(system_info(&json!([])).is_err());
    }
}
