//! A count of things in progress (guest calls, open ListAndWatch streams) that
//! can be read and waited on: each thing holds a guard for as long as it lasts,
//! so the count cannot leak even when a future is dropped mid-call.
//!
//! A gauge may also wake a thread when its count leaves zero: the epoch ticker
//! (`runtime::engine`) sleeps parked while no guest call is counted.

use std::sync::Arc;
use std::thread::Thread;

use tokio::sync::watch;

/// A shared count; clones count the same things.
#[derive(Debug, Clone)]
pub struct Gauge {
    count: Arc<watch::Sender<u64>>,
    /// Unparked whenever the count goes from 0 to 1.
    wake: Option<Thread>,
}

impl Default for Gauge {
    fn default() -> Self {
        Self {
            count: Arc::new(watch::Sender::new(0)),
            wake: None,
        }
    }
}

impl Gauge {
    /// This gauge (and the clones made of it from now on) unparking `thread`
    /// each time the count leaves zero. The thread must re-check the count after
    /// `std::thread::park` returns: an unpark that comes before the park makes
    /// the park return at once, so no wake-up is lost between its check and its
    /// park, but parks may also return spuriously.
    pub fn waking(mut self, thread: Thread) -> Self {
        self.wake = Some(thread);
        self
    }

    /// Counts one more until the guard drops.
    pub fn enter(&self) -> GaugeGuard {
        let mut first = false;
        self.count.send_modify(|n| {
            first = *n == 0;
            *n += 1;
        });
        if first && let Some(thread) = &self.wake {
            thread.unpark();
        }
        GaugeGuard(self.count.clone())
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        *self.count.borrow()
    }

    /// The count now and every change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.count.subscribe()
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

    #[test]
    fn leaving_zero_unparks_the_waking_thread() {
        let (parked_tx, parked_rx) = std::sync::mpsc::channel();
        let (woken_tx, woken_rx) = std::sync::mpsc::channel();
        let counted = Gauge::default();
        let seen = counted.clone();
        let thread = std::thread::spawn(move || {
            // Parks until the count is above zero; the token std keeps for an
            // unpark that came first makes the order of the two irrelevant.
            parked_tx.send(()).expect("test alive");
            while seen.get() == 0 {
                std::thread::park();
            }
            woken_tx.send(()).expect("test alive");
        });
        let gauge = counted.waking(thread.thread().clone());
        parked_rx.recv().expect("thread started");
        let _call = gauge.enter();
        woken_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the thread was unparked");
        thread.join().expect("thread");
    }
}
