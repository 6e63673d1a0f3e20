//! The only module of the library with `unsafe` code: the few operations
#![allow(unsafe_code)]
//! that neither kvm-ioctls nor the standard library offer safely.

/// CPU time the calling thread has used, nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is
    // always supported on Linux, and the call writes nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Writes the answer to a pending `KVM_EXIT_X86_RDMSR`/`WRMSR` into the run
/// structure, after the borrow of the exit has ended (so that the answer may
/// come from `KVM_GET_MSRS` on the same vCPU). `None` answers with #GP.
///
/// Returns false, and writes nothing, if the pending exit is not an MSR exit.
#[cfg(feature = "kvm")]
pub fn complete_msr_exit(run: &mut kvm_bindings::kvm_run, value: Option<u64>) -> bool {
    use kvm_bindings::{KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR};
    if run.exit_reason != KVM_EXIT_X86_RDMSR && run.exit_reason != KVM_EXIT_X86_WRMSR {
        return false;
    }
    // SAFETY: `exit_reason` says the union holds the `msr` member (checked
    // just above), and every bit pattern is valid for its integer fields.
    let msr = unsafe { &mut run.__bindgen_anon_1.msr };
    match value {
        Some(data) => {
            msr.error = 0;
            if run.exit_reason == KVM_EXIT_X86_RDMSR {
                msr.data = data;
            }
        }
        None => msr.error = 1,
    }
    true
}
