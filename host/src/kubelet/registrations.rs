//! Where every served resource stands with kubelet, whichever frontend serves
//! it: readiness (`/readyz`) is read off this one map.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::domain::ResourceName;

/// Where a served resource stands with kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginStatus {
    /// Not registered: kubelet is absent, restarting or refused; retrying (a
    /// DRA driver: kubelet has not registered it, or its ResourceSlices are
    /// not published yet).
    Waiting,
    /// Registered, at this endpoint (the socket file name kubelet was given;
    /// for a DRA driver, its registration socket's).
    Registered(String),
}

/// Where every served resource stands with kubelet: an entry from the moment it
/// is served until its socket is removed. Readiness is read off it.
#[derive(Debug, Clone, Default)]
pub struct Registrations(Arc<watch::Sender<BTreeMap<ResourceName, PluginStatus>>>);

impl Registrations {
    /// Records `resource`'s status.
    pub fn set(&self, resource: &ResourceName, status: PluginStatus) {
        self.0.send_if_modified(|all| {
            all.insert(resource.clone(), status.clone()).as_ref() != Some(&status)
        });
    }

    /// Forgets `resource` (no longer served).
    pub fn remove(&self, resource: &ResourceName) {
        self.0
            .send_if_modified(|all| all.remove(resource).is_some());
    }

    /// Every served resource's status now, and each change.
    pub fn watch(&self) -> watch::Receiver<BTreeMap<ResourceName, PluginStatus>> {
        self.0.subscribe()
    }
}
