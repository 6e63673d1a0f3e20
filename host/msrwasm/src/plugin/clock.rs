//! The clock behind `msr.now_ns` (and the component `now-ns`).
//!
//! The default, [`HostClock`], is the host's monotonic clock. A VMM that
//! pauses, snapshots or migrates guests injects a clock that follows guest
//! time instead ([`GuestClock`], or its own [`Clock`]), so that counters
//! plugins derive from `now_ns` (energy, residency) neither jump over a pause
//! nor run backwards after a restore.

use std::fmt::Debug;
use std::sync::Mutex;
#[cfg(any(test, feature = "tools"))]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A source of nanoseconds for plugins. Must be monotonic.
pub trait Clock: Send + Sync + Debug {
    /// Nanoseconds since an origin of the clock's choosing.
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock, counting from when it was created.
#[derive(Debug)]
pub struct HostClock {
    origin: Instant,
}

impl HostClock {
    /// A clock that reads 0 now.
    pub fn new() -> Self {
        Self { origin: Instant::now() }
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

#[cfg(any(test, feature = "tools"))]
/// A clock that moves only when told to: scripted tests (`msrwasm test`).
#[derive(Debug, Default)]
pub struct ManualClock {
    ns: AtomicU64,
}

#[cfg(any(test, feature = "tools"))]
impl ManualClock {
    /// A clock at `ns`.
    pub fn new(ns: u64) -> Self {
        Self { ns: AtomicU64::new(ns) }
    }

    /// Moves the clock forward by `ns` (saturating).
    pub fn advance(&self, ns: u64) {
        let _ = self
            .ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_add(ns)));
    }

    /// Sets the clock; plugins expect it never to go backwards.
    #[cfg_attr(not(feature = "tools"), allow(dead_code))]
    pub fn set(&self, ns: u64) {
        self.ns.store(ns, Ordering::Relaxed);
    }
}

#[cfg(any(test, feature = "tools"))]
impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.ns.load(Ordering::Relaxed)
    }
}

/// Guest time: the host's monotonic clock minus the time the guest spent
/// paused, and settable for a restored snapshot or a migrated guest.
///
/// ```
/// use msrwasm::{Clock, GuestClock};
/// let clock = GuestClock::new();
/// clock.pause();
/// let at_pause = clock.now_ns();
/// // ... snapshot taken, guest restored elsewhere ...
/// let restored = GuestClock::resumed_at(at_pause);
/// assert!(restored.now_ns() >= at_pause);
/// ```
#[derive(Debug)]
pub struct GuestClock {
    inner: Mutex<GuestTime>,
}

#[derive(Debug)]
struct GuestTime {
    /// Guest time at `since`.
    base_ns: u64,
    since: Instant,
    paused: bool,
}

impl GuestClock {
    /// A running clock at 0.
    pub fn new() -> Self {
        Self::resumed_at(0)
    }

    /// A running clock that continues from `ns` (what [`Clock::now_ns`]
    /// read when the snapshot was taken).
    pub fn resumed_at(ns: u64) -> Self {
        Self {
            inner: Mutex::new(GuestTime {
                base_ns: ns,
                since: Instant::now(),
                paused: false,
            }),
        }
    }

    /// Stops the clock (the VMM paused the vCPUs).
    pub fn pause(&self) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !t.paused {
            t.base_ns = t.base_ns.saturating_add(t.since.elapsed().as_nanos() as u64);
            t.paused = true;
        }
    }

    /// Lets the clock run again from where it stopped.
    pub fn resume(&self) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if t.paused {
            t.since = Instant::now();
            t.paused = false;
        }
    }
}

impl Default for GuestClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for GuestClock {
    fn now_ns(&self) -> u64 {
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match t.paused {
            true => t.base_ns,
            false => t.base_ns.saturating_add(t.since.elapsed().as_nanos() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_clock_stands_still_while_paused() {
        let c = GuestClock::new();
        c.pause();
        let a = c.now_ns();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(c.now_ns(), a);
        c.resume();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = c.now_ns();
        assert!(b >= a + 1_000_000 && b < a + 1_000_000_000, "{a} {b}");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(5);
        c.advance(10);
        assert_eq!(c.now_ns(), 15);
        c.advance(u64::MAX);
        assert_eq!(c.now_ns(), u64::MAX);
    }
}
