//! Progress events: how the engine tells its front ends what it is doing.
//!
//! Every long operation (build, flash, stop window, verify) reports typed events through one
//! callback, `Sink`. The CLI renders them as a progress display, the detached helper writes
//! them as JSON lines, the klippy extra relays them to the console.
//!
//! Thread-safety: a `Sink` is called from whichever thread does the work (parallel builds
//! call it from several threads at once); implementations must be `Send + Sync` and quick.

use serde::Serialize;
use std::sync::Arc;

/// The pipeline stage an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Plan,
    Preflight,
    Build,
    /// Pre-warming klippy (its C helper, its byte-code) while klipper still runs.
    Prewarm,
    Stop,
    Flash,
    Restart,
    Verify,
    Report,
}

/// How loud an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Info,
    Warning,
    Error,
}

/// One progress report: stage, device (if any), fraction done (if known), message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub stage: Stage,
    pub device: Option<String>,
    pub fraction: Option<f64>,
    pub level: Level,
    pub message: String,
}

impl Event {
    pub fn info(stage: Stage, device: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            stage,
            device: device.map(str::to_owned),
            fraction: None,
            level: Level::Info,
            message: message.into(),
        }
    }
    #[must_use]
    pub fn with_level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }
    #[must_use]
    pub fn with_fraction(mut self, fraction: f64) -> Self {
        self.fraction = Some(fraction.clamp(0.0, 1.0));
        self
    }
}

/// The one callback events go through.
pub type Sink = Arc<dyn Fn(&Event) + Send + Sync>;

/// A sink that drops everything (for callers that do not want progress).
pub fn discard() -> Sink {
    Arc::new(|_| {})
}
