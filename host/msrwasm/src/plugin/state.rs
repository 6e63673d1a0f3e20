//! The VM-wide `state_*` store: integers keyed by plugin *name*, shared by
//! all vCPUs and kept across hot reloads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

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
}

/// One plugin's keys. Keys are created on first write and never removed, so
/// a reader holds the map lock only for the lookup, never across the atomic.
#[derive(Debug, Default)]
pub struct StateScope {
    keys: RwLock<HashMap<i32, Arc<AtomicI64>>>,
}

impl StateScope {
    fn slot(&self, key: i32) -> Arc<AtomicI64> {
        if let Some(slot) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return slot.clone();
        }
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    pub fn get(&self, key: i32) -> i64 {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .map_or(0, |slot| slot.load(Ordering::SeqCst))
    }

    pub fn set(&self, key: i32, value: i64) {
        self.slot(key).store(value, Ordering::SeqCst);
    }

    /// Atomic add; returns the new value (wrapping, as wasm i64 arithmetic).
    pub fn add(&self, key: i32, delta: i64) -> i64 {
        self.slot(key).fetch_add(delta, Ordering::SeqCst).wrapping_add(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_per_name_and_missing_keys_read_zero() {
        let store = StateStore::default();
        store.scope("a").set(1, 5);
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
                        scope.add(7, 1);
                    })
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(store.scope("p").get(7), 40_000);
    }
}
