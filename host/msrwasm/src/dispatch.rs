//! What the host does with each vCPU exit, as plain functions over decoded
//! exits: the vCPU loop decodes, this module decides, the loop applies.
//! Nothing here touches KVM, so every path is testable with synthetic exits.

use std::sync::Arc;
use std::time::Instant;

use crate::plugin::abi::{REASON_FILTER, REASON_INVAL, REASON_UNKNOWN};
use crate::policy::{Access, Decision, KvmMsrs, PluginCounters, PolicyCell, Responder, VcpuChain};
use crate::trace::{TraceRecord, TraceSender};

use super::io::{IoBus, PortEffect};

/// An exit, decoded and owned (the loop handles the two exits that carry a
/// buffer to fill, port and MMIO reads, with [`ExitHandler::io_in`] and
/// [`ExitHandler::mmio_read`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    Rdmsr {
        index: u32,
        reason: u32,
    },
    Wrmsr {
        index: u32,
        value: u64,
        reason: u32,
    },
    IoOut {
        port: u16,
        data: Vec<u8>,
    },
    MmioWrite {
        addr: u64,
        len: usize,
    },
    Hlt,
    /// Triple fault.
    Shutdown,
    InternalError,
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    /// KVM_RUN returned EINTR/EAGAIN: someone kicked this vCPU.
    Interrupted,
    /// Anything else KVM reported.
    Unexpected {
        what: String,
    },
}

/// What the vCPU loop must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Resume,
    /// Complete the pending MSR exit: `Some(value)` succeeds (the value is
    /// read by RDMSR), `None` injects #GP.
    CompleteMsr(Option<u64>),
    /// This vCPU halted for good.
    Halt,
    /// The guest asked to end the VM with this status.
    Exit(u8),
    /// The vCPU cannot go on; report its registers and end the VM.
    Crash(String),
}

/// Counters of one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VcpuStats {
    pub exits: u64,
    pub rdmsr: u64,
    pub wrmsr: u64,
    /// MSR accesses answered with #GP.
    pub gp: u64,
    /// MSR accesses that fell back to KVM's own MSR.
    pub kvm_fallback: u64,
    /// MSR accesses decided by the `unhandled` policy.
    pub unhandled: u64,
    pub port_io: u64,
    /// Accesses to ports nobody decodes.
    pub unknown_ports: u64,
    pub mmio: u64,
    /// Exits the host does not expect (logged as errors).
    pub unexpected: u64,
    /// Policy generations this vCPU moved to (hot reloads).
    pub switches: u64,
    /// Longest time one switch held this vCPU, including the first answer
    /// of the new version (instantiation), nanoseconds.
    pub longest_switch_ns: u64,
}

/// A Rust MSR handler used instead of the plugin chain (a benchmark
/// baseline): `Some(value)` completes the access, `None` injects #GP.
pub type NativeMsr = fn(vcpu: u32, access: Access) -> Option<u64>;

impl std::ops::AddAssign<&VcpuStats> for VcpuStats {
    fn add_assign(&mut self, s: &VcpuStats) {
        self.exits += s.exits;
        self.rdmsr += s.rdmsr;
        self.wrmsr += s.wrmsr;
        self.gp += s.gp;
        self.kvm_fallback += s.kvm_fallback;
        self.unhandled += s.unhandled;
        self.port_io += s.port_io;
        self.unknown_ports += s.unknown_ports;
        self.mmio += s.mmio;
        self.unexpected += s.unexpected;
        self.switches += s.switches;
        self.longest_switch_ns = self.longest_switch_ns.max(s.longest_switch_ns);
    }
}

/// Per-vCPU exit handling state.
pub struct ExitHandler {
    vcpu: u32,
    cell: Arc<PolicyCell>,
    generation: u64,
    chain: VcpuChain,
    /// Counters of chains left behind by policy switches, by plugin name.
    retired: Vec<(String, PluginCounters)>,
    io: Arc<IoBus>,
    trace: Option<TraceSender>,
    started: Instant,
    native: Option<NativeMsr>,
    pub stats: VcpuStats,
}

impl ExitHandler {
    pub fn new(vcpu: u32, cell: Arc<PolicyCell>, io: Arc<IoBus>, trace: Option<TraceSender>, started: Instant) -> Self {
        let (generation, policy) = cell.current();
        Self {
            vcpu,
            chain: VcpuChain::new(policy, vcpu),
            cell,
            generation,
            retired: Vec::new(),
            io,
            trace,
            started,
            native: None,
            stats: VcpuStats::default(),
        }
    }

    /// Answers MSRs with `native` instead of the chain (see [`NativeMsr`]).
    pub fn set_native(&mut self, native: Option<NativeMsr>) {
        self.native = native;
    }

    /// The chain this vCPU answers with now.
    pub fn chain_mut(&mut self) -> &mut VcpuChain {
        &mut self.chain
    }

    /// Decides one exit.
    pub fn handle(&mut self, exit: Exit, kvm: &mut dyn KvmMsrs) -> Action {
        self.stats.exits += 1;
        match exit {
            Exit::Rdmsr { index, reason } => {
                self.stats.rdmsr += 1;
                Action::CompleteMsr(self.msr(
                    Access {
                        index,
                        reason,
                        write: None,
                    },
                    kvm,
                ))
            }
            Exit::Wrmsr { index, value, reason } => {
                self.stats.wrmsr += 1;
                Action::CompleteMsr(self.msr(
                    Access {
                        index,
                        reason,
                        write: Some(value),
                    },
                    kvm,
                ))
            }
            Exit::IoOut { port, data } => {
                self.stats.port_io += 1;
                match self.io.write(port, &data) {
                    Some(PortEffect::Exit(status)) => Action::Exit(status),
                    Some(PortEffect::None) => Action::Resume,
                    None => {
                        self.stats.unknown_ports += 1;
                        Action::Resume
                    }
                }
            }
            Exit::MmioWrite { addr, len } => {
                self.stats.mmio += 1;
                tracing::debug!(
                    vcpu = self.vcpu,
                    "dropped {len}-byte MMIO write to {addr:#x} (no device there)"
                );
                Action::Resume
            }
            Exit::Hlt => Action::Halt,
            Exit::Interrupted => {
                self.stats.exits -= 1;
                Action::Resume
            }
            Exit::Shutdown => Action::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            Exit::InternalError => Action::Crash("KVM internal error (KVM_EXIT_INTERNAL_ERROR)".into()),
            Exit::FailEntry { reason, cpu } => Action::Crash(format!(
                "VM entry failed (hardware reason {reason:#x} on host CPU {cpu})"
            )),
            Exit::Unexpected { what } => {
                self.stats.unexpected += 1;
                tracing::error!(vcpu = self.vcpu, "unexpected exit: {what}");
                Action::Crash(format!("unexpected exit: {what}"))
            }
        }
    }

    /// A port read: COM1 registers, all ones elsewhere.
    pub fn io_in(&mut self, port: u16, data: &mut [u8]) {
        self.stats.exits += 1;
        self.stats.port_io += 1;
        if !self.io.read(port, data) {
            self.stats.unknown_ports += 1;
        }
    }

    /// A read of unbacked guest-physical memory: all ones, like an empty bus.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.stats.exits += 1;
        self.stats.mmio += 1;
        data.fill(0xff);
        tracing::debug!(
            vcpu = self.vcpu,
            "MMIO read of {addr:#x} (no device there) reads all ones"
        );
    }

    fn msr(&mut self, access: Access, kvm: &mut dyn KvmMsrs) -> Option<u64> {
        let switch_started = (self.cell.generation() != self.generation).then(|| {
            let started = Instant::now();
            self.switch_policy();
            started
        });
        let decision = match self.native {
            Some(native) => Decision {
                result: native(self.vcpu, access),
                by: Responder::Native,
            },
            None => self.chain.answer(access, kvm),
        };
        match decision.by {
            Responder::Kvm => self.stats.kvm_fallback += 1,
            Responder::Unhandled(_) => self.stats.unhandled += 1,
            Responder::Plugin { .. } | Responder::Native => {}
        }
        if decision.result.is_none() {
            self.stats.gp += 1;
        }
        if let Some(started) = switch_started {
            // The switch and this first answer (which instantiates what
            // changed) are what a reload costs this vCPU.
            self.stats.switches += 1;
            self.stats.longest_switch_ns = self.stats.longest_switch_ns.max(started.elapsed().as_nanos() as u64);
        }
        let debug = tracing::enabled!(tracing::Level::DEBUG);
        if self.trace.is_some() || debug {
            let record = self.record(access, decision);
            if debug {
                tracing::debug!(
                    vcpu = record.vcpu,
                    op = record.op,
                    index = record.index,
                    value = record.value,
                    reason = record.reason,
                    by = record.by,
                    plugin = record.plugin,
                    version = record.version,
                    status = record.status,
                    "msr access"
                );
            }
            if let Some(trace) = &self.trace {
                // A closed trace (the writer failed) must not stop the guest.
                let _ = trace.send(record);
            }
        }
        decision.result
    }

    /// Moves to the policy now in force: fresh instances of what changed.
    fn switch_policy(&mut self) {
        let (generation, policy) = self.cell.current();
        let retired = self.chain.succeed(policy);
        self.retired.extend(retired);
        self.generation = generation;
    }

    /// Plugin counters by name, including those of replaced policies.
    pub fn plugin_counters(&self) -> Vec<(String, PluginCounters)> {
        let mut all = self.retired.clone();
        for (plugin, counters) in self.chain.policy().plugins().iter().zip(self.chain.counters()) {
            all.push((plugin.name().to_owned(), *counters));
        }
        all
    }

    fn record(&self, access: Access, decision: Decision) -> TraceRecord {
        let policy = self.chain.policy();
        let (by, plugin, version, status) = match decision.by {
            Responder::Plugin { position, error } => {
                let p = &policy.plugins()[position];
                let status = match (error, decision.result) {
                    (true, _) => "error",
                    (false, Some(_)) => "handled",
                    (false, None) => "fault",
                };
                (
                    "plugin",
                    Some(p.name().to_owned()),
                    Some(p.sha256()[..16].to_owned()),
                    status.to_owned(),
                )
            }
            Responder::Kvm => ("kvm", None, None, "kvm".to_owned()),
            Responder::Native => ("native", None, None, "handled".to_owned()),
            Responder::Unhandled(policy) => ("unhandled", None, None, format!("{policy:?}").to_ascii_lowercase()),
        };
        let value = match access.write {
            Some(v) => Some(v),
            None => decision.result,
        };
        TraceRecord {
            t_ns: self.started.elapsed().as_nanos() as u64,
            vcpu: self.vcpu,
            op: if access.write.is_some() { "wrmsr" } else { "rdmsr" }.into(),
            index: format!("{:#x}", access.index),
            value: value.map(|v| format!("{v:#x}")),
            reason: reason_name(access.reason).into(),
            by: by.into(),
            plugin,
            version,
            status,
            outcome: if decision.result.is_some() { "ok" } else { "gp" }.into(),
        }
    }
}

/// Name of a `KVM_MSR_EXIT_REASON_*` value.
pub fn reason_name(reason: u32) -> &'static str {
    match reason {
        REASON_INVAL => "inval",
        REASON_UNKNOWN => "unknown",
        REASON_FILTER => "filter",
        _ => "other",
    }
}

#[cfg(test)]
mod tests;
