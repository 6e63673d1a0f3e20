//! The `msrwasm` command line as a library: the raw-guest runner (a small
//! VMM built only on the `msrwasm` engine's public API), the demo, the
//! benchmark and the argument handling. The binary is `src/main.rs`.

pub mod bench;
pub mod cli;
pub mod demo;
pub mod logs;
pub mod profile;
pub mod runner;
pub mod top;

/// Writes to standard output, ignoring errors (a closed pipe must not stop
/// the VM or panic).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// Writes a message line to standard error, ignoring errors: plain text,
/// or one JSON object per line with `--log-format json`.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {{
        $crate::logs::message(&format!($($arg)*));
    }};
}
