//! The only module of the host with `unsafe` code: the few KVM operations
//! that kvm-ioctls cannot offer safely.

use kvm_bindings::{KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR, kvm_run, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Registers every region of `mem` with the VM as a KVM memory slot.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the caller
        // keeps alive for as long as the VM exists (the VM owns both), and no
        // two slots overlap because they come from distinct memory regions.
        unsafe { vm.set_user_memory_region(desc)? };
    }
    Ok(())
}

/// Writes the answer to a pending `KVM_EXIT_X86_RDMSR`/`WRMSR` into the run
/// structure, after the borrow of the exit has ended (so that the answer may
/// come from `KVM_GET_MSRS` on the same vCPU). `None` answers with #GP.
///
/// Returns false, and writes nothing, if the pending exit is not an MSR exit.
pub fn complete_msr_exit(run: &mut kvm_run, value: Option<u64>) -> bool {
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
