//! The VM-wide `state_*` store: integers keyed by plugin *name*, shared by
//! all vCPUs and kept across hot reloads, bounded in size, and exportable
//! for snapshot, restore and live migration.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

/// Keys one plugin's store may hold; a `state_set`/`state_add` of a new key
/// beyond this is a plugin error.
pub const MAX_KEYS: usize = 4096;
/// Plugin stores kept for names no longer in the policy before the oldest
/// of them are dropped.
pub const MAX_RETIRED_SCOPES: usize = 64;

/// Every plugin's store, by plugin name: what [`StateStore::snapshot`]
/// returns and [`StateStore::restore`] takes.
pub type StateSnapshot = BTreeMap<String, BTreeMap<i32, i64>>;

/// The store is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the plugin's state store holds {MAX_KEYS} keys already")]
pub struct StoreFull;

/// Why [`StateStore::restore`] refused a snapshot (nothing restored).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot names stores of plugins the VM does not run and does
    /// not keep: restoring them would only grow the VM's memory.
    #[error(
        "no plugin named {} in the running policy, and no state kept under that name: \
         state is restored only for plugins the VM runs (or removed lately and still keeps); nothing was restored",
        quoted(.0)
    )]
    Unknown(Vec<String>),
    /// A store with more keys than one store may hold.
    #[error("plugin `{plugin}`: {keys} keys, over the {MAX_KEYS} one store may hold; nothing was restored")]
    TooManyKeys {
        /// The plugin.
        plugin: String,
        /// Keys in its snapshot.
        keys: usize,
    },
}

/// `a`, `b` and 3 more.
fn quoted(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut list: Vec<String> = names.iter().take(SHOWN).map(|n| format!("`{n}`")).collect();
    if names.len() > SHOWN {
        list.push(format!("{} more", names.len() - SHOWN));
    }
    match list.len() {
        0 | 1 => list.concat(),
        n => format!("{} and {}", list[..n - 1].join(", "), list[n - 1]),
    }
}

/// All plugins' stores of one VM.
#[derive(Debug, Default)]
pub struct StateStore {
    scopes: RwLock<HashMap<String, Arc<StateScope>>>,
}

impl StateStore {
    /// The store private to plugin `name`; the same scope for every version
    /// of that plugin, so values survive reloads.
    pub fn scope(&self, name: &str) -> Arc<StateScope> {
        if let Some(scope) = self.scopes.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            return scope.clone();
        }
        let mut scopes = self.scopes.write().unwrap_or_else(|e| e.into_inner());
        scopes.entry(name.to_owned()).or_default().clone()
    }

    /// Drops stores of plugins not in `live` once more than
    /// 64 such stores exist (a plugin removed and added
    /// back soon after keeps its values).
    pub fn prune(&self, live: &[&str]) {
        let mut scopes = self.scopes.write().unwrap_or_else(|e| e.into_inner());
        let retired = scopes.keys().filter(|n| !live.contains(&n.as_str())).count();
        if retired > MAX_RETIRED_SCOPES {
            scopes.retain(|name, _| live.contains(&name.as_str()));
        }
    }

    /// Every plugin's keys and values.
    pub fn snapshot(&self) -> StateSnapshot {
        let scopes = self.scopes.read().unwrap_or_else(|e| e.into_inner());
        scopes
            .iter()
            .map(|(name, scope)| (name.clone(), scope.snapshot()))
            .filter(|(_, keys)| !keys.is_empty())
            .collect()
    }

    /// Replaces the stores of the plugins named in `snapshot` with its
    /// values (other plugins' stores are untouched), all under one lock.
    /// Meant for a paused VM (restore after snapshot or migration): a vCPU
    /// running meanwhile may still complete one write to the old values.
    /// Snapshots come from outside (the control API's `PUT /v1/state`, a
    /// migration stream): every store named must be of a plugin in
    /// `running` or one this store already keeps (a plugin removed lately,
    /// at most 64 of them), and hold at most
    /// 4096 keys. So a restore never adds a store for a name the VM
    /// does not know, and the memory it can take is that of the stores the
    /// VM keeps anyway. All or nothing: a refused snapshot restores nothing.
    pub fn restore(&self, snapshot: &StateSnapshot, running: &[&str]) -> Result<(), RestoreError> {
        if let Some((plugin, keys)) = snapshot.iter().find(|(_, keys)| keys.len() > MAX_KEYS) {
            return Err(RestoreError::TooManyKeys {
                plugin: plugin.clone(),
                keys: keys.len(),
            });
        }
        let mut scopes = self.scopes.write().unwrap_or_else(|e| e.into_inner());
        let unknown: Vec<String> = snapshot
            .keys()
            .filter(|name| !running.contains(&name.as_str()) && !scopes.contains_key(name.as_str()))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(RestoreError::Unknown(unknown));
        }
        for (name, keys) in snapshot {
            let scope = scopes.entry(name.clone()).or_default();
            let mut map = scope.keys.write().unwrap_or_else(|e| e.into_inner());
            *map = keys.iter().map(|(&k, &v)| (k, Arc::new(AtomicI64::new(v)))).collect();
        }
        Ok(())
    }
}

/// One plugin's keys. A reader holds the map lock only for the lookup,
/// never across the atomic operation.
#[derive(Debug, Default)]
pub struct StateScope {
    keys: RwLock<HashMap<i32, Arc<AtomicI64>>>,
}

impl StateScope {
    fn slot(&self, key: i32) -> Result<Arc<AtomicI64>, StoreFull> {
        if let Some(slot) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(slot.clone());
        }
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if keys.len() >= MAX_KEYS && !keys.contains_key(&key) {
            return Err(StoreFull);
        }
        Ok(keys.entry(key).or_default().clone())
    }

    /// The value of `key`; missing keys read 0.
    pub fn get(&self, key: i32) -> i64 {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .map_or(0, |slot| slot.load(Ordering::SeqCst))
    }

    /// Stores `value` under `key`.
    pub fn set(&self, key: i32, value: i64) -> Result<(), StoreFull> {
        self.slot(key)?.store(value, Ordering::SeqCst);
        Ok(())
    }

    /// Atomic add; returns the new value (wrapping, as wasm i64 arithmetic).
    pub fn add(&self, key: i32, delta: i64) -> Result<i64, StoreFull> {
        Ok(self.slot(key)?.fetch_add(delta, Ordering::SeqCst).wrapping_add(delta))
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn snapshot(&self) -> BTreeMap<i32, i64> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.iter().map(|(&k, v)| (k, v.load(Ordering::SeqCst))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_per_name_and_missing_keys_read_zero() {
        let store = StateStore::default();
        store.scope("a").set(1, 5).unwrap();
        assert_eq!(store.scope("a").get(1), 5);
        assert_eq!(store.scope("b").get(1), 0);
    }

    #[test]
    fn concurrent_adds_sum_exactly() {
        let store = Arc::new(StateStore::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let scope = store.scope("p");
                std::thread::spawn(move || {
                    (0..10_000).for_each(|_| {
                        scope.add(7, 1).unwrap();
                    })
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(store.scope("p").get(7), 40_000);
    }

    #[test]
    fn a_store_holds_at_most_max_keys() {
        let store = StateStore::default();
        let scope = store.scope("p");
        for k in 0..MAX_KEYS as i32 {
            scope.set(k, 1).unwrap();
        }
        assert_eq!(scope.set(-1, 1), Err(StoreFull));
        assert_eq!(scope.add(-1, 1), Err(StoreFull));
        assert_eq!(scope.set(5, 9), Ok(()), "existing keys stay writable");
        assert_eq!(scope.len(), MAX_KEYS);
    }

    #[test]
    fn snapshot_and_restore_round_trip() {
        let store = StateStore::default();
        store.scope("a").set(1, -5).unwrap();
        store.scope("b").set(i32::MIN, i64::MAX).unwrap();
        let snap = store.snapshot();
        let other = StateStore::default();
        other.scope("a").set(2, 7).unwrap();
        other.restore(&snap, &["a", "b"]).unwrap();
        assert_eq!(other.snapshot(), snap, "a's key 2 replaced, b created");
    }

    #[test]
    fn restore_known_takes_only_running_or_kept_stores_and_bounded_ones() {
        let store = StateStore::default();
        store.scope("live").set(1, 1).unwrap();
        store.scope("retired").set(1, 1).unwrap();
        let snap = |names: &[&str], keys: usize| -> StateSnapshot {
            names
                .iter()
                .map(|n| (n.to_string(), (0..keys as i32).map(|k| (k, 7)).collect()))
                .collect()
        };
        // Unknown names: refused, named, nothing restored, no store added.
        let err = store
            .restore(&snap(&["live", "ghost1", "ghost2"], 3), &["live", "new"])
            .unwrap_err();
        assert_eq!(err, RestoreError::Unknown(vec!["ghost1".into(), "ghost2".into()]));
        assert!(err.to_string().contains("`ghost1` and `ghost2`"), "{err}");
        assert_eq!(store.scope("live").get(0), 0, "nothing restored");
        assert_eq!(store.snapshot().len(), 2, "no store added");
        // Many unknown names: the message stays short.
        let many: Vec<String> = (0..100).map(|i| format!("g{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let err = store.restore(&snap(&many, 1), &[]).unwrap_err().to_string();
        assert!(err.contains("and 92 more") && err.len() < 400, "{err}");
        // Too many keys in one store.
        assert_eq!(
            store.restore(&snap(&["live"], MAX_KEYS + 1), &["live"]),
            Err(RestoreError::TooManyKeys {
                plugin: "live".into(),
                keys: MAX_KEYS + 1
            })
        );
        // Running (even without a store yet), kept (retired) and full stores: restored.
        store
            .restore(&snap(&["live", "retired", "new"], MAX_KEYS), &["live", "new"])
            .unwrap();
        assert_eq!(store.scope("new").len(), MAX_KEYS);
        assert_eq!(store.scope("retired").get(5), 7);
    }

    #[test]
    fn retired_scopes_are_pruned_beyond_the_cap() {
        let store = StateStore::default();
        for i in 0..=MAX_RETIRED_SCOPES {
            store.scope(&format!("old{i}")).set(0, 1).unwrap();
        }
        store.scope("live").set(0, 1).unwrap();
        store.prune(&["live"]);
        assert_eq!(store.snapshot().keys().collect::<Vec<_>>(), ["live"]);
    }
}
