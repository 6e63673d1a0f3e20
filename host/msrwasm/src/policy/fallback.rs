//! When every plugin passes on an MSR that was deflected only because a
//! plugin claimed it, the guest must get what KVM would have given it, and
//! never get past one of KVM's checks because a plugin looked at the MSR.
//!
//! KVM offers user space no way to perform a *guest* MSR access: the only
//! interface is `KVM_GET_MSRS`/`KVM_SET_MSRS`, which KVM treats as
//! host-initiated and exempts from guest checks and side effects. So:
//!
//! - where a host-initiated access behaves exactly like a guest one, the
//!   fallback uses it ([`Rule::Kvm`]);
//! - where KVM's guest answer is fixed and known (a guest write to
//!   `MSR_PLATFORM_INFO` always faults), the host gives that answer
//!   ([`Rule::Gp`], [`Rule::Ignore`]);
//! - where neither holds, claims are refused at load
//!   ([`first_unsafe`]), naming the MSR and what KVM does differently;
//! - any other claimed MSR that every plugin passes on goes to the
//!   `unhandled` policy: KVM does not know it, or msrwasm does not know
//!   that KVM's host path is safe for it, and then #GP (by default) is the
//!   answer that never loosens KVM's checks.
//!
//! The table comes from Linux's `arch/x86/kvm` (`kvm_set_msr_common`,
//! `kvm_get_msr_common`, `__kvm_set_msr`, the vendor `set_msr`/`get_msr`),
//! where every difference is a test of `host_initiated`; `docs/security.md`
//! lists it.

/// What the fallback does for one direction of one MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// `KVM_GET_MSRS`/`KVM_SET_MSRS`: same outcome as a guest access.
    Kvm,
    /// KVM always faults this guest access.
    Gp,
    /// KVM accepts this guest access and ignores it (reads 0).
    Ignore,
}

use Rule::{Gp, Ignore, Kvm};

/// MSRs whose `KVM_GET_MSRS` has the same outcome as a guest RDMSR (same
/// #GP decision, same value): no `host_initiated` branch in KVM's common,
/// SVM, VMX or PVM code, and measured identical on a PVM host.
pub const READ_SAME: &[(u32, u32, &str)] = &[
    (0x0, 0x1, "IA32_P5_MC_ADDR/TYPE"),
    (0x11, 0x11, "KVM_WALL_CLOCK"),
    (0x17, 0x17, "IA32_PLATFORM_ID"),
    (0x2a, 0x2a, "EBL_CR_POWERON"),
    (0x2c, 0x2c, "EBC_FREQUENCY_ID"),
    (0xcd, 0xcd, "FSB_FREQ"),
    (0xfe, 0xfe, "IA32_MTRRCAP"),
    (0x11e, 0x11e, "BBL_CR_CTL3"),
    (0x140, 0x140, "MISC_FEATURES_ENABLES"),
    (0x174, 0x176, "IA32_SYSENTER_CS/ESP/EIP"),
    (0x179, 0x17a, "IA32_MCG_CAP/MCG_STATUS"),
    (0x198, 0x199, "IA32_PERF_STATUS/PERF_CTL"),
    (0x1fc, 0x1fc, "IA32_POWER_CTL"),
    (0x200, 0x26f, "IA32_MTRR_PHYSBASE/PHYSMASK/FIX"),
    (0x277, 0x277, "IA32_PAT"),
    (0x2ff, 0x2ff, "IA32_MTRR_DEF_TYPE"),
    (0x400, 0x47f, "IA32_MCi_CTL/STATUS/ADDR/MISC"),
    (0x606, 0x606, "MSR_RAPL_POWER_UNIT"),
    (0x611, 0x611, "MSR_PKG_ENERGY_STATUS"),
    (0x619, 0x619, "MSR_DRAM_ENERGY_STATUS"),
    (0x639, 0x639, "MSR_PP0_ENERGY_STATUS"),
    (0x641, 0x641, "MSR_PP1_ENERGY_STATUS"),
    (0x6e0, 0x6e0, "IA32_TSC_DEADLINE"),
    (0x4b56_4d00, 0x4b56_4d00, "KVM_WALL_CLOCK_NEW"),
    (0x4b56_4d02, 0x4b56_4d07, "KVM_ASYNC_PF_EN..ASYNC_PF_ACK"),
    (0xc000_0082, 0xc000_0084, "LSTAR/CSTAR/SFMASK"),
    (0xc000_0100, 0xc000_0102, "FS_BASE/GS_BASE/KERNEL_GS_BASE"),
    (0xc001_0010, 0xc001_0010, "AMD SYSCFG"),
    (0xc001_0015, 0xc001_0015, "AMD HWCR"),
    (0xc001_001b, 0xc001_001b, "K7_CLK_CTL"),
    (0xc001_001f, 0xc001_001f, "AMD NB_CFG"),
    (0xc001_0055, 0xc001_0055, "K8_INT_PENDING_MSG"),
    (0xc001_0058, 0xc001_0058, "FAM10H_MMIO_CONF_BASE"),
    (0xc001_0112, 0xc001_0113, "K8_TSEG_ADDR/MASK"),
    (0xc001_0114, 0xc001_0114, "VM_CR"),
    (0xc001_0140, 0xc001_0141, "OSVW_ID_LENGTH/STATUS"),
    (0xc001_1021, 0xc001_1021, "F15H_IC_CFG"),
    (0xc001_1022, 0xc001_1023, "AMD DC_CFG/TW_CFG"),
    (0xc001_102a, 0xc001_102a, "AMD BU_CFG2"),
    (0xc001_102c, 0xc001_102c, "F15H_EX_CFG"),
];

/// MSRs whose `KVM_SET_MSRS` has the same outcome as a guest WRMSR (same
/// #GP decision, same state change, no missing side effect). MCi_STATUS
/// writes are not among them (see [`REFUSED`]).
pub const WRITE_SAME: &[(u32, u32, &str)] = &[
    (0x0, 0x1, "IA32_P5_MC_ADDR/TYPE"),
    (0x11, 0x11, "KVM_WALL_CLOCK"),
    (0x17, 0x17, "IA32_PLATFORM_ID"),
    (0x2a, 0x2a, "EBL_CR_POWERON"),
    (0x2c, 0x2c, "EBC_FREQUENCY_ID"),
    (0x79, 0x79, "IA32_UCODE_WRITE"),
    (0xcd, 0xcd, "FSB_FREQ"),
    (0xfe, 0xfe, "IA32_MTRRCAP"),
    (0x11e, 0x11e, "BBL_CR_CTL3"),
    (0x140, 0x140, "MISC_FEATURES_ENABLES"),
    (0x174, 0x176, "IA32_SYSENTER_CS/ESP/EIP"),
    (0x179, 0x17a, "IA32_MCG_CAP/MCG_STATUS"),
    (0x198, 0x199, "IA32_PERF_STATUS/PERF_CTL"),
    (0x1fc, 0x1fc, "IA32_POWER_CTL"),
    (0x200, 0x26f, "IA32_MTRR_PHYSBASE/PHYSMASK/FIX"),
    (0x277, 0x277, "IA32_PAT"),
    (0x2ff, 0x2ff, "IA32_MTRR_DEF_TYPE"),
    (0x606, 0x606, "MSR_RAPL_POWER_UNIT"),
    (0x611, 0x611, "MSR_PKG_ENERGY_STATUS"),
    (0x619, 0x619, "MSR_DRAM_ENERGY_STATUS"),
    (0x639, 0x639, "MSR_PP0_ENERGY_STATUS"),
    (0x641, 0x641, "MSR_PP1_ENERGY_STATUS"),
    (0x6e0, 0x6e0, "IA32_TSC_DEADLINE"),
    (0x4b56_4d00, 0x4b56_4d00, "KVM_WALL_CLOCK_NEW"),
    (0x4b56_4d02, 0x4b56_4d07, "KVM_ASYNC_PF_EN..ASYNC_PF_ACK"),
    (0xc000_0082, 0xc000_0084, "LSTAR/CSTAR/SFMASK"),
    (0xc000_0100, 0xc000_0102, "FS_BASE/GS_BASE/KERNEL_GS_BASE"),
    (0xc001_0010, 0xc001_0010, "AMD SYSCFG"),
    (0xc001_0015, 0xc001_0015, "AMD HWCR"),
    (0xc001_001b, 0xc001_001b, "K7_CLK_CTL"),
    (0xc001_001f, 0xc001_001f, "AMD NB_CFG"),
    (0xc001_0020, 0xc001_0020, "AMD PATCH_LOADER"),
    (0xc001_0055, 0xc001_0055, "K8_INT_PENDING_MSG"),
    (0xc001_0058, 0xc001_0058, "FAM10H_MMIO_CONF_BASE"),
    (0xc001_0112, 0xc001_0113, "K8_TSEG_ADDR/MASK"),
    (0xc001_0114, 0xc001_0114, "VM_CR"),
    (0xc001_0140, 0xc001_0141, "OSVW_ID_LENGTH/STATUS"),
    (0xc001_1021, 0xc001_1021, "F15H_IC_CFG"),
    (0xc001_1022, 0xc001_1023, "AMD DC_CFG/TW_CFG"),
    (0xc001_102a, 0xc001_102a, "AMD BU_CFG2"),
    (0xc001_102c, 0xc001_102c, "F15H_EX_CFG"),
];

/// MSRs whose guest outcome KVM fixes whatever the state, so the host
/// gives it itself: `(index, name, read, write)` (`None`: as [`READ_SAME`]).
pub const EMULATED: &[(u32, &str, Option<Rule>, Rule)] = &[
    (0x34, "MSR_SMI_COUNT", None, Gp),
    (0x8b, "IA32_UCODE_REV", None, Ignore),
    (0xce, "MSR_PLATFORM_INFO", None, Gp),
];

/// MSRs KVM handles with checks or side effects that only guest accesses
/// get, and whose guest outcome depends on state msrwasm cannot see (CPUID,
/// paging mode, other MSRs): claims over them are refused at load.
/// `(first, last, name, what differs)`.
pub const REFUSED: &[(u32, u32, &str, &str)] = &[
    (
        0x10,
        0x10,
        "IA32_TSC",
        "a guest write also moves IA32_TSC_ADJUST, a host write resynchronizes the TSC",
    ),
    (
        0x12,
        0x12,
        "KVM_SYSTEM_TIME",
        "a guest write on vCPU 0 also updates the kvmclock master clock",
    ),
    (
        0x1b,
        0x1b,
        "IA32_APIC_BASE",
        "guest writes must follow the APIC mode transition rules",
    ),
    (
        0x3a,
        0x3a,
        "IA32_FEATURE_CONTROL",
        "guest accesses depend on CPUID, and a locked value is read-only for the guest",
    ),
    (0x3b, 0x3b, "IA32_TSC_ADJUST", "a guest write also moves the TSC"),
    (
        0x48,
        0x49,
        "IA32_SPEC_CTRL/PRED_CMD",
        "guest accesses depend on CPUID and reserved bits",
    ),
    (
        0x8c,
        0x8f,
        "IA32_SGXLEPUBKEYHASH",
        "guest writes depend on CPUID and the lock",
    ),
    (0x9e, 0x9e, "MSR_IA32_SMBASE", "host-only"),
    (
        0xc1,
        0xc8,
        "IA32_PMCx",
        "PMU counters: guest accesses depend on the vPMU",
    ),
    (0xe1, 0xe1, "IA32_UMWAIT_CONTROL", "guest accesses depend on CPUID"),
    (
        0x10a,
        0x10b,
        "IA32_ARCH_CAPABILITIES/FLUSH_CMD",
        "guest accesses depend on CPUID; host reads of advertised MSRs give 0",
    ),
    (0x122, 0x122, "IA32_TSX_CTRL", "guest accesses depend on CPUID"),
    (
        0x17b,
        0x17b,
        "IA32_MCG_CTL",
        "guest accesses depend on MCG_CAP.MCG_CTL_P",
    ),
    (
        0x186,
        0x18d,
        "IA32_PERFEVTSELx",
        "PMU: guest accesses depend on the vPMU",
    ),
    (0x1a0, 0x1a0, "IA32_MISC_ENABLE", "guest writes may not flip some bits"),
    (0x1c4, 0x1c5, "IA32_XFD/XFD_ERR", "guest accesses depend on CPUID"),
    (
        0x1d9,
        0x1d9,
        "IA32_DEBUGCTL",
        "host writes may set bits the guest may not",
    ),
    (
        0x1db,
        0x1de,
        "LBR FROM/TO",
        "guest writes are refused, host writes accepted",
    ),
    (
        0x280,
        0x29f,
        "IA32_MCi_CTL2",
        "guest accesses depend on MCG_CAP.MCG_CMCI_P",
    ),
    (
        0x309,
        0x30b,
        "IA32_FIXED_CTRx",
        "PMU: guest accesses depend on the vPMU",
    ),
    (
        0x345,
        0x345,
        "IA32_PERF_CAPABILITIES",
        "guest accesses depend on CPUID (PDCM); host reads give 0",
    ),
    (
        0x38d,
        0x392,
        "IA32_PERF_GLOBAL_*",
        "PMU: guest accesses depend on the vPMU",
    ),
    (
        0x3f1,
        0x3f2,
        "IA32_PEBS_ENABLE/PEBS_DATA_CFG",
        "PMU: guest accesses depend on the vPMU",
    ),
    (
        0x480,
        0x491,
        "IA32_VMX_*",
        "guest writes fault, host writes are accepted",
    ),
    (0x4c1, 0x4c8, "IA32_A_PMCx", "PMU: guest accesses depend on the vPMU"),
    (
        0x4d0,
        0x4d0,
        "IA32_MCG_EXT_CTL",
        "guest accesses depend on CPUID and FEATURE_CONTROL",
    ),
    (0x600, 0x600, "IA32_DS_AREA", "PMU: guest accesses depend on the vPMU"),
    (
        0x6a0,
        0x6a8,
        "IA32_U_CET..INT_SSP_TAB",
        "guest accesses depend on CPUID",
    ),
    (0xd90, 0xd90, "IA32_BNDCFGS", "guest accesses depend on CPUID"),
    (0xda0, 0xda0, "IA32_XSS", "guest accesses depend on CPUID"),
    (
        0x4000_0000,
        0x4000_00ff,
        "Hyper-V MSRs",
        "guest accesses depend on the Hyper-V CPUID leaves",
    ),
    (
        0x4b56_4d01,
        0x4b56_4d01,
        "KVM_SYSTEM_TIME_NEW",
        "a guest write on vCPU 0 also updates the kvmclock master clock",
    ),
    (
        0x4b56_4d10,
        0x4b56_4dff,
        "KVM/PVM private MSRs",
        "host and guest reads differ",
    ),
    (
        0xc000_0080,
        0xc000_0081,
        "IA32_EFER/STAR",
        "guest writes are checked against CPUID and the paging mode",
    ),
    (
        0xc000_0103,
        0xc000_0104,
        "IA32_TSC_AUX/TSC_RATIO",
        "guest accesses depend on CPUID",
    ),
    (
        0xc000_0300,
        0xc000_0303,
        "AMD PERF_CNTR_GLOBAL_*",
        "PMU: guest accesses depend on the vPMU",
    ),
    (
        0xc001_0000,
        0xc001_0007,
        "AMD PERFEVTSEL/PERFCTR",
        "PMU: guest accesses depend on the vPMU",
    ),
    (0xc001_0117, 0xc001_0117, "VM_HSAVE_PA", "SVM host-only branch"),
    (0xc001_011f, 0xc001_011f, "VIRT_SPEC_CTRL", "SVM host-only branch"),
    (
        0xc001_0200,
        0xc001_020b,
        "AMD PERF_CTL/CTR",
        "PMU: guest accesses depend on the vPMU",
    ),
    (
        0xc001_1029,
        0xc001_1029,
        "DE_CFG",
        "immutable for the host once the vCPU ran",
    ),
];

fn find<T>(table: &[T], index: u32, range: impl Fn(&T) -> (u32, u32)) -> Option<&T> {
    let at = table.partition_point(|e| range(e).1 < index);
    table.get(at).filter(|e| range(e).0 <= index)
}

/// Whether `index` is a machine-check bank STATUS register.
fn mci_status(index: u32) -> bool {
    (0x400..=0x47f).contains(&index) && index & 3 == 1
}

/// The fallback for one access of a claimed MSR nobody answered; `None`:
/// the `unhandled` policy decides.
pub fn rule(index: u32, write: bool) -> Option<Rule> {
    if find(REFUSED, index, |e| (e.0, e.1)).is_some() || (write && mci_status(index)) {
        return None;
    }
    if let Some(&(_, _, read, write_rule)) = EMULATED.iter().find(|e| e.0 == index) {
        return if write { Some(write_rule) } else { read.or(Some(Kvm)) };
    }
    let same = if write { WRITE_SAME } else { READ_SAME };
    find(same, index, |e| (e.0, e.1)).map(|_| Kvm)
}

/// The first MSR of `first..=last` whose guest behaviour the fallback
/// cannot reproduce: `(index, name, what differs)`.
pub fn first_unsafe(first: u32, last: u32) -> Option<(u32, &'static str, &'static str)> {
    let refused = REFUSED
        .iter()
        .filter(|e| e.0 <= last && e.1 >= first)
        .map(|e| (e.0.max(first), e.2, e.3))
        .next();
    let status = (first.max(0x401)..=last.min(0x47d)).find(|&i| mci_status(i)).map(|i| {
        (
            i,
            "IA32_MCi_STATUS",
            "guest writes depend on HWCR.McStatusWrEn; host writes bypass it",
        )
    });
    match (refused, status) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_are_sorted_and_disjoint() {
        fn sorted(t: &[(u32, u32)]) -> bool {
            t.windows(2).all(|w| w[0].1 < w[1].0) && t.iter().all(|e| e.0 <= e.1)
        }
        assert!(sorted(&READ_SAME.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>()));
        assert!(sorted(&WRITE_SAME.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>()));
        assert!(sorted(&REFUSED.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>()));
        for &(f, l, _) in READ_SAME.iter().chain(WRITE_SAME) {
            assert!(REFUSED.iter().all(|r| r.1 < f || r.0 > l), "{f:#x}");
        }
    }

    #[test]
    fn rules_and_refusals() {
        assert_eq!(first_unsafe(0x0, 0xfff).map(|e| e.0), Some(0x10));
        assert_eq!(first_unsafe(0x11, 0x11), None);
        assert_eq!(first_unsafe(0x30, 0x40).map(|e| e.1), Some("IA32_FEATURE_CONTROL"));
        assert_eq!(first_unsafe(0x400, 0x400), None);
        assert_eq!(first_unsafe(0x400, 0x47f).map(|e| e.0), Some(0x401));
        assert_eq!(rule(0x401, false), Some(Kvm));
        assert_eq!(rule(0x401, true), None);
        assert_eq!(rule(0x34, true), Some(Gp));
        assert_eq!(rule(0x8b, true), Some(Ignore));
        assert_eq!(rule(0xce, true), Some(Gp));
        assert_eq!(rule(0xce, false), Some(Kvm));
        assert_eq!(rule(0x175, true), Some(Kvm));
        assert_eq!(rule(0x4d53_0000, false), None);
    }
}
