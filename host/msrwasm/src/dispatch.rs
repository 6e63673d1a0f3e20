//! The per-vCPU dispatcher: one per vCPU thread, answering each deflected
//! MSR access with the policy in force. Plain code over decoded accesses:
//! nothing here touches KVM, so every path is testable with synthetic
//! exits ([`NoKvm`] stands in for KVM's own MSRs).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sync_wrapper::SyncWrapper;

use crate::events::{CallResult, Events, Fanout, VcpuEvents};
use crate::msr::{Access, AnsweredBy, ExitReason, KvmMsrs, Op, Outcome, Reply, Unhandled};
use crate::plugin::{Answer, CallError, OnError, Plugin, PluginInstance};
use crate::policy::{Policy, fallback};
use crate::stats::{Stats, StatsSink};

#[cfg(test)]
use crate::msr::NoKvm;

/// Distinct (MSR, direction) pairs `unhandled = "log"` (and the firewall)
/// log individually per VM; past this, one line says the rest are not.
pub(crate) const MAX_LOGGED_MSRS: usize = 4096;

/// What dispatchers share with the engine that feeds them: the policy in
/// force, where they leave what they drop at a switch, and the engine-wide
/// sinks. The engine publishes; dispatchers only read.
pub(crate) struct Live {
    generation: AtomicU64,
    current: RwLock<Arc<Policy>>,
    graveyard: Mutex<Vec<Box<dyn Send>>>,
    logged: Mutex<HashSet<(u32, bool)>>,
    pub(crate) events: Fanout,
    pub(crate) stats: Arc<Stats>,
    time_calls: bool,
    /// Where each dispatcher records its thread (host energy attribution).
    threads: Arc<crate::energy::VcpuThreads>,
}

impl Live {
    pub(crate) fn new(
        policy: Policy,
        events: Fanout,
        stats: Arc<Stats>,
        time_calls: bool,
        threads: Arc<crate::energy::VcpuThreads>,
    ) -> Self {
        Self {
            generation: AtomicU64::new(policy.generation()),
            current: RwLock::new(Arc::new(policy)),
            graveyard: Mutex::new(Vec::new()),
            logged: Mutex::new(HashSet::new()),
            events,
            stats,
            time_calls,
            threads,
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn current(&self) -> Arc<Policy> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `policy` in force: dispatchers take it at their next access.
    pub(crate) fn publish(&self, policy: Policy) {
        let generation = policy.generation();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        self.generation.store(generation, Ordering::Release);
    }

    /// Keeps what a dispatcher dropped at a switch until the change path
    /// frees it, off the vCPU thread.
    fn bury(&self, instances: Vec<Option<PluginInstance>>, policy: Arc<Policy>) {
        let mut graveyard = self.graveyard.lock().unwrap_or_else(|e| e.into_inner());
        let instances: Vec<_> = instances.into_iter().flatten().collect();
        if !instances.is_empty() {
            graveyard.push(Box::new(instances));
        }
        graveyard.push(Box::new(policy));
    }

    /// Drops what dispatchers left behind at their last switch.
    pub(crate) fn empty_graveyard(&self) {
        let dead = std::mem::take(&mut *self.graveyard.lock().unwrap_or_else(|e| e.into_inner()));
        drop(dead);
    }

    /// Logs an unhandled access once per (MSR, direction) per VM.
    fn log_unhandled_once(&self, vcpu: u32, access: Access, policy: Unhandled, firewall: bool) {
        let key = (access.index, access.is_write());
        let first = {
            let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
            if logged.len() >= MAX_LOGGED_MSRS {
                if logged.insert((u32::MAX, false)) {
                    tracing::warn!(
                        "{MAX_LOGGED_MSRS} distinct unhandled MSRs logged; further ones are not logged individually (the footprint and trace still record them)"
                    );
                }
                return;
            }
            logged.insert(key)
        };
        if !first {
            return;
        }
        let what = if firewall {
            "denied by the MSR firewall (filter_default = \"deny\", not in allow)"
        } else {
            "unhandled"
        };
        let outcome = match (policy, firewall) {
            (Unhandled::Gp, _) => "#GP",
            (_, _) if access.is_write() => "write dropped",
            _ => "read as 0",
        };
        match access.op {
            Op::Read => tracing::warn!(
                event = if firewall { "firewall_denied" } else { "unhandled_msr" },
                vcpu,
                reason = access.reason.name(),
                "rdmsr {:#x} {what}: {outcome} (unhandled = {policy}); logged once per VM",
                access.index
            ),
            Op::Write(v) => tracing::warn!(
                event = if firewall { "firewall_denied" } else { "unhandled_msr" },
                vcpu,
                reason = access.reason.name(),
                "wrmsr {:#x} <- {v:#x} {what}: {outcome} (unhandled = {policy}); logged once per VM",
                access.index
            ),
        }
    }
}

/// Who decided, before it is tied to the policy's plugin names.
#[derive(Clone, Copy)]
enum Who {
    Plugin { position: usize, error: bool },
    Kvm,
    Template,
    Unhandled,
    Firewall,
}

/// What only the vCPU thread touches: its plugin instances (`None` until
/// first use, and again after a failure threw one away) and its event
/// sinks.
struct Mine {
    instances: Vec<Option<PluginInstance>>,
    sinks: Vec<Box<dyn VcpuEvents>>,
}

/// The per-vCPU dispatcher. `Send + Sync`: it can live in a VMM's vCPU
/// struct (cloud-hypervisor's `Vcpu` is `Send + Sync`) and be created on
/// any thread; it is used through `&mut`, on the vCPU thread, with no lock
/// on the exit path. It follows policy generations by itself: a hot reload,
/// an [`crate::Engine::update`] or an API change reaches it at its next
/// access with no code in the VMM.
pub struct Dispatcher {
    vcpu: u32,
    live: Arc<Live>,
    policy: Arc<Policy>,
    /// Only ever reached through `&mut self`, hence `Sync` whatever the
    /// plugin instances and the VMM's sinks are.
    mine: SyncWrapper<Mine>,
    stats: StatsSink,
    /// Plugin calls so far, for sampling which ones are timed.
    calls: u32,
    /// The thread last recorded as this vCPU's (0: none yet).
    bound_tid: u32,
}

/// With call timing on, one plugin call in this many is timed (reading the
/// clock costs more than a plugin call on some hosts).
pub(crate) const TIMING_SAMPLE: u32 = 16;

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("vcpu", &self.vcpu)
            .field("generation", &self.policy.generation())
            .finish_non_exhaustive()
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        // Its thread is no longer this vCPU's (and its id may be reused).
        self.live.threads.unbind(self.vcpu, self.bound_tid);
    }
}

impl Dispatcher {
    pub(crate) fn new(live: Arc<Live>, vcpu: u32) -> Self {
        let policy = live.current();
        let mut sinks = live.events.vcpu_sinks(vcpu);
        let mut stats = live.stats.sink(vcpu);
        stats.policy(&policy);
        sinks.iter_mut().for_each(|s| s.policy(&policy));
        Self {
            vcpu,
            mine: SyncWrapper::new(Mine {
                instances: (0..policy.chain().len()).map(|_| None).collect(),
                sinks,
            }),
            policy,
            live,
            stats,
            calls: 0,
            bound_tid: 0,
        }
    }

    /// The vCPU this dispatcher answers for.
    pub fn vcpu(&self) -> u32 {
        self.vcpu
    }

    /// The policy generation it answers with now.
    pub fn generation(&self) -> u64 {
        self.policy.generation()
    }

    /// The policy it answers with now.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Instantiates every plugin now (running `init` on this vCPU) rather
    /// than at first use, and moves to the newest policy first: `init`
    /// failures surface before the guest runs. Also prepares the calling
    /// thread for wasm (its signal stack): call it on the vCPU thread
    /// before applying a seccomp filter (`docs/embedding.md`).
    pub fn warm_up(&mut self) -> Result<(), crate::plugin::LoadError> {
        crate::plugin::Runtime::prepare_thread();
        if self.live.generation() != self.policy.generation() {
            self.switch();
        }
        let mine = self.mine.get_mut();
        for (slot, plugin) in mine.instances.iter_mut().zip(self.policy.chain()) {
            if slot.is_none() {
                *slot = Some(plugin.instantiate(self.vcpu)?);
            }
        }
        Ok(())
    }

    /// Decides one deflected access: the claiming plugins in chain order,
    /// then KVM's own handling for claimed MSRs, then `unhandled`.
    pub fn handle(&mut self, access: Access, kvm: &mut dyn KvmMsrs) -> Outcome<'_> {
        self.live.threads.bind(self.vcpu, &mut self.bound_tid);
        let switch_started = (self.live.generation() != self.policy.generation()).then(|| {
            let started = Instant::now();
            self.switch();
            started
        });
        let (reply, who) = self.decide(access, kvm);
        let Self {
            policy, stats, mine, ..
        } = self;
        let sinks = &mut mine.get_mut().sinks;
        let outcome = Outcome {
            reply,
            by: match who {
                Who::Plugin { position, error } => AnsweredBy::Plugin {
                    plugin: policy.chain()[position].info(),
                    position,
                    error,
                },
                Who::Kvm => AnsweredBy::Kvm,
                Who::Template => AnsweredBy::Template,
                Who::Unhandled => AnsweredBy::Unhandled(policy.unhandled()),
                Who::Firewall => AnsweredBy::Firewall(policy.unhandled()),
            },
            reason: access.reason,
            generation: policy.generation(),
        };
        stats.access(&access, &outcome);
        for sink in sinks.iter_mut() {
            sink.access(&access, &outcome);
        }
        if let Some(started) = switch_started {
            // The switch and this first answer (which instantiates what
            // was not prepared) are what a change costs this vCPU.
            let took = started.elapsed();
            stats.switched(outcome.generation, took);
            for sink in sinks.iter_mut() {
                sink.switched(outcome.generation, took);
            }
        }
        outcome
    }

    fn decide(&mut self, access: Access, kvm: &mut dyn KvmMsrs) -> (Reply, Who) {
        // Disjoint borrows instead of cloning Arcs: no shared cache line is
        // written on the exit path.
        let Self {
            vcpu,
            live,
            policy,
            mine,
            stats,
            calls,
            ..
        } = self;
        let Mine { instances, sinks } = mine.get_mut();
        let time_calls = live.time_calls;
        let mut event = |position: usize, result: CallResult<'_>, took: Option<Duration>| {
            stats.plugin_call(position, result, took);
            for sink in sinks.iter_mut() {
                sink.plugin_call(position, result, took);
            }
        };
        for &position in policy.askers(access.index) {
            let plugin = &policy.chain()[position];
            if plugin.health().quarantined() {
                // Not called, and its own failure policy answers: a
                // quarantine never turns into something the plugin did not
                // choose (`on_error`).
                event(position, CallResult::Skipped, None);
                match failed(policy, position, access) {
                    Some(decided) => return decided,
                    None => continue,
                }
            }
            *calls = calls.wrapping_add(1);
            let started = (time_calls && *calls % TIMING_SAMPLE == 0).then(Instant::now);
            let result = ask(&mut instances[position], plugin, *vcpu, access);
            let took = started.map(|s| s.elapsed());
            match result {
                Ok(Answer::Pass) => event(position, CallResult::Pass, took),
                Ok(Answer::Handled(value)) => {
                    event(position, CallResult::Handled, took);
                    let reply = match access.op {
                        // A template's bits win over a plugin's answer too.
                        Op::Read => plugin_read(policy, access.index, value),
                        Op::Write(_) => Reply::Written,
                    };
                    return (reply, Who::Plugin { position, error: false });
                }
                Ok(Answer::Fault) => {
                    event(position, CallResult::Fault, took);
                    return (Reply::Gp, Who::Plugin { position, error: false });
                }
                Err(error) => {
                    // A trap may leave wasm state half-written: start afresh.
                    instances[position] = None;
                    let quarantined = plugin.health().record_error();
                    plugin_failed(live, *vcpu, plugin, access, &error, quarantined);
                    event(
                        position,
                        CallResult::Error {
                            error: &error,
                            quarantined,
                        },
                        took,
                    );
                    if let Some(decided) = failed(policy, position, access) {
                        return decided;
                    }
                }
            }
        }
        // A CPU template: the host's value (KVM's own) with its bits; a
        // write to a read-only MSR it took over faults, as on hardware.
        // (Which MSRs may take a template is decided when the policy is
        // composed: read-only ones, or ones a plugin claims.)
        if let Some(template) = self.policy.template(access.index).copied() {
            let read_only = crate::policy::template_read_only(access.index);
            match access.op {
                Op::Read if read_only || fallback::rule(access.index, false) == Some(fallback::Rule::Kvm) => {
                    if let Some(base) = kvm.get(access.index) {
                        return (Reply::Read(template.apply(base)), Who::Template);
                    }
                }
                Op::Write(_) if read_only => return (Reply::Gp, Who::Template),
                _ => {}
            }
        }
        // A filtered access the firewall denied never falls back to KVM.
        let firewall = access.reason == ExitReason::Filter && self.policy.filter().firewall_denies(access.index);
        if access.reason == ExitReason::Filter
            && !firewall
            && let Some(reply) = kvm_fallback(access, kvm)
        {
            return (reply, Who::Kvm);
        }
        let who = if firewall { Who::Firewall } else { Who::Unhandled };
        (self.unhandled(access, firewall), who)
    }

    /// `firewall`: the firewall denied this access.
    fn unhandled(&self, access: Access, firewall: bool) -> Reply {
        // KVM found the access invalid: it stays #GP, as with kvm.ignore_msrs.
        if access.reason == ExitReason::Inval {
            return Reply::Gp;
        }
        let policy = self.policy.unhandled();
        if policy == Unhandled::Log || firewall {
            self.live.log_unhandled_once(self.vcpu, access, policy, firewall);
        }
        match (policy, access.op) {
            (Unhandled::Gp, _) => Reply::Gp,
            (Unhandled::Ignore | Unhandled::Log, Op::Read) => Reply::Read(0),
            (Unhandled::Ignore | Unhandled::Log, Op::Write(_)) => Reply::Written,
        }
    }

    /// Moves to the policy in force: carried-over plugins keep their
    /// instances, new versions take the instances prepared for this vCPU.
    fn switch(&mut self) {
        let next = self.live.current();
        let mine = self.mine.get_mut();
        let mut instances: Vec<Option<PluginInstance>> = (0..next.chain().len()).map(|_| None).collect();
        for (position, plugin) in next.chain().iter().enumerate() {
            if let Some(old) = self.policy.chain().iter().position(|p| Arc::ptr_eq(p, plugin)) {
                instances[position] = mine.instances[old].take();
            }
        }
        for (position, instance) in next.take_prepared(self.vcpu) {
            if let Some(slot) = instances.get_mut(position).filter(|s| s.is_none()) {
                *slot = Some(instance);
            }
        }
        let old_instances = std::mem::replace(&mut mine.instances, instances);
        let old_policy = std::mem::replace(&mut self.policy, next);
        // Dropping instances and policies can take a while (large
        // memories): not on the vCPU thread.
        self.live.bury(old_instances, old_policy);
        self.stats.policy(&self.policy);
        for sink in &mut mine.sinks {
            sink.policy(&self.policy);
        }
    }
}

/// A plugin's read answer (or its `on_error` value): a template's bits win.
fn plugin_read(policy: &Policy, index: u32, value: u64) -> Reply {
    Reply::Read(policy.template(index).map_or(value, |t| t.apply(value)))
}

/// What a failed or quarantined plugin's `on_error` gives `access`;
/// `None` for `pass` (the chain goes on).
fn failed(policy: &Policy, position: usize, access: Access) -> Option<(Reply, Who)> {
    let reply = match (policy.chain()[position].settings().on_error, access.op) {
        (OnError::Pass, _) => return None,
        (OnError::Fault, _) => Reply::Gp,
        (OnError::Value(value), Op::Read) => plugin_read(policy, access.index, value),
        (OnError::Value(_), Op::Write(_)) => Reply::Written,
    };
    Some((reply, Who::Plugin { position, error: true }))
}

fn plugin_failed(
    live: &Live,
    vcpu: u32,
    plugin: &Plugin,
    access: Access,
    error: &CallError,
    quarantined: Option<Duration>,
) {
    tracing::warn!(
        event = "plugin_error", plugin = plugin.name(), version = plugin.info().short_version(), vcpu,
        index = format_args!("{:#x}", access.index), on_error = %plugin.settings().on_error,
        "plugin error: {error}"
    );
    if let Some(backoff) = quarantined {
        tracing::warn!(
            event = "plugin_quarantined", plugin = plugin.name(), version = plugin.info().short_version(), file = %plugin.path().display(),
            "plugin quarantined for {backoff:?} after repeated errors: not called, its accesses answered by on_error = {}, until its file changes or the backoff expires", plugin.settings().on_error
        );
        live.events.quarantine(plugin.info(), backoff);
    }
}

/// Calls one plugin, instantiating it first if its instance was thrown away.
fn ask(
    slot: &mut Option<PluginInstance>,
    plugin: &Arc<Plugin>,
    vcpu: u32,
    access: Access,
) -> Result<Answer, CallError> {
    let instance = match slot {
        Some(instance) => instance,
        None => slot.insert(
            plugin
                .instantiate(vcpu)
                .map_err(|e| CallError::Instantiate(crate::util::error_chain(&e)))?,
        ),
    };
    match access.op {
        Op::Read => instance.rdmsr(access.index, access.reason.bits()),
        Op::Write(value) => instance.wrmsr(access.index, value, access.reason.bits()),
    }
}

/// What the guest would have got from KVM for a claimed MSR nobody
/// answered, where msrwasm can know it ([`fallback`]); `None` otherwise.
fn kvm_fallback(access: Access, kvm: &mut dyn KvmMsrs) -> Option<Reply> {
    match fallback::rule(access.index, access.is_write())? {
        fallback::Rule::Kvm => match access.op {
            Op::Read => kvm.get(access.index).map(Reply::Read),
            Op::Write(value) if kvm.set(access.index, value) => Some(Reply::Written),
            Op::Write(_) => Some(Reply::Gp),
        },
        fallback::Rule::Gp => Some(Reply::Gp),
        fallback::Rule::Ignore => Some(match access.op {
            Op::Read => Reply::Read(0),
            Op::Write(_) => Reply::Written,
        }),
    }
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
