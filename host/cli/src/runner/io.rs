//! The guest's I/O ports: COM1 (a 16550 from vm-superio) and the exit port.

use std::io::Write;
use std::sync::Mutex;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LAST: u16 = 0x3ff;
pub const EXIT_PORT: u16 = 0xf4;

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
}

/// Ports shared by all vCPUs.
pub struct IoBus {
    serial: Mutex<Serial<NoInterrupt, NoEvents, SerialOut>>,
}

impl IoBus {
    pub fn new(out: SerialOut) -> Self {
        Self {
            serial: Mutex::new(Serial::new(NoInterrupt, out)),
        }
    }

    /// Handles an OUT; returns `None` for a port nobody decodes (counted by
    /// the caller), else what the write does to the VM.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<PortEffect> {
        match port {
            EXIT_PORT => Some(PortEffect::Exit(data.first().copied().unwrap_or(0))),
            COM1_BASE..=COM1_LAST => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                for &byte in data {
                    // A failing stdout (closed pipe) must not stop the guest.
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

    /// Flushes pending serial output.
    pub fn flush(&self) {
        let _ = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .writer_mut()
            .flush();
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
        assert_eq!(&*out.0.lock().unwrap(), b"h\n");
    }

    #[test]
    fn exit_port_and_unknown_ports() {
        let bus = IoBus::new(Box::new(std::io::sink()));
        assert_eq!(bus.write(0xf4, &[7, 1, 0, 0]), Some(PortEffect::Exit(7)));
        assert_eq!(bus.write(0x80, &[1]), None);
        let mut d = [0u8; 2];
        assert!(!bus.read(0x60, &mut d));
        assert_eq!(d, [0xff, 0xff]);
    }
}
