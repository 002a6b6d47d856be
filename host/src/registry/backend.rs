//! [`GuestBackend`]: allocating through one version of a module. Every snapshot
//! of a resource carries the backend of the module version whose scan built it,
//! so an allocation runs in the version that reported the devices it allocates.

use std::sync::Arc;

use crate::domain::ContainerAllocation;
use crate::frontend::{
    AllocateError, AllocateFuture, Backend, Claim, UnprepareFuture, unconfigurable,
};
use crate::runtime::bindings::{
    self, AllocateRequest, ContainerRequest, ContainerResponse, ModuleError, PrepareRequest,
    UnprepareRequest,
};
use crate::runtime::{CallError, CallFailure, Guest};
use crate::snapshot::{AllocationPlan, ResourceSnapshot};
use crate::{merge, policy};

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
    ) -> Result<Vec<ContainerAllocation>, AllocateError> {
        let name = self.guest.name();
        let exports = self.guest.exports();
        // Judged by the grants the call runs with.
        let settings = self.guest.settings();
        let merged = if exports.allocate {
            None
        } else {
            let merged = merge(name, snapshot, plan)?;
            if !exports.post_allocate {
                // No guest runs. Allocations checked against these very grants
                // when scanned need no second check; after a manifest edit, until
                // the rescan it starts is published, they are checked again.
                return if snapshot.allocations().checked_with() == &settings.grants {
                    policy::merged(name, merged)
                } else {
                    policy::allocation(
                        name,
                        merged.len(),
                        merged.iter().map(policy::guest_allocation).collect(),
                        &settings.grants,
                    )
                }
                .map_err(|e| AllocateError::Failed(e.to_string()));
            }
            Some(merged.iter().map(policy::guest_allocation).collect())
        };
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
                            .map_or_else(empty_response, policy::guest_allocation)
                    })
                    .collect(),
            })
            .collect();
        let request = AllocateRequest {
            kind: snapshot.kind().to_string(),
            containers,
        };
        let responses = self
            .guest
            .allocate(&settings, &request, merged)
            .await
            .map_err(allocate_error)?;
        policy::allocation(name, plan.containers().len(), responses, &settings.grants)
            .map_err(|e| AllocateError::Failed(e.to_string()))
    }
}

impl GuestBackend {
    /// Prepares `claim` through the module's `prepare` when it exports it,
    /// else as the allocation of one container per request (refusing
    /// configuration, which nothing would read).
    async fn prepare_now(
        &self,
        snapshot: &ResourceSnapshot,
        plan: &AllocationPlan,
        claim: &Claim,
    ) -> Result<Vec<ContainerAllocation>, AllocateError> {
        if !self.guest.exports().prepare {
            if let Some(request) = claim.configured_request() {
                return Err(unconfigurable(claim, request));
            }
            return self.allocate_now(snapshot, plan).await;
        }
        let name = self.guest.name();
        let settings = self.guest.settings();
        let devices = snapshot.real().devices();
        let requests = plan
            .containers()
            .iter()
            .zip(&claim.requests)
            .map(|(real, request)| bindings::ClaimRequest {
                name: request.name.clone(),
                device_ids: real.iter().map(|&at| devices[at].id.clone()).collect(),
                allocations: real
                    .iter()
                    .map(|&at| {
                        snapshot
                            .allocation(&devices[at].id)
                            .map_or_else(empty_response, policy::guest_allocation)
                    })
                    .collect(),
                config: request.config.clone(),
            })
            .collect();
        let request = PrepareRequest {
            kind: snapshot.kind().to_string(),
            claim: claim_ref(claim),
            requests,
        };
        let responses = self
            .guest
            .prepare(&settings, &request)
            .await
            .map_err(allocate_error)?;
        policy::allocation(name, plan.containers().len(), responses, &settings.grants)
            .map_err(|e| AllocateError::Failed(e.to_string()))
    }

    /// Runs the module's `unprepare` for `claim`, when it exports it.
    async fn unprepare_now(&self, kind: &str, claim: &Claim) -> Result<(), AllocateError> {
        if !self.guest.exports().unprepare {
            return Ok(());
        }
        let request = UnprepareRequest {
            kind: kind.to_string(),
            claim: claim_ref(claim),
            requests: claim
                .requests
                .iter()
                .map(|r| bindings::ClaimRequest {
                    name: r.name.clone(),
                    device_ids: r.device_ids.clone(),
                    allocations: Vec::new(),
                    config: r.config.clone(),
                })
                .collect(),
        };
        self.guest.unprepare(&request).await.map_err(allocate_error)
    }
}

/// The claim as the module is told of it.
fn claim_ref(claim: &Claim) -> bindings::ClaimRef {
    bindings::ClaimRef {
        namespace: claim.namespace.clone(),
        name: claim.name.clone(),
        uid: claim.uid.clone(),
    }
}

/// The host's `allocate` ([`crate::merge`]): per container of `plan`, the merge
/// of its devices' scan-time allocations in `snapshot`.
fn merge(
    module: &str,
    snapshot: &ResourceSnapshot,
    plan: &AllocationPlan,
) -> Result<Vec<ContainerAllocation>, AllocateError> {
    let devices = snapshot.real().devices();
    plan.containers()
        .iter()
        .enumerate()
        .map(|(n, real)| {
            merge::container(
                n,
                real.iter().map(|&at| {
                    let id = devices[at].id.as_str();
                    (id, snapshot.allocation(id))
                }),
            )
            .map_err(|conflict| {
                AllocateError::Rejected(format!(
                    "module {module}: allocate (host default): {conflict}"
                ))
            })
        })
        .collect()
}

/// An allocation that gives a container nothing (a device whose scan reported
/// none), as the guest is handed it.
fn empty_response() -> ContainerResponse {
    policy::guest_allocation(&ContainerAllocation::default())
}

impl Backend for GuestBackend {
    fn allocate<'a>(
        &'a self,
        snapshot: &'a ResourceSnapshot,
        plan: &'a AllocationPlan,
    ) -> AllocateFuture<'a> {
        Box::pin(self.allocate_now(snapshot, plan))
    }

    fn prepare<'a>(
        &'a self,
        snapshot: &'a ResourceSnapshot,
        plan: &'a AllocationPlan,
        claim: &'a Claim,
    ) -> AllocateFuture<'a> {
        Box::pin(self.prepare_now(snapshot, plan, claim))
    }

    fn unprepare<'a>(&'a self, kind: &'a str, claim: &'a Claim) -> UnprepareFuture<'a> {
        Box::pin(self.unprepare_now(kind, claim))
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
