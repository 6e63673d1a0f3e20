//! The KVM side, with no `unsafe` left to the embedder: enabling user-space
//! MSR exits, decoding them, KVM's own MSRs for the fallback, completing
//! exits, and the MSR filter sink.

use kvm_bindings::kvm_enable_cap;
use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::{Cap, Kvm, MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuExit};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::dispatch::Dispatcher;
use crate::msr::{Access, ExitReason, KvmMsrs, Outcome, Reply};
use crate::policy::filter::{FilterDefault, FilterError, FilterPlan, FilterSink, VmmRange};

/// A KVM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// This KVM lacks a capability msrwasm needs.
    #[error("this KVM lacks {0}, which msrwasm needs (Linux 5.10 or newer)")]
    MissingCap(&'static str),
    /// An ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// Which.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `complete` was called without a pending MSR exit.
    #[error("no MSR exit is pending on this vCPU")]
    NoPendingExit,
    /// The VM's descriptor could not be duplicated for the filter sink.
    #[error("cannot duplicate the VM file descriptor")]
    Dup(#[source] std::io::Error),
}

/// Checks that `kvm` has what msrwasm needs: user-space MSR exits and MSR
/// filters.
pub fn check_support(kvm: &Kvm) -> Result<(), KvmError> {
    for (cap, name) in [
        (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
        (Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(())
}

/// Makes KVM send these MSR accesses to user space (`KVM_CAP_X86_USER_SPACE_MSR`),
/// before any vCPU runs and before any filter is set:
///
/// - `UNKNOWN`: MSRs KVM does not know, which plugins model;
/// - `INVAL`: accesses KVM found invalid for MSRs it knows, which plugins
///   may observe or answer (the `unhandled` policy keeps them #GP);
/// - `FILTER`: accesses the MSR filter denies: plugin claims, the
///   default-deny firewall, and the VMM's own ranges. Enabled from the
///   start and kept on, so a filter set later never makes accesses fault
///   inside KVM instead of reaching user space.
pub fn enable_user_space_msrs(vm: &VmFd) -> Result<(), KvmError> {
    let reasons = MsrExitReason::Inval | MsrExitReason::Unknown | MsrExitReason::Filter;
    let mut cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(reasons.bits());
    vm.enable_cap(&cap).map_err(|source| KvmError::Ioctl {
        what: "enabling KVM_CAP_X86_USER_SPACE_MSR",
        source,
    })
}

/// The access an exit carries, if it is an MSR exit.
pub fn msr_access(exit: &VcpuExit<'_>) -> Option<Access> {
    let reason = |r: MsrExitReason| ExitReason::from_bits(r.bits()).unwrap_or(ExitReason::Unknown);
    match exit {
        VcpuExit::X86Rdmsr(e) => Some(Access::read(e.index, reason(e.reason))),
        VcpuExit::X86Wrmsr(e) => Some(Access::write(e.index, e.data, reason(e.reason))),
        _ => None,
    }
}

/// Completes the pending MSR exit of `vcpu` with `reply`; the guest sees
/// it at the next `KVM_RUN` (see [`crate::Engine::state_snapshot`] for
/// pausing).
pub fn complete(vcpu: &mut VcpuFd, reply: Reply) -> Result<(), KvmError> {
    let value = match reply {
        Reply::Read(v) => Some(v),
        Reply::Written => Some(0),
        Reply::Gp => None,
    };
    match crate::sys::complete_msr_exit(vcpu.get_kvm_run(), value) {
        true => Ok(()),
        false => Err(KvmError::NoPendingExit),
    }
}

/// KVM's own MSRs of one vCPU (host-initiated `KVM_GET_MSRS`/`KVM_SET_MSRS`),
/// for the KVM fallback of claimed MSRs every plugin passed on (the rules
/// are in `docs/security.md`).
pub struct VcpuMsrs<'a>(pub &'a VcpuFd);

impl KvmMsrs for VcpuMsrs<'_> {
    fn get(&mut self, index: u32) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        match self.0.get_msrs(&mut msrs) {
            Ok(1) => Some(msrs.as_slice()[0].data),
            _ => None,
        }
    }

    fn set(&mut self, index: u32, value: u64) -> bool {
        let Ok(msrs) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data: value,
            ..Default::default()
        }]) else {
            return false;
        };
        matches!(self.0.set_msrs(&msrs), Ok(1))
    }
}

impl Dispatcher {
    /// Decides a deflected access with `vcpu`'s own MSRs as the fallback,
    /// then completes the exit: the whole MSR integration of a vCPU loop.
    pub fn handle_exit(&mut self, vcpu: &mut VcpuFd, access: Access) -> Result<Outcome<'_>, KvmError> {
        let outcome = self.handle(access, &mut VcpuMsrs(vcpu));
        complete(vcpu, outcome.reply)?;
        Ok(outcome)
    }
}

/// The filter sink of a VMM on kvm-ioctls: merges msrwasm's plan with the
/// VMM's own ranges and programs `KVM_X86_SET_MSR_FILTER` (also on a
/// running VM, from whichever thread applies a policy change).
///
/// It holds its own duplicate of the VM's descriptor, so the VMM keeps its
/// `VmFd` by value (as Firecracker does) and writes no `unsafe`.
pub struct KvmFilter {
    vm: VmFd,
    vmm: Vec<VmmRange>,
    /// What KVM can give a CPU template: the MSRs it knows, and the values
    /// of its feature MSRs (what it can offer guests at most).
    host: HostMsrs,
}

/// The MSRs KVM knows (`KVM_GET_MSR_INDEX_LIST`, sorted) and its feature
/// MSRs with their supported values (`KVM_GET_MSR_FEATURE_INDEX_LIST`,
/// system `KVM_GET_MSRS`).
#[derive(Debug, Default)]
struct HostMsrs {
    known: Vec<u32>,
    features: Vec<(u32, u64)>,
}

impl HostMsrs {
    fn read(kvm: &Kvm) -> Result<Self, KvmError> {
        let mut known = kvm
            .get_msr_index_list()
            .map_err(|source| KvmError::Ioctl {
                what: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?
            .as_slice()
            .to_vec();
        // A KVM without feature MSRs (or whose system KVM_GET_MSRS stops
        // early) offers none: templates asking for bits there are refused.
        let entries: Vec<kvm_msr_entry> = kvm
            .get_msr_feature_index_list()
            .map(|list| list.as_slice().to_vec())
            .unwrap_or_default()
            .into_iter()
            .map(|index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut features = Vec::new();
        if let Ok(mut msrs) = Msrs::from_entries(&entries)
            && !entries.is_empty()
            && let Ok(read) = kvm.get_msrs(&mut msrs)
        {
            features = msrs.as_slice()[..read.min(entries.len())]
                .iter()
                .map(|e| (e.index, e.data))
                .collect();
        }
        known.extend(features.iter().map(|f| f.0));
        known.sort_unstable();
        known.dedup();
        Ok(Self { known, features })
    }

    /// Refuses a template this host cannot honour: bits set to 1 that KVM
    /// cannot offer in a feature MSR, or an MSR that neither KVM nor a
    /// plugin of the plan answers.
    fn check(&self, plan: &FilterPlan) -> Result<(), FilterError> {
        for t in &plan.templates {
            let feature = self.features.iter().find(|(i, _)| *i == t.index).map(|f| f.1);
            // The read-only MSRs a template takes over are KVM feature MSRs:
            // one KVM does not report offers nothing.
            let feature = feature.or(crate::policy::template_read_only(t.index).then_some(0));
            if let Some(supported) = feature {
                let missing = t.value & !supported;
                if missing != 0 {
                    return Err(FilterError::Template {
                        index: t.index,
                        why: format!(
                            "asks for bits {missing:#x} (bit{} {}) that this host's KVM cannot provide (it supports {supported:#x})",
                            if missing.count_ones() == 1 { "" } else { "s" },
                            (0..64)
                                .filter(|b| missing >> b & 1 == 1)
                                .map(|b| b.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
            } else if self.known.binary_search(&t.index).is_err() && !plan.plugin_claims(t.index) {
                return Err(FilterError::Template {
                    index: t.index,
                    why: "cannot be modelled: KVM does not know this MSR (no host value to keep the `x` bits of) and no plugin claims it".into(),
                });
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for KvmFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmFilter")
            .field("vmm", &self.vmm)
            .finish_non_exhaustive()
    }
}

impl KvmFilter {
    /// A sink for `vm` (of `kvm`); `vmm` are the MSRs the VMM wants
    /// deflected to its own loop (counted against KVM's 16 ranges together
    /// with the plan). Duplicates the VM's descriptor: call it before the
    /// VMM's seccomp filter forbids `fcntl(F_DUPFD_CLOEXEC)`.
    pub fn new(kvm: &Kvm, vm: &VmFd, vmm: Vec<VmmRange>) -> Result<Self, KvmError> {
        let vm = crate::sys::dup_vm(kvm, vm).map_err(KvmError::Dup)?;
        let host = HostMsrs::read(kvm)?;
        Ok(Self { vm, vmm, host })
    }
}

impl FilterSink for KvmFilter {
    fn apply(&self, plan: &FilterPlan) -> Result<(), FilterError> {
        self.host.check(plan)?;
        let ranges = plan.ranges(&self.vmm)?;
        let flags = |r: bool, w: bool| match (r, w) {
            (true, true) => MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            (true, false) => MsrFilterRangeFlags::READ,
            _ => MsrFilterRangeFlags::WRITE,
        };
        // KVM refuses (EINVAL) a deny-by-default filter without ranges; one
        // range whose bitmap denies its single MSR says the same thing.
        let deny_one = [0u8];
        let mut kvm_ranges: Vec<MsrFilterRange<'_>> = ranges
            .windows
            .iter()
            .map(|w| MsrFilterRange {
                flags: flags(w.read, w.write),
                base: w.base,
                msr_count: w.count,
                bitmap: &w.bitmap,
            })
            .collect();
        if kvm_ranges.is_empty() && ranges.default == FilterDefault::Deny {
            kvm_ranges.push(MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: 0,
                msr_count: 1,
                bitmap: &deny_one,
            });
        }
        let default = match ranges.default {
            FilterDefault::Allow => MsrFilterDefaultAction::ALLOW,
            FilterDefault::Deny => MsrFilterDefaultAction::DENY,
        };
        self.vm
            .set_msr_filter(default, &kvm_ranges)
            .map_err(|e| FilterError::Kvm(std::io::Error::from_raw_os_error(e.errno())))
    }
}
