//! What one guest call runs in: a fresh `Store` whose data holds an empty WASI
//! context (no files, environment, network or inherited stdio), a memory limiter,
//! the module's configuration, and capped stdout/stderr that end up in the log.
//!
//! A store serves one call, or (an allocation's, see `guest`) a short run of
//! calls that all returned: no trap, missed deadline or hit memory cap outlives
//! the call it happened in.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use crate::grants::Grants;
use crate::runtime::bindings::LogLevel;
use crate::runtime::bindings::wasm_device_plugin::device::{host, types};

/// Most bytes of a guest's stdout or stderr kept per call.
const STDIO_CAP: usize = 4096;
/// Longest guest log line kept.
const LOG_LINE_CAP: usize = 4096;
/// Most log lines one call may write; the rest are dropped (and that is logged
/// once), so a guest cannot flood the node's logs.
pub const LOG_LINES_PER_CALL: u32 = 100;

/// A module's configuration values, as the `host.config` import returns them.
pub type ModuleConfig = BTreeMap<String, String>;

/// Per-module limits on every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory an instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// Deadline of `scan` and `health`.
    pub scan_deadline: Duration,
    /// Deadline of `allocate` plus `post-allocate`.
    pub allocate_deadline: Duration,
}

impl Limits {
    /// The deadline of `call`.
    pub fn deadline(&self, call: Call) -> Duration {
        match call {
            Call::Scan | Call::Health | Call::Describe => self.scan_deadline,
            Call::Allocate | Call::Prepare | Call::Unprepare => self.allocate_deadline,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 * 1024 * 1024,
            scan_deadline: Duration::from_secs(10),
            allocate_deadline: Duration::from_secs(1),
        }
    }
}

/// Everything a call of one module runs with; replaced as a whole when the
/// operator edits the module's manifest, so a call sees one consistent version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallSettings {
    /// Deadlines and memory cap.
    pub limits: Limits,
    /// The values `host.config` returns.
    pub config: ModuleConfig,
    /// Directories the guest may read, host paths its allocations may use.
    pub grants: Grants,
}

/// Which export is running (for logs and errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `scan`.
    Scan,
    /// `health`.
    Health,
    /// `allocate` (and `post-allocate` on the same instance).
    Allocate,
    /// `describe`, after a scan (the scan's deadline).
    Describe,
    /// `prepare` (the allocation's deadline).
    Prepare,
    /// `unprepare` (the allocation's deadline).
    Unprepare,
}

impl Call {
    /// The WIT name.
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Scan => "scan",
            Call::Health => "health",
            Call::Allocate => "allocate",
            Call::Describe => "describe",
            Call::Prepare => "prepare",
            Call::Unprepare => "unprepare",
        }
    }
}

/// Refuses memory growth past the cap and remembers that it did, so a trap that
/// follows can be reported as "out of memory" rather than as a guest bug.
struct MemoryCap {
    max_bytes: usize,
    exceeded: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max_bytes;
        if !allowed {
            self.exceeded = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The data of one call's store.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryCap,
    settings: Arc<CallSettings>,
    module: Arc<str>,
    call: Call,
    /// When the running call's deadline passes (see [`arm`]).
    call_end: Instant,
    log_lines: u32,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

impl HostState {
    /// The settings this call runs with.
    pub fn settings(&self) -> &CallSettings {
        &self.settings
    }

    /// The settings this store was made with, shared.
    pub(crate) fn settings_arc(&self) -> &Arc<CallSettings> {
        &self.settings
    }

    /// Whether the call was refused memory.
    pub fn memory_exceeded(&self) -> bool {
        self.limiter.exceeded
    }

    /// Whether the guest has written to stdout or stderr since the store was
    /// made (the pipes cannot be emptied, so a store that has is not reused).
    pub fn wrote_stdio(&self) -> bool {
        !(self.stdout.contents().is_empty() && self.stderr.contents().is_empty())
    }

    /// Writes what the guest printed to the log, one event per stream.
    pub fn flush_stdio(&self) {
        for (stream, pipe) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let bytes = pipe.contents();
            if !bytes.is_empty() {
                let text = String::from_utf8_lossy(&bytes);
                tracing::info!(module = %self.module, call = self.call.as_str(), stream, output = %text.trim_end(), "guest output");
            }
        }
    }
}

/// A store for one call of `module`'s export `call`, with the deadline armed.
pub fn new_store(
    engine: &wasmtime::Engine,
    module: Arc<str>,
    call: Call,
    settings: &Arc<CallSettings>,
) -> Store<HostState> {
    let stdout = MemoryOutputPipe::new(STDIO_CAP);
    let stderr = MemoryOutputPipe::new(STDIO_CAP);
    // The builder starts empty: no args, env, preopened directories or inherited
    // stdio; networking is denied explicitly on top of that.
    let mut wasi = WasiCtx::builder();
    wasi.stdout(stdout.clone()).stderr(stderr.clone());
    wasi.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for dir in settings.grants.read_only_dirs() {
        let guest_path = dir.to_string_lossy();
        if let Err(err) = wasi.preopened_dir(dir, &*guest_path, FsPerms::ReadOnly) {
            // A granted directory that is missing now (a device not plugged in) is
            // simply not visible to this call.
            tracing::debug!(module = %module, dir = %dir.display(), cause = %err, "granted directory not available");
        }
    }
    let state = HostState {
        wasi: wasi.build(),
        table: ResourceTable::new(),
        limiter: MemoryCap {
            max_bytes: settings.limits.memory_bytes,
            exceeded: false,
        },
        settings: settings.clone(),
        module,
        call,
        call_end: Instant::now(),
        log_lines: 0,
        stdout,
        stderr,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limiter);
    // Every epoch tick a running guest yields to the executor, so a guest that
    // never returns neither holds a thread nor blocks cancellation (the host
    // drops the call's future at the yield); past the deadline that `arm` set,
    // it traps with `Trap::Interrupt`. A call that finishes within one tick never
    // gets here.
    store.epoch_deadline_callback(|store| {
        Ok(if Instant::now() >= store.data().call_end {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Yield(1)
        })
    });
    arm(&mut store, call);
    store
}

/// Readies `store` for one call of `call`: its deadline starts now, and its
/// per-call log allowance is whole again. [`new_store`] arms the store it makes;
/// a store kept for another call is armed again before that call.
pub fn arm(store: &mut Store<HostState>, call: Call) {
    let deadline = store.data().settings.limits.deadline(call);
    let state = store.data_mut();
    state.call = call;
    state.call_end = Instant::now() + deadline;
    state.log_lines = 0;
    store.set_epoch_deadline(1);
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: LogLevel, mut message: String) {
        self.log_lines = self.log_lines.saturating_add(1);
        if self.log_lines > LOG_LINES_PER_CALL {
            if self.log_lines == LOG_LINES_PER_CALL + 1 {
                tracing::warn!(module = %self.module, call = self.call.as_str(), "guest wrote more than {LOG_LINES_PER_CALL} log lines in one call; dropping the rest of this call's lines");
            }
            return;
        }
        if message.len() > LOG_LINE_CAP {
            let mut end = LOG_LINE_CAP;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let (module, call) = (&*self.module, self.call.as_str());
        match level {
            LogLevel::Trace => tracing::trace!(module, call, "{message}"),
            LogLevel::Debug => tracing::debug!(module, call, "{message}"),
            LogLevel::Info => tracing::info!(module, call, "{message}"),
            LogLevel::Warn => tracing::warn!(module, call, "{message}"),
            LogLevel::Error => tracing::error!(module, call, "{message}"),
        }
    }

    fn config(&mut self) -> Vec<(String, String)> {
        self.settings
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn get_config(&mut self, key: String) -> Option<String> {
        self.settings.config.get(&key).cloned()
    }
}
