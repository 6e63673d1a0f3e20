//! `--metrics-addr` and `--metrics-sd-dir`: a VM's metrics where a stock
//! Prometheus server finds and scrapes them.
//!
//! The endpoint is the engine's read-only [`msrwasm::api::MetricsServer`].
//! The discovery entry is one file per VM in a directory that Prometheus
//! reads with `file_sd_configs` (it watches the directory, so a VM appears
//! and disappears within moments):
//!
//! ```json
//! [{"targets": ["127.0.0.1:40123"], "labels": {"vm": "web-1", "msrwasm_pid": "4242"}}]
//! ```
//!
//! written whole (a temporary file renamed into place, mode 0644 so that a
//! Prometheus running as another user reads it) once the endpoint listens,
//! and removed when the VM ends, however it ends short of SIGKILL. An entry
//! left by a VM that was killed is replaced by the next VM of that name; an
//! entry whose VM still runs is never touched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Longest VM name.
pub const MAX_NAME: usize = 64;
/// Largest discovery entry read back (to see whose it is).
const MAX_ENTRY_BYTES: u64 = 64 << 10;

/// Why the metrics endpoint or its discovery entry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Endpoint(#[from] msrwasm::api::ApiError),
    #[error("--metrics-sd-dir {}: cannot write the discovery entry", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--metrics-sd-dir: {} belongs to VM process {pid}, which is running: give this VM another --name",
        path.display()
    )]
    Taken { path: PathBuf, pid: u32 },
}

/// Checks a VM name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with a
/// dot or a dash (it names a file and a Prometheus label value).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "`{name}`: a VM name is 1 to {MAX_NAME} letters, digits, `.`, `_` or `-`, not starting with `.` or `-`"
        )),
    }
}

/// A default VM name: the guest's file stem (cleaned) and this process id.
pub fn default_name(guest: &Path) -> String {
    let stem: String = guest
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() || "._-".contains(c) {
            true => c,
            false => '_',
        })
        .take(MAX_NAME - 12)
        .collect();
    let stem = stem.trim_start_matches(['.', '-']);
    let stem = if stem.is_empty() { "vm" } else { stem };
    format!("{stem}-{}", std::process::id())
}

/// The running endpoint and, if asked for, its discovery entry.
pub struct Metrics {
    // Dropped in this order: the entry is gone before the endpoint stops.
    entry: Option<SdEntry>,
    server: msrwasm::api::MetricsServer,
}

impl Metrics {
    /// Serves `engine`'s metrics on `addr`; with `sd_dir`, announces them
    /// there under `name`.
    pub fn start(
        addr: SocketAddr,
        engine: msrwasm::Engine,
        sd_dir: Option<&Path>,
        name: &str,
    ) -> Result<Self, MetricsError> {
        let server = msrwasm::api::MetricsServer::start(addr, engine)?;
        let entry = match sd_dir {
            Some(dir) => Some(SdEntry::write(dir, name, server.local_addr())?),
            None => None,
        };
        Ok(Self { server, entry })
    }

    /// Where the endpoint listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The discovery entry, if one was written.
    pub fn entry(&self) -> Option<&Path> {
        self.entry.as_ref().map(|e| e.path.as_path())
    }
}

/// One VM's file in the discovery directory; removed when dropped.
struct SdEntry {
    path: PathBuf,
}

impl SdEntry {
    fn write(dir: &Path, name: &str, addr: SocketAddr) -> Result<Self, MetricsError> {
        let path = dir.join(format!("msrwasm-{name}.json"));
        if let Some(pid) = owner(&path).filter(|&pid| pid != std::process::id() && alive(pid)) {
            return Err(MetricsError::Taken { path, pid });
        }
        // Prometheus on this host reaches an endpoint bound to every
        // address through loopback.
        let target = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
            IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
            _ => addr,
        };
        let body = serde_json::json!([{
            "targets": [target.to_string()],
            "labels": { "vm": name, "msrwasm_pid": std::process::id().to_string() },
        }]);
        msrwasm::tools::write_atomic_mode(&path, format!("{body}\n").as_bytes(), 0o644).map_err(|source| {
            MetricsError::Write {
                path: path.clone(),
                source,
            }
        })?;
        Ok(Self { path })
    }
}

impl Drop for SdEntry {
    fn drop(&mut self) {
        // Only our own entry: another VM may have taken the name since.
        if owner(&self.path) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The process that wrote the entry at `path`, if it is one of ours.
fn owner(path: &Path) -> Option<u32> {
    let bytes = msrwasm::tools::read_regular(path, MAX_ENTRY_BYTES).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get(0)?.get("labels")?.get("msrwasm_pid")?.as_str()?.parse().ok()
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_defaults_are_valid() {
        for good in ["web-1", "a", "vm_2.test", &"x".repeat(MAX_NAME)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".hidden",
            "a/b",
            "a b",
            "ü",
            &"x".repeat(MAX_NAME + 1),
            "..",
            "a\nb",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for guest in [
            "guest.elf",
            "/x/.-odd name!.bin",
            "",
            &format!("{}.elf", "y".repeat(200)),
        ] {
            let name = default_name(Path::new(guest));
            assert!(check_name(&name).is_ok(), "{guest} -> {name}");
        }
    }

    #[test]
    fn an_entry_is_whole_removed_at_drop_and_a_live_owner_keeps_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        let entry = SdEntry::write(dir.path(), "web-1", addr).unwrap();
        let text = std::fs::read_to_string(&entry.path).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value[0]["targets"][0], "127.0.0.1:9464");
        assert_eq!(value[0]["labels"]["vm"], "web-1");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&entry.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o044, 0o044 & !umask(), "readable by Prometheus: {mode:o}");
        let path = entry.path.clone();
        drop(entry);
        assert!(!path.exists());

        // An entry of a live process (pid 1) is refused; a dead one's replaced.
        let taken = dir.path().join("msrwasm-db.json");
        std::fs::write(
            &taken,
            r#"[{"targets":["127.0.0.1:1"],"labels":{"vm":"db","msrwasm_pid":"1"}}]"#,
        )
        .unwrap();
        assert!(matches!(
            SdEntry::write(dir.path(), "db", addr),
            Err(MetricsError::Taken { pid: 1, .. })
        ));
        std::fs::write(
            &taken,
            r#"[{"targets":["127.0.0.1:1"],"labels":{"vm":"db","msrwasm_pid":"4294967295"}}]"#,
        )
        .unwrap();
        let replaced = SdEntry::write(dir.path(), "db", addr).unwrap();
        assert_eq!(owner(&replaced.path), Some(std::process::id()));
        // A FIFO in its place is not waited on.
        drop(replaced);
        let fifo = dir.path().join("msrwasm-f.json");
        std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert_eq!(owner(&fifo), None);
    }

    fn umask() -> u32 {
        let probe = tempfile::tempdir().unwrap();
        let file = probe.path().join("p");
        std::fs::write(&file, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        0o666 & !(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777)
    }
}
