//! The function host: one wasmtime engine (pooling allocator, fuel, epoch interruption
//! with a ticker thread) shared by every function of a process, the two linkers, the
//! artifact cache, the instance pool's slots and the tenants' limits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use agora_proto::units::{GIB, MIB};
use tokio::sync::Semaphore;
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig};

use crate::admission::TenantSlots;
use crate::artifact_cache::{ArtifactCache, Compiled};
use crate::error::{error_text, FunctionError};
use crate::function::{Function, Guest};
use crate::guest::{cgi_module, http_component};
use crate::spec::{check_name, FunctionSpec, GuestKind, ModuleSource};
use agora_proto::sha256_hex;

/// How often the epoch advances: the granularity of deadlines.
pub use agora_wasm_executor::runner::{EpochTicker, EPOCH_TICK};

/// Settings of a [`FunctionHost`]; `Default` suits an agent.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Where compiled modules are kept between runs (created if needed); `None`
    /// compiles in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Instances that may be live at once, over all functions: the size of the
    /// instance pool. Requests beyond it wait in their function's queue.
    pub max_instances: u32,
    /// Largest linear memory one instance may have; every function's memory limit
    /// must fit in it. Virtual address space reserved: about twice this per slot.
    pub max_memory_per_instance: u64,
    /// Largest response a guest may produce (CGI stdout or `wasi:http` body).
    pub output_limit: u64,
    /// Concurrent requests per tenant, unless set with
    /// [`FunctionHost::set_tenant_limit`].
    pub default_tenant_concurrency: u32,
    /// Use the pooling allocator (falls back to on-demand allocation, with a warning,
    /// when the pool cannot be reserved).
    pub pooling: bool,
    /// Bytes of each pool slot's linear memory kept resident between requests and
    /// reset in place, rather than returned to the kernel: faster instantiation, at
    /// the price of up to this much resident memory per slot used.
    pub keep_resident_per_instance: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: None,
            max_instances: 256,
            max_memory_per_instance: 4 * GIB,
            output_limit: 16 * MIB,
            default_tenant_concurrency: 256,
            pooling: true,
            keep_resident_per_instance: MIB,
        }
    }
}

/// Runs functions; one per process, shared (`Arc`) by everything that loads or serves
/// functions.
pub struct FunctionHost {
    engine: Engine,
    cgi_linker: wasmtime::Linker<cgi_module::CgiCtx>,
    component_linker: wasmtime::component::Linker<http_component::ProxyCtx>,
    cache: ArtifactCache,
    /// One permit per pool slot.
    instances: Arc<Semaphore>,
    tenants: Mutex<HashMap<String, Arc<TenantSlots>>>,
    config: HostConfig,
    pooling: bool,
    compiled: AtomicU64,
    /// Declared last so the ticker stops before the engine goes away.
    _ticker: EpochTicker,
}

impl FunctionHost {
    /// Builds the engine, the linkers and the epoch ticker.
    pub fn new(config: HostConfig) -> Result<Arc<Self>, FunctionError> {
        if config.max_instances == 0 {
            return Err(FunctionError::Host(
                "max_instances must be at least 1".to_string(),
            ));
        }
        if config.default_tenant_concurrency == 0 {
            return Err(FunctionError::Host(
                "default_tenant_concurrency must be at least 1".to_string(),
            ));
        }
        let (engine, pooling) = build_engine(&config)?;
        let cgi_linker = cgi_module::linker(&engine)?;
        let component_linker = http_component::linker(&engine)?;
        let cache = ArtifactCache::new(&engine, config.cache_dir.clone());
        let ticker = EpochTicker::start(&engine, "agora-fn-epoch").map_err(|e| {
            FunctionError::Host(format!("cannot start the epoch ticker thread: {e}"))
        })?;
        Ok(Arc::new(FunctionHost {
            engine,
            cgi_linker,
            component_linker,
            cache,
            instances: Arc::new(Semaphore::new(config.max_instances as usize)),
            tenants: Mutex::new(HashMap::new()),
            config,
            pooling,
            compiled: AtomicU64::new(0),
            _ticker: ticker,
        }))
    }

    /// Loads a function: reads and checks its module (core module or component,
    /// detected from the bytes), compiles it or takes it from the artifact cache,
    /// and resolves its imports once. The function is not reachable over HTTP until
    /// it is added to a [`crate::FunctionRegistry`].
    ///
    /// Blocking: compiling takes ~100 ms per 100 KB of wasm on this kind of machine;
    /// from async code call it through `tokio::task::spawn_blocking`.
    pub fn load(self: &Arc<Self>, spec: FunctionSpec) -> Result<Arc<Function>, FunctionError> {
        let started = Instant::now();
        spec.validate(self.config.max_memory_per_instance)?;
        let name = spec.name.clone();
        let (sha, compiled, from_cache) = self.compile(&spec)?;
        let guest = match compiled {
            Compiled::Module(module) => Guest::Cgi(cgi_module::prepare(
                &name,
                &self.cgi_linker,
                &module,
                spec.memory_limit,
            )?),
            Compiled::Component(component) => Guest::Http(http_component::prepare(
                &name,
                &self.component_linker,
                &component,
            )?),
        };
        let kind = guest.kind();
        tracing::info!(
            function = %name,
            tenant = %spec.tenant,
            kind = ?kind,
            sha256 = %sha,
            from_cache,
            ms = started.elapsed().as_millis() as u64,
            "function loaded"
        );
        let tenant = self.tenant(&spec.tenant);
        Ok(Arc::new(Function::new(
            Arc::clone(self),
            spec,
            sha,
            guest,
            tenant,
        )))
    }

    /// Sets how many requests of `tenant`'s functions may run at once on this host.
    /// Functions loaded afterwards use the new limit; requests of functions loaded
    /// before keep the old one until they are loaded again.
    pub fn set_tenant_limit(&self, tenant: &str, limit: u32) -> Result<(), FunctionError> {
        check_name("tenant", tenant).map_err(FunctionError::Host)?;
        if limit == 0 {
            return Err(FunctionError::Host(format!(
                "tenant {tenant:?}: the concurrency limit must be at least 1"
            )));
        }
        let slots = Arc::new(TenantSlots {
            name: tenant.to_string(),
            limit,
            slots: Arc::new(Semaphore::new(limit as usize)),
        });
        self.tenants
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tenant.to_string(), slots);
        Ok(())
    }

    /// How many modules and components this host has compiled (cache hits do not
    /// count).
    pub fn compiled_count(&self) -> u64 {
        self.compiled.load(Ordering::Relaxed)
    }

    /// Whether the pooling allocator is in use (false after a fallback).
    pub fn uses_pooling(&self) -> bool {
        self.pooling
    }

    /// The settings this host was built with.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn instance_slots(&self) -> &Arc<Semaphore> {
        &self.instances
    }

    fn tenant(&self, tenant: &str) -> Arc<TenantSlots> {
        let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        let limit = self.config.default_tenant_concurrency;
        Arc::clone(tenants.entry(tenant.to_string()).or_insert_with(|| {
            Arc::new(TenantSlots {
                name: tenant.to_string(),
                limit,
                slots: Arc::new(Semaphore::new(limit as usize)),
            })
        }))
    }

    /// (sha256, compiled guest, whether it came from the disk cache).
    fn compile(&self, spec: &FunctionSpec) -> Result<(String, Compiled, bool), FunctionError> {
        let name = &spec.name;
        // With a known sha and a cached artifact, the module need not even be read.
        if let Some(sha) = &spec.sha256 {
            if let Some(compiled) = self.cache.load(&self.engine, sha) {
                return Ok((sha.clone(), compiled, true));
            }
        }
        let bytes = match &spec.module {
            ModuleSource::Bytes(bytes) => bytes.clone(),
            ModuleSource::Path(path) => {
                std::fs::read(path)
                    .map(bytes::Bytes::from)
                    .map_err(|cause| FunctionError::ReadModule {
                        name: name.clone(),
                        path: path.clone(),
                        cause,
                    })?
            }
        };
        let actual = sha256_hex(&bytes);
        if let Some(expected) = &spec.sha256 {
            if *expected != actual {
                return Err(FunctionError::module(
                    name,
                    format!("module bytes have sha256 {actual}, not the {expected} the spec names; the file changed or the wrong file was given"),
                ));
            }
        } else if let Some(compiled) = self.cache.load(&self.engine, &actual) {
            return Ok((actual, compiled, true));
        }
        let kind =
            GuestKind::detect(&bytes).map_err(|m| FunctionError::module(name, m.to_string()))?;
        let compiled = match kind {
            GuestKind::CgiModule => Module::from_binary(&self.engine, &bytes).map(Compiled::Module),
            GuestKind::HttpComponent => {
                Component::from_binary(&self.engine, &bytes).map(Compiled::Component)
            }
        }
        .map_err(|e| {
            FunctionError::module(name, format!("does not compile: {}", error_text(&e)))
        })?;
        self.compiled.fetch_add(1, Ordering::Relaxed);
        self.cache.store(&actual, &compiled);
        Ok((actual, compiled, false))
    }
}

fn base_config() -> Config {
    let mut config = Config::new();
    config.consume_fuel(true).epoch_interruption(true);
    config
}

fn build_engine(host: &HostConfig) -> Result<(Engine, bool), FunctionError> {
    if host.pooling {
        let n = host.max_instances;
        let mut pool = PoolingAllocationConfig::new();
        // A Rust component holds a few core instances (the program, the WASI adapter,
        // shims) and up to two memories; a core module one of each.
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_memory_size(usize::try_from(host.max_memory_per_instance).unwrap_or(usize::MAX))
            .table_elements(agora_wasm_executor::MAX_TABLE_ELEMENTS)
            // Measured (fn-bench, noop guest): resetting a slot's dirty pages with
            // memset, found with the PAGEMAP_SCAN ioctl (Linux 6.7+; off where the
            // kernel lacks it), instead of madvise + copy-on-write faults, halves the
            // per-request cost: no TLB shootdown IPIs across the host's threads.
            .linear_memory_keep_resident(
                usize::try_from(host.keep_resident_per_instance).unwrap_or(0),
            )
            .pagemap_scan(wasmtime::Enabled::Auto)
            .table_keep_resident(64 * 1024);
        let mut config = base_config();
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        match Engine::new(&config) {
            Ok(engine) => return Ok((engine, true)),
            Err(e) => tracing::warn!(
                error = %error_text(&e),
                "cannot set up wasmtime's pooling allocator (address-space limits?); \
                 falling back to on-demand allocation, instantiation will be slower"
            ),
        }
    }
    let engine = Engine::new(&base_config()).map_err(|e| {
        FunctionError::Host(format!(
            "cannot create the wasmtime engine: {}",
            error_text(&e)
        ))
    })?;
    Ok((engine, false))
}

// Shared between the HTTP tasks and blocking threads.
const _: () = {
    const fn check<T: Send + Sync>() {}
    check::<FunctionHost>()
};
