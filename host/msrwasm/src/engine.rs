//! Hot reload: when a plugin file or the manifest changes on disk, the new
//! version is compiled and validated on this module's thread, then put in
//! force with one generation switch that vCPUs notice at their next exit.
//! Anything that fails validation is refused and logged; what runs keeps
//! running.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use notify::RecursiveMode;
use notify_debouncer_full::new_debouncer;

use crate::plugin::state::StateStore;
use crate::plugin::{LoadError, ModuleCache, Plugin, PluginSettings, content_hash, read_plugin_file};
use crate::policy::{Policy, PolicyCell, PolicySpec};

/// Quiet time after the last change to a file before it is read: long
/// enough to coalesce the steps of one save, short enough to feel instant.
pub const DEBOUNCE: Duration = Duration::from_millis(20);

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {}: {source}", dir.display())]
    Watch { dir: PathBuf, source: notify::Error },
    #[error("cannot start the watcher: {0}")]
    Start(String),
}

/// Reload counters of one VM.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub applied: AtomicU64,
    pub refused: AtomicU64,
}

/// The result of one reload attempt, as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The new policy is in force under this generation.
    Applied { generation: u64 },
    /// Refused; the running policy stays.
    Refused { reason: String },
    /// Nothing to do (same content and settings as what runs).
    Unchanged,
}

/// What is in force, and how to build the next version of it.
pub struct Reloader {
    spec: PolicySpec,
    plugins: Vec<Arc<Plugin>>,
    cell: Arc<PolicyCell>,
    vm: Arc<VmFd>,
    state: Arc<StateStore>,
    cache: Arc<ModuleCache>,
    stats: Arc<ReloadStats>,
    /// Content hash of every watched file as last tried (applied or
    /// refused), so that an event without a content change does nothing.
    seen: HashMap<PathBuf, Option<String>>,
}

impl Reloader {
    pub fn new(
        spec: PolicySpec,
        cell: Arc<PolicyCell>,
        vm: Arc<VmFd>,
        state: Arc<StateStore>,
        cache: Arc<ModuleCache>,
        stats: Arc<ReloadStats>,
    ) -> Self {
        let plugins = cell.current().1.plugins().to_vec();
        let mut reloader = Self {
            spec,
            plugins,
            cell,
            vm,
            state,
            cache,
            stats,
            seen: HashMap::new(),
        };
        let files = reloader.files();
        reloader.fresh(&files.into_iter().collect());
        reloader
    }

    /// Those of `changed` whose content differs from when last tried.
    fn fresh(&mut self, changed: &HashSet<PathBuf>) -> HashSet<PathBuf> {
        changed
            .iter()
            .filter(|path| {
                let hash = read_plugin_file(path).ok().map(|bytes| content_hash(&bytes));
                self.seen.insert((*path).clone(), hash.clone()) != Some(hash)
            })
            .cloned()
            .collect()
    }

    /// The files whose changes matter: the manifest and every plugin.
    pub fn files(&self) -> BTreeSet<PathBuf> {
        let plugins = self.spec.plugins.iter().map(|p| absolute(&p.path));
        plugins.chain(self.spec.manifest.as_deref().map(absolute)).collect()
    }

    /// Reacts to changes of `changed` (absolute paths).
    pub fn reload(&mut self, changed: &HashSet<PathBuf>) -> Outcome {
        let changed = &self.fresh(changed);
        if changed.is_empty() {
            return Outcome::Unchanged;
        }
        let manifest = self.spec.manifest.clone().filter(|m| changed.contains(&absolute(m)));
        let outcome = match manifest {
            Some(manifest) => self.reload_manifest(&manifest),
            None => self.reload_plugins(changed),
        };
        // Refusals are counted where they happen (one per refused file).
        if let Outcome::Applied { .. } = outcome {
            self.stats.applied.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    /// A changed manifest is taken as a whole or not at all.
    fn reload_manifest(&mut self, manifest: &Path) -> Outcome {
        let spec = match PolicySpec::from_manifest(manifest) {
            Ok(spec) => spec,
            Err(e) => return self.refuse(manifest, e.to_string()),
        };
        let mut plugins = Vec::new();
        for settings in &spec.plugins {
            match self.load(settings) {
                Ok(plugin) => plugins.push(plugin),
                Err(e) => return self.refuse(manifest, e.to_string()),
            }
        }
        if spec == self.spec && plugins.iter().zip(&self.plugins).all(|(a, b)| Arc::ptr_eq(a, b)) {
            return Outcome::Unchanged;
        }
        self.go_live(spec, plugins, manifest)
    }

    /// Each changed plugin file is taken or refused on its own.
    fn reload_plugins(&mut self, changed: &HashSet<PathBuf>) -> Outcome {
        let mut plugins = self.plugins.clone();
        let mut refused = Vec::new();
        let mut changed_file = None;
        for (slot, settings) in plugins.iter_mut().zip(&self.spec.plugins) {
            if !changed.contains(&absolute(&settings.path)) {
                continue;
            }
            match self.load(settings) {
                Ok(plugin) if !Arc::ptr_eq(&plugin, slot) => {
                    *slot = plugin;
                    changed_file = Some(settings.path.clone());
                }
                Ok(_) => {}
                Err(e) => {
                    // load() logged it
                    refused.push(e.to_string());
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        match changed_file {
            Some(file) => self.go_live(self.spec.clone(), plugins, &file),
            None if refused.is_empty() => Outcome::Unchanged,
            None => Outcome::Refused {
                reason: refused.join("; "),
            },
        }
    }

    /// The running plugin if content and settings are unchanged, else the
    /// new version, compiled (or taken from the cache) and validated.
    fn load(&self, settings: &PluginSettings) -> Result<Arc<Plugin>, LoadError> {
        let bytes = read_plugin_file(&settings.path)?;
        let sha256 = content_hash(&bytes);
        let running = self.plugins.iter().find(|p| p.name() == settings.name);
        if let Some(p) = running.filter(|p| p.settings() == settings && p.sha256() == sha256) {
            return Ok(p.clone());
        }
        let started = Instant::now();
        let cached = self.cache.contains(&sha256);
        // The bytes just hashed, not a second read that may see newer content.
        let result = Plugin::from_bytes_cached(settings.clone(), &bytes, &self.state, &self.cache);
        let old = running.map_or("-", |p| &p.sha256()[..16]);
        let took = started.elapsed();
        match &result {
            Ok(_) => tracing::info!(
                file = %settings.path.display(), old, new = &sha256[..16], compile_ms = took.as_secs_f64() * 1e3,
                cached, "plugin version validated"
            ),
            Err(e) => tracing::warn!(
                file = %settings.path.display(), old, new = &sha256[..16], compile_ms = took.as_secs_f64() * 1e3,
                "plugin version refused, the running version stays: {e}"
            ),
        }
        result.map(Arc::new)
    }

    /// Logs and counts a refusal; what runs keeps running.
    fn refuse(&self, file: &Path, reason: String) -> Outcome {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(file = %file.display(), "reload refused, the running policy stays: {reason}");
        Outcome::Refused { reason }
    }

    fn go_live(&mut self, spec: PolicySpec, plugins: Vec<Arc<Plugin>>, cause: &Path) -> Outcome {
        let policy = match Policy::from_plugins(plugins.clone(), spec.unhandled) {
            Ok(policy) => policy,
            Err(e) => return self.refuse(cause, e.to_string()),
        };
        let current = self.cell.current().1;
        if policy.filter() != current.filter()
            && let Err(e) = policy.filter().apply(&self.vm)
        {
            return self.refuse(cause, e.to_string());
        }
        let generation = self.cell.replace(Arc::new(policy));
        tracing::info!(cause = %cause.display(), generation, "reload applied");
        self.spec = spec;
        self.plugins = plugins;
        Outcome::Applied { generation }
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// The watcher thread; stops when dropped.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Watches the directories of every file `reloader` cares about (so
    /// that atomic renames and multi-step writes are seen) and reloads on
    /// debounced changes.
    pub fn start(mut reloader: Reloader) -> Result<Self, WatchError> {
        let (tx, rx) = channel();
        let mut debouncer = new_debouncer(DEBOUNCE, None, tx).map_err(|e| WatchError::Start(e.to_string()))?;
        let mut dirs = BTreeSet::new();
        watch_dirs(&mut debouncer, &mut dirs, &reloader.files())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("msrwasm-reload".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    let events = match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(Ok(events)) => events,
                        Ok(Err(errors)) => {
                            for e in errors {
                                tracing::warn!("file watcher: {e}");
                            }
                            continue;
                        }
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    let files = reloader.files();
                    let changed: HashSet<PathBuf> = events
                        .iter()
                        .flat_map(|e| e.paths.iter())
                        .filter(|p| files.contains(*p))
                        .cloned()
                        .collect();
                    if changed.is_empty() {
                        continue;
                    }
                    if let Outcome::Applied { .. } = reloader.reload(&changed)
                        && let Err(e) = watch_dirs(&mut debouncer, &mut dirs, &reloader.files())
                    {
                        tracing::warn!("{e}");
                    }
                }
            })
            .map_err(|e| WatchError::Start(e.to_string()))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Makes the watched directories those of `files` (added and removed as
/// the manifest changes).
fn watch_dirs(
    debouncer: &mut notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    dirs: &mut BTreeSet<PathBuf>,
    files: &BTreeSet<PathBuf>,
) -> Result<(), WatchError> {
    let wanted: BTreeSet<PathBuf> = files.iter().filter_map(|f| f.parent().map(Path::to_owned)).collect();
    for dir in dirs.difference(&wanted) {
        let _ = debouncer.unwatch(dir);
    }
    for dir in wanted.difference(dirs) {
        debouncer
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Watch {
                dir: dir.clone(),
                source,
            })?;
    }
    *dirs = wanted;
    Ok(())
}
