//! Compiled modules by content hash, so that content seen before (a
//! rollback, a file touched without change) goes live without compiling.
//! Only validated versions enter; the oldest leave first, and the cache is
//! bounded by entries and by compiled bytes.

use std::collections::VecDeque;
use std::sync::Mutex;

use wasmtime::Module;

/// Compiled plugin modules, by the sha256 of their source content.
#[derive(Debug, Default)]
pub struct ModuleCache {
    modules: Mutex<VecDeque<(String, Module, usize)>>,
}

impl ModuleCache {
    /// Modules kept at most.
    pub const MAX_ENTRIES: usize = 32;
    /// Compiled code kept at most, bytes.
    pub const MAX_BYTES: usize = 256 << 20;

    pub(crate) fn get(&self, sha256: &str) -> Option<Module> {
        let modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        modules.iter().find(|(h, ..)| h == sha256).map(|(_, m, _)| m.clone())
    }

    pub(crate) fn insert(&self, sha256: &str, module: &Module) {
        let range = module.image_range();
        let size = (range.end as usize).saturating_sub(range.start as usize);
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if modules.iter().any(|(h, ..)| h == sha256) || size > Self::MAX_BYTES {
            return;
        }
        modules.push_back((sha256.to_owned(), module.clone(), size));
        while modules.len() > Self::MAX_ENTRIES || modules.iter().map(|(.., s)| s).sum::<usize>() > Self::MAX_BYTES {
            modules.pop_front();
        }
    }

    /// Whether content with this hash is compiled already.
    pub fn contains(&self, sha256: &str) -> bool {
        self.get(sha256).is_some()
    }

    /// Number of modules held.
    pub fn len(&self) -> usize {
        self.modules.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no module is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Compiled bytes held.
    pub fn bytes(&self) -> usize {
        let modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        modules.iter().map(|(.., s)| s).sum()
    }
}
