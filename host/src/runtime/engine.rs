//! The process's one wasmtime `Engine` and `Linker`, and the epoch ticker that
//! makes per-call deadlines work.
//!
//! One engine per process: compiled components are only valid with the engine
//! (and its settings) that compiled them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use crate::gauge::Gauge;
use crate::metrics::{LoadOutcome, Metrics};
use crate::runtime::bindings::DevicePlugin;
use crate::runtime::cache::{self, Cache, Lookup};
use crate::runtime::limits::HostState;
use crate::runtime::{LoadError, RuntimeError};

/// How often the epoch advances. Deadlines are whole ticks, so this is their
/// resolution; a tick costs one atomic increment.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The first bytes of every WebAssembly binary.
const WASM_MAGIC: [u8; 4] = *b"\0asm";
/// The version field of a core module (a component's differs).
const CORE_MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];

/// A snapshot of [`Runtime::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    /// Components compiled from source.
    pub compiled: u64,
    /// Components read from the compiled-module cache instead.
    pub cache_hits: u64,
    /// Cache entries found but not trusted (corrupt, stale, foreign) and rebuilt.
    pub cache_rejected: u64,
    /// Files refused as modules (not wasm, not a component, invalid).
    pub refused: u64,
}

/// The engine, the linker holding every import a module may use, the
/// compiled-module cache, and the ticker.
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    cache: Option<Cache>,
    /// One lock per content hash being loaded: modules with the same bytes (one
    /// guest copied under several names, each with its own manifest) loading
    /// at once take turns, so the first compiles and caches and the others read
    /// the cache instead of compiling the same code again.
    loading: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    metrics: Arc<Metrics>,
    calls: Gauge,
    stop_ticker: Arc<AtomicBool>,
}

impl Runtime {
    /// Builds the engine (component model, async calls, epoch interruption) and a
    /// linker with WASI 0.2 and the `host` interface, and starts the ticker.
    /// Compiled components are cached in `cache_dir` when given; a directory that
    /// cannot be used is logged and the host compiles every module instead.
    /// Loads and guest calls are counted in `metrics`.
    ///
    /// # Errors
    /// [`RuntimeError::Engine`] if wasmtime rejects the configuration.
    pub fn new(cache_dir: Option<&Path>, metrics: Arc<Metrics>) -> Result<Self, RuntimeError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| RuntimeError::Engine(e.to_string()))?;

        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;
        DevicePlugin::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let stop = stop_ticker.clone();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| RuntimeError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        let cache = cache_dir.and_then(|dir| match Cache::open(dir, &engine) {
            Ok(cache) => {
                tracing::info!(dir = %dir.display(), "compiled-module cache in use");
                Some(cache)
            }
            Err(err) => {
                tracing::warn!(dir = %dir.display(), cause = %err, "compiled-module cache not used; every module is compiled at load");
                None
            }
        });
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            cache,
            loading: Mutex::default(),
            metrics,
            calls: Gauge::default(),
            stop_ticker,
        })
    }

    /// What loading modules has cost so far.
    pub fn stats(&self) -> RuntimeStats {
        let count = |outcome| self.metrics.module_loads(outcome);
        RuntimeStats {
            compiled: count(LoadOutcome::Compiled),
            cache_hits: count(LoadOutcome::Cached),
            cache_rejected: count(LoadOutcome::CacheRejected),
            refused: count(LoadOutcome::Refused),
        }
    }

    /// The metrics this runtime counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The component in `bytes`, from the cache when it holds a valid entry for
    /// them, else compiled (and cached). CPU-bound for tens of milliseconds when
    /// it compiles, and with a cache it may wait for a load of the same bytes
    /// that is compiling (then it reads what that one cached): call it off the
    /// async executor.
    ///
    /// # Errors
    /// [`LoadError`] saying why the bytes are not a component.
    pub fn component(&self, module: &str, bytes: &[u8]) -> Result<Component, LoadError> {
        let refused = |err| {
            self.metrics.module_loaded(LoadOutcome::Refused);
            Err(err)
        };
        if bytes.len() < 8 || bytes[..4] != WASM_MAGIC {
            return refused(LoadError::NotWasm);
        }
        if bytes[4..8] == CORE_MODULE_VERSION {
            return refused(LoadError::CoreModule);
        }
        let hash = self.cache.as_ref().map(|_| cache::content_hash(bytes));
        // Held until this load has compiled and cached (or found the entry).
        let turn = hash.as_ref().map(|hash| self.turn_for(hash));
        let _turn = turn
            .as_ref()
            .map(|lock| lock.lock().unwrap_or_else(|e| e.into_inner()));
        if let (Some(cache), Some(hash)) = (&self.cache, &hash) {
            match cache.load(&self.engine, hash) {
                (Lookup::Hit, Some(component)) => {
                    self.metrics.module_loaded(LoadOutcome::Cached);
                    tracing::debug!(module, "compiled module read from the cache");
                    return Ok(component);
                }
                (Lookup::Rejected(reason), _) => {
                    self.metrics.module_loaded(LoadOutcome::CacheRejected);
                    tracing::warn!(module, entry = %cache.entry_path(hash).display(), %reason, "cache entry not trusted; compiling again");
                }
                _ => {}
            }
        }
        let component = match Component::from_binary(&self.engine, bytes) {
            Ok(component) => component,
            Err(e) => return refused(LoadError::Invalid(format!("{e:#}"))),
        };
        self.metrics.module_loaded(LoadOutcome::Compiled);
        if let (Some(cache), Some(hash)) = (&self.cache, &hash)
            && let Err(err) = cache.store(&component, hash)
        {
            tracing::warn!(module, dir = %cache.dir().display(), cause = %err, "cannot write the compiled-module cache");
        }
        Ok(component)
    }

    /// The lock that loads of the content `hash` take turns on (see `loading`);
    /// locks no load holds any more are dropped on the way.
    fn turn_for(&self, hash: &str) -> Arc<Mutex<()>> {
        let mut loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        loading.retain(|_, lock| Arc::strong_count(lock) > 1);
        loading.entry(hash.to_string()).or_default().clone()
    }

    /// Guest calls running now, across every module.
    pub fn calls(&self) -> &Gauge {
        &self.calls
    }

    /// Counts a component that compiled but does not fit our world.
    pub(crate) fn count_refused(&self) {
        self.metrics.module_loaded(LoadOutcome::Refused);
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The linker with every import a module may use.
    pub fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}
