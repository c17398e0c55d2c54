//! The functions a process serves, by name: what the HTTP router looks requests up
//! in. Functions can be added, replaced and removed while requests are served.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::error::FunctionError;
use crate::function::Function;
use crate::host::FunctionHost;
use crate::metrics::MetricsSnapshot;
use crate::spec::FunctionSpec;

/// Thread-safe map of name to loaded function, over one [`FunctionHost`].
pub struct FunctionRegistry {
    host: Arc<FunctionHost>,
    functions: RwLock<BTreeMap<String, Arc<Function>>>,
}

impl FunctionRegistry {
    /// An empty registry whose functions run on `host`.
    pub fn new(host: Arc<FunctionHost>) -> Arc<Self> {
        Arc::new(FunctionRegistry {
            host,
            functions: RwLock::new(BTreeMap::new()),
        })
    }

    /// The host functions are loaded on.
    pub fn host(&self) -> &Arc<FunctionHost> {
        &self.host
    }

    /// Loads `spec` (see [`FunctionHost::load`]: blocking) and serves it under its
    /// name, replacing any function of that name. Requests already running on the old
    /// one finish there; its queued requests get 503.
    pub fn deploy(&self, spec: FunctionSpec) -> Result<Arc<Function>, FunctionError> {
        let function = self.host.load(spec)?;
        self.insert(Arc::clone(&function));
        Ok(function)
    }

    /// Serves an already loaded function under its name; returns the one it replaces.
    pub fn insert(&self, function: Arc<Function>) -> Option<Arc<Function>> {
        let old = self
            .functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(function.name().to_string(), function);
        if let Some(old) = &old {
            old.retire();
        }
        old
    }

    /// Stops serving `name`; requests running finish, queued ones get 503.
    pub fn remove(&self, name: &str) -> Option<Arc<Function>> {
        let removed = self
            .functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        if let Some(function) = &removed {
            function.retire();
            tracing::info!(function = name, "function removed");
        }
        removed
    }

    /// The function called `name`, if served.
    pub fn get(&self, name: &str) -> Option<Arc<Function>> {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Names of the functions served, sorted.
    pub fn names(&self) -> Vec<String> {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Metrics of every function served, sorted by name.
    pub fn metrics(&self) -> Vec<MetricsSnapshot> {
        let functions: Vec<Arc<Function>> = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        functions.iter().map(|f| f.metrics()).collect()
    }
}
