//! The guest's I/O ports: COM1 (a 16550 from vm-superio), the exit port,
//! and the two ways PVH guests end a VM on cloud-hypervisor and
//! Firecracker: ACPI S5 on port 0x600 and an i8042 reset on port 0x64.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LAST: u16 = 0x3ff;
pub const EXIT_PORT: u16 = 0xf4;
/// cloud-hypervisor's ACPI shutdown device (the PM1 control register).
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// Sleep type S5 (5 << 2) with SLP_EN (1 << 5): power off.
pub const ACPI_S5: u8 = 0x34;
/// The i8042 command port; Firecracker ends the VM on a reset command.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042 command that pulses the CPU reset line.
pub const I8042_RESET: u8 = 0xfe;

/// Serial output sink (standard output for `msrwasm run`, a buffer in tests).
pub type SerialOut = Box<dyn Write + Send>;

/// The UART has no interrupt line: raw guests poll it.
#[derive(Debug)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// What a port write asks of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    None,
    /// The guest wrote the exit port: end the VM with this status.
    Exit(u8),
    /// The guest wrote ACPI S5 to port 0x600: power off (status 0).
    PowerOff,
    /// The guest wrote the i8042 reset command to port 0x64: the guest asks
    /// to stop, which ends the VM (status 0).
    Reset,
}

/// Bytes of serial output held while standard output is slow; past this,
/// output is dropped (and counted) rather than stalling a vCPU.
pub const SERIAL_BUFFER: usize = 1 << 20;
/// How long a partial serial line waits for its newline before it is
/// written anyway (a prompt, a progress dot).
const PARTIAL_LINE_WAIT: Duration = Duration::from_millis(100);
/// A partial serial line this long is written without waiting.
const PARTIAL_LINE_MAX: usize = 4096;

#[derive(Default)]
struct Pipe {
    bytes: VecDeque<u8>,
    dropped: u64,
    closed: bool,
}

/// The UART's output: a bounded queue a writer thread drains into the
/// real sink, so a vCPU never blocks on a slow or stalled reader.
#[derive(Clone)]
struct QueueWriter(Arc<(Mutex<Pipe>, Condvar)>);

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (lock, cvar) = &*self.0;
        let mut pipe = lock.lock().unwrap_or_else(|e| e.into_inner());
        let room = SERIAL_BUFFER.saturating_sub(pipe.bytes.len());
        let take = room.min(buf.len());
        pipe.bytes.extend(&buf[..take]);
        pipe.dropped += (buf.len() - take) as u64;
        cvar.notify_one();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Ports shared by all vCPUs.
pub struct IoBus {
    serial: Mutex<Serial<NoInterrupt, NoEvents, QueueWriter>>,
    pipe: QueueWriter,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl IoBus {
    /// A bus whose COM1 output goes to `out` (through the bounded queue).
    pub fn new(mut out: SerialOut) -> Self {
        let pipe = QueueWriter(Arc::new((Mutex::new(Pipe::default()), Condvar::new())));
        let drain = pipe.clone();
        let writer = std::thread::Builder::new()
            .name("msrwasm-serial".into())
            .spawn(move || {
                let (lock, cvar) = &*drain.0;
                loop {
                    let chunk: Vec<u8> = {
                        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                        // Whole lines only, so that msrwasm's own messages on
                        // standard error land between guest lines, never in
                        // one; a partial line goes out once it has waited
                        // PARTIAL_LINE_WAIT, grown past PARTIAL_LINE_MAX, or
                        // the guest is done.
                        let mut waited = Duration::ZERO;
                        let take = loop {
                            if p.closed || p.bytes.len() >= PARTIAL_LINE_MAX {
                                break p.bytes.len();
                            }
                            if let Some(end) = p.bytes.iter().rposition(|&b| b == b'\n') {
                                break end + 1;
                            }
                            if p.bytes.is_empty() {
                                waited = Duration::ZERO;
                                p = cvar.wait(p).unwrap_or_else(|e| e.into_inner());
                            } else if waited >= PARTIAL_LINE_WAIT {
                                break p.bytes.len();
                            } else {
                                let started = std::time::Instant::now();
                                p = cvar
                                    .wait_timeout(p, PARTIAL_LINE_WAIT - waited)
                                    .unwrap_or_else(|e| e.into_inner())
                                    .0;
                                waited += started.elapsed();
                            }
                        };
                        if take == 0 {
                            break;
                        }
                        p.bytes.drain(..take).collect()
                    };
                    // A failing sink (closed pipe) must not stop the guest.
                    if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
                        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                        p.dropped += chunk.len() as u64;
                    }
                }
                let _ = out.flush();
            })
            .ok();
        Self {
            serial: Mutex::new(Serial::new(NoInterrupt, pipe.clone())),
            pipe,
            writer: Mutex::new(writer),
        }
    }

    /// Handles an OUT; returns `None` for a port nobody decodes (counted by
    /// the caller), else what the write does to the VM.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<PortEffect> {
        match port {
            EXIT_PORT => Some(PortEffect::Exit(data.first().copied().unwrap_or(0))),
            ACPI_SLEEP_PORT if data.first() == Some(&ACPI_S5) => Some(PortEffect::PowerOff),
            I8042_COMMAND_PORT if data.first() == Some(&I8042_RESET) => Some(PortEffect::Reset),
            COM1_BASE..=COM1_LAST => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                for &byte in data {
                    let _ = serial.write((port - COM1_BASE) as u8, byte);
                }
                Some(PortEffect::None)
            }
            _ => None,
        }
    }

    /// Handles an IN; returns false for a port nobody decodes, which reads
    /// as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            COM1_BASE..=COM1_LAST => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                data.fill(serial.read((port - COM1_BASE) as u8));
                true
            }
            _ => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes what is queued, waiting at most `grace` for a slow sink (a
    /// stalled reader is abandoned, not waited for); returns the bytes
    /// dropped over the run.
    pub fn finish(&self, grace: Duration) -> u64 {
        let (lock, cvar) = &*self.pipe.0;
        lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        cvar.notify_all();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            msrwasm::tools::join_within(writer, grace);
        }
        let p = lock.lock().unwrap_or_else(|e| e.into_inner());
        p.dropped + p.bytes.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_bytes_pass_unchanged_and_lsr_says_empty() {
        let out = Shared::default();
        let bus = IoBus::new(Box::new(out.clone()));
        assert_eq!(bus.write(0x3f8, b"h"), Some(PortEffect::None));
        assert_eq!(bus.write(0x3f8, b"\n"), Some(PortEffect::None));
        let mut lsr = [0u8];
        assert!(bus.read(0x3fd, &mut lsr));
        assert_ne!(lsr[0] & 0x20, 0);
        assert_eq!(bus.finish(Duration::from_secs(1)), 0);
        assert_eq!(&*out.0.lock().unwrap(), b"h\n");
    }

    /// Serial output goes out in whole lines (so that host messages never
    /// split a guest line); a partial line goes out after waiting for its
    /// newline, never at once, and at the end.
    #[test]
    fn serial_output_goes_out_in_whole_lines() {
        type Log = Arc<Mutex<Vec<(std::time::Instant, Vec<u8>)>>>;
        #[derive(Clone, Default)]
        struct Writes(Log);
        impl Write for Writes {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().push((std::time::Instant::now(), buf.to_vec()));
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Writes::default();
        let bus = IoBus::new(Box::new(out.clone()));
        let queued = std::time::Instant::now();
        for b in b"one\ntwo" {
            bus.write(0x3f8, &[*b]);
        }
        let text = || {
            out.0
                .lock()
                .unwrap()
                .iter()
                .flat_map(|w| w.1.clone())
                .collect::<Vec<u8>>()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while text() != b"one\ntwo" {
            assert!(std::time::Instant::now() < deadline, "{:?}", text());
            std::thread::sleep(Duration::from_millis(10));
        }
        // Every write but the partial line's ends a line; the partial line
        // went out only after PARTIAL_LINE_WAIT.
        let writes = out.0.lock().unwrap().clone();
        let (last, partial) = writes.split_last().unwrap();
        assert!(partial.iter().all(|w| w.1.ends_with(b"\n")), "{writes:?}");
        assert!(last.1.ends_with(b"two") && !last.1.contains(&b'\n'), "{writes:?}");
        assert!(last.0 - queued >= PARTIAL_LINE_WAIT, "{:?}", last.0 - queued);
        bus.write(0x3f8, b"!");
        assert_eq!(bus.finish(Duration::from_secs(1)), 0);
        assert_eq!(text(), b"one\ntwo!");
    }

    /// A sink that never returns, like a pipe whose reader stopped.
    struct Stalled;
    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(0)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_never_blocks_a_vcpu() {
        let bus = IoBus::new(Box::new(Stalled));
        let started = std::time::Instant::now();
        for _ in 0..(SERIAL_BUFFER + 4096) {
            assert_eq!(bus.write(0x3f8, b"x"), Some(PortEffect::None));
        }
        let dropped = bus.finish(Duration::from_millis(50));
        assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
        assert!(dropped >= 4096, "{dropped}");
    }

    #[test]
    fn exit_port_and_unknown_ports() {
        let bus = IoBus::new(Box::new(std::io::sink()));
        assert_eq!(bus.write(0xf4, &[7, 1, 0, 0]), Some(PortEffect::Exit(7)));
        assert_eq!(bus.write(0x80, &[1]), None);
        assert_eq!(bus.write(0x600, &[0x34]), Some(PortEffect::PowerOff));
        assert_eq!(bus.write(0x64, &[0xfe]), Some(PortEffect::Reset));
        // Other values on those ports do nothing (and count as unknown).
        assert_eq!(bus.write(0x600, &[0x01]), None);
        assert_eq!(bus.write(0x64, &[0xad]), None);
        let mut d = [0u8; 2];
        assert!(!bus.read(0x60, &mut d));
        assert_eq!(d, [0xff, 0xff]);
    }
}
