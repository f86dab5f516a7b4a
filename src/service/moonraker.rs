//! The `moonraker` backend: `/machine/services/stop|start` (no sudo needed).
//!
//! Owns: asking Moonraker to stop/start the klipper unit and polling
//! `system_info.service_state` until the unit is inactive/active. The unit name is the
//! configured one, or — when that is empty — Moonraker's `instance_ids.klipper`, resolved
//! once on first use.
//!
//! Thread-safety: `Send + Sync`; the resolved unit name is kept in a `OnceLock`.

use std::sync::OnceLock;
use std::time::Duration;

use super::{wait_for_state, Error, ServiceControl};
use crate::moonraker::{Client, ServiceAction};

/// How long a stop or start may take before Moonraker's state says it is done.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Controls the service through Moonraker's machine API.
#[derive(Debug)]
pub struct MoonrakerService {
    client: Client,
    configured_unit: String,
    unit: OnceLock<String>,
    state_timeout: Duration,
}

impl MoonrakerService {
    /// `unit` empty: ask Moonraker which unit is klipper.
    pub fn new(client: Client, unit: &str) -> Self {
        MoonrakerService {
            client,
            configured_unit: unit.trim().to_owned(),
            unit: OnceLock::new(),
            state_timeout: STATE_TIMEOUT,
        }
    }

    /// Change how long stop/start wait for the unit's state (default 60 s).
    #[cfg(test)]
    #[must_use]
    pub fn with_state_timeout(mut self, timeout: Duration) -> Self {
        self.state_timeout = timeout;
        self
    }

    /// The unit controlled (resolving it through Moonraker when not configured).
    pub fn unit(&self) -> Result<String, Error> {
        if !self.configured_unit.is_empty() {
            return Ok(self.configured_unit.clone());
        }
        if let Some(unit) = self.unit.get() {
            return Ok(unit.clone());
        }
        let unit = self
            .client
            .klipper_unit()
            .map_err(|source| Error::Moonraker {
                action: "find the unit of",
                service: "klipper".into(),
                source: Box::new(source),
            })?;
        Ok(self.unit.get_or_init(|| unit).clone())
    }

    fn unit_name(&self) -> String {
        if self.configured_unit.is_empty() {
            self.unit.get().cloned().unwrap_or_else(|| "klipper".into())
        } else {
            self.configured_unit.clone()
        }
    }

    /// `(active?, "active_state/sub_state")` of the unit.
    fn state(&self, unit: &str, action: &'static str) -> Result<(bool, String), Error> {
        let state = self
            .client
            .service_state(unit)
            .map_err(|source| Error::Moonraker {
                action,
                service: self.describe(),
                source: Box::new(source),
            })?;
        match state {
            Some((active, sub)) => Ok((active == "active", format!("{active}/{sub}"))),
            None => Err(Error::Unavailable {
                service: self.describe(),
                reason: format!(
                    "Moonraker does not report the state of `{unit}` (is it in \
                     available_services? is its [machine] provider `none`?)"
                ),
            }),
        }
    }

    fn act(&self, action: ServiceAction, label: &'static str, want: bool) -> Result<(), Error> {
        let unit = self.unit()?;
        self.client
            .service_action(action, &unit)
            .map_err(|source| Error::Moonraker {
                action: label,
                service: self.describe(),
                source: Box::new(source),
            })?;
        wait_for_state(&self.describe(), want, self.state_timeout, || {
            self.state(&unit, label)
        })
    }
}

impl ServiceControl for MoonrakerService {
    fn describe(&self) -> String {
        format!(
            "{} (via Moonraker at {})",
            self.unit_name(),
            self.client.base_url()
        )
    }

    fn stop(&self) -> Result<(), Error> {
        self.act(ServiceAction::Stop, "stop", false)
    }

    fn start(&self) -> Result<(), Error> {
        self.act(ServiceAction::Start, "start", true)
    }

    fn is_active(&self) -> Result<bool, Error> {
        let unit = self.unit()?;
        Ok(self.state(&unit, "query")?.0)
    }

    fn check(&self) -> Result<(), Error> {
        let unit = self.unit()?;
        let available = self
            .client
            .available_services()
            .map_err(|source| Error::Moonraker {
                action: "check control of",
                service: self.describe(),
                source: Box::new(source),
            })?;
        if !available.contains(&unit) {
            return Err(Error::Unavailable {
                service: self.describe(),
                reason: format!(
                    "Moonraker may not control `{unit}` (available services: {}). Add it to \
                     <data_path>/moonraker.asvc, check Moonraker's [machine] provider, or use \
                     the systemd backend: `kflash settings set service systemd`",
                    if available.is_empty() {
                        "none".to_owned()
                    } else {
                        available.join(", ")
                    }
                ),
            });
        }
        self.state(&unit, "check control of").map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moonraker::fake::{Reply, Server};
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A Moonraker whose `klipper-1` unit follows stop/start POSTs.
    fn moonraker(available: &'static [&'static str]) -> (Server, Arc<AtomicBool>) {
        let active = Arc::new(AtomicBool::new(true));
        let flag = active.clone();
        let server = Server::start(move |r| match r.path.as_str() {
            "/machine/services/stop" | "/machine/services/start" => {
                let body: Value = serde_json::from_str(&r.body).unwrap_or_default();
                if body["service"] != "klipper-1" {
                    return Reply::json(
                        400,
                        r#"{"error": {"message": "Invalid argument for 'service'"}}"#,
                    );
                }
                flag.store(r.path.ends_with("start"), Ordering::SeqCst);
                Reply::result(&json!("ok"))
            }
            "/machine/system_info" => {
                let (a, s) = if flag.load(Ordering::SeqCst) {
                    ("active", "running")
                } else {
                    ("inactive", "dead")
                };
                Reply::result(&json!({"system_info": {
                    "instance_ids": {"klipper": "klipper-1"},
                    "available_services": available,
                    "service_state": {"klipper-1": {"active_state": a, "sub_state": s}}
                }}))
            }
            _ => Reply::json(404, r#"{"error": {"message": "Not Found"}}"#),
        });
        (server, active)
    }

    fn client(server: &Server) -> Client {
        Client::new(&server.url, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn stops_and_starts_the_resolved_unit() {
        let (server, active) = moonraker(&["klipper-1", "moonraker"]);
        let svc = MoonrakerService::new(client(&server), "");
        svc.check().unwrap();
        assert!(svc.is_active().unwrap());
        svc.stop().unwrap();
        assert!(!active.load(Ordering::SeqCst));
        assert!(!svc.is_active().unwrap());
        svc.start().unwrap();
        assert!(active.load(Ordering::SeqCst));
        assert!(svc.describe().contains("klipper-1"));
    }

    #[test]
    fn check_refuses_a_unit_moonraker_may_not_control() {
        let (server, _) = moonraker(&["moonraker"]);
        let svc = MoonrakerService::new(client(&server), "");
        let err = svc.check().unwrap_err().to_string();
        assert!(err.contains("moonraker.asvc"), "{err}");
        assert!(err.contains("klipper-1"), "{err}");
    }

    #[test]
    fn rejected_action_carries_moonrakers_message() {
        let (server, active) = moonraker(&["klipper-1"]);
        let svc = MoonrakerService::new(client(&server), "klipper");
        let err = svc.stop().unwrap_err().to_string();
        assert!(err.contains("Invalid argument"), "{err}");
        assert!(active.load(Ordering::SeqCst));
    }

    #[test]
    fn state_that_never_changes_times_out() {
        let server = Server::start(|r| match r.path.as_str() {
            "/machine/system_info" => Reply::result(&json!({"system_info": {
                "service_state": {"klipper": {"active_state": "active", "sub_state": "running"}}
            }})),
            _ => Reply::result(&json!("ok")),
        });
        let svc = MoonrakerService::new(client(&server), "klipper")
            .with_state_timeout(Duration::from_millis(500));
        let err = svc.stop().unwrap_err();
        assert!(matches!(err, Error::StateTimeout { .. }), "{err}");
        assert!(err.to_string().contains("active/running"), "{err}");
    }

    #[test]
    fn unreachable_moonraker_is_reported() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Client::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(1)).unwrap();
        let err = MoonrakerService::new(c, "klipper")
            .check()
            .unwrap_err()
            .to_string();
        assert!(err.contains("unreachable"), "{err}");
    }
}
