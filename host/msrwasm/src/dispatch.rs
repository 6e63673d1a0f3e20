//! The per-vCPU dispatcher: one per vCPU thread, answering each deflected
//! MSR access with the policy in force. Plain code over decoded accesses:
//! nothing here touches KVM, so every path is testable with synthetic
//! exits ([`NoKvm`] stands in for KVM's own MSRs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::Shared;
use crate::events::{CallResult, Events, VcpuEvents};
use crate::plugin::{Answer, CallError, OnError, Plugin, PluginInfo, PluginInstance};
use crate::policy::{Policy, Unhandled, fallback};
use crate::stats::StatsSink;

/// Why KVM sent an access to user space (`KVM_MSR_EXIT_REASON_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitReason {
    /// KVM knows the MSR but found the access invalid (a bad value,
    /// reserved bits, a read-only MSR).
    Inval,
    /// KVM does not know the MSR.
    Unknown,
    /// The MSR filter denied the access (a plugin claimed the MSR, the
    /// firewall denies it, or the VMM's own filter range covers it).
    Filter,
}

impl ExitReason {
    /// KVM's bit for this reason (what `msr.reason` returns to plugins).
    pub fn bits(self) -> u32 {
        match self {
            ExitReason::Inval => 1,
            ExitReason::Unknown => 2,
            ExitReason::Filter => 4,
        }
    }

    /// The reason for KVM's bits, if they name exactly one.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            1 => Some(ExitReason::Inval),
            2 => Some(ExitReason::Unknown),
            4 => Some(ExitReason::Filter),
            _ => None,
        }
    }

    /// `inval`, `unknown` or `filter`.
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::Inval => "inval",
            ExitReason::Unknown => "unknown",
            ExitReason::Filter => "filter",
        }
    }
}

/// RDMSR, or WRMSR with the value written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// RDMSR.
    Read,
    /// WRMSR of this value (EDX:EAX).
    Write(u64),
}

/// A deflected MSR access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// The MSR index (ECX).
    pub index: u32,
    /// Read or write.
    pub op: Op,
    /// Why KVM sent it to user space.
    pub reason: ExitReason,
}

impl Access {
    /// A deflected RDMSR.
    pub fn read(index: u32, reason: ExitReason) -> Self {
        Self {
            index,
            op: Op::Read,
            reason,
        }
    }

    /// A deflected WRMSR.
    pub fn write(index: u32, value: u64, reason: ExitReason) -> Self {
        Self {
            index,
            op: Op::Write(value),
            reason,
        }
    }

    /// Whether this is a WRMSR.
    pub fn is_write(&self) -> bool {
        matches!(self.op, Op::Write(_))
    }
}

/// What the guest gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reply {
    /// The RDMSR completes with this value.
    Read(u64),
    /// The WRMSR completes.
    Written,
    /// The instruction faults with #GP(0).
    Gp,
}

/// Who decided an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnsweredBy<'a> {
    /// A plugin answered HANDLED or FAULT, or failed and its
    /// `on_error = "fault"` decided (`error`).
    Plugin {
        /// The plugin version.
        plugin: &'a PluginInfo,
        /// Its position in the chain.
        position: usize,
        /// Whether a plugin error decided.
        error: bool,
    },
    /// Every plugin passed on a claimed MSR and KVM's own handling decided.
    Kvm,
    /// Nobody answered; the VM's `unhandled` policy decided.
    Unhandled(Unhandled),
}

/// The decision on one access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome<'a> {
    /// What the guest gets.
    pub reply: Reply,
    /// Who decided.
    pub by: AnsweredBy<'a>,
    /// The policy generation that decided.
    pub generation: u64,
}

/// KVM's own handling of an MSR, for claimed MSRs every plugin passed on
/// (`KVM_GET_MSRS`/`KVM_SET_MSRS` on the vCPU: see
/// [`crate::kvm::VcpuMsrs`]).
pub trait KvmMsrs {
    /// KVM's value, or `None` if KVM does not know the MSR.
    fn get(&mut self, index: u32) -> Option<u64>;
    /// Whether KVM accepted the write.
    fn set(&mut self, index: u32, value: u64) -> bool;
}

/// KVM as a host without one sees it: it knows no MSR. For driving a
/// dispatcher without a VM (tests, `msrwasm test`); a VMM passes its vCPU
/// instead ([`crate::kvm::VcpuMsrs`]), or "PASS falls back to KVM" is lost.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoKvm;

impl KvmMsrs for NoKvm {
    fn get(&mut self, _: u32) -> Option<u64> {
        None
    }

    fn set(&mut self, _: u32, _: u64) -> bool {
        false
    }
}

/// Who decided, before it is tied to the policy's plugin names.
#[derive(Clone, Copy)]
enum Who {
    Plugin { position: usize, error: bool },
    Kvm,
    Unhandled,
}

/// The per-vCPU dispatcher. `Send`: create it anywhere, use it on the vCPU
/// thread. It follows policy generations by itself: a hot reload, an
/// [`crate::Engine::update`] or an API change reaches it at its next access
/// with no code in the VMM.
pub struct Dispatcher {
    vcpu: u32,
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    /// This vCPU's instance of each plugin; `None` until first use, and
    /// again after a failure threw it away.
    instances: Vec<Option<PluginInstance>>,
    stats: StatsSink,
    sinks: Vec<Box<dyn VcpuEvents>>,
    time_calls: bool,
    /// Plugin calls so far, for sampling which ones are timed.
    calls: u32,
}

/// With call timing on, one plugin call in this many is timed (reading the
/// clock costs more than a plugin call on some hosts).
pub const TIMING_SAMPLE: u32 = 16;

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("vcpu", &self.vcpu)
            .field("generation", &self.policy.generation())
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    pub(crate) fn new(shared: Arc<Shared>, vcpu: u32) -> Self {
        let policy = shared.current();
        let mut stats = shared.stats.sink(vcpu);
        let mut sinks = shared.events.vcpu_sinks(vcpu);
        stats.policy(&policy);
        sinks.iter_mut().for_each(|s| s.policy(&policy));
        let time_calls = shared.time_calls;
        Self {
            vcpu,
            instances: (0..policy.plugins().len()).map(|_| None).collect(),
            policy,
            shared,
            stats,
            sinks,
            time_calls,
            calls: 0,
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
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Instantiates every plugin now (running `init` on this vCPU) rather
    /// than at first use, and moves to the newest policy first: `init`
    /// failures surface before the guest runs.
    pub fn warm_up(&mut self) -> Result<(), crate::plugin::LoadError> {
        if self.shared.generation() != self.policy.generation() {
            self.switch();
        }
        for (slot, plugin) in self.instances.iter_mut().zip(self.policy.plugins()) {
            if slot.is_none() {
                *slot = Some(plugin.instantiate(self.vcpu)?);
            }
        }
        Ok(())
    }

    /// Decides one deflected access: the claiming plugins in chain order,
    /// then KVM's own handling for claimed MSRs, then `unhandled`.
    pub fn handle(&mut self, access: Access, kvm: &mut dyn KvmMsrs) -> Outcome<'_> {
        let switch_started = (self.shared.generation() != self.policy.generation()).then(|| {
            let started = Instant::now();
            self.switch();
            started
        });
        let (reply, who) = self.decide(access, kvm);
        let Self {
            policy, stats, sinks, ..
        } = self;
        let outcome = Outcome {
            reply,
            by: match who {
                Who::Plugin { position, error } => AnsweredBy::Plugin {
                    plugin: policy.plugins()[position].info(),
                    position,
                    error,
                },
                Who::Kvm => AnsweredBy::Kvm,
                Who::Unhandled => AnsweredBy::Unhandled(policy.unhandled()),
            },
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
            shared,
            policy,
            instances,
            stats,
            sinks,
            time_calls,
            calls,
            ..
        } = self;
        let mut event = |position: usize, result: CallResult<'_>, took: Option<Duration>| {
            stats.plugin_call(position, result, took);
            for sink in sinks.iter_mut() {
                sink.plugin_call(position, result, took);
            }
        };
        for &position in policy.askers(access.index) {
            let plugin = &policy.plugins()[position];
            if plugin.health().quarantined() {
                event(position, CallResult::Skipped, None);
                continue;
            }
            *calls = calls.wrapping_add(1);
            let started = (*time_calls && *calls % TIMING_SAMPLE == 0).then(Instant::now);
            let result = ask(&mut instances[position], plugin, *vcpu, access);
            let took = started.map(|s| s.elapsed());
            match result {
                Ok(Answer::Pass) => event(position, CallResult::Pass, took),
                Ok(Answer::Handled(value)) => {
                    event(position, CallResult::Handled, took);
                    let reply = match access.op {
                        Op::Read => Reply::Read(value),
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
                    plugin_failed(shared, *vcpu, plugin, access, &error, quarantined);
                    event(
                        position,
                        CallResult::Error {
                            error: &error,
                            quarantined,
                        },
                        took,
                    );
                    if plugin.settings().on_error == OnError::Fault {
                        return (Reply::Gp, Who::Plugin { position, error: true });
                    }
                }
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
        (self.unhandled(access, firewall), Who::Unhandled)
    }

    /// `firewall`: the firewall denied this access.
    fn unhandled(&self, access: Access, firewall: bool) -> Reply {
        // KVM found the access invalid: it stays #GP, as with kvm.ignore_msrs.
        if access.reason == ExitReason::Inval {
            return Reply::Gp;
        }
        let policy = self.policy.unhandled();
        if policy == Unhandled::Log || firewall {
            self.shared.log_unhandled_once(self.vcpu, access, policy, firewall);
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
        let next = self.shared.current();
        let mut instances: Vec<Option<PluginInstance>> = (0..next.plugins().len()).map(|_| None).collect();
        for (position, plugin) in next.plugins().iter().enumerate() {
            if let Some(old) = self.policy.plugins().iter().position(|p| Arc::ptr_eq(p, plugin)) {
                instances[position] = self.instances[old].take();
            }
        }
        for (position, instance) in next.take_prepared(self.vcpu) {
            if let Some(slot) = instances.get_mut(position).filter(|s| s.is_none()) {
                *slot = Some(instance);
            }
        }
        let old_instances = std::mem::replace(&mut self.instances, instances);
        let old_policy = std::mem::replace(&mut self.policy, next);
        // Dropping instances and policies can take a while (large
        // memories): not on the vCPU thread.
        self.shared.bury(old_instances, old_policy);
        self.stats.policy(&self.policy);
        for sink in &mut self.sinks {
            sink.policy(&self.policy);
        }
    }
}

fn plugin_failed(
    shared: &Shared,
    vcpu: u32,
    plugin: &Plugin,
    access: Access,
    error: &CallError,
    quarantined: Option<Duration>,
) {
    tracing::warn!(
        plugin = plugin.name(), version = plugin.info().short_version(), vcpu,
        index = format_args!("{:#x}", access.index), on_error = ?plugin.settings().on_error,
        "plugin error: {error}"
    );
    if let Some(backoff) = quarantined {
        tracing::warn!(
            plugin = plugin.name(), version = plugin.info().short_version(), file = %plugin.path().display(),
            "plugin quarantined for {backoff:?} after repeated errors: skipped (as PASS) until its file changes or the backoff expires"
        );
        shared.events.quarantine(plugin.info(), backoff);
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
                .map_err(|e| CallError::Instantiate(crate::error_chain(&e)))?,
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
