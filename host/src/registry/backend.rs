//! [`GuestBackend`]: allocating through one version of a module. Every snapshot
//! of a resource carries the backend of the module version whose scan built it,
//! so an allocation runs in the version that reported the devices it allocates.

use std::sync::Arc;

use crate::frontend::{AllocateError, AllocateFuture, Backend};
use crate::policy;
use crate::runtime::bindings::{AllocateRequest, ContainerRequest, ModuleError};
use crate::runtime::{CallError, CallFailure, Guest, merge};
use crate::snapshot::{AllocationPlan, ResourceSnapshot};

/// Allocates through one version of a module.
pub struct GuestBackend {
    guest: Arc<Guest>,
}

impl GuestBackend {
    /// A backend calling `guest`.
    pub fn new(guest: Arc<Guest>) -> Self {
        Self { guest }
    }

    /// The module version it calls.
    pub fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    async fn allocate_now(
        &self,
        snapshot: &ResourceSnapshot,
        plan: &AllocationPlan,
    ) -> Result<Vec<crate::domain::ContainerAllocation>, AllocateError> {
        let devices = snapshot.real().devices();
        let containers = plan
            .containers()
            .iter()
            .map(|real| ContainerRequest {
                device_ids: real.iter().map(|&at| devices[at].id.clone()).collect(),
                allocations: real
                    .iter()
                    .map(|&at| {
                        snapshot
                            .allocation(&devices[at].id)
                            .map(policy::guest_allocation)
                            .unwrap_or_else(merge::empty)
                    })
                    .collect(),
            })
            .collect();
        let request = AllocateRequest {
            kind: snapshot.kind().to_string(),
            containers,
        };
        // Judged by the grants the call ran with.
        let settings = self.guest.settings();
        let responses = self
            .guest
            .allocate(&settings, &request)
            .await
            .map_err(allocate_error)?;
        policy::allocation(
            self.guest.name(),
            plan.containers().len(),
            responses,
            &settings.grants,
        )
        .map_err(|e| AllocateError::Failed(e.to_string()))
    }
}

impl Backend for GuestBackend {
    fn allocate<'a>(
        &'a self,
        snapshot: &'a ResourceSnapshot,
        plan: &'a AllocationPlan,
    ) -> AllocateFuture<'a> {
        Box::pin(self.allocate_now(snapshot, plan))
    }
}

/// What a failed guest call means for kubelet.
fn allocate_error(err: CallError) -> AllocateError {
    let message = err.to_string();
    match err {
        CallError::Module {
            error: ModuleError::InvalidRequest(_),
            ..
        } => AllocateError::Rejected(message),
        CallError::Module {
            error: ModuleError::Unavailable(_),
            ..
        } => AllocateError::Unavailable(message),
        CallError::Module {
            error: ModuleError::Internal(_),
            ..
        } => AllocateError::Failed(message),
        CallError::Failed {
            failure: CallFailure::Deadline(_),
            ..
        } => AllocateError::TimedOut(message),
        CallError::Failed { .. } => AllocateError::Failed(message),
    }
}
