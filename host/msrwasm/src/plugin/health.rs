//! Quarantine: a plugin version that keeps failing is skipped (treated as
//! PASS) for a while, so that a broken plugin cannot turn every access into
//! an error; a new version of its file, or the end of the backoff, ends it.

use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When a plugin goes into quarantine, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuarantinePolicy {
    /// This many errors ...
    pub errors: u32,
    /// ... within this window start a quarantine.
    pub window: Duration,
    /// The first quarantine lasts this long; each next one twice as long ...
    pub first_backoff: Duration,
    /// ... up to this.
    pub max_backoff: Duration,
}

impl Default for QuarantinePolicy {
    fn default() -> Self {
        Self {
            errors: 5,
            window: Duration::from_secs(1),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Error history of one loaded plugin version, shared by all vCPUs.
#[derive(Debug)]
pub struct Health {
    policy: QuarantinePolicy,
    /// Skipped until this time (ns on [`clock`]); 0 while healthy, so the
    /// check on every call is one atomic load.
    until_ns: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When the first error of the current window happened.
    started: Option<Instant>,
    errors: u32,
    next_backoff: Duration,
}

fn clock() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    // +1 keeps 0 free to mean "healthy".
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

impl Health {
    /// A healthy record under `policy`.
    pub fn new(policy: QuarantinePolicy) -> Self {
        Self {
            policy,
            until_ns: AtomicU64::new(0),
            window: Mutex::new(Window {
                started: None,
                errors: 0,
                next_backoff: policy.first_backoff,
            }),
        }
    }

    /// Whether calls are skipped now.
    pub fn quarantined(&self) -> bool {
        let until = self.until_ns.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if clock() < until {
            return true;
        }
        // One caller clears it and says so.
        if self
            .until_ns
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!("plugin quarantine ended (backoff expired); calling it again");
        }
        false
    }

    /// Counts an error; returns the backoff if it started a quarantine.
    pub fn record_error(&self) -> Option<Duration> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        // A window opens at the error that starts it, not at some fixed
        // origin: errors in quick succession always share one.
        let now = Instant::now();
        if w.started
            .is_none_or(|started| now.duration_since(started) > self.policy.window)
        {
            w.started = Some(now);
            w.errors = 0;
        }
        w.errors += 1;
        if w.errors < self.policy.errors || self.until_ns.load(Ordering::Relaxed) != 0 {
            return None;
        }
        let backoff = w.next_backoff;
        w.next_backoff = (backoff * 2).min(self.policy.max_backoff);
        w.errors = 0;
        w.started = None;
        self.until_ns
            .store(clock() + backoff.as_nanos() as u64, Ordering::Relaxed);
        Some(backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Health {
        Health::new(QuarantinePolicy {
            errors: 3,
            window: Duration::from_secs(10),
            first_backoff: Duration::from_millis(30),
            max_backoff: Duration::from_millis(50),
        })
    }

    #[test]
    fn repeated_errors_quarantine_then_the_backoff_expires_and_grows() {
        let h = quick();
        assert_eq!((h.record_error(), h.record_error()), (None, None));
        assert!(!h.quarantined());
        assert_eq!(h.record_error(), Some(Duration::from_millis(30)));
        assert!(h.quarantined());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!h.quarantined(), "the backoff expired");
        for _ in 0..2 {
            assert_eq!(h.record_error(), None);
        }
        assert_eq!(
            h.record_error(),
            Some(Duration::from_millis(50)),
            "doubled, capped at the maximum"
        );
    }

    #[test]
    fn the_window_opens_at_the_first_error_whenever_that_is() {
        // Errors in quick succession quarantine, however long after the
        // process (and its clock) started they come.
        let policy = QuarantinePolicy {
            window: Duration::from_millis(50),
            ..QuarantinePolicy::default()
        };
        for delay_ms in [0, 30, 45, 60, 95] {
            let h = Health::new(policy);
            clock();
            std::thread::sleep(Duration::from_millis(delay_ms));
            let started = (0..5).filter_map(|_| h.record_error()).count();
            assert_eq!(started, 1, "after {delay_ms} ms");
            assert!(h.quarantined());
        }
    }

    #[test]
    fn errors_spread_wider_than_the_window_do_not_quarantine() {
        let h = Health::new(QuarantinePolicy {
            window: Duration::from_millis(10),
            ..QuarantinePolicy::default()
        });
        for _ in 0..10 {
            assert_eq!(h.record_error(), None);
            std::thread::sleep(Duration::from_millis(12));
        }
        assert!(!h.quarantined());
    }
}
