//! The process's one wasmtime `Engine` and `Linker`, and the epoch ticker that
//! makes per-call deadlines work.
//!
//! One engine per process: compiled components are only valid with the engine
//! (and its settings) that compiled them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine};

use crate::runtime::RuntimeError;
use crate::runtime::bindings::DevicePlugin;
use crate::runtime::limits::HostState;

/// How often the epoch advances. Deadlines are whole ticks, so this is their
/// resolution; a tick costs one atomic increment.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The engine, the linker holding every import a module may use, and the ticker.
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    stop_ticker: Arc<AtomicBool>,
}

impl Runtime {
    /// Builds the engine (component model, async calls, epoch interruption) and a
    /// linker with WASI 0.2 and the `host` interface, and starts the ticker.
    ///
    /// # Errors
    /// [`RuntimeError::Engine`] if wasmtime rejects the configuration.
    pub fn new() -> Result<Self, RuntimeError> {
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
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            stop_ticker,
        })
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

/// Epoch ticks for a deadline, rounded up, at least one.
pub fn deadline_ticks(deadline: Duration) -> u64 {
    let tick = EPOCH_TICK.as_micros().max(1);
    u64::try_from(deadline.as_micros().div_ceil(tick))
        .unwrap_or(u64::MAX)
        .max(1)
}
