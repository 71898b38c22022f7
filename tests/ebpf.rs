//! eBPF observation: the BPF dirty bitmap equals the KVM ring round after round, migrations
//! in `ebpf` mode pass every correctness check, the page-state programs handle synthetic
//! inputs, failures say why, and nothing stays loaded after exit or a crash.
use std::process::Command;
use std::time::Duration;

use accel_ebpf::{
    DirtyProbe, EbpfError, PageStateKind, PageStates, Target, ATTR_ENCRYPTED, PSF_HUGE, PSF_OVERFLOW, PSF_UNALIGNED,
    PSF_ZERO_PAGES,
};
use accel_user::app::config::{DirtySource, WorkloadKind};
use accel_user::app::session;
use embedded_vmm::vmm::{GuestSpec, Machine, Workload};
use kvm_hooks::dirty::DirtySet;
use kvm_hooks::vm::DirtyPreference;
use migaccel_tests::{config, wait_for_reports};

/// The leftover check counts BPF objects system-wide: tests in this file run one at a time.
static LEFTOVER_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    LEFTOVER_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A paused 128 MiB oracle guest whose dirty ring holds `ring_bytes`, with the dirty probe
/// attached to its vCPU threads.
fn oracle_with_probe(ring_bytes: u32) -> (Machine, DirtyProbe) {
    let spec = GuestSpec { ram_bytes: 128 << 20, vcpus: 2, workload: Workload::Oracle { pages: 16384 } };
    let m = Machine::boot(spec, DirtyPreference::Ring { bytes: ring_bytes }).unwrap();
    let probe =
        DirtyProbe::attach(Target::Threads(m.vcpu_tids()), &m.ram().slot_ranges()).expect("attach the dirty probe");
    (m, probe)
}

#[test]
fn bpf_bitmap_equals_ring_round_after_round() {
    let _g = serial();
    // A small ring fills often: ring-full exits are part of what must match.
    let (m, probe) = oracle_with_probe(16 << 10);
    m.dirty().start().unwrap();
    probe.harvest(|_| {});
    let (mut total, mut rounds, mut iter) = (0u64, 0u32, 1u64);
    while total < 1_000_000 {
        iter += 1;
        m.set_oracle_iteration(iter).unwrap();
        m.resume().unwrap();
        // Two batches of 1024 writes per vCPU: about 2000 distinct pages, more than the
        // 1024-entry ring holds, so every round has ring-full exits whatever the host's speed.
        wait_for_reports(&m, 2);
        m.pause().unwrap();
        let ring = m.dirty().take().unwrap();
        let mut bpf = DirtySet::new(m.ram().pages());
        probe.harvest(|g| {
            bpf.insert(g);
        });
        let mut ring_set = DirtySet::new(m.ram().pages());
        for &g in &ring {
            ring_set.insert(g);
        }
        let only_ring: Vec<u64> = ring.iter().copied().filter(|&g| !bpf.contains(g)).take(5).collect();
        let only_bpf: Vec<u64> = bpf.iter().filter(|&g| !ring_set.contains(g)).take(5).collect();
        assert!(
            only_ring.is_empty() && only_bpf.is_empty(),
            "round {rounds}: ring-only {only_ring:?}, bpf-only {only_bpf:?}"
        );
        total += ring.len() as u64;
        rounds += 1;
    }
    let st = probe.stats().unwrap();
    assert!(total >= 1_000_000, "only {total} dirtied pages in {rounds} rounds");
    assert_eq!(st.lost, 0, "{st:?}");
    assert!(m.dirty().stats.ring_full_exits.load(std::sync::atomic::Ordering::Relaxed) > 0, "the ring never filled");
}

#[test]
fn migrations_with_ebpf_dirty_source() {
    let _g = serial();
    for w in [WorkloadKind::Ab, WorkloadKind::Hot, WorkloadKind::Idle] {
        let mut c = config(w, DirtySource::Ebpf);
        if w != WorkloadKind::Idle {
            c.migration.downtime_target_ms = 1;
            c.migration.min_rounds = 3;
            c.migration.max_rounds = 5;
        }
        let out = session::demo(&c, &mut |_| {}).unwrap_or_else(|e| panic!("{w:?}: {e:#}"));
        let r = &out.report;
        assert!(r.verification.ok(), "{w:?}: {:?}", r.verification);
        assert!(r.source.dirty_mode.starts_with("ebpf"), "{}", r.source.dirty_mode);
        if w != WorkloadKind::Idle {
            assert!(r.source.precopy_rounds.len() >= 3, "{w:?}: {} rounds", r.source.precopy_rounds.len());
        }
    }
}

fn map_gpa(gpa: u64, npages: u64, attrs: u64) -> Vec<accel_ebpf::PageStateEvent> {
    accel_ebpf::test_run_page_state("map_gpa_range", &[12, gpa, npages, attrs]).unwrap().0
}

#[test]
fn page_state_program_with_synthetic_inputs() {
    let _g = serial();
    let ok = map_gpa(0x20_0000, 16, ATTR_ENCRYPTED);
    assert_eq!(ok.len(), 1);
    assert_eq!(
        (ok[0].kind, ok[0].flags, ok[0].gpa, ok[0].npages, ok[0].attrs),
        (PageStateKind::MapGpaRange, 0, 0x20_0000, 16, ATTR_ENCRYPTED)
    );
    assert_eq!(ok[0].tgid, std::process::id());
    assert_eq!(map_gpa(0x20_0010, 1, 0)[0].flags, PSF_UNALIGNED);
    assert_eq!(map_gpa(0x20_0000, 0, 0)[0].flags, PSF_ZERO_PAGES);
    assert_eq!(map_gpa(0, 1 << 40, 0)[0].flags, PSF_HUGE);
    assert_eq!(map_gpa(!0xfff, 2, 0)[0].flags, PSF_OVERFLOW);
    // Another hypercall number is not a page-state change.
    let (ev, st) = accel_ebpf::test_run_page_state("map_gpa_range", &[5, 0x1000, 1, 0]).unwrap();
    assert!(ev.is_empty() && st.page_state_events == 0);

    // Applying them: only the valid, in-range one changes state.
    let mut ps = PageStates::new(1024);
    assert!(ps.is_private(3), "pages start private");
    let shared = map_gpa(0x1000, 4, 0);
    ps.apply(&shared[0]).unwrap();
    assert!(!ps.is_private(1) && !ps.is_private(4) && ps.is_private(5));
    ps.apply(&map_gpa(0x2000, 1, ATTR_ENCRYPTED)[0]).unwrap();
    assert!(ps.is_private(2));
    assert!(ps.apply(&map_gpa(1023 * 4096, 2, 0)[0]).unwrap_err().contains("outside guest RAM"));
    assert!(ps.apply(&map_gpa(0x1010, 1, 0)[0]).is_err());
    assert!(ps.apply(&map_gpa(0, 1 << 40, 0)[0]).is_err());
    assert_eq!((ps.applied, ps.rejected), (2, 3));
    // The engine's view: shared pages 1, 3, 4 (2 went back to private); nothing past page 1023.
    let mut bits = PageStates::new(100);
    bits.apply(&map_gpa(0x1000, 4, 0)[0]).unwrap();
    bits.apply(&map_gpa(0x2000, 1, ATTR_ENCRYPTED)[0]).unwrap();
    bits.apply(&map_gpa(96 * 4096, 4, 0)[0]).unwrap();
    assert_eq!(bits.shared_bitmap(), vec![0b11010, 0xf << 32]);
    assert_eq!(PageStates::new(100).shared_bitmap(), vec![0, 0], "all private at start, no bits past the end");
}

#[test]
fn vmgexit_program_survives_a_bad_ghcb_pointer() {
    let _g = serial();
    let (ev, st) = accel_ebpf::test_run_page_state("vmgexit_psc", &[3, 0xdead_0000_0000]).unwrap();
    assert!(ev.is_empty());
    assert_eq!(st.ghcb_unreadable, 1, "{st:?}");
}

#[test]
fn dirty_program_with_synthetic_inputs() {
    let _g = serial();
    let slots = [(0, 1024), (4096, 512)];
    let (pages, st) = accel_ebpf::test_run_dirty(&slots, 1, 10).unwrap();
    assert_eq!((pages, st.pushes, st.lost), (vec![4106], 1, 0));
    let (pages, st) = accel_ebpf::test_run_dirty(&slots, 1, 512).unwrap();
    assert!(pages.is_empty() && st.lost == 1, "offset past the slot is lost, not written");
    let (pages, st) = accel_ebpf::test_run_dirty(&slots, 7, 0).unwrap();
    assert!(pages.is_empty() && st.lost == 1, "unknown slot");
    let (pages, st) = accel_ebpf::test_run_dirty(&slots, 1 << 16, 0).unwrap();
    assert!(pages.is_empty() && st.lost == 1, "address space 1");
}

/// The bench's run-time figures come from the kernel's BPF accounting: while it is on, the
/// attached probe's run count covers at least every push it recorded, and time advances.
#[test]
fn kernel_counts_the_probes_runs() {
    let _g = serial();
    let (m, probe) = oracle_with_probe(64 << 10);
    let stats = accel_ebpf::RunTimeStats::enable().expect("BPF_ENABLE_STATS");
    let (r0, p0) = (probe.run_time().unwrap(), probe.stats().unwrap().pushes);
    m.dirty().start().unwrap();
    for iter in 2..12 {
        m.set_oracle_iteration(iter).unwrap();
        m.resume().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        m.pause().unwrap();
        m.dirty().take().unwrap();
    }
    let (r1, p1) = (probe.run_time().unwrap(), probe.stats().unwrap().pushes);
    drop(stats);
    let (runs, pushes) = (r1.runs - r0.runs, p1 - p0);
    assert!(pushes > 1000, "the guest dirtied only {pushes} pages");
    assert!(runs >= pushes, "{runs} counted runs < {pushes} recorded pushes");
    assert!(r1.time > r0.time, "{r0:?} -> {r1:?}");
}

#[test]
fn missing_tracepoint_is_named() {
    let _g = serial();
    let e = accel_ebpf::ensure_tracepoints(&["kvm_no_such_event"]).unwrap_err();
    assert!(matches!(e, EbpfError::TracepointMissing("kvm_no_such_event")));
    assert!(e.to_string().contains("kvm:kvm_no_such_event does not exist"), "{e}");
}

/// Without privileges the load fails with a reason; the engine refuses ebpf mode.
#[test]
fn unprivileged_load_fails_with_a_reason() {
    let _g = serial();
    if std::env::var_os("MIGACCEL_UNPRIVILEGED_CHILD").is_some() {
        let e = accel_ebpf::test_run_page_state("map_gpa_range", &[12, 0, 1, 0]).unwrap_err();
        println!("CHILD-ERROR: {e}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(&exe)
        .args(["--exact", "unprivileged_load_fails_with_a_reason", "--nocapture"])
        .env("MIGACCEL_UNPRIVILEGED_CHILD", "1")
        .output()
        .expect("setpriv (util-linux)");
    let out = String::from_utf8_lossy(&o.stdout);
    // libtest may print "test … ... " on the same line before the child's own output.
    let line = out
        .lines()
        .find_map(|l| l.find("CHILD-ERROR").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("child output: {out} {}", String::from_utf8_lossy(&o.stderr)));
    assert!(line.contains("loading the BPF object failed") && line.contains("root or CAP_BPF"), "{line}");
}

fn bpf_objects(kind: &str) -> usize {
    let o = Command::new("bpftool").args([kind, "show", "-j"]).output().expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Array(vec![]));
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|p| {
                    p["name"].as_str().is_some_and(|n| ["dirty_ring_push", "map_gpa_range", "vmgexit_psc"].contains(&n))
                })
                .count()
        })
        .unwrap_or(0)
}

fn bpf_links() -> usize {
    let o = Command::new("bpftool").args(["link", "show", "-j"]).output().expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Array(vec![]));
    v.as_array()
        .map(|a| a.iter().filter(|l| l["tp_name"].as_str().is_some_and(|n| n.starts_with("kvm_"))).count())
        .unwrap_or(0)
}

/// `migaccel` in ebpf mode leaves no program or link behind, neither after a clean exit
/// nor after SIGKILL (nothing is pinned; the kernel frees them with the last fd).
#[test]
fn nothing_left_behind_after_exit_or_crash() {
    let _g = serial();
    // Programs of earlier tests are freed asynchronously once their fds close: take the
    // baseline when the counts have settled, and fail only on more objects than before.
    let (p0, l0) = settled();
    let bin = migaccel_tests::migaccel_bin();
    let ok = Command::new(&bin)
        .args(["demo", "--ram", "64MiB", "--workload", "idle", "--dirty-source", "ebpf"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let (p1, l1) = settled();
    assert!(p1 <= p0 && l1 <= l0, "after a clean exit: progs {p1} (was {p0}), links {l1} (was {l0})");
    let mut child = Command::new(&bin)
        .args(["demo", "--ram", "64MiB", "--workload", "ab", "--dirty-source", "ebpf", "--warmup-ms", "5000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until its probe is attached, then kill it.
    let mut seen = false;
    for _ in 0..200 {
        if bpf_links() > l0 {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(seen, "the probe never attached");
    for _ in 0..100 {
        if bpf_objects("prog") <= p0 && bpf_links() <= l0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("after SIGKILL: progs {} (was {p0}), links {} (was {l0})", bpf_objects("prog"), bpf_links());
}

/// Counts of our programs and KVM links once they stop changing (at most ~3 s).
fn settled() -> (usize, usize) {
    let mut last = (bpf_objects("prog"), bpf_links());
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        let now = (bpf_objects("prog"), bpf_links());
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// The engine refuses ebpf mode when BPF cannot load (root without capabilities keeps
/// /dev/kvm, loses CAP_BPF): one error line naming the mode and the cause, no migration.
#[test]
fn engine_refuses_ebpf_mode_without_bpf() {
    let _g = serial();
    let o = Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all"])
        .arg(migaccel_tests::migaccel_bin())
        .args(["demo", "--ram", "64MiB", "--workload", "idle", "--dirty-source", "ebpf"])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("dirty_source = \"ebpf\" refused") && err.contains("loading the BPF object failed"), "{err}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("verification"), "no migration may run");
    // The same for page states: no silent fallback to the VMM's record.
    let key = std::env::temp_dir().join(format!("migaccel-test-nobpf-{}.key", std::process::id()));
    std::fs::write(&key, std::array::from_fn::<u8, 32, _>(|i| 0x42 ^ (i as u8).wrapping_mul(0x3b))).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let o = Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all"])
        .arg(migaccel_tests::migaccel_bin())
        .args(["demo", "--ram", "64MiB", "--workload", "canary", "--page-state-source", "ebpf"])
        .arg("--confidential-key")
        .arg(&key)
        .output()
        .expect("setpriv (util-linux)");
    let _ = std::fs::remove_file(&key);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("page_state_source = \"ebpf\" refused") && err.contains("loading the BPF object failed"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("verification"), "no migration may run");
}

/// A real guest announces page-state changes through the VMM's port; each request is
/// replayed through the attached BPF program and reaches the page-state map by the ring
/// buffer and drain thread. The map the BPF path built equals the VMM's own record.
#[test]
fn guest_page_state_requests_cross_check_the_bpf_map() {
    let _g = serial();
    use std::sync::{Arc, Mutex};
    let spec = GuestSpec { ram_bytes: 64 << 20, vcpus: 2, workload: Workload::PageState };
    let m = Machine::boot(spec, DirtyPreference::Ring { bytes: 64 << 10 }).unwrap();
    let pages = m.ram().pages();
    let probe = Arc::new(accel_ebpf::PageStateProbe::attach(Target::Process(std::process::id()), pages).unwrap());
    let direct = Arc::new(Mutex::new(PageStates::new(pages)));
    let (p, d) = (probe.clone(), direct.clone());
    let ordered = Arc::new(Mutex::new(()));
    m.set_page_state_hook(Arc::new(move |r| {
        // One at a time, so both maps see the requests in the same order.
        let _o = ordered.lock().unwrap();
        let ev = accel_ebpf::PageStateEvent {
            kind: PageStateKind::MapGpaRange,
            flags: 0,
            gpa: r.gpa,
            npages: r.npages,
            attrs: r.attrs,
            tgid: 0,
            vcpu: r.vcpu,
        };
        d.lock().unwrap().apply(&ev).unwrap();
        p.replay_map_gpa_range(r.gpa, r.npages, r.attrs).unwrap();
    }));
    m.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    m.pause().unwrap();
    let (handled, refused) = m.page_state_counts();
    assert!(handled > 100, "only {handled} requests");
    assert_eq!(refused, 0);
    // Let the drain thread catch up.
    for _ in 0..100 {
        if probe.states().lock().unwrap().applied == handled {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let bpf = probe.states().lock().unwrap();
    let direct = direct.lock().unwrap();
    assert_eq!(
        bpf.applied,
        handled,
        "every request reached the BPF map (dropped: {:?})",
        probe.stats().map(|s| s.page_state_dropped)
    );
    let diff: Vec<u64> = (0..pages).filter(|&g| bpf.is_private(g) != direct.is_private(g)).take(5).collect();
    assert!(diff.is_empty(), "page states differ at {diff:?}");
    let shared = (0..pages).filter(|&g| !bpf.is_private(g)).count();
    assert!(shared > 0, "the guest made some pages shared");
}

/// `migaccel watch` on VMs that other processes own: it counts the dirty-ring pushes of the
/// watched VMM and no one else's, notices when that process exits, and refuses a process
/// that holds no VM or does not exist.
#[test]
fn watch_vms_that_other_processes_own() {
    let _g = serial();
    use std::process::Stdio;
    let bin = migaccel_tests::migaccel_bin();
    let run = |workload: &str| {
        Command::new(&bin)
            // Pushes exist only with the ring on and logging active (QEMU: dirty-ring-size and
            // calc-dirty-rate).
            .args(["run", "--ram", "64MiB", "--workload", workload, "--seconds", "30"])
            .args(["--dirty-source", "ring", "--dirty-log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("migaccel run")
    };
    let (mut busy, mut idle) = (run("ab"), run("idle"));
    for p in [busy.id(), idle.id()] {
        for _ in 0..200 {
            if kvm_hooks::process::kvm_vms(p).unwrap_or(0) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(Duration::from_millis(500)); // warm-up: the guests run
    let watch = |pid: u32, secs: &str| {
        Command::new(&bin)
            .args(["watch", "--pid", &pid.to_string(), "--seconds", secs, "--report", "json"])
            .output()
            .expect("migaccel watch")
    };
    let json = |o: &std::process::Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).expect("JSON report")
    };
    let b = json(&watch(busy.id(), "1"));
    assert_eq!(b["vms"], 1);
    assert!(b["pushes"].as_u64().unwrap() > 10_000, "{b}");
    assert_eq!(b["lost"], 0);
    assert_eq!(b["slots"][0]["slot"], 0, "the guest's RAM is memslot 0: {b}");
    assert_eq!(b["exited"], false);
    // The idle guest writes no memory; the busy one keeps dirtying pages meanwhile, and the
    // process filter keeps them out.
    let i = json(&watch(idle.id(), "1"));
    assert_eq!(i["pushes"], 0, "{i}");
    // Watching ends when the process does.
    let w = Command::new(&bin)
        .args(["watch", "--pid", &busy.id().to_string(), "--seconds", "60", "--report", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    busy.kill().unwrap();
    busy.wait().unwrap();
    let e = json(&w.wait_with_output().unwrap());
    assert_eq!(e["exited"], true, "{e}");
    assert!(e["pushes"].as_u64().unwrap() > 0);
    idle.kill().unwrap();
    idle.wait().unwrap();
    // A process without a VM, and no process at all.
    let mut sleeper = Command::new("sleep").arg("10").spawn().unwrap();
    let o = watch(sleeper.id(), "1");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("holds no KVM VM"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = watch(1 << 22, "1");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("No such process"), "{}", String::from_utf8_lossy(&o.stderr));
}
