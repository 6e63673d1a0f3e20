//! A VM's MSR policy: the loaded plugins in order, the claim table, the
//! KVM filter they need, and the per-vCPU chain that answers each access.

pub mod claims;
pub mod filter;
pub mod manifest;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::plugin::abi::REASON_FILTER;
use crate::plugin::state::StateStore;
use crate::plugin::{Answer, CallError, LoadError, ModuleCache, OnError, Plugin, PluginInstance};
use claims::ClaimTable;
use filter::{FilterError, FilterPlan};
pub use manifest::{ManifestError, PolicySpec, Unhandled};

/// Why a policy cannot be put in force.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// Loaded plugins plus everything derived from their claims.
#[derive(Debug)]
pub struct Policy {
    plugins: Vec<Arc<Plugin>>,
    table: ClaimTable,
    filter: FilterPlan,
    unhandled: Unhandled,
    /// MSRs already reported under `unhandled = "log"`: (index, is_write).
    logged: Mutex<HashSet<(u32, bool)>>,
}

impl Policy {
    /// Loads every plugin of `spec` and plans the filter their claims need.
    /// Compiled modules go to (and come from) `cache`.
    pub fn load(spec: &PolicySpec, state: &StateStore, cache: &ModuleCache) -> Result<Self, PolicyError> {
        let plugins = spec
            .plugins
            .iter()
            .map(|settings| Plugin::load_cached(settings.clone(), state, cache).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_plugins(plugins, spec.unhandled)
    }

    /// Composes already loaded plugins (in chain order).
    pub fn from_plugins(plugins: Vec<Arc<Plugin>>, unhandled: Unhandled) -> Result<Self, PolicyError> {
        let filter = FilterPlan::build(
            plugins
                .iter()
                .flat_map(|p| p.claims().unwrap_or_default().iter().map(move |&r| (p.name(), r))),
        )?;
        let claims: Vec<_> = plugins.iter().map(|p| p.claims()).collect();
        Ok(Self {
            table: ClaimTable::new(&claims),
            plugins,
            filter,
            unhandled,
            logged: Mutex::default(),
        })
    }

    pub fn plugins(&self) -> &[Arc<Plugin>] {
        &self.plugins
    }

    pub fn filter(&self) -> &FilterPlan {
        &self.filter
    }

    pub fn unhandled(&self) -> Unhandled {
        self.unhandled
    }
}

/// The policy in force on a VM, swappable while vCPUs run: each vCPU
/// compares the generation (one atomic load per MSR exit) and moves to
/// fresh instances of the new policy at its next exit.
#[derive(Debug)]
pub struct PolicyCell {
    generation: AtomicU64,
    current: RwLock<(u64, Arc<Policy>)>,
}

impl PolicyCell {
    pub fn new(policy: Arc<Policy>) -> Self {
        Self {
            generation: AtomicU64::new(1),
            current: RwLock::new((1, policy)),
        }
    }

    /// The generation in force; changes whenever the policy is replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The policy in force, with its generation.
    pub fn current(&self) -> (u64, Arc<Policy>) {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `policy` in force; returns its generation.
    pub fn replace(&self, policy: Arc<Policy>) -> u64 {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let generation = current.0 + 1;
        *current = (generation, policy);
        self.generation.store(generation, Ordering::Release);
        generation
    }
}

/// KVM's own handling of an MSR, for filtered accesses that every plugin
/// passed on (`KVM_GET_MSRS` / `KVM_SET_MSRS` on the vCPU).
pub trait KvmMsrs {
    /// KVM's value, or `None` if KVM does not know the MSR.
    fn get(&mut self, index: u32) -> Option<u64>;
    /// Whether KVM accepted the write.
    fn set(&mut self, index: u32, value: u64) -> bool;
}

/// KVM as a host without one sees it: it knows no MSR. For driving a chain
/// (or an exit handler) without a VM: filtered accesses nobody answers go
/// to the `unhandled` policy.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoKvm;

impl KvmMsrs for NoKvm {
    fn get(&mut self, _: u32) -> Option<u64> {
        None
    }

    fn set(&mut self, _: u32, _: u64) -> bool {
        false
    }
}

/// A deflected RDMSR (`value == None`) or WRMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub index: u32,
    pub reason: u32,
    pub write: Option<u64>,
}

/// Who decided an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Responder {
    /// Plugin at this chain position answered HANDLED or FAULT, or failed
    /// and its `on_error = "fault"` decided.
    Plugin { position: usize, error: bool },
    /// Every plugin passed on a filtered MSR that KVM knows.
    Kvm,
    /// Nobody answered; the VM's `unhandled` policy decided.
    Unhandled(Unhandled),
    /// A native Rust handler answered instead of the chain (benchmarks).
    Native,
}

/// The answer to an access: `Some(value)` completes it (the value matters
/// for reads only), `None` injects #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub result: Option<u64>,
    pub by: Responder,
}

/// Counters of one plugin on one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PluginCounters {
    pub handled: u64,
    pub fault: u64,
    pub pass: u64,
    /// Plugin errors (trap, timeout, bad status, no reply), decided by on_error.
    pub errors: u64,
    /// Times this vCPU's error put the plugin into quarantine.
    pub quarantines: u64,
    /// Accesses the plugin was skipped for (as PASS) while quarantined.
    pub skipped: u64,
}

impl std::ops::AddAssign for PluginCounters {
    fn add_assign(&mut self, c: Self) {
        self.handled += c.handled;
        self.fault += c.fault;
        self.pass += c.pass;
        self.errors += c.errors;
        self.quarantines += c.quarantines;
        self.skipped += c.skipped;
    }
}

/// One vCPU's view of a policy: its own instance of every plugin.
pub struct VcpuChain {
    policy: Arc<Policy>,
    vcpu: u32,
    /// `None` until first use, and again after a failure threw it away.
    instances: Vec<Option<PluginInstance>>,
    counters: Vec<PluginCounters>,
}

impl VcpuChain {
    pub fn new(policy: Arc<Policy>, vcpu: u32) -> Self {
        let n = policy.plugins.len();
        Self {
            policy,
            vcpu,
            instances: (0..n).map(|_| None).collect(),
            counters: vec![PluginCounters::default(); n],
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Per-plugin counters, in chain order.
    pub fn counters(&self) -> &[PluginCounters] {
        &self.counters
    }

    /// Moves this chain to `policy`: plugins that did not change (the same
    /// loaded version) keep their instances and counters; the counters of
    /// the others are returned, by plugin name.
    pub fn succeed(&mut self, policy: Arc<Policy>) -> Vec<(String, PluginCounters)> {
        let next = VcpuChain::new(policy, self.vcpu);
        let old = std::mem::replace(self, next);
        let mut old: Vec<_> = old
            .policy
            .plugins
            .iter()
            .cloned()
            .zip(old.instances)
            .zip(old.counters)
            .collect();
        for (position, plugin) in self.policy.plugins.iter().enumerate() {
            if let Some(at) = old.iter().position(|((p, _), _)| Arc::ptr_eq(p, plugin)) {
                let ((_, instance), counters) = old.swap_remove(at);
                self.instances[position] = instance;
                self.counters[position] = counters;
            }
        }
        old.into_iter().map(|((p, _), c)| (p.name().to_owned(), c)).collect()
    }

    /// Instantiates every plugin now rather than at first use.
    pub fn warm_up(&mut self) -> Result<(), LoadError> {
        for (slot, plugin) in self.instances.iter_mut().zip(&self.policy.plugins) {
            if slot.is_none() {
                *slot = Some(plugin.instantiate(self.vcpu)?);
            }
        }
        Ok(())
    }

    /// Answers one deflected access: the claiming plugins in file order,
    /// then KVM's own value for filtered MSRs, then `unhandled`.
    pub fn answer(&mut self, access: Access, kvm: &mut dyn KvmMsrs) -> Decision {
        // Disjoint borrows instead of cloning the policy's Arc: no shared
        // cache line is written on the exit path.
        let Self {
            policy,
            vcpu,
            instances,
            counters,
        } = self;
        for &position in policy.table.lookup(access.index) {
            let plugin = &policy.plugins[position];
            let counter = &mut counters[position];
            let answered = |result| Decision {
                result,
                by: Responder::Plugin { position, error: false },
            };
            if plugin.health().quarantined() {
                counter.skipped += 1;
                continue;
            }
            match ask(&mut instances[position], plugin, *vcpu, access) {
                Ok(Answer::Pass) => counter.pass += 1,
                Ok(Answer::Handled(value)) => {
                    counter.handled += 1;
                    return answered(Some(value));
                }
                Ok(Answer::Fault) => {
                    counter.fault += 1;
                    return answered(None);
                }
                Err(error) => {
                    counter.errors += 1;
                    tracing::warn!(
                        plugin = plugin.name(), vcpu = *vcpu, index = format_args!("{:#x}", access.index),
                        on_error = ?plugin.settings().on_error, "plugin error: {error}"
                    );
                    // A trap may leave wasm state half-written: start afresh.
                    instances[position] = None;
                    if let Some(backoff) = plugin.health().record_error() {
                        counter.quarantines += 1;
                        tracing::warn!(
                            plugin = plugin.name(), file = %plugin.path().display(),
                            "plugin quarantined for {backoff:?} after repeated errors: skipped (as PASS) until its file changes or the backoff expires"
                        );
                    }
                    if plugin.settings().on_error == OnError::Fault {
                        return Decision {
                            result: None,
                            by: Responder::Plugin { position, error: true },
                        };
                    }
                }
            }
        }
        if access.reason == REASON_FILTER
            && let Some(result) = kvm_fallback(access, kvm)
        {
            return Decision {
                result,
                by: Responder::Kvm,
            };
        }
        self.unhandled(access)
    }

    fn unhandled(&self, access: Access) -> Decision {
        let policy = self.policy.unhandled;
        let by = Responder::Unhandled(policy);
        match policy {
            Unhandled::Gp => Decision { result: None, by },
            Unhandled::Ignore => Decision { result: Some(0), by },
            Unhandled::Log => {
                let first = self
                    .policy
                    .logged
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((access.index, access.write.is_some()));
                if first {
                    match access.write {
                        None => tracing::warn!(vcpu = self.vcpu, "ignored rdmsr {:#x} (unhandled = log)", access.index),
                        Some(v) => tracing::warn!(
                            vcpu = self.vcpu,
                            "ignored wrmsr {:#x} <- {v:#x} (unhandled = log)",
                            access.index
                        ),
                    }
                }
                Decision { result: Some(0), by }
            }
        }
    }
}

/// Calls one plugin, instantiating it first if its instance was thrown away.
fn ask(
    slot: &mut Option<PluginInstance>,
    plugin: &Arc<Plugin>,
    vcpu: u32,
    access: Access,
) -> Result<Answer, CallError> {
    let instance = match slot {
        Some(instance) => instance,
        None => slot.insert(
            plugin
                .instantiate(vcpu)
                .map_err(|e| CallError::Trap(format!("re-instantiation failed: {e}")))?,
        ),
    };
    match access.write {
        None => instance.rdmsr(access.index, access.reason),
        Some(value) => instance.wrmsr(access.index, value, access.reason),
    }
}

/// KVM's own answer for a filtered MSR: `None` if KVM does not know the
/// MSR, `Some(None)` for #GP (KVM knows it but refuses the value).
fn kvm_fallback(access: Access, kvm: &mut dyn KvmMsrs) -> Option<Option<u64>> {
    match access.write {
        None => kvm.get(access.index).map(Some),
        Some(value) if kvm.set(access.index, value) => Some(Some(0)),
        Some(_) => kvm.get(access.index).map(|_| None),
    }
}

#[cfg(test)]
mod tests;
