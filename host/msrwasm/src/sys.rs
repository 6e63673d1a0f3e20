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

/// The CPU-time clock of the calling thread, readable from any thread of
/// the process with [`clock_ns`] (while the thread lives).
pub fn current_thread_clock() -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `pthread_self()` is the calling thread, alive for the call;
    // `clock` is a valid, writable clockid_t.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    (rc == 0).then_some(clock)
}

/// Reads `clock` (from [`current_thread_clock`]), nanoseconds; `None` once
/// its thread has exited.
pub fn clock_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; an invalid or stale clock
    // id makes the call fail with EINVAL, it writes nothing else.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| {
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64)
    })
}

/// The calling thread's kernel id.
pub fn gettid() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    (unsafe { libc::gettid() }) as u32
}

/// Clears `O_NONBLOCK` on `fd`.
pub fn set_blocking(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL on a descriptor the caller owns and
    // keeps open for the call; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
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

/// Loads a core module from the compiled-plugin cache.
pub fn deserialize_module(engine: &wasmtime::Engine, bytes: &[u8]) -> wasmtime::Result<wasmtime::Module> {
    // SAFETY: `bytes` were produced by `Module::serialize` on an engine with
    // the same compatibility hash (the cache key), verified against the
    // SHA-256 stored beside them (no corruption), and read from a directory
    // only this user can write (checked when the cache is opened); wasmtime
    // additionally checks the header and version of the artifact.
    unsafe { wasmtime::Module::deserialize(engine, bytes) }
}

/// Loads a component from the compiled-plugin cache.
pub fn deserialize_component(
    engine: &wasmtime::Engine,
    bytes: &[u8],
) -> wasmtime::Result<wasmtime::component::Component> {
    // SAFETY: as for `deserialize_module`: our own serialized artifact,
    // keyed by engine compatibility, checksummed, in a private directory.
    unsafe { wasmtime::component::Component::deserialize(engine, bytes) }
}

/// A second handle on the VM behind `vm` (a `dup` of its fd), so that the
/// engine can program the MSR filter while the VMM keeps owning its
/// `VmFd` by value.
#[cfg(feature = "kvm")]
pub fn dup_vm(kvm: &kvm_ioctls::Kvm, vm: &kvm_ioctls::VmFd) -> std::io::Result<kvm_ioctls::VmFd> {
    use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
    // SAFETY: the descriptor belongs to `vm`, which the caller borrows for
    // the whole call, so it stays open while it is duplicated.
    let borrowed = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
    let owned = borrowed.try_clone_to_owned()?;
    let raw = owned.into_raw_fd();
    // SAFETY: `raw` is a fresh duplicate of a KVM VM descriptor that nothing
    // else owns; the new `VmFd` takes ownership and closes it when dropped.
    unsafe { kvm.create_vmfd_from_rawfd(raw) }.map_err(|e| {
        // On error the descriptor was not taken over (the mmap-size query
        // failed before it): close it here.
        // SAFETY: `raw` is still ours and open.
        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
        std::io::Error::from_raw_os_error(e.errno())
    })
}
