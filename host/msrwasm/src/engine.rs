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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::dispatch::{Dispatcher, Live};
use crate::events::{Cause, Events, Fanout, Reload};
use crate::files::FileStamp;
use crate::oci::Fetch;
use crate::plugin::state::{RestoreError, StateSnapshot, StateStore};
use crate::plugin::{
    ExecMode, ModuleCache, Plugin, PluginSettings, Runtime, RuntimeError, RuntimeOptions, content_hash,
    read_plugin_file,
};
use crate::policy::filter::{FilterSink, NoFilter};
use crate::policy::{Policy, PolicyError, PolicySpec, Unhandled};
use crate::stats::{Stats, StatsSnapshot};

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

/// A policy change was refused; the running policy stays. Every reason is
/// kept ([`UpdateError::errors`]); the first is the error's source.
#[derive(Debug)]
pub struct UpdateError {
    errors: Vec<PolicyError>,
}

impl UpdateError {
    fn new(errors: Vec<PolicyError>) -> Self {
        debug_assert!(!errors.is_empty());
        Self { errors }
    }

    /// Every reason, each naming its file.
    pub fn errors(&self) -> &[PolicyError] {
        &self.errors
    }

    /// The reasons, taken out.
    pub fn into_errors(self) -> Vec<PolicyError> {
        self.errors
    }
}

impl std::fmt::Display for UpdateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.errors.len() {
            1 => f.write_str("policy change refused"),
            n => write!(f, "policy change refused ({n} reasons: {})", {
                let all: Vec<String> = self.errors.iter().map(crate::util::error_chain).collect();
                all.join("; ")
            }),
        }
    }
}

impl std::error::Error for UpdateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.errors.first().map(|e| e as _)
    }
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
    energy: crate::EnergyOptions,
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
            energy: crate::EnergyOptions::default(),
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

    /// Starts the engine's wasmtime configuration from `config`; msrwasm
    /// overrides what bounded execution needs (fuel, epoch interruption,
    /// the wasm stack cap) and turns the component model on.
    pub fn wasmtime_config(mut self, config: wasmtime::Config) -> Self {
        self.options.config = Some(config);
        self
    }

    /// How plugin code runs: native code ([`ExecMode::Jit`], the default)
    /// or Pulley bytecode with no executable memory ever mapped
    /// ([`ExecMode::NoJit`]). `docs/embedding.md` lists what each mode
    /// needs of a seccomp profile. With [`EngineBuilder::runtime`], the
    /// given runtime's mode applies instead.
    pub fn mode(mut self, mode: ExecMode) -> Self {
        self.options.mode = mode;
        self
    }

    /// `false`: wasmtime installs no signal handlers and relies on none
    /// (bounds checked in the code, slower), for VMMs that own SIGSEGV,
    /// SIGBUS and SIGILL. Default `true` in [`ExecMode::Jit`]; always
    /// `false` in [`ExecMode::NoJit`].
    pub fn signals_based_traps(mut self, on: bool) -> Self {
        self.options.signals_based_traps = on;
        self
    }

    /// The clock plugins read (`msr.now_ns`): for example a
    /// [`crate::plugin::clock::GuestClock`] that stands still while the VM
    /// is paused.
    pub fn clock(mut self, clock: Arc<dyn crate::plugin::clock::Clock>) -> Self {
        self.options.clock = clock;
        self
    }

    /// Where host energy comes from for plugins the manifest grants it
    /// (`grants = ["energy"]`): the powercap tree, `/proc/stat` and the
    /// sampling period (default: the system's, every 100 ms).
    pub fn energy(mut self, options: crate::EnergyOptions) -> Self {
        self.energy = options;
        self
    }

    /// Adds an event sink.
    pub fn events(mut self, events: Arc<dyn Events>) -> Self {
        self.events.push(events);
        self
    }

    /// The VMM's side of the MSR filter (without one, policies that claim
    /// MSRs or set a firewall are refused, naming the reason).
    pub fn filter(mut self, sink: impl FilterSink + 'static) -> Self {
        self.filter = Some(Box::new(sink));
        self
    }

    /// Times plugin calls (for the call-time histogram of `/metrics`): one
    /// call in 16, since reading the clock costs more than a plugin call on
    /// some hosts.
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

    /// Keeps compiled plugins in `dir` too (checksummed, keyed by content
    /// and engine; the directory must be private to this user):
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
            .or_else(|| spec.manifest().and_then(|m| m.parent()).map(Path::to_owned))
            .unwrap_or_else(|| PathBuf::from("."));
        let empty = Policy::compose(Vec::new(), &PolicySpec::default(), 0)?;
        let energy = crate::energy::EnergyGate::new(self.energy);
        let shared = Arc::new(Shared {
            runtime: runtime.clone(),
            state: Arc::new(StateStore::default()),
            cache: match &self.cache_dir {
                Some(dir) => ModuleCache::with_disk(dir, &runtime),
                None => ModuleCache::new(),
            },
            live: Arc::new(Live::new(empty, events, stats, self.time_calls, energy.threads.clone())),
            energy,
            owner: Mutex::new(Owner {
                spec: PolicySpec::default(),
                plugins: Vec::new(),
                seen: HashMap::new(),
                pending: None,
            }),
            filter: self.filter.unwrap_or_else(|| Box::new(NoFilter)),
            vcpus: Mutex::new(BTreeSet::new()),
            closed: AtomicBool::new(false),
            manifest: RwLock::new(None),
            oci: self.oci,
            base_dir,
            started: Instant::now(),
        });
        let engine = Engine { shared };
        // The first load goes through the change path like every later
        // one, and is reported to the event sinks like them.
        engine
            .shared
            .change(spec, Cause::Start, Follow::AsGiven)
            .map_err(|e| EngineError::Policy(e.into_errors().remove(0)))?;
        Ok(engine)
    }
}

/// Whether a change follows the manifest its spec came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Follow {
    /// As the spec says (a spec from [`PolicySpec::from_manifest`] follows
    /// its file).
    AsGiven,
    /// The change comes from code: it owns the policy from now on, and no
    /// manifest file is followed.
    Code,
}

/// The answer to a VM's deflected MSR accesses: its policy, plugin state
/// and counters. Cheap to clone (all clones are the same engine); `Send`
/// and `Sync`.
///
/// ```no_run
/// use msrwasm::{Access, Engine, ExitReason, NoKvm, PolicySpec, Reply, Unhandled};
///
/// let spec = PolicySpec::from_paths(&["plugins/synthetic_rapl.wat".into()], Unhandled::Gp);
/// // A real VMM passes its filter: .filter(msrwasm::kvm::KvmFilter::new(&kvm, &vm, vec![])?)
/// let engine = Engine::builder().filter(msrwasm::filter::RecordingFilter::default()).build(spec)?;
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
    /// Policy changes applied since start (the first policy is not
    /// counted).
    pub reloads_applied: u64,
    /// Policy changes refused since start.
    pub reloads_refused: u64,
}

/// One plugin in [`Status`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct PluginStatus {
    /// Name.
    pub name: String,
    /// Content sha256.
    pub version: String,
    /// `core` or `component`.
    pub flavour: crate::msr::Flavour,
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
        Dispatcher::new(self.shared.live.clone(), vcpu)
    }

    /// The generation in force (changes with every applied change).
    pub fn generation(&self) -> u64 {
        self.shared.generation()
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.shared.current()
    }

    /// The spec in force, to edit and pass to [`Engine::update`]. It never
    /// names a manifest: see [`Engine::update`].
    pub fn spec(&self) -> PolicySpec {
        let mut spec = self.shared.lock_owner().spec.clone();
        spec.manifest = None;
        spec
    }

    /// Replaces the policy with `spec`, from the VMM's code, through the
    /// same serialized path as file reloads.
    ///
    /// A programmatic change owns the policy from then on: the engine stops
    /// following the manifest file (if the policy came from one), so a later
    /// edit of that file can never silently revert what the code set. The
    /// plugin files `spec` names are still followed (a new version of a
    /// plugin's code goes live as before, with the settings given here).
    /// To hand the policy back to a file, call [`Engine::follow_manifest`].
    pub fn update(&self, spec: PolicySpec) -> Result<u64, UpdateError> {
        self.shared.change(spec, Cause::Update, Follow::Code)
    }

    /// Replaces the policy with the manifest at `path` and follows that
    /// file from then on (what a policy built from
    /// [`PolicySpec::from_manifest`] does from the start).
    pub fn follow_manifest(&self, path: &Path) -> Result<u64, UpdateError> {
        let spec = PolicySpec::from_manifest(path).map_err(|e| UpdateError::new(vec![PolicyError::Manifest(e)]))?;
        self.shared.change(spec, Cause::Update, Follow::AsGiven)
    }

    /// Replaces the policy with a manifest given as text (the control API):
    /// relative plugin paths resolve against the engine's base directory.
    /// Like [`Engine::update`], no manifest file is followed afterwards.
    pub fn update_manifest(&self, text: &str) -> Result<u64, UpdateError> {
        let name = self.shared.base_dir.join("(manifest from the control API)");
        let spec = PolicySpec::parse(&name, text).map_err(|e| UpdateError::new(vec![PolicyError::Manifest(e)]))?;
        self.shared.change(spec, Cause::Api, Follow::Code)
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
        self.shared.live.stats.snapshot()
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

    /// Restores plugin state (see [`StateStore::restore`]): only stores of
    /// plugins in the running policy (or kept from lately removed ones),
    /// each bounded; all or nothing.
    pub fn restore_state(&self, snapshot: &StateSnapshot) -> Result<(), RestoreError> {
        let policy = self.shared.current();
        let running: Vec<&str> = policy.chain().iter().map(|p| p.name()).collect();
        self.shared.state.restore(snapshot, &running)
    }

    /// Prepares the calling thread for running plugins now (its signal
    /// stack: an `mmap`, an `mprotect`, a `sigaltstack`), as wasmtime
    /// otherwise does the first time the thread runs wasm. A VMM calls it
    /// on the thread that drives reloads before applying a seccomp filter
    /// that forbids those calls; [`Dispatcher::warm_up`] does it on vCPU
    /// threads.
    pub fn prepare_thread(&self) {
        Runtime::prepare_thread();
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
            reloads_applied: stats.reloads_applied,
            reloads_refused: stats.reloads_refused,
            plugins: policy
                .chain()
                .iter()
                .map(|p| PluginStatus {
                    name: p.name().to_owned(),
                    version: p.sha256().to_owned(),
                    flavour: p.flavour(),
                    path: p.path().to_owned(),
                    claims: p
                        .claims()
                        .map(|c| c.iter().map(|&r| crate::util::format_range(r)).collect()),
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
        self.shared.live.empty_graveyard();
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

/// What the engine's clones share.
pub(crate) struct Shared {
    runtime: Arc<Runtime>,
    state: Arc<StateStore>,
    cache: ModuleCache,
    /// The policy in force and what dispatchers share with the engine.
    live: Arc<Live>,
    owner: Mutex<Owner>,
    filter: Box<dyn FilterSink>,
    vcpus: Mutex<BTreeSet<u32>>,
    closed: AtomicBool,
    /// The manifest file of the spec in force (readable while a change is
    /// being compiled).
    manifest: RwLock<Option<PathBuf>>,
    oci: Option<Arc<dyn Fetch>>,
    base_dir: PathBuf,
    started: Instant,
    /// Host energy for this VM's granted plugins.
    energy: crate::energy::EnergyGate,
}

impl Shared {
    fn generation(&self) -> u64 {
        self.live.generation()
    }

    fn current(&self) -> Arc<Policy> {
        self.live.current()
    }

    fn lock_owner(&self) -> std::sync::MutexGuard<'_, Owner> {
        self.owner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every `oci://` plugin of `spec` local: its path becomes the
    /// fetched file and fixed content is pinned by sha256. All of them are
    /// fetched at once, under one deadline ([`Fetch::fetch_all`]).
    fn fetch(&self, spec: &mut PolicySpec) -> Result<(), Vec<PolicyError>> {
        let errors: Vec<PolicyError> = crate::oci::localize_all(self.oci.as_deref(), &mut spec.plugins)
            .into_iter()
            .map(|(plugin, source)| PolicyError::Oci {
                plugin,
                source: Box::new(source),
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
        // The bytes just hashed, not a second read that may see newer content.
        let result = Plugin::build(
            &self.runtime,
            settings.clone(),
            &bytes,
            sha256.clone(),
            &self.state,
            Some(&self.energy),
            Some(&self.cache),
        );
        let old = running.map_or("-", |p| p.info().short_version());
        let took_ms = started.elapsed().as_secs_f64() * 1e3;
        match &result {
            Ok(p) => tracing::info!(
                event = "plugin_version", plugin = settings.name.as_str(), version = &sha256[..16],
                file = %settings.path.display(), old, new = &sha256[..16], compile_ms = took_ms,
                compiled = p.compiled_from().name(),
                "plugin version validated"
            ),
            Err(e) => tracing::warn!(
                event = "plugin_version_refused", plugin = settings.name.as_str(), version = &sha256[..16],
                file = %settings.path.display(), old, new = &sha256[..16], compile_ms = took_ms,
                "plugin version refused: {}", crate::util::error_chain(e)
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
        for (position, plugin) in policy.chain().iter().enumerate() {
            if old.chain().iter().any(|p| Arc::ptr_eq(p, plugin)) {
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
        self.live.publish(policy);
        owner.seen.extend(files);
        *self.manifest.write().unwrap_or_else(|e| e.into_inner()) = spec.manifest.clone();
        owner.spec = spec;
        owner.plugins = plugins;
        self.live.empty_graveyard();
        Ok(generation)
    }

    fn report(&self, reload: Reload) -> Reload {
        match &reload {
            Reload::Applied {
                cause: Cause::Start,
                generation,
            } => tracing::debug!(event = "policy_loaded", generation, "policy loaded"),
            Reload::Applied { cause, generation } => {
                tracing::info!(event = "reload", %cause, generation, "reload applied")
            }
            Reload::Refused { cause, errors } => {
                tracing::warn!(event = "reload_refused", %cause, "change refused, the running policy stays: {}", errors.join("; "))
            }
        }
        self.live.events.reload(&reload);
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
                errors: errors.iter().map(crate::util::error_chain).collect(),
            },
        })
    }

    /// A whole new spec: the first, or one from code or the API.
    fn change(&self, mut spec: PolicySpec, cause: Cause, follow: Follow) -> Result<u64, UpdateError> {
        if follow == Follow::Code {
            spec.manifest = None;
        }
        let manifest = manifest_seen(&spec);
        // Registries are asked before the owner lock is taken.
        let fetched = self.fetch(&mut spec);
        let mut owner = self.lock_owner();
        let result = fetched.and_then(|()| self.load_and_apply(&mut owner, spec, manifest));
        if result.is_ok() {
            owner.pending = None;
        }
        self.report_result(cause, &result);
        result.map_err(UpdateError::new)
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
                        errors: vec![crate::util::error_chain(&e)],
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
                    errors: vec![crate::util::error_chain(&e)],
                })),
            }
        }
        if let Some(path) = applied_cause {
            let cause = Cause::File(path);
            let reload = match self.apply(&mut owner, spec, plugins, Vec::new()) {
                Ok(generation) => Reload::Applied { cause, generation },
                Err(e) => Reload::Refused {
                    cause,
                    errors: vec![crate::util::error_chain(&e)],
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

/// Makes an `oci://` plugin local through `fetch`: its `path` becomes the
/// fetched file, and fixed content is pinned by sha256 (a manifest
/// `sha256` that disagrees with the registry's layer is refused here).
/// Plugins that are files, or already fetched, are left alone.
#[cfg(any(test, feature = "tools"))]
pub fn localize(fetch: Option<&dyn Fetch>, settings: &mut PluginSettings) -> Result<(), crate::oci::OciError> {
    match crate::oci::localize_all(fetch, std::slice::from_mut(settings)).pop() {
        Some((_, e)) => Err(e),
        None => Ok(()),
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

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
