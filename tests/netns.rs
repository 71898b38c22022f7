//! Two "hosts": `migaccel receive` and `migaccel send` as separate processes in two network
//! namespaces joined by a veth pair. RAM dumps from both sides are compared page by page.
use std::io::BufRead;
use std::process::{Command, Stdio};

use embedded_vmm::vmm::{GuestSpec, Workload};
use migaccel_tests::{migaccel_bin, NetnsPair};

fn two_hosts(tag: &str, workload: &str, dirty: &str, hot: Option<Workload>) {
    two_hosts_with(tag, workload, dirty, hot, &[], &[]);
}

/// `transport` flags go to both ends, `recv_only` to the receiver.
fn two_hosts_with(
    tag: &str,
    workload: &str,
    dirty: &str,
    hot: Option<Workload>,
    transport: &[&str],
    recv_only: &[&str],
) {
    let extra: Vec<String> = match hot {
        Some(Workload::Hot { working_set, pages_per_sec }) => {
            vec!["--hot-working-set".into(), working_set.to_string(), "--hot-rate".into(), pages_per_sec.to_string()]
        }
        _ => vec![],
    };
    let ns = NetnsPair::create(tag).expect("create network namespaces (needs root and iproute2)");
    let dir = std::env::temp_dir().join(format!("migaccel-netns-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (sdump, ddump) = (dir.join("src.ram"), dir.join("dst.ram"));
    let listen = format!("{}:47111", ns.dst_ip);
    let bin = migaccel_bin();
    let mut recv = Command::new("ip")
        .args(["netns", "exec", &ns.dst])
        .arg(&bin)
        .args(["receive", "--listen", &listen, "--report", "json", "--dirty-source", dirty, "--dump-memory"])
        .arg(&ddump)
        .arg("--auth-key")
        .arg(migaccel_tests::test_key_file())
        .args(transport)
        .args(recv_only)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(recv.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "receiver: {line}");
    let send = Command::new("ip")
        .args(["netns", "exec", &ns.src])
        .arg(&bin)
        .args([
            "send",
            "--to",
            &listen,
            "--report",
            "json",
            "--ram",
            "128MiB",
            "--workload",
            workload,
            "--dirty-source",
            dirty,
        ])
        .args(["--downtime-ms", "1", "--min-rounds", "3", "--max-rounds", "5", "--dump-memory"])
        .arg(&sdump)
        .arg("--auth-key")
        .arg(migaccel_tests::test_key_file())
        .args(&extra)
        .args(transport)
        .output()
        .unwrap();
    let r = recv.wait_with_output().unwrap();
    assert!(send.status.success(), "send failed: {}", String::from_utf8_lossy(&send.stderr));
    assert!(r.status.success(), "receive failed: {}", String::from_utf8_lossy(&r.stderr));
    let srep: serde_json::Value = serde_json::from_slice(&send.stdout).unwrap();
    let drep: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(drep["guest_alive"], true, "{drep}");
    assert_eq!(drep["prepared_ram"], recv_only.contains(&"--prepare-ram"), "{drep}");
    let rounds = srep["precopy_rounds"].as_array().unwrap().len();
    if workload != "idle" {
        assert!(rounds >= 3, "{rounds} rounds: {srep}");
    }
    let (a, b) = (std::fs::read(&sdump).unwrap(), std::fs::read(&ddump).unwrap());
    assert_eq!(a.len(), 128 << 20);
    let d = accel_user::app::verify::diff_pages(&a, &b, 8);
    assert!(d.is_empty(), "pages differ between hosts: {d:?}");
    // The invariant is checked over the ranges the guest walked.
    let walked = match workload {
        "idle" => Workload::Idle,
        _ => hot.unwrap_or(Workload::Ab),
    };
    let spec = GuestSpec { ram_bytes: 128 << 20, vcpus: 2, workload: walked };
    accel_user::app::verify::check_ab(&spec, &b).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

const HOT: Option<Workload> = Some(Workload::Hot { working_set: 32 << 20, pages_per_sec: 0 });

#[test]
fn ab_between_namespaces_ring() {
    two_hosts("abr", "ab", "ring", None);
}

#[test]
fn ab_between_namespaces_bitmap() {
    two_hosts("abb", "ab", "bitmap", None);
}

#[test]
fn hot_between_namespaces_ring() {
    two_hosts("hotr", "hot", "ring", HOT);
}

#[test]
fn hot_between_namespaces_bitmap() {
    two_hosts("hotb", "hot", "bitmap", HOT);
}

#[test]
fn idle_between_namespaces_ring() {
    two_hosts("idler", "idle", "ring", None);
}

#[test]
fn idle_between_namespaces_bitmap() {
    two_hosts("idleb", "idle", "bitmap", None);
}

#[test]
fn ab_between_namespaces_zerocopy_4_streams() {
    two_hosts_with("zc4", "ab", "ring", None, &["--transport", "zerocopy", "--streams", "4"], &[]);
}

#[test]
fn hot_between_namespaces_auto_2_streams() {
    two_hosts_with("au2", "hot", "ring", HOT, &["--transport", "auto", "--streams", "2"], &[]);
}

#[test]
fn ab_between_namespaces_into_a_prepared_destination() {
    two_hosts_with(
        "prep",
        "ab",
        "ring",
        None,
        &["--transport", "copy", "--streams", "2"],
        &["--prepare-ram", "128MiB"],
    );
}
