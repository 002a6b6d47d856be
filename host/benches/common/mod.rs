//! What the benchmarks share: percentiles of samples, waiting for a device
//! plugin's registration, and writing a bench's Markdown section into
//! `BENCHMARKS.md`.
//!
//! Each bench prints its section to stdout. With `WDP_BENCH_WRITE=<file>` set
//! (`cargo xtask bench` sets it to the repository's `BENCHMARKS.md`), it also
//! replaces the text between `<!-- bench:<name>:begin -->` and
//! `<!-- bench:<name>:end -->` in that file, so the document always holds the
//! figures of the last full run, with the command that produced them.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use wasm_device_plugin::kubelet::deviceplugin::simulator::Simulator;
use wdp_tests::WAIT;

/// Sorted samples, for percentiles.
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Sorts `samples`. Panics on an empty set: a bench that measured nothing
    /// has a bug.
    pub fn new(mut samples: Vec<Duration>) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_unstable();
        Self(samples)
    }

    /// The `q` quantile (0.0 to 1.0), nearest rank.
    pub fn at(&self, q: f64) -> Duration {
        let i = ((self.0.len() - 1) as f64 * q).round() as usize;
        self.0[i]
    }

    /// The median.
    pub fn p50(&self) -> Duration {
        self.at(0.5)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Duration {
        self.at(0.99)
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        self.0[self.0.len() - 1]
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Waits until `resource` is registered with `kubelet` and listed; its socket.
pub async fn registered(kubelet: &Simulator, resource: &str) -> PathBuf {
    let view = kubelet
        .wait_for(WAIT, "registered and listed", |v| {
            v.plugin(resource)
                .is_some_and(|p| p.streaming && !p.updates.is_empty())
        })
        .await
        .expect("registered");
    let endpoint = &view.plugin(resource).expect("plugin").registration.endpoint;
    kubelet.dir().join(endpoint)
}

/// `d` in microseconds, one decimal.
pub fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// `d` in milliseconds, two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// One line about the machine and build: cores, CPU model, profile.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or_else(String::new, |kb| format!(", {} GiB", kb / (1024 * 1024)));
    let profile = if cfg!(debug_assertions) {
        "debug assertions on (not an optimised build)"
    } else {
        "optimised (bench profile = release)"
    };
    format!("{cores} cores ({cpu}){memory}; {profile}")
}

/// Prints `body` and, with `WDP_BENCH_WRITE` set, puts it into that file
/// between the markers of section `name` (appended, with its markers, when the
/// file has none yet).
pub fn publish(name: &str, body: &str) {
    println!("{body}");
    let Some(path) = std::env::var_os("WDP_BENCH_WRITE") else {
        return;
    };
    let begin = format!("<!-- bench:{name}:begin -->");
    let end = format!("<!-- bench:{name}:end -->");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let section = format!("{begin}\n{}\n{end}", body.trim_end());
    let updated = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{section}{}", &text[..b], &text[e + end.len()..])
        }
        _ => format!("{}\n{section}\n", text.trim_end()),
    };
    std::fs::write(&path, updated).expect("write the benchmark document");
    eprintln!(
        "bench {name}: written into {}",
        std::path::Path::new(&path).display()
    );
}

/// Today's date (UTC), `YYYY-MM-DD`.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Howard Hinnant's days-to-civil algorithm.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
