//! The only module of the CLI with `unsafe` code: registering guest memory
//! with KVM, which kvm-ioctls cannot offer safely.
#![allow(unsafe_code)]

use kvm_bindings::kvm_userspace_memory_region;
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
        // keeps alive for as long as the VM exists (the runner's `Vm` owns
        // both), and no two slots overlap because they come from distinct
        // memory regions.
        unsafe { vm.set_user_memory_region(desc)? };
    }
    Ok(())
}
