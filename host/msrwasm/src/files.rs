//! Reading untrusted files: plugins, manifests, guest images.
//!
//! A path may name anything: a FIFO (whose `open` would block until a
//! writer comes), a device that never ends (`/dev/zero`), a huge file, a
//! directory, or a symlink to any of these, swapped in at any time. Every
//! read goes through [`read_regular`]: opened without blocking, checked to
//! be a regular file *after* opening (no race with a swap), and never read
//! past its size limit whatever the file system claims.

// Writing is for the compiled-code cache (only a build with the compiler
// writes code), the footprint and the tools.
#![cfg_attr(not(feature = "cranelift"), allow(dead_code))]

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Largest plugin file the host reads (a guard against mistakes such as
/// pointing `path` at a disk image).
pub const MAX_PLUGIN_BYTES: u64 = 64 << 20;

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The OS refused.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A directory, FIFO, socket or device.
    #[error("it is a {0}, not a regular file")]
    NotRegular(&'static str),
    /// Larger than the caller allows.
    #[error("{size} bytes is over the {} limit", bytes(*limit))]
    TooLarge {
        /// The size seen (at least `limit + 1` when the file grew while read).
        size: u64,
        /// The limit.
        limit: u64,
    },
}

/// `64 MiB`, `1 KiB` or `100 bytes`.
fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n}-byte"),
    }
}

fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Opens `path` for reading without blocking and checks that it is a
/// regular file of at most `limit` bytes.
pub fn open_regular(path: &Path, limit: u64) -> Result<(File, u64), ReadError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(kind(meta.file_type())));
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    Ok((file, meta.len()))
}

/// Reads a regular file of at most `limit` bytes (see the module docs).
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let (file, len) = open_regular(path, limit)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge {
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// Creates `dir` (and its parents) private to this user, or checks that an
/// existing one is trustworthy: owned by this user and writable by nobody
/// else (what a cache of code to run must be).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = std::fs::metadata(dir)?;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "{}: the directory must be owned by this user and not writable by group or others",
            dir.display()
        )));
    }
    Ok(())
}

/// Checks that `path` can take an output file: its directory exists, and
/// `path` is either absent or a regular file (never followed through a
/// symbolic link, never a FIFO, device, socket or directory, which a
/// rename would replace). Call it when the command starts, so a bad path
/// is refused before any work, not found at the end with the work lost.
pub fn check_output(path: &Path) -> std::io::Result<()> {
    let refuse = |what: &str| {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: {what}; give a new path or a regular file", path.display()),
        ))
    };
    if path.file_name().is_none() {
        return refuse("names no file");
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(m) if m.file_type().is_symlink() => return refuse("is a symbolic link, not replaced"),
        Ok(m) if m.is_dir() => return refuse("is a directory"),
        Ok(_) => return refuse("is a FIFO, device or socket, not replaced"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => refuse("its parent is not a directory"),
        Err(e) => refuse(&format!("its directory {} cannot be used ({e})", dir.display())),
    }
}

/// Replaces `path` with `bytes` atomically (a temporary file beside it,
/// synced, then renamed over it), mode 0600: readers see the old content or
/// the new, never a half-written file. Refuses what [`check_output`]
/// refuses.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, 0o600)
}

/// [`write_atomic`] with file mode `mode` (before the umask), for files
/// other users' processes read (a Prometheus service-discovery entry).
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    check_output(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or("file".into(), |n| n.to_string_lossy().into_owned());
    let temp = dir.join(format!(".{name}.{}.{:x}.tmp", std::process::id(), unique()));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&temp, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })
}

/// Keeps the `keep` newest (by mtime) files of `dir` that `wanted` selects,
/// removing the others: how the caches stay bounded.
/// Temporary files of [`write_atomic`] older than an hour (a process
/// ended while writing) go too.
pub(crate) fn keep_newest(dir: &Path, keep: usize, wanted: impl Fn(&Path) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let stale = |e: &std::fs::DirEntry| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with('.')
            && name.ends_with(".tmp")
            && e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > std::time::Duration::from_secs(3600)))
    };
    let mut entries: Vec<(std::time::SystemTime, std::path::PathBuf)> = entries
        .flatten()
        .filter(|e| {
            if stale(e) {
                let _ = std::fs::remove_file(e.path());
                return false;
            }
            wanted(&e.path())
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if entries.len() <= keep {
        return;
    }
    entries.sort();
    for (_, path) in &entries[..entries.len() - keep] {
        let _ = std::fs::remove_file(path);
    }
}

/// A number no other call in this process returns (temporary file names).
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What identifies a file's current content cheaply: a change of any field
/// means the content may have changed (symlinks followed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of `path` now, or `None` if it cannot be stat'ed.
    pub fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn devices_fifos_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        assert!(matches!(read_regular(&fifo, 10), Err(ReadError::NotRegular("FIFO"))));
        assert!(matches!(
            read_regular(Path::new("/dev/zero"), 10),
            Err(ReadError::NotRegular("character device"))
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/urandom", &link).unwrap();
        assert!(matches!(read_regular(&link, 10), Err(ReadError::NotRegular(_))));
        assert!(matches!(
            read_regular(dir.path(), 10),
            Err(ReadError::NotRegular("directory"))
        ));
    }

    #[test]
    fn size_limits_hold() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, [1u8; 11]).unwrap();
        assert!(matches!(
            read_regular(&f, 10),
            Err(ReadError::TooLarge { size: 11, limit: 10 })
        ));
        assert_eq!(read_regular(&f, 11).unwrap().len(), 11);
    }

    #[test]
    fn keep_newest_removes_the_oldest_wanted_entries() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        // Written newest first, so creation order is not what decides.
        for n in (0..6u64).rev() {
            let path = dir.path().join(format!("{n}.entry"));
            std::fs::write(&path, b"x").unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(base + std::time::Duration::from_secs(n)).unwrap();
        }
        std::fs::write(dir.path().join("other"), b"x").unwrap();
        keep_newest(dir.path(), 2, |p| p.extension().is_some_and(|x| x == "entry"));
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["4.entry", "5.entry", "other"]);
    }

    /// Issue #21: `--footprint` and `pull -o` replaced a FIFO, a device or
    /// a symbolic link (to `/proc/self/fd/1`, say) with a regular file, and
    /// a missing directory was found only at the end.
    #[test]
    fn outputs_refuse_what_is_not_a_regular_file_or_a_new_path() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/proc/self/fd/1", &link).unwrap();
        let cases = [
            (fifo.clone(), "FIFO, device or socket"),
            (PathBuf::from("/dev/null"), "FIFO, device or socket"),
            (link.clone(), "symbolic link"),
            (dir.path().to_owned(), "is a directory"),
            (dir.path().join("missing/out.json"), "cannot be used"),
        ];
        for (path, words) in &cases {
            let e = check_output(path).unwrap_err().to_string();
            assert!(e.contains(words) && e.contains(&*path.to_string_lossy()), "{e}");
            // The writer refuses too, without blocking on the FIFO.
            assert!(write_atomic(path, b"x").is_err(), "{}", path.display());
        }
        assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        let file = dir.path().join("out.json");
        check_output(&file).unwrap();
        write_atomic(&file, b"1").unwrap();
        check_output(&file).unwrap();
        write_atomic(&file, b"2").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"2");
    }
}
