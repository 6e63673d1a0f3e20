//! Signals: kicking vCPU threads out of KVM_RUN, and the signals that
//! end a run cleanly (statistics flushed, trace written, status 128+N).

use std::sync::Once;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
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

/// Every signal whose default action ends the process, apart from the
/// ones a fault raises (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS,
/// SIGABRT: wasmtime's traps and crashes), SIGPIPE (ignored: a closed
/// output is an error to handle) and the real-time signals, listed apart.
const NAMED: [(i32, &str); 14] = [
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGINT, "SIGINT"),
    (libc::SIGQUIT, "SIGQUIT"),
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGALRM, "SIGALRM"),
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGSTKFLT, "SIGSTKFLT"),
    (libc::SIGXCPU, "SIGXCPU"),
    (libc::SIGXFSZ, "SIGXFSZ"),
    (libc::SIGVTALRM, "SIGVTALRM"),
    (libc::SIGPROF, "SIGPROF"),
    (libc::SIGIO, "SIGIO"),
    (libc::SIGPWR, "SIGPWR"),
];

/// The signals that end a run, the same way at any phase: those named here and
/// the real-time signals but the first, which kicks vCPU threads out of
/// KVM_RUN.
pub fn termination_signals() -> Vec<i32> {
    let named = NAMED.iter().map(|(sig, _)| *sig);
    named.chain(kick_signal() + 1..=libc::SIGRTMAX()).collect()
}

/// The name of a termination signal (`SIGTERM`, `SIGRTMIN+3`).
pub fn name(sig: i32) -> String {
    match NAMED.iter().find(|(n, _)| *n == sig) {
        Some((_, name)) => (*name).to_owned(),
        None if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) => format!("SIGRTMIN+{}", sig - libc::SIGRTMIN()),
        None => "signal".to_owned(),
    }
}

/// Makes every [`termination_signals`] signal stop a VM cleanly (statistics
/// flushed, the trace and footprint written, the API socket removed, exit
/// status 128+N) instead of killing the process. Install it before any
/// slow start-up work, with [`watch_start_up`].
pub fn install_termination_handlers() {
    for sig in termination_signals() {
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

/// Where the run is: starting (compiling, fetching, `init` on every vCPU),
/// running (the run loop answers signals), or ending on a signal that
/// came during start-up.
static PHASE: AtomicU8 = AtomicU8::new(STARTING);
const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const ENDING: u8 = 2;

/// During start-up a signal ends the process at once (it is seen within
/// 10 ms, and its line gets 200 ms to reach standard error, whatever
/// start-up is doing: a compile, a registry fetch, a slow `init`),
/// with status 128+N and a line saying the guest did not run; nothing has
/// been created yet that needs cleaning up (the API socket and the
/// footprint come once the vCPUs run). Once the VM runs (`running`), the
/// run loop stops it cleanly instead.
pub fn watch_start_up() {
    let spawned = std::thread::Builder::new()
        .name("msrwasm-start-signals".into())
        .spawn(|| {
            while PHASE.load(Ordering::Acquire) == STARTING {
                if let Some(sig) = termination_requested()
                    && PHASE
                        .compare_exchange(STARTING, ENDING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    crate::err!(
                        "msrwasm: stopped by signal {sig} ({}) during start-up; the guest did not run",
                        name(sig)
                    );
                    // The line goes through the log queue: give its writer a
                    // moment (a standard error nobody reads cannot hold us).
                    std::thread::sleep(Duration::from_millis(200));
                    std::process::exit(128 + sig);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no start-up signal watcher ({e}): a signal during start-up acts once the VM runs");
    }
}

/// The VM runs: from now on the run loop answers signals. If a start-up
/// signal is already ending the process, this waits for that.
pub(super) fn running() {
    if PHASE
        .compare_exchange(STARTING, RUNNING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
        && PHASE.load(Ordering::Acquire) == ENDING
    {
        loop {
            std::thread::park();
        }
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
