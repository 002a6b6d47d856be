//! The process's one wasmtime `Engine` and `Linker`, and the epoch ticker that
//! makes per-call deadlines work.
//!
//! One engine per process: compiled components are only valid with the engine
//! (and its settings) that compiled them.
//!
//! The ticker advances the epoch only while a guest call (instantiation
//! included) is in flight: [`Runtime::calls`] counts them, and the ticker thread
//! parks once the count has been zero for `LINGER_TICKS` ticks (100 ms), woken
//! by the call that makes it one. A node runs this host beside every workload,
//! and an idle host must not wake 100 times a second for nothing; the linger
//! keeps a stream of short allocations from paying a park and an unpark each
//! (measured: without it the 1-client p99 of Allocate was 3.5× higher). Deadlines are unaffected: `limits::arm` sets
//! each store's epoch deadline one tick past the epoch at arm time, which is
//! inside the call (so the ticker is running), and the deadline itself is a
//! clock time checked at each tick.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::Duration;

use tokio::sync::watch;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use crate::gauge::Gauge;
use crate::metrics::{LoadOutcome, Metrics};
use crate::runtime::bindings::DeviceDriver;
use crate::runtime::cache::{self, Cache, Lookup};
use crate::runtime::limits::HostState;
use crate::runtime::{LoadError, RuntimeError};

/// How often the epoch advances while a guest call runs. Deadlines are whole
/// ticks, so this is their resolution; a tick costs one atomic increment.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How many ticks the ticker keeps running after the last guest call before it
/// parks: a steady stream of allocations (each call short, with gaps between)
/// then costs no park and unpark per call, and an idle host still stops
/// ticking within [`EPOCH_TICK`] × this.
const LINGER_TICKS: u32 = 10;

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
    /// Guest calls in flight; leaving zero wakes the ticker.
    calls: Gauge,
    ticker: Ticker,
}

/// The epoch ticker thread, and what it shares with the runtime.
struct Ticker {
    thread: Thread,
    stop: Arc<AtomicBool>,
    /// Epoch increments so far.
    ticks: watch::Receiver<u64>,
}

impl Ticker {
    /// Starts the thread: while `calls` counts a call, it advances `engine`'s
    /// epoch every [`EPOCH_TICK`]; otherwise it is parked. Returns it with the
    /// gauge that wakes it (the one guest calls must enter).
    fn start(engine: Engine, calls: Gauge) -> std::io::Result<(Self, Gauge)> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ticks_tx, ticks) = watch::channel(0u64);
        let seen = calls.clone();
        let stopped = stop.clone();
        let handle = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                // Ticks in a row with no call in flight.
                let mut idle: u32 = 0;
                while !stopped.load(Ordering::Acquire) {
                    if seen.get() == 0 {
                        idle = idle.saturating_add(1);
                        if idle > LINGER_TICKS {
                            // Woken by the call that makes the count one (or by
                            // `Drop`); the loop re-checks either way.
                            std::thread::park();
                            idle = 0;
                            continue;
                        }
                    } else {
                        idle = 0;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    // A tick after the last call ended would wake nothing.
                    if seen.get() > 0 {
                        engine.increment_epoch();
                        ticks_tx.send_modify(|n| *n += 1);
                    }
                }
            })?;
        let thread = handle.thread().clone();
        let calls = calls.waking(thread.clone());
        Ok((
            Self {
                thread,
                stop,
                ticks,
            },
            calls,
        ))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }
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
        DeviceDriver::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;

        let (ticker, calls) = Ticker::start(engine.clone(), Gauge::default())
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
            calls,
            ticker,
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
        release_freed_memory();
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

    /// Guest calls running now, across every module. Every guest call,
    /// instantiation included, must be counted in it (`Guest` does): the epoch
    /// ticker runs only while it is above zero, and a guest running uncounted
    /// would never reach its deadline.
    pub fn calls(&self) -> &Gauge {
        &self.calls
    }

    /// How many times the ticker has advanced the epoch, now and at each tick
    /// (it does not while no guest call runs).
    pub fn epoch_ticks(&self) -> watch::Receiver<u64> {
        self.ticker.ticks.clone()
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

/// Hands the memory the compiler freed back to the OS. Cranelift allocates
/// megabytes while it compiles (on several threads, so in several of glibc's
/// arenas) and frees them all at the end, but glibc keeps freed memory for
/// reuse: after one cold load of a small guest the host's RSS stayed ~13 MiB
/// above what a warm load (the cache read instead) leaves (BENCHMARKS.md,
/// "What a node pays"). A compile takes tens of milliseconds; the trim adds
/// well under one.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heaps to the
    // kernel; it touches no allocated memory and may run on any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough for ten ticks, had the ticker been running.
    const OBSERVE: Duration = Duration::from_millis(100);

    fn runtime() -> Runtime {
        Runtime::new(None, Arc::new(Metrics::new())).expect("runtime")
    }

    #[test]
    fn epoch_does_not_advance_while_no_call_runs() {
        let runtime = runtime();
        // Observing an absence takes a window; nothing is waited for here.
        std::thread::sleep(OBSERVE);
        assert_eq!(*runtime.epoch_ticks().borrow(), 0);
    }

    #[tokio::test]
    async fn epoch_advances_while_a_call_runs_and_stops_after() {
        let runtime = runtime();
        let mut ticks = runtime.epoch_ticks();
        let call = runtime.calls().enter();
        tokio::time::timeout(Duration::from_secs(10), ticks.wait_for(|n| *n >= 3))
            .await
            .expect("ticks within 10 s")
            .expect("ticker alive");
        drop(call);
        let after = *ticks.borrow_and_update();
        std::thread::sleep(OBSERVE);
        // At most the tick that was sleeping when the call ended.
        assert!(
            *ticks.borrow() <= after + 1,
            "{} > {after} + 1",
            *ticks.borrow()
        );
    }
}
