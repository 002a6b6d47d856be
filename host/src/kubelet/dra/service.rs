//! The `DRAPlugin` gRPC service of one driver, v1 and v1beta1 (the same
//! messages under two packages): protocol messages in, [`Driver`] calls, and
//! protocol messages out. Every claim of a request gets its own entry in the
//! answer; a claim that cannot be (un)prepared says why in its `error`, and
//! the call itself succeeds, so the other claims are not held up.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::kubelet::dra::checkpoint::PreparedDevice;
use crate::kubelet::dra::driver::{ClaimRef, Driver};
use crate::kubelet::dra::proto::{v1, v1beta1};

/// The DRA service of one driver, for both versions.
#[derive(Clone)]
pub struct DraService {
    driver: Arc<Driver>,
}

impl DraService {
    /// The service of `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }

    /// Prepares every claim, concurrently (the driver serializes what must be).
    async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> Vec<(String, Result<Vec<PreparedDevice>, String>)> {
        let driver = &self.driver;
        futures::future::join_all(claims.into_iter().map(|claim| async move {
            if claim.uid.is_empty() || claim.name.is_empty() || claim.namespace.is_empty() {
                return (
                    claim.uid.clone(),
                    Err(format!(
                        "claim {claim}: namespace, name and UID are required"
                    )),
                );
            }
            let result = driver.prepare(&claim).await;
            (claim.uid, result)
        }))
        .await
    }

    async fn unprepare(&self, claims: Vec<ClaimRef>) -> Vec<(String, Result<(), String>)> {
        let mut out = Vec::with_capacity(claims.len());
        for claim in claims {
            let result = self.driver.unprepare(&claim).await;
            out.push((claim.uid, result));
        }
        out
    }
}

macro_rules! dra_service {
    ($version:ident) => {
        // v1 has a field (share_id) that v1beta1 lacks.
        #[allow(clippy::needless_update)]
        #[tonic::async_trait]
        impl $version::dra_plugin_server::DraPlugin for DraService {
            async fn node_prepare_resources(
                &self,
                request: Request<$version::NodePrepareResourcesRequest>,
            ) -> Result<Response<$version::NodePrepareResourcesResponse>, Status> {
                let claims = request.into_inner().claims.into_iter().map(|c| ClaimRef {
                    namespace: c.namespace,
                    name: c.name,
                    uid: c.uid,
                });
                let claims: HashMap<String, $version::NodePrepareResourceResponse> = self
                    .prepare(claims.collect())
                    .await
                    .into_iter()
                    .map(|(uid, result)| {
                        let response = match result {
                            Ok(devices) => $version::NodePrepareResourceResponse {
                                devices: devices
                                    .into_iter()
                                    .map(|d| $version::Device {
                                        request_names: d.requests,
                                        pool_name: d.pool,
                                        device_name: d.device,
                                        cdi_device_ids: d.cdi_ids,
                                        ..Default::default()
                                    })
                                    .collect(),
                                error: String::new(),
                            },
                            Err(error) => $version::NodePrepareResourceResponse {
                                devices: Vec::new(),
                                error,
                            },
                        };
                        (uid, response)
                    })
                    .collect();
                Ok(Response::new($version::NodePrepareResourcesResponse {
                    claims,
                }))
            }

            async fn node_unprepare_resources(
                &self,
                request: Request<$version::NodeUnprepareResourcesRequest>,
            ) -> Result<Response<$version::NodeUnprepareResourcesResponse>, Status> {
                let claims = request.into_inner().claims.into_iter().map(|c| ClaimRef {
                    namespace: c.namespace,
                    name: c.name,
                    uid: c.uid,
                });
                let claims = self
                    .unprepare(claims.collect())
                    .await
                    .into_iter()
                    .map(|(uid, result)| {
                        (
                            uid,
                            $version::NodeUnprepareResourceResponse {
                                error: result.err().unwrap_or_default(),
                            },
                        )
                    })
                    .collect();
                Ok(Response::new($version::NodeUnprepareResourcesResponse {
                    claims,
                }))
            }
        }
    };
}

dra_service!(v1);
dra_service!(v1beta1);
