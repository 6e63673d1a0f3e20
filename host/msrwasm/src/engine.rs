//! The engine: the one owner of a VM's MSR policy.
//!
//! Every change goes through one serialized path (a lock held while the
//! new version is read, compiled, validated on every vCPU and put in
//! force): file changes found by [`Engine::refresh`] (what the watcher
//! calls), programmatic [`Engine::update`]s from the VMM, and the control
//! API ([`Engine::update_manifest`]). The engine remembers where the policy
//! in force came from, so a programmatic change is never undone by a later
//! event on a file it no longer uses.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::dispatch::{Access, Dispatcher, Op};
use crate::events::{Cause, Events, Fanout, Reload};
use crate::files::FileStamp;
use crate::oci::Fetch;
use crate::plugin::state::{StateSnapshot, StateStore, StoreFull};
use crate::plugin::{
    ModuleCache, Plugin, PluginSettings, Runtime, RuntimeError, RuntimeOptions, content_hash, read_plugin_file,
};
use crate::policy::filter::{FilterSink, NoFilter};
use crate::policy::{Policy, PolicyError, PolicySpec, Unhandled};
use crate::stats::{Stats, StatsSnapshot};

/// Distinct (MSR, direction) pairs `unhandled = "log"` (and the firewall)
/// log individually per VM; past this, one line says the rest are not.
pub const MAX_LOGGED_MSRS: usize = 4096;

/// Why an engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The wasm runtime did not start.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The initial policy is refused.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    runtime: Option<Arc<Runtime>>,
    options: RuntimeOptions,
    events: Fanout,
    filter: Option<Box<dyn FilterSink>>,
    time_calls: bool,
    base_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    oci: Option<Arc<dyn Fetch>>,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self {
            runtime: None,
            options: RuntimeOptions::default(),
            events: Fanout::new(),
            filter: None,
            time_calls: false,
            base_dir: None,
            cache_dir: None,
            oci: None,
        }
    }
}

impl EngineBuilder {
    /// Runs plugins on this runtime (shared by several engines, say)
    /// instead of creating one from the options below.
    pub fn runtime(mut self, runtime: Arc<Runtime>) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Starts the engine's wasmtime configuration from `config` (see
    /// [`crate::plugin::runtime::configure`] for what msrwasm overrides).
    pub fn wasmtime_config(mut self, config: wasmtime::Config) -> Self {
        self.options.config = Some(config);
        self
    }

    /// The clock plugins read (`msr.now_ns`): for example a
    /// [`crate::plugin::clock::GuestClock`] that stands still while the VM
    /// is paused.
    pub fn clock(mut self, clock: Arc<dyn crate::plugin::clock::Clock>) -> Self {
        self.options.clock = clock;
        self
    }

    /// Adds an event sink.
    pub fn events(mut self, events: Arc<dyn Events>) -> Self {
        self.events.push(events);
        self
    }

    /// The VMM's side of the MSR filter (without one, policies that need a
    /// filter are refused: see [`NoFilter`]).
    pub fn filter(mut self, sink: impl FilterSink + 'static) -> Self {
        self.filter = Some(Box::new(sink));
        self
    }

    /// Times plugin calls (for the call-time histogram of `/metrics`): one
    /// call in [`crate::dispatch::TIMING_SAMPLE`], since reading the clock
    /// costs more than a plugin call on some hosts.
    pub fn time_calls(mut self, on: bool) -> Self {
        self.time_calls = on;
        self
    }

    /// Where relative plugin paths of manifests given as text (the control
    /// API) resolve; by default the directory of the first manifest, else
    /// the working directory.
    pub fn base_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base_dir = Some(dir.into());
        self
    }

    /// Keeps compiled plugins in `dir` too (see [`crate::plugin::cache`]):
    /// restarts and reloads of large plugins skip compiling. Without it,
    /// compiled plugins are cached in memory only.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// Fetches `oci://` plugins through `fetch` (an
    /// [`OciStore`](crate::oci::store::OciStore) with the `oci` feature).
    /// Without it, a policy naming one is refused. Follow tags with a
    /// [`Follower`](crate::oci::Follower) on the same fetcher.
    pub fn oci(mut self, fetch: Arc<dyn Fetch>) -> Self {
        self.oci = Some(fetch);
        self
    }

    /// Loads `spec` and hands its filter plan to the filter sink.
    pub fn build(self, spec: PolicySpec) -> Result<Engine, EngineError> {
        let runtime = match self.runtime {
            Some(r) => r,
            None => Runtime::new(self.options)?,
        };
        let stats = Arc::new(Stats::default());
        let mut events = self.events;
        events.push(stats.clone());
        let base_dir = self
            .base_dir
            .or_else(|| spec.manifest.as_ref().and_then(|m| m.parent()).map(Path::to_owned))
            .unwrap_or_else(|| PathBuf::from("."));
        let shared = Arc::new(Shared {
            runtime: runtime.clone(),
            state: Arc::new(StateStore::default()),
            cache: match &self.cache_dir {
                Some(dir) => ModuleCache::with_disk(dir, runtime.engine()),
                None => ModuleCache::new(),
            },
            generation: AtomicU64::new(0),
            current: RwLock::new(Arc::new(Policy::compose(Vec::new(), &PolicySpec::default(), 0)?)),
            owner: Mutex::new(Owner {
                spec: PolicySpec::default(),
                plugins: Vec::new(),
                seen: HashMap::new(),
                pending: None,
            }),
            events,
            stats,
            filter: self.filter.unwrap_or_else(|| Box::new(NoFilter)),
            logged: Mutex::new(HashSet::new()),
            vcpus: Mutex::new(BTreeSet::new()),
            graveyard: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            manifest: RwLock::new(None),
            time_calls: self.time_calls,
            oci: self.oci,
            base_dir,
            started: Instant::now(),
        });
        let engine = Engine { shared };
        let mut spec = spec;
        let manifest = manifest_seen(&spec);
        engine.shared.fetch(&mut spec).map_err(first_error)?;
        {
            let mut owner = engine.shared.lock_owner();
            engine
                .shared
                .load_and_apply(&mut owner, spec, manifest)
                .map_err(first_error)?;
        }
        Ok(engine)
    }
}

fn first_error(mut errors: Vec<PolicyError>) -> PolicyError {
    errors.remove(0)
}

/// The answer to a VM's deflected MSR accesses: its policy, plugin state
/// and counters. Cheap to clone (all clones are the same engine); `Send`
/// and `Sync`.
///
/// ```no_run
/// use msrwasm::{Access, Engine, ExitReason, NoKvm, PolicySpec, Reply, Unhandled};
///
/// let spec = PolicySpec::from_paths(&["plugins/rapl.wat".into()], Unhandled::Gp);
/// // A real VMM passes its filter: .filter(msrwasm::kvm::KvmFilter::new(vm, vec![]))
/// let engine = Engine::builder().filter(msrwasm::policy::filter::RecordingFilter::default()).build(spec)?;
/// let mut vcpu0 = engine.dispatcher(0);
/// let outcome = vcpu0.handle(Access::read(0x606, ExitReason::Filter), &mut NoKvm);
/// assert_eq!(outcome.reply, Reply::Read(0xa0e03));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

/// What `GET /v1/status` and similar reports need.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    /// The generation in force.
    pub generation: u64,
    /// vCPUs with dispatchers.
    pub vcpus: usize,
    /// Seconds since the engine was built.
    pub uptime_s: f64,
    /// The unhandled policy in force.
    pub unhandled: Unhandled,
    /// The manifest in force was read from this file (`None`: given in
    /// code, by the API, or as plugin paths).
    pub manifest: Option<PathBuf>,
    /// The plugins in force.
    pub plugins: Vec<PluginStatus>,
}

/// One plugin in [`Status`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct PluginStatus {
    /// Name.
    pub name: String,
    /// Content sha256.
    pub version: String,
    /// `core` or `component`.
    pub flavour: crate::plugin::Flavour,
    /// File.
    pub path: PathBuf,
    /// Claims in force, `0x35` or `0x610-0x61f`; `None`: a catch-all.
    pub claims: Option<Vec<String>>,
    /// Counters (all versions, all vCPUs).
    pub stats: crate::stats::PluginStats,
    /// Whether it is skipped now.
    pub quarantined: bool,
}

impl Engine {
    /// Starts building an engine.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// The dispatcher for vCPU `vcpu`: one per vCPU thread. Creating it
    /// registers the vCPU, so later changes prepare (and validate) new
    /// plugin instances for it off the vCPU thread.
    pub fn dispatcher(&self, vcpu: u32) -> Dispatcher {
        self.shared.vcpus.lock().unwrap_or_else(|e| e.into_inner()).insert(vcpu);
        Dispatcher::new(self.shared.clone(), vcpu)
    }

    /// The generation in force (changes with every applied change).
    pub fn generation(&self) -> u64 {
        self.shared.generation()
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.shared.current()
    }

    /// The spec in force.
    pub fn spec(&self) -> PolicySpec {
        self.shared.lock_owner().spec.clone()
    }

    /// Replaces the policy with `spec` (from the VMM's code): the same
    /// serialized path as file reloads; the spec becomes the engine's, so
    /// a later change of a file it does not name changes nothing.
    pub fn update(&self, spec: PolicySpec) -> Result<u64, Vec<PolicyError>> {
        self.shared.change(spec, Cause::Update)
    }

    /// Replaces the policy with a manifest given as text (the control API):
    /// relative plugin paths resolve against the engine's base directory.
    /// The text becomes the VM's manifest until the next such change.
    pub fn update_manifest(&self, text: &str) -> Result<u64, Vec<PolicyError>> {
        let name = self.shared.base_dir.join("(manifest from the control API)");
        let mut spec = PolicySpec::parse(&name, text).map_err(|e| vec![PolicyError::Manifest(e)])?;
        spec.manifest = None;
        self.shared.change(spec, Cause::Api)
    }

    /// Checks every file the policy reads (and a refused manifest's) and
    /// applies what changed, skipping files in `hold` (being written).
    /// What the watcher and `POST /v1/reload` call; also usable from a
    /// VMM's own timer or event loop.
    pub fn refresh(&self, hold: &HashSet<PathBuf>) -> Vec<Reload> {
        self.shared.refresh(hold, false)
    }

    /// Re-reads every file now, even those that look unchanged.
    pub fn reload_all(&self) -> Vec<Reload> {
        self.shared.refresh(&HashSet::new(), true)
    }

    /// The files whose changes matter now: the manifest (if the policy came
    /// from a file), every plugin, and the files a refused manifest names.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let owner = self.shared.lock_owner();
        let mut files = owner.spec.files();
        if let Some(pending) = &owner.pending {
            files.extend(pending.iter().cloned());
        }
        files.sort();
        files.dedup();
        files
    }

    /// Counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The plugin state store.
    pub fn state(&self) -> &Arc<StateStore> {
        &self.shared.state
    }

    /// Every plugin's state (for snapshot and live migration). Take it with
    /// the vCPUs paused: an MSR exit completes only at the next `KVM_RUN`,
    /// so pause with `immediate_exit` and let every vCPU return first.
    pub fn state_snapshot(&self) -> StateSnapshot {
        self.shared.state.snapshot()
    }

    /// Restores plugin state (see [`StateStore::restore`]).
    pub fn restore_state(&self, snapshot: &StateSnapshot) -> Result<(), StoreFull> {
        self.shared.state.restore(snapshot)
    }

    /// The wasm runtime.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.shared.runtime
    }

    /// The status report of the control API.
    pub fn status(&self) -> Status {
        let policy = self.shared.current();
        let stats = self.stats();
        let manifest = self.shared.manifest.read().unwrap_or_else(|e| e.into_inner()).clone();
        Status {
            generation: policy.generation(),
            vcpus: self.shared.vcpus.lock().unwrap_or_else(|e| e.into_inner()).len(),
            uptime_s: self.shared.started.elapsed().as_secs_f64(),
            unhandled: policy.unhandled(),
            manifest,
            plugins: policy
                .plugins()
                .iter()
                .map(|p| PluginStatus {
                    name: p.name().to_owned(),
                    version: p.sha256().to_owned(),
                    flavour: p.flavour(),
                    path: p.path().to_owned(),
                    claims: p.claims().map(|c| c.iter().map(|&r| crate::format_range(r)).collect()),
                    stats: stats.plugins.get(p.name()).cloned().unwrap_or_default(),
                    quarantined: p.health().quarantined(),
                })
                .collect(),
        }
    }

    /// Refuses every later change, and discards one in flight (a compile
    /// that finishes after shutdown). For orderly shutdown.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
    }

    /// Drops plugin instances and policies that dispatchers left behind
    /// at their last switch (done by every change too).
    pub fn collect_garbage(&self) {
        self.shared.empty_graveyard();
    }
}

/// A file as last tried by the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    stamp: Option<FileStamp>,
    hash: Option<String>,
}

/// What only the change path touches (under the owner lock).
struct Owner {
    /// The spec in force.
    spec: PolicySpec,
    /// The plugin versions in force, in chain order.
    plugins: Vec<Arc<Plugin>>,
    /// Every watched file as last tried (applied or refused).
    seen: HashMap<PathBuf, Seen>,
    /// Files a refused manifest names: when one changes, the manifest is
    /// tried again.
    pending: Option<Vec<PathBuf>>,
}

/// What the engine's clones and dispatchers share.
pub(crate) struct Shared {
    runtime: Arc<Runtime>,
    state: Arc<StateStore>,
    cache: ModuleCache,
    generation: AtomicU64,
    current: RwLock<Arc<Policy>>,
    owner: Mutex<Owner>,
    pub(crate) events: Fanout,
    pub(crate) stats: Arc<Stats>,
    filter: Box<dyn FilterSink>,
    logged: Mutex<HashSet<(u32, bool)>>,
    vcpus: Mutex<BTreeSet<u32>>,
    graveyard: Mutex<Vec<Box<dyn Send>>>,
    closed: AtomicBool,
    /// The manifest file of the spec in force (readable while a change is
    /// being compiled).
    manifest: RwLock<Option<PathBuf>>,
    pub(crate) time_calls: bool,
    oci: Option<Arc<dyn Fetch>>,
    base_dir: PathBuf,
    started: Instant,
}

impl Shared {
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn current(&self) -> Arc<Policy> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_owner(&self) -> std::sync::MutexGuard<'_, Owner> {
        self.owner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps what a dispatcher dropped at a switch until the change path
    /// frees it, off the vCPU thread.
    pub(crate) fn bury(&self, instances: Vec<Option<crate::plugin::PluginInstance>>, policy: Arc<Policy>) {
        let mut graveyard = self.graveyard.lock().unwrap_or_else(|e| e.into_inner());
        let instances: Vec<_> = instances.into_iter().flatten().collect();
        if !instances.is_empty() {
            graveyard.push(Box::new(instances));
        }
        graveyard.push(Box::new(policy));
    }

    fn empty_graveyard(&self) {
        let dead = std::mem::take(&mut *self.graveyard.lock().unwrap_or_else(|e| e.into_inner()));
        drop(dead);
    }

    /// Logs an unhandled access once per (MSR, direction) per VM.
    pub(crate) fn log_unhandled_once(&self, vcpu: u32, access: Access, policy: Unhandled, firewall: bool) {
        let key = (access.index, access.is_write());
        let first = {
            let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
            if logged.len() >= MAX_LOGGED_MSRS {
                if logged.insert((u32::MAX, false)) {
                    tracing::warn!(
                        "{MAX_LOGGED_MSRS} distinct unhandled MSRs logged; further ones are not logged individually (the footprint and trace still record them)"
                    );
                }
                return;
            }
            logged.insert(key)
        };
        if !first {
            return;
        }
        let what = if firewall {
            "denied by the MSR firewall (filter_default = \"deny\", not in allow)"
        } else {
            "unhandled"
        };
        let outcome = match (policy, firewall) {
            (Unhandled::Gp, _) => "#GP",
            (_, _) if access.is_write() => "write dropped",
            _ => "read as 0",
        };
        match access.op {
            Op::Read => tracing::warn!(
                vcpu,
                reason = access.reason.name(),
                "rdmsr {:#x} {what}: {outcome} (unhandled = {policy}); logged once per VM",
                access.index
            ),
            Op::Write(v) => tracing::warn!(
                vcpu,
                reason = access.reason.name(),
                "wrmsr {:#x} <- {v:#x} {what}: {outcome} (unhandled = {policy}); logged once per VM",
                access.index
            ),
        }
    }

    /// Makes every `oci://` plugin of `spec` local: its path becomes the
    /// fetched file and fixed content is pinned by sha256.
    fn fetch(&self, spec: &mut PolicySpec) -> Result<(), Vec<PolicyError>> {
        let errors: Vec<PolicyError> = spec
            .plugins
            .iter_mut()
            .filter_map(|settings| {
                crate::oci::localize(self.oci.as_deref(), settings)
                    .err()
                    .map(|source| PolicyError::Oci {
                        plugin: settings.name.clone(),
                        source: Box::new(source),
                    })
            })
            .collect();
        match errors.is_empty() {
            true => Ok(()),
            false => Err(errors),
        }
    }

    /// Loads every plugin of `spec`, reusing the running version when
    /// content and settings are unchanged, each with the record of the file
    /// as it was read; returns every error.
    fn load_plugins(&self, owner: &Owner, spec: &PolicySpec) -> Result<Loaded, Vec<PolicyError>> {
        let (mut plugins, mut files) = (Vec::new(), Vec::new());
        let mut errors = Vec::new();
        for settings in &spec.plugins {
            match self.load_plugin(owner, settings) {
                Ok((p, seen)) => {
                    plugins.push(p);
                    files.push((settings.path.clone(), seen));
                }
                Err(e) => errors.push(PolicyError::Load(e)),
            }
        }
        match errors.is_empty() {
            true => Ok((plugins, files)),
            false => Err(errors),
        }
    }

    /// The running plugin if content and settings are unchanged, else the
    /// new version, compiled (or taken from the cache) and validated; with
    /// the file's record: its stamp taken before the read, so that a save
    /// made during the compile shows as a change at the next refresh.
    fn load_plugin(
        &self,
        owner: &Owner,
        settings: &PluginSettings,
    ) -> Result<(Arc<Plugin>, Seen), crate::plugin::LoadError> {
        let stamp = FileStamp::of(&settings.path);
        let bytes = read_plugin_file(&settings.path)?;
        let sha256 = content_hash(&bytes);
        let seen = Seen {
            stamp,
            hash: Some(sha256.clone()),
        };
        let running = owner.plugins.iter().find(|p| p.name() == settings.name);
        if let Some(p) = running.filter(|p| p.settings() == settings && p.sha256() == sha256) {
            return Ok((p.clone(), seen));
        }
        let started = Instant::now();
        let cached = self.cache.contains(&sha256);
        // The bytes just hashed, not a second read that may see newer content.
        let result = Plugin::build(
            &self.runtime,
            settings.clone(),
            &bytes,
            sha256.clone(),
            &self.state,
            Some(&self.cache),
        );
        let old = running.map_or("-", |p| p.info().short_version());
        let took_ms = started.elapsed().as_secs_f64() * 1e3;
        match &result {
            Ok(_) => tracing::info!(
                file = %settings.path.display(), old, new = &sha256[..16], compile_ms = took_ms, cached,
                "plugin version validated"
            ),
            Err(e) => tracing::warn!(
                file = %settings.path.display(), old, new = &sha256[..16], compile_ms = took_ms,
                "plugin version refused: {}", crate::error_chain(e)
            ),
        }
        result.map(|p| (Arc::new(p), seen))
    }

    /// Puts a loaded policy in force: composes it, prepares (and so
    /// validates) instances of new versions on every registered vCPU,
    /// hands the filter plan to the VMM, then switches the generation.
    /// `files`: records of the files read for this change, kept once it
    /// is in force.
    fn apply(
        &self,
        owner: &mut Owner,
        spec: PolicySpec,
        plugins: Vec<Arc<Plugin>>,
        files: Vec<(PathBuf, Seen)>,
    ) -> Result<u64, PolicyError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PolicyError::Closed);
        }
        let generation = self.generation() + 1;
        let policy = Policy::compose(plugins.clone(), &spec, generation)?;
        let old = self.current();
        let vcpus: Vec<u32> = self
            .vcpus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        for (position, plugin) in policy.plugins().iter().enumerate() {
            if old.plugins().iter().any(|p| Arc::ptr_eq(p, plugin)) {
                continue;
            }
            for &vcpu in &vcpus {
                let instance = plugin
                    .instantiate(vcpu)
                    .map_err(|source| PolicyError::Vcpu { vcpu, source })?;
                policy.prepare(vcpu, position, instance);
            }
        }
        if policy.filter() != old.filter() || generation == 1 {
            self.filter
                .apply(policy.filter())
                .map_err(|source| PolicyError::Filter {
                    manifest: spec.manifest.clone(),
                    source,
                })?;
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(PolicyError::Closed);
        }
        let names: Vec<&str> = spec.plugins.iter().map(|p| p.name.as_str()).collect();
        self.state.prune(&names);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        self.generation.store(generation, Ordering::Release);
        owner.seen.extend(files);
        *self.manifest.write().unwrap_or_else(|e| e.into_inner()) = spec.manifest.clone();
        owner.spec = spec;
        owner.plugins = plugins;
        self.empty_graveyard();
        Ok(generation)
    }

    fn report(&self, reload: Reload) -> Reload {
        match &reload {
            Reload::Applied { cause, generation } => tracing::info!(%cause, generation, "reload applied"),
            Reload::Refused { cause, errors } => {
                tracing::warn!(%cause, "change refused, the running policy stays: {}", errors.join("; "))
            }
        }
        self.events.reload(&reload);
        reload
    }

    /// Loads `spec`'s plugins and puts it in force; `manifest`: the record
    /// of its manifest, taken before the manifest was read.
    fn load_and_apply(
        &self,
        owner: &mut Owner,
        spec: PolicySpec,
        manifest: Option<(PathBuf, Seen)>,
    ) -> Result<u64, Vec<PolicyError>> {
        let (plugins, mut files) = self.load_plugins(owner, &spec)?;
        files.extend(manifest);
        self.apply(owner, spec, plugins, files).map_err(|e| vec![e])
    }

    /// Reports the outcome of a whole new spec.
    fn report_result(&self, cause: Cause, result: &Result<u64, Vec<PolicyError>>) -> Reload {
        self.report(match result {
            Ok(generation) => Reload::Applied {
                cause,
                generation: *generation,
            },
            Err(errors) => Reload::Refused {
                cause,
                errors: errors.iter().map(crate::error_chain).collect(),
            },
        })
    }

    /// A whole new spec, from code or the API.
    fn change(&self, mut spec: PolicySpec, cause: Cause) -> Result<u64, Vec<PolicyError>> {
        let manifest = manifest_seen(&spec);
        // Registries are asked before the owner lock is taken.
        let fetched = self.fetch(&mut spec);
        let mut owner = self.lock_owner();
        let result = fetched.and_then(|()| self.load_and_apply(&mut owner, spec, manifest));
        if result.is_ok() {
            owner.pending = None;
        }
        self.report_result(cause, &result);
        result
    }

    fn refresh(&self, hold: &HashSet<PathBuf>, force: bool) -> Vec<Reload> {
        let mut owner = self.lock_owner();
        let mut files = owner.spec.files();
        files.extend(owner.pending.iter().flatten().cloned());
        let mut changed = HashSet::new();
        for file in files {
            if hold.contains(&file) {
                continue;
            }
            // An unchanged stamp means unchanged content: no need to read
            // (and hash) the file again, however large.
            let stamp = FileStamp::of(&file);
            if !force && stamp.is_some() && owner.seen.get(&file).is_some_and(|b| b.stamp == stamp) {
                continue;
            }
            let now = seen(&file);
            let before = owner.seen.insert(file.clone(), now.clone());
            if force || before.is_none_or(|b| b.hash != now.hash) {
                changed.insert(file);
            }
        }
        if changed.is_empty() {
            return Vec::new();
        }
        let mut reports = Vec::new();
        // The manifest first, when it (or a file a refused one names) changed.
        if let Some(manifest) = owner.spec.manifest.clone().or_else(|| owner.pending_manifest())
            && (changed.contains(&manifest) || owner.pending.iter().flatten().any(|f| changed.contains(f)))
        {
            let cause = Cause::File(manifest.clone());
            match PolicySpec::from_manifest(&manifest) {
                Err(e) => {
                    owner.pending = Some(std::iter::once(manifest.clone()).chain(e.names.clone()).collect());
                    reports.push(self.report(Reload::Refused {
                        cause,
                        errors: vec![crate::error_chain(&e)],
                    }));
                }
                Ok(mut spec) => {
                    let fetched = self.fetch(&mut spec);
                    let files = spec.files();
                    // The manifest's record was taken above, before it was read.
                    let result = fetched.and_then(|()| self.load_and_apply(&mut owner, spec, None));
                    owner.pending = match result {
                        Ok(_) => None,
                        Err(_) => Some(files),
                    };
                    reports.push(self.report_result(cause, &result));
                    if result.is_ok() {
                        return reports;
                    }
                }
            }
        }
        // Changed plugin files of the spec in force, each taken or refused
        // on its own (also when the manifest beside them was refused).
        let spec = owner.spec.clone();
        let mut plugins = owner.plugins.clone();
        let mut applied_cause = None;
        for (slot, settings) in plugins.iter_mut().zip(&spec.plugins) {
            if !changed.contains(&settings.path) {
                continue;
            }
            // Its record was taken before this read, by the loop above.
            match self.load_plugin(&owner, settings) {
                Ok((plugin, _)) if !Arc::ptr_eq(&plugin, slot) => {
                    *slot = plugin;
                    applied_cause.get_or_insert_with(|| settings.path.clone());
                }
                Ok(_) => {}
                Err(e) => reports.push(self.report(Reload::Refused {
                    cause: Cause::File(settings.path.clone()),
                    errors: vec![crate::error_chain(&e)],
                })),
            }
        }
        if let Some(path) = applied_cause {
            let cause = Cause::File(path);
            let reload = match self.apply(&mut owner, spec, plugins, Vec::new()) {
                Ok(generation) => Reload::Applied { cause, generation },
                Err(e) => Reload::Refused {
                    cause,
                    errors: vec![crate::error_chain(&e)],
                },
            };
            reports.push(self.report(reload));
        }
        reports
    }
}

impl Owner {
    /// The manifest of a refused manifest change, if one is pending.
    fn pending_manifest(&self) -> Option<PathBuf> {
        self.pending.as_ref().and_then(|p| p.first().cloned())
    }
}

/// Loaded plugin versions, with the records of the files they came from.
type Loaded = (Vec<Arc<Plugin>>, Vec<(PathBuf, Seen)>);

/// The record of a spec's manifest, taken before anything else is read.
fn manifest_seen(spec: &PolicySpec) -> Option<(PathBuf, Seen)> {
    spec.manifest.as_ref().map(|m| (m.clone(), seen(m)))
}

/// The file as it is now: stamp and content hash.
fn seen(path: &Path) -> Seen {
    let stamp = FileStamp::of(path);
    let hash = stamp
        .and_then(|_| read_plugin_file(path).ok())
        .map(|b| content_hash(&b));
    Seen { stamp, hash }
}
