//! Confidential migrations through the in-guest Migration Handler on an extra vCPU at both
//! ends: private pages and vCPU state travel only as MH-encrypted blobs.
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use accel_user::config::{Config, DirtySource, WorkloadKind};
use accel_user::protocol::FrameKind;
use accel_user::session;
use migaccel_tests::{assert_running, config, Proxy};

/// A 0600 key file with `byte` repeated.
fn key_file(tag: &str, byte: u8) -> PathBuf {
    let p = std::env::temp_dir().join(format!("migaccel-test-{tag}-{}.key", std::process::id()));
    std::fs::write(&p, [byte; 32]).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn confidential(workload: WorkloadKind, tag: &str) -> Config {
    let mut c = config(workload, DirtySource::Ring);
    c.confidential.enabled = true;
    c.confidential.key_file = Some(key_file(tag, 0x5c));
    c.migration.downtime_target_ms = 1;
    c.migration.max_rounds = 5;
    c
}

fn migrate(workload: WorkloadKind) {
    let c = confidential(workload, &format!("{workload:?}"));
    let out = session::demo(&c, &mut |_| {}).expect("confidential migration succeeds");
    let r = &out.report;
    let v = &r.verification;
    assert!(v.mismatched_pages.is_empty(), "destination RAM differs at pages {:?}", v.mismatched_pages);
    assert!(v.ab_invariant_error.is_none(), "{:?}", v.ab_invariant_error);
    assert!(v.guest_alive, "{:?} -> {:?}", r.destination.progress_at_resume, r.destination.progress_after);
    let rounds = r.source.precopy_rounds.len();
    assert!(rounds >= 3, "only {rounds} precopy rounds");
    let exported = r.source.mh_exported.expect("the report counts MH exports");
    let written: u64 = r.source.precopy_rounds.iter().map(|x| x.pages - x.zero_pages).sum();
    assert!(exported >= written, "{exported} pages through the MH, {written} data pages sent");
    // One Blobs frame (24-byte header, 8-byte prefix) of whole encrypted VMSA pages.
    let sb = r.source.vcpu_state_bytes;
    assert!(sb > 32 && (sb - 32) % 4136 == 0, "vCPU state travelled as {sb} bytes, not as blobs");
}

#[test]
fn ab_confidential() {
    migrate(WorkloadKind::Ab);
}

#[test]
fn hot_confidential() {
    migrate(WorkloadKind::Hot);
}
