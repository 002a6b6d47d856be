//! A count of things in progress (guest calls, open ListAndWatch streams) that
//! can be read and waited on: each thing holds a guard for as long as it lasts,
//! so the count cannot leak even when a future is dropped mid-call.

use std::sync::Arc;

use tokio::sync::watch;

/// A shared count; clones count the same things.
#[derive(Debug, Clone)]
pub struct Gauge(Arc<watch::Sender<u64>>);

impl Default for Gauge {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }
}

impl Gauge {
    /// Counts one more until the guard drops.
    pub fn enter(&self) -> GaugeGuard {
        self.0.send_modify(|n| *n += 1);
        GaugeGuard(self.0.clone())
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        *self.0.borrow()
    }

    /// The count now and every change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// One counted thing; dropping it counts it out.
#[derive(Debug)]
pub struct GaugeGuard(Arc<watch::Sender<u64>>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_in_and_out() {
        let gauge = Gauge::default();
        let watch = gauge.watch();
        let a = gauge.enter();
        let b = gauge.clone().enter();
        assert_eq!(gauge.get(), 2);
        drop(a);
        assert_eq!(*watch.borrow(), 1);
        drop(b);
        assert_eq!(gauge.get(), 0);
    }
}
