//! Compiled plugins by content hash: in memory (a rollback or a file touched
//! without change goes live without compiling), and optionally on disk (a
//! restart or a reload of an 18 MB component loads in milliseconds instead
//! of compiling for seconds).
//!
//! Only validated versions enter either cache. The disk cache keys entries
//! by the source's SHA-256 and the runtime's code key (versions, execution
//! mode, signals-based traps: the same in builds with and without the
//! compiler, [`super::Runtime::code_key`]); wasmtime checks each entry's
//! real compatibility again when it loads it. Each entry carries a SHA-256
//! of its own bytes, checked before use: a corrupt or truncated entry is
//! deleted and the plugin compiled again, never loaded. The directory must be private
//! (owned by this user, not writable by others): wasmtime trusts a
//! precompiled artifact, so msrwasm only uses a cache nobody else can write.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use wasmtime::Engine;
use wasmtime::Module;
use wasmtime::component::Component;

/// A compiled plugin.
#[derive(Clone)]
pub enum Artifact {
    /// A core module.
    Module(Module),
    /// A component.
    Component(Component),
}

impl Artifact {
    fn size(&self) -> usize {
        let range = match self {
            Artifact::Module(m) => m.image_range(),
            Artifact::Component(c) => c.image_range(),
        };
        (range.end as usize).saturating_sub(range.start as usize)
    }

    #[cfg_attr(not(feature = "cranelift"), allow(dead_code))]
    fn kind(&self) -> &'static str {
        match self {
            Artifact::Module(_) => "core",
            Artifact::Component(_) => "component",
        }
    }
}

/// Where a compiled plugin came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Compiled now.
    Compiled,
    /// From the in-memory cache.
    Memory,
    /// From the disk cache.
    Disk,
}

impl Source {
    /// `now`, `memory cache` or `disk cache`: where the reload log says
    /// the code came from.
    pub fn name(self) -> &'static str {
        match self {
            Self::Compiled => "now",
            Self::Memory => "memory cache",
            Self::Disk => "disk cache",
        }
    }
}

/// Compiled plugins, by the sha256 of their source content.
#[derive(Default)]
pub struct ModuleCache {
    memory: Mutex<VecDeque<(String, Artifact, usize)>>,
    disk: Option<DiskCache>,
}

impl std::fmt::Debug for ModuleCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleCache")
            .field("entries", &self.len())
            .field("disk", &self.disk.as_ref().map(|d| &d.dir))
            .finish()
    }
}

impl ModuleCache {
    /// Entries kept in memory at most.
    pub const MAX_ENTRIES: usize = 32;
    /// Compiled code kept in memory at most, bytes.
    pub const MAX_BYTES: usize = 256 << 20;

    /// A memory-only cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache that also keeps artifacts in `dir` (see the module docs);
    /// `None` with a warning when `dir` is not private or not usable.
    pub fn with_disk(dir: &Path, runtime: &super::Runtime) -> Self {
        let disk = match DiskCache::open(dir, &runtime.code_key()) {
            Ok(disk) => Some(disk),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "compiled-plugin cache disabled: {e}");
                None
            }
        };
        Self {
            memory: Mutex::default(),
            disk,
        }
    }

    #[cfg(any(test, feature = "tools"))]
    /// The disk directory in use, if any.
    pub fn disk_dir(&self) -> Option<&Path> {
        self.disk.as_ref().map(|d| d.dir.as_path())
    }

    /// A compiled artifact for content `sha256`, if cached.
    pub(crate) fn get(&self, sha256: &str, engine: &Engine, component: bool) -> Option<(Artifact, Source)> {
        {
            let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, a, _)) = memory.iter().find(|(h, ..)| h == sha256) {
                return Some((a.clone(), Source::Memory));
            }
        }
        let artifact = self.disk.as_ref()?.load(sha256, engine, component)?;
        Some((artifact, Source::Disk))
    }

    /// Keeps a validated artifact.
    pub(crate) fn insert(&self, sha256: &str, artifact: &Artifact, source: Source) {
        if source == Source::Compiled
            && let Some(disk) = &self.disk
        {
            disk.store(sha256, artifact);
        }
        let size = artifact.size();
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        if memory.iter().any(|(h, ..)| h == sha256) || size > Self::MAX_BYTES {
            return;
        }
        memory.push_back((sha256.to_owned(), artifact.clone(), size));
        while memory.len() > Self::MAX_ENTRIES || memory.iter().map(|(.., s)| s).sum::<usize>() > Self::MAX_BYTES {
            memory.pop_front();
        }
    }

    /// Whether content with this hash is compiled in memory already.
    #[cfg(test)]
    pub fn contains(&self, sha256: &str) -> bool {
        let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.iter().any(|(h, ..)| h == sha256)
    }

    /// Entries held in memory.
    pub fn len(&self) -> usize {
        self.memory.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    #[cfg(any(test, feature = "tools"))]
    /// Whether memory holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[cfg(feature = "tools")]
    /// Compiled bytes held in memory.
    pub fn bytes(&self) -> usize {
        let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.iter().map(|(.., s)| s).sum()
    }
}

/// Header of a disk entry, before the SHA-256 of the payload.
const MAGIC: &[u8; 16] = b"msrwasm-cwasm-1\n";
/// Entries kept on disk at most (the oldest go first).
#[cfg_attr(not(feature = "cranelift"), allow(dead_code))]
pub const MAX_DISK_ENTRIES: usize = 64;
/// Largest entry read back.
const MAX_ENTRY_BYTES: u64 = 1 << 30;

struct DiskCache {
    dir: PathBuf,
    engine_key: String,
}

impl DiskCache {
    fn open(dir: &Path, engine_key: &str) -> std::io::Result<Self> {
        crate::files::private_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            engine_key: engine_key.to_owned(),
        })
    }

    fn path(&self, sha256: &str, component: bool) -> PathBuf {
        let kind = if component { "component" } else { "core" };
        self.dir.join(format!("{sha256}-{}-{kind}.cwasm", self.engine_key))
    }

    fn load(&self, sha256: &str, engine: &Engine, component: bool) -> Option<Artifact> {
        let path = self.path(sha256, component);
        let bytes = match crate::files::read_regular(&path, MAX_ENTRY_BYTES) {
            Ok(bytes) => bytes,
            Err(crate::files::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %path.display(), "compiled-plugin cache entry unreadable, compiling instead: {e}");
                let _ = std::fs::remove_file(&path);
                return None;
            }
        };
        let valid =
            bytes.len() > 48 && &bytes[..16] == MAGIC && Sha256::digest(&bytes[48..]).as_slice() == &bytes[16..48];
        if !valid {
            tracing::warn!(file = %path.display(), "corrupt compiled-plugin cache entry removed; compiling instead");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let payload = &bytes[48..];
        let artifact = match component {
            false => crate::sys::deserialize_module(engine, payload).map(Artifact::Module),
            true => crate::sys::deserialize_component(engine, payload).map(Artifact::Component),
        };
        match artifact {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(file = %path.display(), "compiled-plugin cache entry refused by wasmtime: {e}");
                // Without a compiler this entry may be the only code there
                // is (another engine's settings): left for that engine.
                #[cfg(feature = "cranelift")]
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Without the compiler nothing is compiled here, so nothing is stored.
    #[cfg(not(feature = "cranelift"))]
    fn store(&self, _: &str, _: &Artifact) {}

    #[cfg(feature = "cranelift")]
    fn store(&self, sha256: &str, artifact: &Artifact) {
        let payload = match artifact {
            Artifact::Module(m) => m.serialize(),
            Artifact::Component(c) => c.serialize(),
        };
        let Ok(payload) = payload else { return };
        let path = self.path(sha256, artifact.kind() == "component");
        let mut entry = Vec::with_capacity(48 + payload.len());
        entry.extend_from_slice(MAGIC);
        entry.extend_from_slice(&Sha256::digest(&payload));
        entry.extend_from_slice(&payload);
        if let Err(e) = crate::files::write_atomic(&path, &entry) {
            tracing::warn!(dir = %self.dir.display(), "cannot write a compiled-plugin cache entry: {e}");
            return;
        }
        self.evict();
    }

    /// Keeps at most [`MAX_DISK_ENTRIES`] entries, the newest.
    #[cfg_attr(not(feature = "cranelift"), allow(dead_code))]
    fn evict(&self) {
        crate::files::keep_newest(&self.dir, MAX_DISK_ENTRIES, |p| {
            p.extension().is_some_and(|x| x == "cwasm")
        });
    }
}

#[cfg(feature = "tools")]
/// The user's cache directory for msrwasm: `$XDG_CACHE_HOME/msrwasm`, else
/// `$HOME/.cache/msrwasm`.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("msrwasm"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::Runtime;
    use crate::util::hex;

    fn compiled(engine: &Engine, n: usize) -> (String, Artifact) {
        let wat = format!("(module (func (export \"f{n}\")))");
        let module = Module::new(engine, &wat).unwrap();
        (hex(&Sha256::digest(wat.as_bytes())), Artifact::Module(module))
    }

    fn private_temp() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        crate::files::private_dir(dir.path()).unwrap();
        dir
    }

    #[test]
    fn disk_entries_are_reused_and_damaged_ones_compiled_again() {
        let engine = Runtime::shared().engine().clone();
        let dir = private_temp();
        let (sha, artifact) = compiled(&engine, 0);
        ModuleCache::with_disk(dir.path(), &Runtime::shared()).insert(&sha, &artifact, Source::Compiled);
        let fresh = || ModuleCache::with_disk(dir.path(), &Runtime::shared());
        assert!(matches!(fresh().get(&sha, &engine, false), Some((_, Source::Disk))));
        // A core entry is never taken for a component.
        assert!(fresh().get(&sha, &engine, true).is_none());

        let entry = fresh().disk.unwrap().path(&sha, false);
        let good = std::fs::read(&entry).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        for damaged in [flipped, good[..good.len() / 2].to_vec(), b"msrwasm".to_vec()] {
            std::fs::write(&entry, damaged).unwrap();
            assert!(fresh().get(&sha, &engine, false).is_none());
            assert!(!entry.exists(), "a damaged entry is removed");
        }
        // A FIFO in its place is refused, not waited on.
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&entry)
                .status()
                .unwrap()
                .success()
        );
        assert!(fresh().get(&sha, &engine, false).is_none());
    }

    #[test]
    fn a_directory_others_can_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            ModuleCache::with_disk(dir.path(), &Runtime::shared())
                .disk_dir()
                .is_none()
        );
    }

    #[test]
    fn both_caches_keep_only_the_newest_entries() {
        let engine = Runtime::shared().engine().clone();
        let dir = private_temp();
        let cache = ModuleCache::with_disk(dir.path(), &Runtime::shared());
        let all: Vec<_> = (0..MAX_DISK_ENTRIES + 2).map(|n| compiled(&engine, n)).collect();
        for (sha, artifact) in &all {
            cache.insert(sha, artifact, Source::Compiled);
        }
        assert_eq!(cache.len(), ModuleCache::MAX_ENTRIES);
        assert!(!cache.contains(&all[0].0) && cache.contains(&all[all.len() - 1].0));
        let on_disk = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(on_disk, MAX_DISK_ENTRIES);
    }
}
