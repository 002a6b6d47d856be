//! Warm instances: an allocation may run on the instance that answered the one
//! before, but only after a call that returned cleanly; a trap, a missed
//! deadline, output on stdio or an edited configuration means a fresh instance,
//! and one instance answers at most `WARM_CALLS` allocations.
//!
//! The `faulty` test guest counts, in its own memory, the allocations its
//! instance has answered (`ALLOCATIONS`, 1 in a fresh instance), so what the
//! host reused is seen from outside, through kubelet's Allocate.

use std::time::Duration;

use tonic::Code;
use wasm_device_plugin::runtime::guest::WARM_CALLS;
use wdp_tests::{Dirs, Fixture, guests, ids, status_of, test_settings};

const FAULTY: &str = "example.com/faulty";

/// The faulty module with devices `f0` to `f4`, where asking for `f1` traps,
/// `f2` computes past the 300 ms deadline, `f3` prints to stdout and `f4` is
/// refused as an invalid request.
async fn faulty() -> Fixture {
    let dirs = Dirs::new();
    dirs.add_module("faulty", guests::FAULTY);
    dirs.write_manifest(
        "faulty",
        "[config]\ndevices = \"5\"\ntrap-on = \"f1\"\nspin-on = \"f2\"\n\
         print-on = \"f3\"\nrefuse-on = \"f4\"\n",
    );
    let mut settings = test_settings(&dirs.kubelet());
    settings.limits.allocate_deadline = Duration::from_millis(300);
    let fixture = Fixture::start_with(dirs, settings);
    fixture
        .wait_for("faulty listed", |v| ids(v, FAULTY).len() == 5)
        .await;
    fixture
}

/// Allocates `id`; the count of allocations its instance has answered.
async fn allocations(fixture: &Fixture, id: &str) -> u32 {
    let response = fixture
        .kubelet
        .allocate(FAULTY, &[&[id]])
        .await
        .unwrap_or_else(|e| panic!("allocating {id}: {e}"));
    response.container_responses[0]
        .envs
        .get("ALLOCATIONS")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {response:?}"))
}

/// Allocates `id`, which must fail; its gRPC code.
async fn refused(fixture: &Fixture, id: &str) -> Code {
    status_of(fixture.kubelet.allocate(FAULTY, &[&[id]]).await).0
}

#[tokio::test]
async fn allocations_reuse_a_warm_instance() {
    let fixture = faulty().await;
    assert_eq!(allocations(&fixture, "f0").await, 1, "the first is fresh");
    assert_eq!(allocations(&fixture, "f0").await, 2);
    assert_eq!(allocations(&fixture, "f0").await, 3);
    fixture.stop().await;
}

#[tokio::test]
async fn a_trapped_allocation_leaves_no_instance_behind() {
    let fixture = faulty().await;
    assert_eq!(allocations(&fixture, "f0").await, 1);
    assert_eq!(allocations(&fixture, "f0").await, 2);
    assert_eq!(refused(&fixture, "f1").await, Code::Internal);
    assert_eq!(allocations(&fixture, "f0").await, 1, "fresh after the trap");
    fixture.stop().await;
}

#[tokio::test]
async fn an_allocation_past_its_deadline_leaves_no_instance_behind() {
    let fixture = faulty().await;
    assert_eq!(allocations(&fixture, "f0").await, 1);
    assert_eq!(refused(&fixture, "f2").await, Code::DeadlineExceeded);
    assert_eq!(
        allocations(&fixture, "f0").await,
        1,
        "fresh after the deadline"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn an_allocation_that_printed_leaves_no_instance_behind() {
    let fixture = faulty().await;
    assert_eq!(allocations(&fixture, "f0").await, 1);
    assert_eq!(
        allocations(&fixture, "f3").await,
        2,
        "printing is no failure"
    );
    assert_eq!(allocations(&fixture, "f0").await, 1, "fresh after printing");
    fixture.stop().await;
}

#[tokio::test]
async fn a_refused_allocation_keeps_its_instance() {
    let fixture = faulty().await;
    assert_eq!(allocations(&fixture, "f0").await, 1);
    assert_eq!(refused(&fixture, "f4").await, Code::InvalidArgument);
    assert_eq!(
        allocations(&fixture, "f0").await,
        3,
        "the module's own error is an answer, not a fault"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn an_edited_configuration_gets_a_fresh_instance() {
    let fixture = faulty().await;
    assert_eq!(allocations(&fixture, "f0").await, 1);
    assert_eq!(allocations(&fixture, "f0").await, 2);
    fixture
        .set_config(
            "faulty",
            &[("devices", "5"), ("trap-on", "f1"), ("note", "edited")],
        )
        .await;
    assert_eq!(
        allocations(&fixture, "f0").await,
        1,
        "fresh with the new settings"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_warm_instance_answers_at_most_warm_calls_allocations() {
    let fixture = faulty().await;
    for n in 1..=WARM_CALLS {
        assert_eq!(allocations(&fixture, "f0").await, n);
    }
    assert_eq!(
        allocations(&fixture, "f0").await,
        1,
        "retired after {WARM_CALLS}"
    );
    fixture.stop().await;
}
