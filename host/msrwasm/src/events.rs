//! What happens in an engine, delivered to whoever wants to know: accesses
//! and plugin calls per vCPU, reload outcomes and quarantines per engine.
//!
//! In the style of vm-superio's `SerialEvents`: the engine calls an
//! [`Events`] implementation, which decides what to do (count, trace, log,
//! export). Per-vCPU events go to a [`VcpuEvents`] sink each dispatcher
//! owns (`&mut self`, no locks on the exit path); engine-wide events go to
//! [`Events`] itself. msrwasm's own counters ([`crate::stats`]), its trace
//! ([`crate::trace`]) and its footprint ([`crate::footprint`]) are
//! implementations of these traits; a VMM adds its own with
//! [`crate::EngineBuilder::events`].

use std::sync::Arc;
use std::time::Duration;

use crate::msr::{Access, Outcome, PluginInfo};
use crate::plugin::CallError;
use crate::policy::Policy;

/// How one plugin call went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallResult<'a> {
    /// HANDLED (a read's value, or an accepted write).
    Handled,
    /// FAULT.
    Fault,
    /// PASS.
    Pass,
    /// A plugin error, decided by the plugin's `on_error`.
    Error {
        /// What went wrong.
        error: &'a CallError,
        /// The quarantine this error started, if it did.
        quarantined: Option<Duration>,
    },
    /// Skipped: the plugin is quarantined.
    Skipped,
}

/// What caused a policy change.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The engine was built: its first policy.
    Start,
    /// A watched file changed (or a refresh found it changed).
    File(std::path::PathBuf),
    /// The VMM called [`crate::Engine::update`] or
    /// [`crate::Engine::follow_manifest`].
    Update,
    /// The control API (`PUT /v1/policy`).
    Api,
    /// An explicit refresh ([`crate::Engine::refresh`], `POST /v1/reload`).
    Refresh,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Start => f.write_str("start"),
            Cause::File(path) => write!(f, "{}", path.display()),
            Cause::Update => f.write_str("update()"),
            Cause::Api => f.write_str("the control API"),
            Cause::Refresh => f.write_str("refresh"),
        }
    }
}

/// The outcome of one attempt to change the policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Reload {
    /// The new policy is in force under `generation`.
    Applied {
        /// What caused it.
        cause: Cause,
        /// The generation now in force.
        generation: u64,
    },
    /// Refused: the running policy stays.
    Refused {
        /// What caused it.
        cause: Cause,
        /// Every reason, each naming its file.
        errors: Vec<String>,
    },
}

/// Engine-wide events. Every method has a default that does nothing.
pub trait Events: Send + Sync {
    /// A sink for the dispatcher of vCPU `vcpu` (called when the
    /// dispatcher is created). `None`: no per-vCPU events.
    fn vcpu(&self, vcpu: u32) -> Option<Box<dyn VcpuEvents>> {
        let _ = vcpu;
        None
    }

    /// A policy change was applied or refused; the engine's first policy
    /// is reported too (cause [`Cause::Start`]).
    fn reload(&self, reload: &Reload) {
        let _ = reload;
    }

    /// A plugin version was quarantined for `backoff` after repeated errors.
    fn quarantine(&self, plugin: &PluginInfo, backoff: Duration) {
        let _ = (plugin, backoff);
    }
}

/// Per-vCPU events, on the vCPU's thread. Every method has a default that
/// does nothing.
pub trait VcpuEvents: Send {
    /// The dispatcher moved to `policy` (also called once for the first).
    fn policy(&mut self, policy: &Policy) {
        let _ = policy;
    }

    /// Plugin `position` of the current policy was asked (or skipped);
    /// `took` is the call's duration when the engine times calls.
    fn plugin_call(&mut self, position: usize, result: CallResult<'_>, took: Option<Duration>) {
        let _ = (position, result, took);
    }

    /// An access was decided.
    fn access(&mut self, access: &Access, outcome: &Outcome<'_>) {
        let _ = (access, outcome);
    }

    /// The dispatcher switched policies; the switch and the new version's
    /// first answer held the vCPU for `took`.
    fn switched(&mut self, generation: u64, took: Duration) {
        let _ = (generation, took);
    }
}

/// Several sinks as one.
#[derive(Default)]
pub struct Fanout {
    sinks: Vec<Arc<dyn Events>>,
}

impl Fanout {
    /// No sinks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a sink.
    pub fn push(&mut self, sink: Arc<dyn Events>) {
        self.sinks.push(sink);
    }

    /// The per-vCPU sinks of every sink that has one.
    pub(crate) fn vcpu_sinks(&self, vcpu: u32) -> Vec<Box<dyn VcpuEvents>> {
        self.sinks.iter().filter_map(|s| s.vcpu(vcpu)).collect()
    }
}

impl Events for Fanout {
    fn reload(&self, reload: &Reload) {
        self.sinks.iter().for_each(|s| s.reload(reload));
    }

    fn quarantine(&self, plugin: &PluginInfo, backoff: Duration) {
        self.sinks.iter().for_each(|s| s.quarantine(plugin, backoff));
    }
}
