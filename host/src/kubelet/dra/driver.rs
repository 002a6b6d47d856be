//! One served DRA driver's claims: NodePrepareResources and
//! NodeUnprepareResources in protocol-free terms. A claim is fetched from the
//! API server (its UID and allocation checked), its devices of this driver and
//! node mapped back to the guest's ids through the current snapshot, and
//! prepared through that snapshot's backend with one container per request of
//! the claim: the guest's `prepare` with each request's opaque configuration
//! for this driver (the DeviceClass's first, then the claim's), or, without
//! it, the allocation path (`allocate` and `post-allocate`, or the host's
//! merge), which refuses configuration. The answer passes the output policy
//! and is written as one CDI spec per claim before the answer names its
//! devices. Each prepared claim is checkpointed before the answer goes out, so
//! both calls are idempotent across restarts; unpreparing runs the guest's
//! `unprepare` (when exported) with the requests as checkpointed, then
//! removes the spec.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::api::resource::v1::{DeviceAllocationConfiguration, ResourceClaim};
use tokio::sync::Mutex as AsyncMutex;

use crate::cdi::{self, CdiDir};
use crate::domain::ResourceName;
use crate::frontend::{Claim, ClaimRequest, RequestError, Snapshots};
use crate::kubelet::dra::checkpoint::{Checkpoint, PreparedClaim, PreparedDevice};
use crate::kubelet::dra::client::ApiClient;
use crate::kubelet::dra::names::DeviceNames;
use crate::metrics::ResourceMetrics;
use crate::snapshot::ResourceSnapshot;

/// A claim as kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID.
    pub uid: String,
}

impl std::fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// One served driver: what its requests read.
pub struct Driver {
    /// The driver name.
    pub name: String,
    /// The node, which is also the pool name.
    pub node: String,
    /// The resource it serves.
    pub resource: ResourceName,
    /// The CDI kind of its claims' specs.
    pub cdi_kind: String,
    /// The resource's snapshots.
    pub snapshots: Snapshots,
    /// Where claim specs go.
    pub cdi: Arc<CdiDir>,
    /// The API server.
    pub client: Arc<ApiClient>,
    /// Prepared claims; held across a claim's preparation, so claims of one
    /// driver are prepared one at a time (as upstream's helper serializes).
    pub checkpoint: AsyncMutex<Checkpoint>,
    /// Where prepare and unprepare are counted.
    pub metrics: ResourceMetrics,
    /// The slice names of the last snapshot asked, by its generation.
    names: Mutex<Option<(u64, Arc<DeviceNames>)>>,
}

impl Driver {
    /// A driver serving `resource`'s snapshots with `checkpoint`'s claims.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        node: String,
        resource: ResourceName,
        cdi_kind: String,
        snapshots: Snapshots,
        cdi: Arc<CdiDir>,
        client: Arc<ApiClient>,
        checkpoint: Checkpoint,
        metrics: ResourceMetrics,
    ) -> Self {
        metrics.set_prepared_claims(checkpoint.len());
        Self {
            name,
            node,
            resource,
            cdi_kind,
            snapshots,
            cdi,
            client,
            checkpoint: AsyncMutex::new(checkpoint),
            metrics,
            names: Mutex::new(None),
        }
    }

    /// The slice names of `snapshot`'s devices (computed once per snapshot).
    pub fn names_of(&self, snapshot: &ResourceSnapshot) -> Arc<DeviceNames> {
        let mut cached = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((generation, names)) = cached.as_ref()
            && *generation == snapshot.generation()
        {
            return names.clone();
        }
        let (names, left_out) = DeviceNames::of(snapshot.real());
        // Logged once per snapshot: the slices and claims of this one leave
        // these devices out.
        for (id, holder) in left_out {
            tracing::error!(driver = %self.name, device = %id, name_taken_by = %holder, "device left out of the ResourceSlices: its slice device name is another device's");
        }
        let names = Arc::new(names);
        *cached = Some((snapshot.generation(), names.clone()));
        names
    }

    /// Prepares `claim` (or answers as it was prepared before).
    ///
    /// # Errors
    /// Why the claim cannot be prepared, naming it; nothing was prepared.
    pub async fn prepare(&self, claim: &ClaimRef) -> Result<Vec<PreparedDevice>, String> {
        let started = Instant::now();
        let result = self.prepare_timed(claim).await;
        self.metrics.prepared(
            started.elapsed(),
            if result.is_ok() { "ok" } else { "error" },
        );
        match &result {
            Ok(devices) => {
                tracing::info!(driver = %self.name, claim = %claim, devices = devices.len(), "claim prepared")
            }
            Err(error) => {
                tracing::warn!(driver = %self.name, claim = %claim, cause = %error, "claim not prepared")
            }
        }
        result
    }

    async fn prepare_timed(&self, claim: &ClaimRef) -> Result<Vec<PreparedDevice>, String> {
        if let Some(prepared) = self.checkpoint.lock().await.get(&claim.uid) {
            return Ok(prepared.devices.clone());
        }
        // The slow API call before taking the lock.
        let fetched = self.fetch(claim).await?;
        let mut checkpoint = self.checkpoint.lock().await;
        if let Some(prepared) = checkpoint.get(&claim.uid) {
            return Ok(prepared.devices.clone());
        }
        let prepared = self.prepare_fetched(claim, &fetched).await?;
        let devices = prepared.devices.clone();
        let spec_file = prepared.spec_file.clone();
        if let Err(error) = checkpoint.insert(claim.uid.clone(), prepared) {
            if let Some(file) = spec_file {
                let _ = self.cdi.remove_file(&file);
            }
            return Err(format!("claim {claim}: {error}"));
        }
        self.metrics.set_prepared_claims(checkpoint.len());
        Ok(devices)
    }

    /// Unprepares `claim`: its spec removed, then forgotten. A claim this
    /// driver never prepared (or already unprepared) is done.
    ///
    /// # Errors
    /// The spec or the checkpoint cannot be written; the claim stays prepared.
    pub async fn unprepare(&self, claim: &ClaimRef) -> Result<(), String> {
        let started = Instant::now();
        let result = self.unprepare_timed(claim).await;
        self.metrics.unprepared(
            started.elapsed(),
            if result.is_ok() { "ok" } else { "error" },
        );
        if let Err(error) = &result {
            tracing::warn!(driver = %self.name, claim = %claim, cause = %error, "claim not unprepared");
        }
        result
    }

    async fn unprepare_timed(&self, claim: &ClaimRef) -> Result<(), String> {
        let mut checkpoint = self.checkpoint.lock().await;
        let Some(prepared) = checkpoint.get(&claim.uid) else {
            return Ok(());
        };
        let snapshot = self.snapshots.borrow().clone();
        let asked = Claim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            uid: claim.uid.clone(),
            requests: prepared.requests.clone(),
        };
        snapshot
            .backend()
            .unprepare(snapshot.kind(), &asked)
            .await
            .map_err(|e| format!("claim {claim}: the module's unprepare failed: {e}"))?;
        if let Some(file) = &prepared.spec_file {
            self.cdi
                .remove_file(file)
                .map_err(|e| format!("claim {claim}: {e}"))?;
        }
        checkpoint
            .remove(&claim.uid)
            .map_err(|e| format!("claim {claim}: {e}"))?;
        self.metrics.set_prepared_claims(checkpoint.len());
        tracing::info!(driver = %self.name, claim = %claim, "claim unprepared");
        Ok(())
    }

    /// The claim from the API server, checked to be the one kubelet means and
    /// allocated.
    async fn fetch(&self, claim: &ClaimRef) -> Result<ResourceClaim, String> {
        let fetched = self
            .client
            .claim(&claim.namespace, &claim.name)
            .await
            .map_err(|e| format!("claim {claim}: {e}"))?;
        let uid = fetched.metadata.uid.as_deref().unwrap_or_default();
        if uid != claim.uid {
            return Err(format!(
                "claim {claim}: the API server has UID {uid} under that name (the claim was replaced)"
            ));
        }
        Ok(fetched)
    }

    /// Allocates `fetched`'s devices of this driver and writes its spec.
    async fn prepare_fetched(
        &self,
        claim: &ClaimRef,
        fetched: &ResourceClaim,
    ) -> Result<PreparedClaim, String> {
        let allocation = fetched
            .status
            .as_ref()
            .and_then(|s| s.allocation.as_ref())
            .ok_or_else(|| format!("claim {claim} is not allocated"))?;
        let results = allocation
            .devices
            .as_ref()
            .and_then(|d| d.results.as_deref())
            .unwrap_or_default()
            .iter()
            .filter(|r| r.driver == self.name);
        let snapshot = self.snapshots.borrow().clone();
        let names = self.names_of(&snapshot);
        // One container per request, in the order requests first appear.
        let mut requests: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for result in results {
            if result.pool != self.node {
                return Err(format!(
                    "claim {claim}: device `{}` is in pool `{}`, and this host serves pool `{}` (node {})",
                    result.device, result.pool, self.node, self.node
                ));
            }
            let id = names
                .position(&result.device)
                .map(|at| snapshot.real().devices()[at].id.clone())
                .ok_or_else(|| {
                    format!(
                        "claim {claim}: device `{}` (request `{}`) is not a device of driver {} on node {} any more",
                        result.device, result.request, self.name, self.node
                    )
                })?;
            match requests.iter_mut().find(|(r, _)| *r == result.request) {
                Some((_, devices)) => devices.push((result.device.clone(), id)),
                None => requests.push((result.request.clone(), vec![(result.device.clone(), id)])),
            }
        }
        if requests.is_empty() {
            return Ok(PreparedClaim {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                spec_file: None,
                devices: Vec::new(),
                requests: Vec::new(),
            });
        }
        let configs = allocation
            .devices
            .as_ref()
            .and_then(|d| d.config.as_deref())
            .unwrap_or_default();
        let asked = Claim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            uid: claim.uid.clone(),
            requests: requests
                .iter()
                .map(|(request, devices)| {
                    Ok(ClaimRequest {
                        name: request.clone(),
                        device_ids: devices.iter().map(|(_, id)| id.clone()).collect(),
                        config: opaque_config(&self.name, configs, request)
                            .map_err(|e| format!("claim {claim}: {e}"))?,
                    })
                })
                .collect::<Result<_, String>>()?,
        };
        let containers: Vec<Vec<&str>> = requests
            .iter()
            .map(|(_, devices)| devices.iter().map(|(_, id)| id.as_str()).collect())
            .collect();
        let plan = snapshot
            .plan(&containers)
            .map_err(|e| format!("claim {claim}: {}", request_error(&e, &requests)))?;
        let answers = snapshot
            .prepare(&plan, &asked)
            .await
            .map_err(|e| format!("claim {claim}: the module could not prepare it: {e}"))?;
        if answers.len() != requests.len() {
            return Err(format!(
                "claim {claim}: the module answered {} allocations for {} requests",
                answers.len(),
                requests.len()
            ));
        }
        let mut spec_devices = Vec::new();
        let mut devices = Vec::new();
        for ((request, request_devices), answer) in requests.iter().zip(answers) {
            if !answer.annotations.is_empty() {
                let keys: Vec<&str> = answer.annotations.keys().map(String::as_str).collect();
                return Err(format!(
                    "claim {claim}: the module answered request `{request}` with annotations ({}), which DRA cannot hand to a container (CDI carries no container annotations); serve this kind through the device-plugin API, or configure the module to leave them out",
                    keys.join(", ")
                ));
            }
            let edits = cdi::edits(&answer);
            let mut cdi_ids = Vec::new();
            if !edits.is_empty() {
                let name = format!("{}-{}", claim.uid, request.replace('/', "-"));
                cdi_ids.push(format!("{}={name}", self.cdi_kind));
                spec_devices.push((name, edits));
            }
            cdi_ids.extend(answer.cdi_devices.iter().cloned());
            // kubelet matches a container's requests by the top-level name.
            let top = request.split('/').next().unwrap_or(request).to_string();
            for (device, _) in request_devices {
                devices.push(PreparedDevice {
                    requests: vec![top.clone()],
                    pool: self.node.clone(),
                    device: device.clone(),
                    cdi_ids: cdi_ids.clone(),
                });
            }
        }
        let spec_file = match cdi::claim_spec(&self.cdi_kind, &claim.uid, spec_devices) {
            Some(spec) => {
                let file = cdi::claim_file_name(&self.name, &claim.uid);
                self.cdi
                    .write_file(file.clone(), &spec)
                    .map_err(|e| format!("claim {claim}: {e}"))?;
                Some(file)
            }
            None => None,
        };
        Ok(PreparedClaim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            spec_file,
            devices,
            requests: asked.requests,
        })
    }
}

/// The opaque configuration for `driver` that applies to `request`, each as
/// JSON text, in order of precedence: the DeviceClass's (`FromClass`) first,
/// then the claim's (`FromClaim`), each in the order the allocation lists
/// them, as upstream's drivers apply them. An entry applies when it names no
/// requests, the request, or (for `request/subrequest`) its main request.
///
/// # Errors
/// An entry of another source than these two.
fn opaque_config(
    driver: &str,
    configs: &[DeviceAllocationConfiguration],
    request: &str,
) -> Result<Vec<String>, String> {
    let main = request.split('/').next().unwrap_or(request);
    let applies = |c: &DeviceAllocationConfiguration| {
        c.requests
            .as_deref()
            .is_none_or(|names| names.is_empty() || names.iter().any(|n| n == request || n == main))
    };
    let mut ordered = Vec::new();
    for source in ["FromClass", "FromClaim"] {
        for config in configs.iter().filter(|c| c.source == source) {
            let Some(opaque) = config.opaque.as_ref().filter(|o| o.driver == driver) else {
                continue;
            };
            if applies(config) {
                ordered.push(opaque.parameters.0.to_string());
            }
        }
    }
    if let Some(other) = configs
        .iter()
        .find(|c| c.source != "FromClass" && c.source != "FromClaim")
        && other.opaque.as_ref().is_some_and(|o| o.driver == driver)
    {
        return Err(format!(
            "its allocation has configuration for this driver from source `{}`, which this host does not know (FromClass, FromClaim)",
            other.source
        ));
    }
    Ok(ordered)
}

/// A plan's error in the claim's terms: requests by name, devices by id.
fn request_error(error: &RequestError, requests: &[(String, Vec<(String, String)>)]) -> String {
    let request = |at: usize| requests.get(at).map_or("?", |(r, _)| r.as_str());
    match error {
        RequestError::Unhealthy { id, container } => {
            format!(
                "device `{id}` (request `{}`) is unhealthy",
                request(*container)
            )
        }
        RequestError::UnknownDevice { id, container } => format!(
            "device `{id}` (request `{}`) is not served any more",
            request(*container)
        ),
        RequestError::Duplicate { id } => {
            format!("device `{id}` is allocated to the claim more than once")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::resource::v1::OpaqueDeviceConfiguration;
    use k8s_openapi::apimachinery::pkg::runtime::RawExtension;

    use super::*;

    fn config(
        source: &str,
        driver: &str,
        requests: &[&str],
        n: u32,
    ) -> DeviceAllocationConfiguration {
        DeviceAllocationConfiguration {
            source: source.into(),
            requests: (!requests.is_empty())
                .then(|| requests.iter().map(|r| r.to_string()).collect()),
            opaque: Some(OpaqueDeviceConfiguration {
                driver: driver.into(),
                parameters: RawExtension(serde_json::json!({ "n": n })),
            }),
        }
    }

    #[test]
    fn opaque_config_is_the_classs_then_the_claims_for_this_driver_and_request() {
        let configs = [
            config("FromClaim", "d.example.com", &[], 1),
            config("FromClass", "d.example.com", &[], 2),
            config("FromClaim", "other.example.com", &[], 3),
            config("FromClaim", "d.example.com", &["gpu"], 4),
            config("FromClaim", "d.example.com", &["nic"], 5),
            config("FromClass", "d.example.com", &["gpu/small"], 6),
        ];
        assert_eq!(
            opaque_config("d.example.com", &configs, "gpu/small").expect("known sources"),
            [r#"{"n":2}"#, r#"{"n":6}"#, r#"{"n":1}"#, r#"{"n":4}"#]
        );
        assert_eq!(
            opaque_config("d.example.com", &configs, "nic").expect("known sources"),
            [r#"{"n":2}"#, r#"{"n":1}"#, r#"{"n":5}"#]
        );
        assert!(
            opaque_config("x.example.com", &configs, "gpu")
                .expect("known sources")
                .is_empty()
        );
    }

    #[test]
    fn opaque_config_of_an_unknown_source_for_this_driver_is_refused() {
        let configs = [config("FromSomewhere", "d.example.com", &[], 1)];
        let err = opaque_config("d.example.com", &configs, "gpu").expect_err("unknown source");
        assert!(err.contains("FromSomewhere"), "{err}");
        assert!(opaque_config("x.example.com", &configs, "gpu").is_ok());
    }
}
