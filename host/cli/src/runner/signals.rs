//! Signals: kicking vCPU threads out of KVM_RUN, and the signals that
//! end a run cleanly (statistics flushed, trace written, status 128+N).

use std::sync::Once;
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

static TERMINATION: AtomicI32 = AtomicI32::new(0);

/// The signal that interrupts KVM_RUN so a vCPU thread sees the stop flag.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

extern "C" fn on_termination(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATION.store(num, Ordering::SeqCst);
}

pub(super) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// Signals that end a run cleanly instead of killing the process.
pub const TERMINATION_SIGNALS: [i32; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
];

/// The name of a termination signal.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGALRM => "SIGALRM",
        _ => "signal",
    }
}

/// Makes the [`TERMINATION_SIGNALS`] stop a running VM cleanly (statistics
/// flushed, the trace written, exit status 128+N) instead of killing the
/// process. SIGPIPE stays ignored (Rust's default), so a closed standard
/// output is an error to handle, not a death.
pub fn install_termination_handlers() {
    for sig in TERMINATION_SIGNALS {
        if let Err(e) = register_signal_handler(sig, on_termination) {
            tracing::error!("cannot install a handler for signal {sig}: {e}");
        }
    }
}

/// The termination signal received, if any.
pub fn termination_requested() -> Option<i32> {
    match TERMINATION.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// Kicks every thread until it has returned (a kick can land just before a
/// thread re-enters KVM_RUN, so one is not enough), then joins them.
pub(super) fn stop_threads<T>(threads: Vec<JoinHandle<T>>) -> Vec<Result<T, String>> {
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    threads
        .into_iter()
        .map(|t| {
            let name = t.thread().name().unwrap_or("vcpu").to_owned();
            t.join().map_err(|_| format!("{name} thread panicked"))
        })
        .collect()
}
