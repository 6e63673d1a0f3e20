//! The MSR footprint of a guest: every deflected MSR access, summarized per
//! operation and index (count, vCPUs, exit reasons, who answered, #GP
//! count, last value), as an [`Events`] implementation. What `--footprint`,
//! `GET /v1/footprint` and `msrwasm policy suggest` read.
//!
//! Each vCPU writes its own shard (an uncontended lock per access); readers
//! merge the shards, copying one at a time. A vCPU never waits for a
//! reader: what it records while a reader copies its shard joins the shard
//! at its next access (and when its dispatcher is dropped, so the file
//! written at exit has everything), so a reader may not yet see the last
//! accesses of a vCPU that has been idle since. Bounded: past
//! [`MAX_ENTRIES`] distinct (op, index) pairs per vCPU, further new pairs
//! are only counted in `overflow`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::events::{Events, VcpuEvents};
use crate::msr::{Access, AnsweredBy, Op, Outcome, Reply};

/// Distinct (op, index) pairs recorded per vCPU.
pub const MAX_ENTRIES: usize = 65_536;

/// One (op, index) pair of the footprint, as `GET /v1/footprint` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FootprintEntry {
    /// `rdmsr` or `wrmsr`.
    pub op: String,
    /// The MSR, hex.
    pub index: String,
    /// Accesses.
    pub count: u64,
    /// vCPUs that made them.
    pub vcpus: Vec<u32>,
    /// Exit reasons seen: `inval`, `unknown`, `filter`.
    pub reasons: Vec<String>,
    /// Who answered, and how often: `plugin:NAME`, `kvm`, `unhandled`,
    /// `firewall`.
    pub answered_by: BTreeMap<String, u64>,
    /// Accesses answered with #GP.
    pub gp: u64,
    /// The last value read (if the last read completed) or written, hex.
    pub last_value: Option<String>,
}

#[derive(Clone, Default)]
struct Entry {
    count: u64,
    reasons: u8,
    /// Labels are shared, so that a reader copies an entry cheaply.
    answered_by: Vec<(Arc<str>, u64)>,
    gp: u64,
    last_value: Option<u64>,
}

impl Entry {
    /// Adds `newer` (recorded after `self`) into `self`.
    fn merge(&mut self, newer: &Entry) {
        self.count += newer.count;
        self.reasons |= newer.reasons;
        self.gp += newer.gp;
        self.last_value = newer.last_value.or(self.last_value);
        for (who, n) in &newer.answered_by {
            match self.answered_by.iter_mut().find(|(w, _)| w == who) {
                Some((_, c)) => *c += n,
                None => self.answered_by.push((who.clone(), *n)),
            }
        }
    }
}

type Entries = std::collections::HashMap<(bool, u32), Entry>;

#[derive(Default)]
struct Shard {
    vcpu: u32,
    /// A live sink writes this shard; a dropped one leaves it to the
    /// vCPU's next sink (shards are bounded by the sinks alive at once).
    in_use: bool,
    entries: Entries,
}

/// The footprint recorder: add it with [`crate::EngineBuilder::events`].
#[derive(Default)]
pub struct Footprint {
    shards: Mutex<Vec<Arc<Mutex<Shard>>>>,
    overflow: Arc<AtomicU64>,
}

impl std::fmt::Debug for Footprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Footprint").finish_non_exhaustive()
    }
}

impl Footprint {
    /// An empty footprint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accesses not recorded because a vCPU's footprint was full.
    pub fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    /// Every recorded (op, index), merged over vCPUs, sorted by op and index.
    pub fn entries(&self) -> Vec<FootprintEntry> {
        let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner()).clone();
        type Merged = (Entry, BTreeSet<u32>);
        let mut merged: BTreeMap<(bool, u32), Merged> = BTreeMap::new();
        for shard in shards {
            // A copy under the vCPU's lock, merged after it is released: a
            // reader holds up that vCPU's next exit for the copy only.
            let (vcpu, copy) = {
                let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                let copy: Vec<_> = shard.entries.iter().map(|(k, e)| (*k, e.clone())).collect();
                (shard.vcpu, copy)
            };
            for (key, e) in &copy {
                let (m, vcpus) = merged.entry(*key).or_default();
                m.merge(e);
                vcpus.insert(vcpu);
            }
        }
        merged
            .into_iter()
            .map(|((write, index), (e, vcpus))| FootprintEntry {
                op: if write { "wrmsr" } else { "rdmsr" }.into(),
                index: format!("{index:#x}"),
                count: e.count,
                vcpus: vcpus.into_iter().collect(),
                reasons: [(1, "inval"), (2, "unknown"), (4, "filter")]
                    .iter()
                    .filter(|(bit, _)| e.reasons & bit != 0)
                    .map(|(_, n)| (*n).to_owned())
                    .collect(),
                answered_by: e.answered_by.into_iter().map(|(w, n)| (w.to_string(), n)).collect(),
                gp: e.gp,
                last_value: e.last_value.map(|v| format!("{v:#x}")),
            })
            .collect()
    }
}

impl Events for Footprint {
    fn vcpu(&self, vcpu: u32) -> Option<Box<dyn VcpuEvents>> {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        let free = shards.iter().find(|s| {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            let take = s.vcpu == vcpu && !s.in_use;
            s.in_use |= take;
            take
        });
        let shard = match free {
            Some(shard) => shard.clone(),
            None => {
                let shard = Arc::new(Mutex::new(Shard {
                    vcpu,
                    in_use: true,
                    ..Shard::default()
                }));
                shards.push(shard.clone());
                shard
            }
        };
        Some(Box::new(FootprintSink {
            shard,
            pending: Entries::new(),
            overflow: self.overflow.clone(),
        }))
    }
}

/// A vCPU's writer. It never waits for a reader: while `entries()` copies
/// its shard, accesses go to `pending`, a map only this vCPU touches, which
/// joins the shard at the next access that finds it free (and when the
/// sink is dropped).
struct FootprintSink {
    shard: Arc<Mutex<Shard>>,
    pending: Entries,
    overflow: Arc<AtomicU64>,
}

impl FootprintSink {
    fn flush(pending: &mut Entries, shard: &mut Shard, overflow: &AtomicU64) {
        for (key, e) in pending.drain() {
            let room = shard.entries.len() < MAX_ENTRIES;
            match shard.entries.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut m) => m.get_mut().merge(&e),
                std::collections::hash_map::Entry::Vacant(v) if room => {
                    v.insert(e);
                }
                std::collections::hash_map::Entry::Vacant(_) => {
                    overflow.fetch_add(e.count, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Drop for FootprintSink {
    fn drop(&mut self) {
        let mut shard = self.shard.lock().unwrap_or_else(|e| e.into_inner());
        Self::flush(&mut self.pending, &mut shard, &self.overflow);
        shard.in_use = false;
    }
}

impl VcpuEvents for FootprintSink {
    fn access(&mut self, access: &Access, outcome: &Outcome<'_>) {
        let mut locked = match self.shard.try_lock() {
            Ok(shard) => Some(shard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let entries = match locked.as_deref_mut() {
            Some(shard) => {
                if !self.pending.is_empty() {
                    Self::flush(&mut self.pending, shard, &self.overflow);
                }
                &mut shard.entries
            }
            None => &mut self.pending,
        };
        let key = (access.is_write(), access.index);
        if !entries.contains_key(&key) && entries.len() >= MAX_ENTRIES {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let e = entries.entry(key).or_default();
        e.count += 1;
        e.reasons |= access.reason.bits() as u8;
        if outcome.reply == Reply::Gp {
            e.gp += 1;
        }
        e.last_value = match (access.op, outcome.reply) {
            (Op::Write(v), _) | (Op::Read, Reply::Read(v)) => Some(v),
            _ => e.last_value,
        };
        let who: &str = match &outcome.by {
            AnsweredBy::Plugin { plugin, .. } => &plugin.name,
            AnsweredBy::Kvm => "kvm",
            AnsweredBy::Template => "template",
            AnsweredBy::Unhandled(_) => "unhandled",
            AnsweredBy::Firewall(_) => "firewall",
        };
        let is_plugin = matches!(outcome.by, AnsweredBy::Plugin { .. });
        let found = e.answered_by.iter_mut().find(|(w, _)| match is_plugin {
            true => w.strip_prefix("plugin:") == Some(who),
            false => **w == *who,
        });
        match found {
            Some((_, n)) => *n += 1,
            None => {
                let label: Arc<str> = if is_plugin {
                    format!("plugin:{who}").into()
                } else {
                    who.into()
                };
                e.answered_by.push((label, 1));
            }
        }
    }
}

/// A manifest skeleton from a footprint (`msrwasm policy suggest`): an
/// `allow` list for a default-deny firewall (the MSRs KVM handled for the
/// guest, or that a firewall denied), and the MSRs that went unhandled,
/// with counts, as comments ready to be edited.
#[cfg(any(test, feature = "tools"))]
pub fn suggest(entries: &[FootprintEntry], source: &str) -> String {
    let index = |e: &FootprintEntry| crate::util::parse_number(&e.index).map(|v| v as u32);
    let kvm_side = |e: &FootprintEntry| {
        e.answered_by.contains_key("kvm")
            || (e.reasons.iter().any(|r| r == "filter") && !e.answered_by.keys().any(|k| k.starts_with("plugin:")))
    };
    let mut allow: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    let mut unhandled: BTreeMap<u32, (u64, u64, Vec<String>)> = BTreeMap::new();
    for e in entries {
        let Some(i) = index(e) else { continue };
        let write = e.op == "wrmsr";
        if kvm_side(e) {
            let slot = allow.entry(i).or_default();
            if write { slot.1 += e.count } else { slot.0 += e.count }
        } else if e.answered_by.contains_key("unhandled") {
            let slot = unhandled.entry(i).or_default();
            if write {
                slot.1 += e.count
            } else {
                slot.0 += e.count
            }
            for r in &e.reasons {
                if !slot.2.contains(r) {
                    slot.2.push(r.clone());
                }
            }
        }
    }
    let total: u64 = entries.iter().map(|e| e.count).sum();
    let mut out = format!(
        "# A manifest skeleton from {source}: {} MSRs, {total} accesses recorded.\n\
         # msrwasm policy suggest writes it; edit it before use (docs/manifest.md).\n\n\
         # A default-deny MSR firewall: only `allow` stays in KVM; everything else\n\
         # leaves KVM and goes to the plugins, then to `unhandled`.\n\
         filter_default = \"deny\"\n\
         unhandled = \"gp\"\n\n\
         # MSRs the guest used that KVM handled (or that a firewall denied): keep\n\
         # them in KVM. KVM cannot filter the x2APIC range 0x800-0x8ff anyway.\n\
         allow = [\n",
        entries.len()
    );
    for (i, (reads, writes)) in &allow {
        if (0x800..=0x8ff).contains(i) {
            continue;
        }
        out += &format!(
            "  \"{i:#x}\",{}# rdmsr {reads}, wrmsr {writes}\n",
            " ".repeat(14usize.saturating_sub(format!("{i:#x}").len()))
        );
    }
    out += "]\n";
    if !unhandled.is_empty() {
        out += "\n# MSRs no plugin answered (KVM does not know them, or refused the access):\n\
                # add a [[plugin]] that claims them, or leave them to `unhandled`.\n";
        for (i, (reads, writes, reasons)) in &unhandled {
            out += &format!("#   {i:#x}: rdmsr {reads}, wrmsr {writes} ({})\n", reasons.join(", "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExitReason, Unhandled};

    fn outcome(reply: Reply, by: AnsweredBy<'_>) -> Outcome<'_> {
        Outcome {
            reply,
            by,
            reason: ExitReason::Unknown,
            generation: 1,
        }
    }

    #[test]
    fn vcpus_are_merged_per_op_and_index() {
        let footprint = Footprint::new();
        let mut vcpu0 = footprint.vcpu(0).unwrap();
        let mut vcpu1 = footprint.vcpu(1).unwrap();
        let gp = outcome(Reply::Gp, AnsweredBy::Unhandled(Unhandled::Gp));
        vcpu0.access(
            &Access::read(0x10, ExitReason::Filter),
            &outcome(Reply::Read(5), AnsweredBy::Kvm),
        );
        vcpu1.access(
            &Access::read(0x10, ExitReason::Filter),
            &outcome(Reply::Read(7), AnsweredBy::Kvm),
        );
        vcpu1.access(&Access::write(0x10, 9, ExitReason::Unknown), &gp);
        let entries = footprint.entries();
        assert_eq!(entries.len(), 2, "{entries:?}");
        let read = &entries[0];
        assert_eq!(
            (read.op.as_str(), read.index.as_str(), read.count),
            ("rdmsr", "0x10", 2)
        );
        assert_eq!(read.vcpus, [0, 1]);
        assert_eq!(read.reasons, ["filter"]);
        assert_eq!(read.answered_by.get("kvm"), Some(&2));
        let write = &entries[1];
        assert_eq!(
            (write.op.as_str(), write.gp, write.last_value.as_deref()),
            ("wrmsr", 1, Some("0x9"))
        );
        assert_eq!(write.answered_by.get("unhandled"), Some(&1));
        assert!(suggest(&entries, "test").contains("\"0x10\","));
    }

    #[test]
    fn a_full_vcpu_footprint_only_counts_new_pairs() {
        let footprint = Footprint::new();
        let mut vcpu = footprint.vcpu(0).unwrap();
        let answer = outcome(Reply::Read(0), AnsweredBy::Unhandled(Unhandled::Ignore));
        for index in 0..MAX_ENTRIES as u32 + 10 {
            vcpu.access(&Access::read(index, ExitReason::Unknown), &answer);
        }
        // Pairs already recorded are still counted.
        vcpu.access(&Access::read(0, ExitReason::Unknown), &answer);
        assert_eq!(footprint.overflow(), 10);
        let entries = footprint.entries();
        assert_eq!(entries.len(), MAX_ENTRIES);
        assert_eq!(entries[0].count, 2);
    }

    /// Issue #21: `GET /v1/footprint` copied a vCPU's shard under the lock
    /// that vCPU takes on every exit (vCPUs stalled up to 364 ms). A
    /// reader holding the lock must not hold up the vCPU, and nothing the
    /// vCPU recorded meanwhile is lost.
    #[test]
    fn a_reader_holding_a_shard_never_blocks_its_vcpu() {
        let footprint = Arc::new(Footprint::new());
        let mut vcpu = footprint.vcpu(0).unwrap();
        let answer = outcome(Reply::Read(1), AnsweredBy::Kvm);
        vcpu.access(&Access::read(0x10, ExitReason::Unknown), &answer);
        let shard = footprint.shards.lock().unwrap()[0].clone();
        let held = shard.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            for index in [0x10, 0x11, 0x10] {
                vcpu.access(&Access::read(index, ExitReason::Unknown), &answer);
            }
            tx.send(()).unwrap();
            vcpu
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("the vCPU waited for the reader");
        drop(held);
        let mut vcpu = worker.join().unwrap();
        // The next access (or the sink's end) brings in what waited aside.
        vcpu.access(&Access::read(0x11, ExitReason::Unknown), &answer);
        let counts: Vec<_> = footprint.entries().iter().map(|e| (e.index.clone(), e.count)).collect();
        assert_eq!(counts, [("0x10".to_string(), 3), ("0x11".to_string(), 2)]);
        vcpu.access(&Access::read(0x12, ExitReason::Unknown), &answer);
        let shard = footprint.shards.lock().unwrap()[0].clone();
        let held = shard.lock().unwrap();
        let worker = std::thread::spawn(move || {
            vcpu.access(&Access::read(0x12, ExitReason::Unknown), &answer);
            vcpu
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let vcpu = loop {
            if worker.is_finished() {
                break worker.join().unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "the vCPU waited for the reader");
            std::thread::yield_now();
        };
        drop(held);
        drop(vcpu);
        assert_eq!(
            footprint.entries().last().map(|e| e.count),
            Some(2),
            "flushed when dropped"
        );
    }

    /// Issue #21: a VMM that recreates its vCPU threads (hotplug, reboot)
    /// made a new shard per dispatcher, never released.
    #[test]
    fn shards_of_dropped_sinks_are_reused_and_their_counts_go_on() {
        let footprint = Footprint::new();
        let answer = outcome(Reply::Read(0), AnsweredBy::Kvm);
        for _ in 0..1000 {
            let mut vcpu = footprint.vcpu(3).unwrap();
            vcpu.access(&Access::read(0x10, ExitReason::Unknown), &answer);
        }
        let live = footprint.vcpu(3).unwrap();
        let mut second = footprint.vcpu(3).unwrap();
        second.access(&Access::read(0x10, ExitReason::Unknown), &answer);
        assert_eq!(footprint.shards.lock().unwrap().len(), 2, "one per live sink");
        drop(live);
        assert_eq!(footprint.entries()[0].count, 1001);
    }
}
