//! The vCPU thread: run, decode the exit, decide, apply. MSR exits go to
//! msrwasm's dispatcher through its public KVM helpers; the rest are this
//! runner's (ports, MMIO, HLT), decided by plain code tested without KVM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;

use kvm_ioctls::{VcpuExit, VcpuFd};
use msrwasm::{Access, Dispatcher, Reply};

use super::io::{IoBus, PortEffect};
use super::{CrashReport, VmEnd};

/// A Rust MSR handler used instead of the plugin chain (the benchmark
/// baseline).
pub type NativeMsr = fn(vcpu: u32, access: Access) -> Reply;

/// What a vCPU thread tells the VM's main thread.
#[derive(Debug)]
pub(super) enum Event {
    Halted,
    End(VmEnd),
}

/// Exits of one vCPU, as the runner saw them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExitStats {
    /// Every exit.
    pub exits: u64,
    /// RDMSR exits.
    pub rdmsr: u64,
    /// WRMSR exits.
    pub wrmsr: u64,
    /// Port I/O exits.
    pub port_io: u64,
    /// Accesses to ports nobody decodes.
    pub unknown_ports: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// Exits the runner does not expect.
    pub unexpected: u64,
}

impl std::ops::AddAssign<&ExitStats> for ExitStats {
    fn add_assign(&mut self, s: &ExitStats) {
        self.exits += s.exits;
        self.rdmsr += s.rdmsr;
        self.wrmsr += s.wrmsr;
        self.port_io += s.port_io;
        self.unknown_ports += s.unknown_ports;
        self.mmio += s.mmio;
        self.unexpected += s.unexpected;
    }
}

/// What the loop does after a non-MSR exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Resume,
    Halt,
    Exit(u8),
    PowerOff,
    Reset,
    Crash(String),
}

/// A non-MSR exit, decoded and owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Exit {
    IoOut { port: u16, data: Vec<u8> },
    MmioWrite { addr: u64, len: usize },
    Hlt,
    Shutdown,
    InternalError,
    FailEntry { reason: u64, cpu: u32 },
    Interrupted,
    Unexpected { what: String },
}

/// Decides a non-MSR exit.
pub(super) fn decide(exit: Exit, io: &IoBus, stats: &mut ExitStats, vcpu: u32) -> Action {
    stats.exits += 1;
    match exit {
        Exit::IoOut { port, data } => {
            stats.port_io += 1;
            match io.write(port, &data) {
                Some(PortEffect::Exit(status)) => Action::Exit(status),
                Some(PortEffect::PowerOff) => Action::PowerOff,
                Some(PortEffect::Reset) => Action::Reset,
                Some(PortEffect::None) => Action::Resume,
                None => {
                    stats.unknown_ports += 1;
                    Action::Resume
                }
            }
        }
        Exit::MmioWrite { addr, len } => {
            stats.mmio += 1;
            tracing::debug!(vcpu, "dropped {len}-byte MMIO write to {addr:#x} (no device there)");
            Action::Resume
        }
        Exit::Hlt => Action::Halt,
        Exit::Interrupted => {
            stats.exits -= 1;
            Action::Resume
        }
        Exit::Shutdown => Action::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        Exit::InternalError => Action::Crash("KVM internal error (KVM_EXIT_INTERNAL_ERROR)".into()),
        Exit::FailEntry { reason, cpu } => Action::Crash(format!(
            "VM entry failed (hardware reason {reason:#x} on host CPU {cpu})"
        )),
        Exit::Unexpected { what } => {
            stats.unexpected += 1;
            tracing::error!(vcpu, "unexpected exit: {what}");
            Action::Crash(format!("unexpected exit: {what}"))
        }
    }
}

fn decode(exit: VcpuExit<'_>) -> Exit {
    match exit {
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
    pub msrs: Dispatcher,
    pub io: Arc<IoBus>,
    pub native: Option<NativeMsr>,
    pub stop: Arc<AtomicBool>,
    pub events: Sender<Event>,
    pub stats: ExitStats,
}

impl VcpuThread {
    /// Runs until this vCPU halts, the VM ends, or `stop` is set.
    pub fn run(mut self) -> ExitStats {
        while !self.stop.load(Ordering::Acquire) {
            let (access, action) = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.stats.exits += 1;
                    self.stats.port_io += 1;
                    if !self.io.read(port, data) {
                        self.stats.unknown_ports += 1;
                    }
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.stats.exits += 1;
                    self.stats.mmio += 1;
                    data.fill(0xff);
                    tracing::debug!(
                        vcpu = self.index,
                        "MMIO read of {addr:#x} (no device there) reads all ones"
                    );
                    continue;
                }
                Ok(exit) => match msrwasm::kvm::msr_access(&exit) {
                    Some(access) => (Some(access), Action::Resume),
                    None => (None, decide(decode(exit), &self.io, &mut self.stats, self.index)),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    (None, decide(Exit::Interrupted, &self.io, &mut self.stats, self.index))
                }
                Err(e) => (None, Action::Crash(format!("KVM_RUN failed: {e}"))),
            };
            if let Some(access) = access {
                self.stats.exits += 1;
                if access.is_write() {
                    self.stats.wrmsr += 1;
                } else {
                    self.stats.rdmsr += 1;
                }
                let result = match self.native {
                    Some(native) => msrwasm::kvm::complete(&mut self.fd, native(self.index, access)),
                    None => self.msrs.handle_exit(&mut self.fd, access).map(|_| ()),
                };
                if let Err(e) = result {
                    self.end(VmEnd::Error(format!("completing an MSR exit: {e}")));
                    break;
                }
                continue;
            }
            match action {
                Action::Resume => {}
                Action::Halt => {
                    let _ = self.events.send(Event::Halted);
                    break;
                }
                Action::Exit(status) => {
                    self.end(VmEnd::ExitPort(status));
                    break;
                }
                Action::PowerOff => {
                    self.end(VmEnd::PowerOff);
                    break;
                }
                Action::Reset => {
                    self.end(VmEnd::Reset);
                    break;
                }
                Action::Crash(what) => {
                    let report = self.crash_report(what);
                    self.end(VmEnd::Crash(Box::new(report)));
                    break;
                }
            }
        }
        self.stats
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> IoBus {
        IoBus::new(Box::new(std::io::sink()))
    }

    #[test]
    fn ports_decide_exit_and_unknown_ports_are_counted() {
        let mut stats = ExitStats::default();
        let io = bus();
        assert_eq!(
            decide(
                Exit::IoOut {
                    port: 0xf4,
                    data: vec![7]
                },
                &io,
                &mut stats,
                0
            ),
            Action::Exit(7)
        );
        assert_eq!(
            decide(
                Exit::IoOut {
                    port: 0x80,
                    data: vec![1]
                },
                &io,
                &mut stats,
                0
            ),
            Action::Resume
        );
        assert_eq!((stats.exits, stats.port_io, stats.unknown_ports), (2, 2, 1));
        let out = |port, byte| Exit::IoOut { port, data: vec![byte] };
        assert_eq!(decide(out(0x600, 0x34), &io, &mut stats, 0), Action::PowerOff);
        assert_eq!(decide(out(0x64, 0xfe), &io, &mut stats, 0), Action::Reset);
        assert_eq!(decide(out(0x64, 0x20), &io, &mut stats, 0), Action::Resume);
    }

    #[test]
    fn crashes_and_kicks() {
        let mut stats = ExitStats::default();
        let io = bus();
        assert!(matches!(decide(Exit::Shutdown, &io, &mut stats, 0), Action::Crash(w) if w.contains("triple fault")));
        assert_eq!(decide(Exit::Interrupted, &io, &mut stats, 0), Action::Resume);
        assert_eq!(decide(Exit::Hlt, &io, &mut stats, 0), Action::Halt);
        assert_eq!(stats.exits, 2, "a kick is not an exit of the guest's");
        assert!(matches!(
            decide(Exit::Unexpected { what: "X".into() }, &io, &mut stats, 0),
            Action::Crash(_)
        ));
        assert_eq!(stats.unexpected, 1);
    }
}
