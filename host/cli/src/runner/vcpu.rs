//! The vCPU thread: run, decode the exit, let [`ExitHandler`] decide, apply.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::exit::{Action, Exit, ExitHandler};
use super::{CrashReport, VmEnd};
use crate::policy::KvmMsrs;

/// What a vCPU thread tells the VM's main thread.
#[derive(Debug)]
pub(super) enum Event {
    Halted,
    End(VmEnd),
}

/// KVM's own MSRs of one vCPU, for the fallback of filtered MSRs.
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

fn decode(exit: VcpuExit<'_>) -> Exit {
    match exit {
        VcpuExit::X86Rdmsr(e) => Exit::Rdmsr {
            index: e.index,
            reason: e.reason.bits(),
        },
        VcpuExit::X86Wrmsr(e) => Exit::Wrmsr {
            index: e.index,
            value: e.data,
            reason: e.reason.bits(),
        },
        VcpuExit::IoOut(port, data) => Exit::IoOut {
            port,
            data: data.to_vec(),
        },
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, len: data.len() },
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::InternalError => Exit::InternalError,
        VcpuExit::FailEntry(reason, cpu) => Exit::FailEntry { reason, cpu },
        VcpuExit::Intr => Exit::Interrupted,
        other => Exit::Unexpected {
            what: format!("{other:?}"),
        },
    }
}

pub(super) struct VcpuThread {
    pub index: u32,
    pub fd: VcpuFd,
    pub handler: ExitHandler,
    pub stop: Arc<AtomicBool>,
    pub events: Sender<Event>,
}

impl VcpuThread {
    /// Runs until this vCPU halts, the VM ends, or `stop` is set.
    pub fn run(mut self) -> ExitHandler {
        while !self.stop.load(Ordering::Acquire) {
            let action = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.handler.io_in(port, data);
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.handler.mmio_read(addr, data);
                    continue;
                }
                Ok(exit) => {
                    let exit = decode(exit);
                    self.handler.handle(exit, &mut VcpuMsrs(&self.fd))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.handler.handle(Exit::Interrupted, &mut VcpuMsrs(&self.fd))
                }
                Err(e) => Action::Crash(format!("KVM_RUN failed: {e}")),
            };
            match action {
                Action::Resume => {}
                Action::CompleteMsr(value) => {
                    if !crate::sys::complete_msr_exit(self.fd.get_kvm_run(), value) {
                        self.end(VmEnd::Error("an MSR answer found no pending MSR exit".into()));
                        break;
                    }
                }
                Action::Halt => {
                    let _ = self.events.send(Event::Halted);
                    break;
                }
                Action::Exit(status) => {
                    self.end(VmEnd::ExitPort(status));
                    break;
                }
                Action::Crash(what) => {
                    let report = self.crash_report(what);
                    self.end(VmEnd::Crash(Box::new(report)));
                    break;
                }
            }
        }
        self.handler
    }

    fn end(&self, end: VmEnd) {
        let _ = self.events.send(Event::End(end));
    }

    fn crash_report(&self, what: String) -> CrashReport {
        let regs = self.fd.get_regs().unwrap_or_default();
        let sregs = self.fd.get_sregs().unwrap_or_default();
        CrashReport {
            vcpu: self.index,
            what,
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
        }
    }
}
