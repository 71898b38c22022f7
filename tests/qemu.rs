//! `migaccel watch` on a real QEMU: a VM migaccel does not own. QEMU's own dirty-rate
//! measurement (`calc-dirty-rate`, dirty-ring mode) is the independent reference.
use std::process::Command;
use std::time::Duration;

use migaccel_tests::qemu::{guest_image, Qemu};
use serde_json::{json, Value};

fn watch(pid: u32, secs: &str) -> Value {
    let o = Command::new(migaccel_tests::migaccel_bin())
        .args(["watch", "--pid", &pid.to_string(), "--seconds", secs, "--report", "json"])
        .output()
        .expect("migaccel watch");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("JSON report")
}

/// While QEMU logs dirty pages (`calc-dirty-rate` in dirty-ring mode), `watch` counts the
/// guest's pushes in one memslot at the rate QEMU measures itself; once QEMU stops logging
/// there are none; when QEMU quits, the watch ends.
#[test]
fn watch_a_qemu_guest() {
    let dir = std::env::temp_dir().join(format!("migaccel-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = guest_image(&dir, &Default::default()).unwrap();
    let mut q = Qemu::start(&dir, "qmp", "kvm,dirty-ring-size=4096", 256, &kernel, &[]).unwrap();
    assert_eq!(q.cmd("query-status", json!({})).unwrap()["status"], "running");
    // Past the firmware and the guest's ring-0 setup: the vCPU runs the CPL 3 loop.
    let mut regs = String::new();
    for _ in 0..300 {
        regs = q
            .cmd("human-monitor-command", json!({"command-line": "info registers"}))
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        if regs.contains("CS =0023") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(regs.contains("CS =0023"), "the guest never reached CPL 3:\n{regs}");
    q.cmd("calc-dirty-rate", json!({"calc-time": 3, "mode": "dirty-ring"})).unwrap();
    let w = watch(q.pid(), "2");
    assert_eq!(w["vms"], 1);
    assert_eq!(w["lost"], 0, "{w}");
    let slots = w["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 1, "the guest writes one RAM range, in one memslot: {w}");
    let pushes = w["pushes"].as_u64().unwrap();
    let ours = pushes as f64 / (w["watched_ms"].as_u64().unwrap() as f64 / 1e3);
    // QEMU's own measurement of the same guest, over an overlapping window.
    let mut rate = Value::Null;
    for _ in 0..100 {
        rate = q.cmd("query-dirty-rate", json!({})).unwrap();
        if rate["status"] == "measured" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rate["status"], "measured", "{rate}");
    let theirs = rate["dirty-rate"].as_f64().unwrap() * 256.0; // MB/s -> 4 KiB pages/s
    let r = ours / theirs;
    eprintln!("watch: {ours:.0} pages/s over {pushes} pushes; QEMU calc-dirty-rate: {theirs:.0} pages/s; ratio {r:.3}");
    assert!((0.75..1.33).contains(&r), "watch: {ours:.0} pages/s, QEMU: {theirs:.0} pages/s");
    // Logging is off again: no pushes, though the guest keeps writing.
    let idle = watch(q.pid(), "1");
    assert_eq!(idle["pushes"], 0, "{idle}");
    // The watch ends when QEMU does.
    let pid = q.pid();
    let t = std::thread::spawn(move || watch(pid, "60"));
    std::thread::sleep(Duration::from_millis(700));
    q.quit().unwrap();
    let end = t.join().unwrap();
    assert_eq!(end["exited"], true, "{end}");
    let _ = std::fs::remove_dir_all(&dir);
}
