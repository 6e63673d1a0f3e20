//! msrwasm's counters: an [`Events`] implementation every engine has.
//!
//! Each dispatcher gets its own cells (one writer, the vCPU thread: plain
//! relaxed loads and stores, no locked instructions, no shared cache lines
//! on the exit path); readers on other threads (the summary, `/metrics`,
//! `/v1/status`) add the cells up at any time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::events::{CallResult, Cause, Events, Reload, VcpuEvents};
use crate::msr::{Access, AnsweredBy, Outcome, Reply};
use crate::policy::Policy;

/// Upper bounds (seconds) of the plugin call-time histogram buckets.
pub const CALL_BUCKETS: [f64; 12] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2,
];
/// Plugin names one vCPU keeps counters for; past this, names no longer
/// in the policy are forgotten.
pub(crate) const MAX_NAMES: usize = 256;

fn bump(cell: &AtomicU64) {
    add(cell, 1);
}

fn add(cell: &AtomicU64, n: u64) {
    // One writer per cell: no read-modify-write instruction needed.
    cell.store(cell.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

fn get(cell: &AtomicU64) -> u64 {
    cell.load(Ordering::Relaxed)
}

/// Counters of one vCPU, summed over its dispatchers.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VcpuStats {
    /// RDMSR accesses decided.
    pub rdmsr: u64,
    /// WRMSR accesses decided.
    pub wrmsr: u64,
    /// Decided by a plugin, `[reads, writes]`.
    pub by_plugin: [u64; 2],
    /// Decided by KVM's own MSR (the fallback) or a CPU template, `[reads, writes]`.
    pub by_kvm: [u64; 2],
    /// Decided by the `unhandled` policy, `[reads, writes]`.
    pub by_unhandled: [u64; 2],
    /// Accesses answered with #GP.
    pub gp: u64,
    /// Policy generations moved to.
    pub switches: u64,
    /// Longest time one switch (with the new version's first answer) held
    /// the vCPU, nanoseconds.
    pub longest_switch_ns: u64,
}

impl VcpuStats {
    /// Accesses decided by KVM's fallback, or by a CPU template (which
    /// starts from KVM's value).
    pub fn kvm_fallback(&self) -> u64 {
        self.by_kvm[0] + self.by_kvm[1]
    }

    /// Accesses decided by the `unhandled` policy.
    pub fn unhandled(&self) -> u64 {
        self.by_unhandled[0] + self.by_unhandled[1]
    }

    fn merge(&mut self, o: &VcpuStats) {
        self.rdmsr += o.rdmsr;
        self.wrmsr += o.wrmsr;
        for i in 0..2 {
            self.by_plugin[i] += o.by_plugin[i];
            self.by_kvm[i] += o.by_kvm[i];
            self.by_unhandled[i] += o.by_unhandled[i];
        }
        self.gp += o.gp;
        self.switches += o.switches;
        self.longest_switch_ns = self.longest_switch_ns.max(o.longest_switch_ns);
    }
}

/// Counters of one plugin (by name, over its versions and vCPUs).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PluginStats {
    /// HANDLED answers.
    pub handled: u64,
    /// FAULT answers.
    pub fault: u64,
    /// PASS answers.
    pub pass: u64,
    /// Plugin errors (trap, timeout, bad status, no reply), decided by on_error.
    pub errors: u64,
    /// Times an error put the plugin into quarantine.
    pub quarantines: u64,
    /// Accesses the plugin was skipped for (as PASS) while quarantined.
    pub skipped: u64,
    /// Timed calls (when the engine times calls: a sample, one call in 16).
    pub timed_calls: u64,
    /// Their total duration, nanoseconds.
    pub timed_ns: u64,
    /// Timed calls per bucket of the `/metrics` histogram, 1 µs to 10 ms
    /// (not cumulative), plus one for longer calls.
    pub buckets: Vec<u64>,
}

impl PluginStats {
    fn merge(&mut self, o: &PluginStats) {
        self.handled += o.handled;
        self.fault += o.fault;
        self.pass += o.pass;
        self.errors += o.errors;
        self.quarantines += o.quarantines;
        self.skipped += o.skipped;
        self.timed_calls += o.timed_calls;
        self.timed_ns += o.timed_ns;
        if self.buckets.len() < o.buckets.len() {
            self.buckets.resize(o.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
    }
}

#[derive(Debug, Default)]
struct PluginCells {
    handled: AtomicU64,
    fault: AtomicU64,
    pass: AtomicU64,
    errors: AtomicU64,
    quarantines: AtomicU64,
    skipped: AtomicU64,
    timed_calls: AtomicU64,
    timed_ns: AtomicU64,
    buckets: [AtomicU64; CALL_BUCKETS.len() + 1],
}

impl PluginCells {
    fn read(&self) -> PluginStats {
        PluginStats {
            handled: get(&self.handled),
            fault: get(&self.fault),
            pass: get(&self.pass),
            errors: get(&self.errors),
            quarantines: get(&self.quarantines),
            skipped: get(&self.skipped),
            timed_calls: get(&self.timed_calls),
            timed_ns: get(&self.timed_ns),
            buckets: self.buckets.iter().map(get).collect(),
        }
    }
}

#[derive(Debug, Default)]
struct VcpuCells {
    vcpu: u32,
    /// A live dispatcher writes these cells; when it is dropped they wait
    /// for the vCPU's next dispatcher (a VMM that recreates vCPU threads
    /// reuses them instead of adding cells without bound).
    in_use: AtomicBool,
    rdmsr: AtomicU64,
    wrmsr: AtomicU64,
    by: [[AtomicU64; 2]; 3],
    gp: AtomicU64,
    switches: AtomicU64,
    longest_switch_ns: AtomicU64,
    plugins: Mutex<Vec<(Arc<str>, Arc<PluginCells>)>>,
}

impl VcpuCells {
    fn read(&self) -> VcpuStats {
        VcpuStats {
            rdmsr: get(&self.rdmsr),
            wrmsr: get(&self.wrmsr),
            by_plugin: [get(&self.by[0][0]), get(&self.by[0][1])],
            by_kvm: [get(&self.by[1][0]), get(&self.by[1][1])],
            by_unhandled: [get(&self.by[2][0]), get(&self.by[2][1])],
            gp: get(&self.gp),
            switches: get(&self.switches),
            longest_switch_ns: get(&self.longest_switch_ns),
        }
    }
}

/// Everything counted so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Per vCPU.
    pub vcpus: BTreeMap<u32, VcpuStats>,
    /// Per plugin name.
    pub plugins: BTreeMap<String, PluginStats>,
    /// Policy changes applied (the first policy is not counted).
    pub reloads_applied: u64,
    /// Policy changes refused.
    pub reloads_refused: u64,
}

impl StatsSnapshot {
    /// All vCPUs added up.
    pub fn total(&self) -> VcpuStats {
        let mut t = VcpuStats::default();
        self.vcpus.values().for_each(|v| t.merge(v));
        t
    }
}

/// The counters of an engine (see the module docs).
#[derive(Debug, Default)]
pub struct Stats {
    cells: Mutex<Vec<Arc<VcpuCells>>>,
    reloads_applied: AtomicU64,
    reloads_refused: AtomicU64,
}

impl Stats {
    /// Adds up every cell.
    pub fn snapshot(&self) -> StatsSnapshot {
        let cells = self.cells.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut snap = StatsSnapshot {
            reloads_applied: self.reloads_applied.load(Ordering::Relaxed),
            reloads_refused: self.reloads_refused.load(Ordering::Relaxed),
            ..StatsSnapshot::default()
        };
        for c in cells {
            snap.vcpus.entry(c.vcpu).or_default().merge(&c.read());
            let plugins = c.plugins.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for (name, p) in plugins {
                snap.plugins.entry(name.to_string()).or_default().merge(&p.read());
            }
        }
        snap
    }

    /// A sink for a new dispatcher of `vcpu`.
    /// Cells of a dropped dispatcher of the same vCPU are taken over
    /// (their counts go on), so cells are bounded by the dispatchers alive
    /// at once, not by how many were ever made.
    pub(crate) fn sink(&self, vcpu: u32) -> StatsSink {
        let mut all = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        let free = all
            .iter()
            .find(|c| c.vcpu == vcpu && !c.in_use.swap(true, Ordering::AcqRel))
            .cloned();
        let cells = free.unwrap_or_else(|| {
            let cells = Arc::new(VcpuCells {
                vcpu,
                in_use: AtomicBool::new(true),
                ..VcpuCells::default()
            });
            all.push(cells.clone());
            cells
        });
        drop(all);
        StatsSink {
            cells,
            positions: Vec::new(),
        }
    }
}

impl Events for Stats {
    fn reload(&self, reload: &Reload) {
        // Changes only: the engine's first policy is not a reload.
        let counter = match reload {
            Reload::Applied {
                cause: Cause::Start, ..
            }
            | Reload::Refused {
                cause: Cause::Start, ..
            } => return,
            Reload::Applied { .. } => &self.reloads_applied,
            Reload::Refused { .. } => &self.reloads_refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One dispatcher's counters.
#[derive(Debug)]
pub struct StatsSink {
    cells: Arc<VcpuCells>,
    /// Cells of the current policy's plugins, by chain position.
    positions: Vec<Arc<PluginCells>>,
}

impl Drop for StatsSink {
    fn drop(&mut self) {
        self.cells.in_use.store(false, Ordering::Release);
    }
}

#[cfg(test)]
impl Stats {
    /// Cells ever made (for the bound test).
    pub(crate) fn cell_count(&self) -> usize {
        self.cells.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl VcpuEvents for StatsSink {
    fn policy(&mut self, policy: &Policy) {
        let mut named = self.cells.plugins.lock().unwrap_or_else(|e| e.into_inner());
        if named.len() > MAX_NAMES {
            named.retain(|(n, _)| policy.plugins().any(|p| *p.name == **n));
        }
        self.positions = policy
            .plugins()
            .map(|p| match named.iter().find(|(n, _)| **n == *p.name) {
                Some((_, cells)) => cells.clone(),
                None => {
                    let cells = Arc::new(PluginCells::default());
                    named.push((p.name.as_str().into(), cells.clone()));
                    cells
                }
            })
            .collect();
    }

    fn plugin_call(&mut self, position: usize, result: CallResult<'_>, took: Option<Duration>) {
        let Some(c) = self.positions.get(position) else { return };
        match result {
            CallResult::Handled => bump(&c.handled),
            CallResult::Fault => bump(&c.fault),
            CallResult::Pass => bump(&c.pass),
            CallResult::Error { quarantined, .. } => {
                bump(&c.errors);
                if quarantined.is_some() {
                    bump(&c.quarantines);
                }
            }
            CallResult::Skipped => bump(&c.skipped),
        }
        if let Some(took) = took {
            bump(&c.timed_calls);
            add(&c.timed_ns, took.as_nanos() as u64);
            let secs = took.as_secs_f64();
            let bucket = CALL_BUCKETS
                .iter()
                .position(|&le| secs <= le)
                .unwrap_or(CALL_BUCKETS.len());
            bump(&c.buckets[bucket]);
        }
    }

    fn access(&mut self, access: &Access, outcome: &Outcome<'_>) {
        let c = &self.cells;
        let dir = usize::from(access.is_write());
        bump(if access.is_write() { &c.wrmsr } else { &c.rdmsr });
        let by = match outcome.by {
            AnsweredBy::Plugin { .. } => 0,
            // A template answers from KVM's value: counted with KVM's.
            AnsweredBy::Kvm | AnsweredBy::Template => 1,
            AnsweredBy::Unhandled(_) | AnsweredBy::Firewall(_) => 2,
        };
        bump(&c.by[by][dir]);
        if outcome.reply == Reply::Gp {
            bump(&c.gp);
        }
    }

    fn switched(&mut self, _generation: u64, took: Duration) {
        let c = &self.cells;
        bump(&c.switches);
        let ns = took.as_nanos() as u64;
        if ns > get(&c.longest_switch_ns) {
            c.longest_switch_ns.store(ns, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #21: every `Engine::dispatcher()` added cells that were never
    /// released, so a VMM recreating vCPU threads grew without bound.
    #[test]
    fn cells_of_dropped_dispatchers_are_reused_and_their_counts_go_on() {
        let stats = Stats::default();
        for _ in 0..1000 {
            let mut sink = stats.sink(0);
            sink.switched(1, Duration::from_micros(1));
        }
        let live = stats.sink(0);
        let mut other = stats.sink(0);
        other.switched(1, Duration::from_micros(1));
        assert_eq!(stats.cell_count(), 2, "one per live dispatcher");
        drop((live, other));
        assert_eq!(stats.snapshot().vcpus[&0].switches, 1001);
        let _again = stats.sink(0);
        assert_eq!(stats.cell_count(), 2);
    }
}
