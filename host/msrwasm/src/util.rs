//! Small helpers every part uses.

use sha2::Digest;

/// Waits at most `grace` for `thread` to end and joins it if it did; else
/// leaves it to end by itself and returns `None` (the helper threads' stop
/// rule: a stalled peer never holds up a shutdown).
pub fn join_within<T>(
    thread: std::thread::JoinHandle<T>,
    grace: std::time::Duration,
) -> Option<std::thread::Result<T>> {
    let deadline = std::time::Instant::now() + grace;
    while !thread.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    thread.is_finished().then(|| thread.join())
}

/// Reads a number as manifests and scripts write them: `0x606` or `1542`.
pub fn parse_number(word: &str) -> Option<u64> {
    let word = word.trim();
    match word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => word.parse().ok(),
    }
}

/// `0x35`, or `0x610-0x61f` for a range.
pub fn format_range((first, last): (u32, u32)) -> String {
    if first == last {
        format!("{first:#x}")
    } else {
        format!("{first:#x}-{last:#x}")
    }
}

/// An error and its sources on one line, `outer: inner: innermost`.
pub fn error_chain<E: std::error::Error + ?Sized>(e: &E) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out += ": ";
            out += &text;
        }
        source = s.source();
    }
    out
}

/// Hex SHA-256 of a plugin file's content: its version identity.
pub fn content_hash(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
