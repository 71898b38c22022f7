//! Soak: one VM migrated back and forth between in-process hosts, again and again, with
//! faults injected (a connection cut in mid-precopy, a frame edited on the way, a peer
//! without the key ahead of the source). Every migration either completes page for page or
//! fails with the source running; file descriptors, memory and BPF objects stay bounded.
//!
//! The suite runs a short soak; `MIGACCEL_SOAK=100 cargo test --release -p migaccel-tests
//! --test soak -- --nocapture` runs 100 migrations (figures in `docs/testing.md`).
use std::time::Instant;

use accel_user::app::config::{ByteSize, DirtySource, WorkloadKind};
use accel_user::app::session;
use accel_user::wire::frame::FrameKind;
use migaccel_tests::{
    assert_ram_eq, assert_running, config, keyless_auth_init, resume_if_fenced, spawn_receiver as receiver, Cut, Proxy,
    Tamper, Tap,
};

/// What this process holds: open file descriptors, resident memory, BPF programs and maps.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    fds: usize,
    rss_mib: u64,
    /// The anonymous part of RSS (heap, stacks): guest RAM is shared memory.
    anon_mib: u64,
    bpf: usize,
}

impl Usage {
    fn now() -> Usage {
        // Freed heap the allocator keeps for reuse is not held memory: hand it back first,
        // so the figure is what the process still holds.
        // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
        unsafe { libc::malloc_trim(0) };
        let mut u = Usage::default();
        for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            u.fds += 1;
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", e.file_name().to_string_lossy()));
            if info.is_ok_and(|i| i.contains("prog_id:") || i.contains("map_id:") || i.contains("link_id:")) {
                u.bpf += 1;
            }
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let mib = |key: &str| {
            let l = status.lines().find(|l| l.starts_with(key)).unwrap();
            l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() >> 10
        };
        u.rss_mib = mib("VmRSS:");
        u.anon_mib = mib("RssAnon:");
        u
    }
    fn max(self, o: Usage) -> Usage {
        Usage {
            fds: self.fds.max(o.fds),
            rss_mib: self.rss_mib.max(o.rss_mib),
            anon_mib: self.anon_mib.max(o.anon_mib),
            bpf: self.bpf.max(o.bpf),
        }
    }
}

/// Flip a byte of the first EndOfRound on the way: the destination refuses it by its seal.
fn edit_end_of_round() -> Tamper {
    Box::new(|k, n, p: &mut [u8]| {
        if k == FrameKind::EndOfRound && n == 0 {
            p[0] ^= 1;
        }
    })
}

#[test]
fn migrations_back_and_forth_with_faults_stay_bounded() {
    let n: usize = std::env::var("MIGACCEL_SOAK").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut c = config(WorkloadKind::Ab, DirtySource::Ebpf);
    c.guest.ram = ByteSize(64 << 20);
    c.migration.downtime_target_ms = 1;
    c.migration.min_rounds = 2;
    c.migration.max_rounds = 4;
    c.migration.io_timeout_ms = 3000;
    let t0 = Instant::now();
    let mut src = session::boot_source(&c).unwrap();
    let (mut done, mut failed) = (0usize, 0usize);
    let mut base = None;
    let mut peak = Usage::default();
    for i in 0..n {
        // Faults on one connection (the proxies take one); plain rounds use two data streams.
        let fault = i % 4;
        let mut cfg = c.clone();
        cfg.migration.streams = if fault == 0 { 2 } else { 1 };
        let (addr, t) = receiver(&cfg);
        let res = match fault {
            1 => {
                let p = Proxy::start(addr, Cut::AtFrame(FrameKind::Pages, 3));
                session::send(&cfg, &src, &p.addr, &mut |_| {})
            }
            2 => {
                let tap = Tap::start(addr, Some(edit_end_of_round()));
                session::send(&cfg, &src, &tap.addr, &mut |_| {})
            }
            _ => {
                // A peer without the key that starts the handshake first and stalls.
                let _peer = (fault == 3).then(|| keyless_auth_init(&addr));
                session::send(&cfg, &src, &addr, &mut |_| {})
            }
        };
        let (r, rres) = t.join().unwrap();
        match res {
            Ok(_) => {
                let got = rres.unwrap_or_else(|e| panic!("migration {i}: the source finished, the destination: {e}"));
                assert_ram_eq(&src.ram().snapshot(), &got.snapshot.unwrap_or_default(), &format!("migration {i}"));
                let m = r.into_machine().expect("a received VM");
                assert_running(&m);
                // The received VM migrates on, its dirty pages again from a fresh BPF probe.
                session::attach_ebpf(&m).unwrap();
                src = m;
                done += 1;
            }
            Err(e) => {
                assert!(fault == 1 || fault == 2, "migration {i} (no fault injected) failed: {e}");
                resume_if_fenced(&e, &src);
                assert!(src.is_running(), "migration {i}: the source keeps running after {e}");
                assert!(!r.machine().is_some_and(|m| m.is_running()), "migration {i}: the destination must not run");
                failed += 1;
            }
        }
        let u = Usage::now();
        // After two migrations every kind of buffer and thread pool has been used once.
        if i == 1 {
            base = Some(u);
        }
        if (i + 1) % 10 == 0 {
            println!(
                "after {} migrations: fds {}, RSS {} MiB ({} MiB heap and stacks), BPF objects {}",
                i + 1,
                u.fds,
                u.rss_mib,
                u.anon_mib,
                u.bpf
            );
        }
        peak = peak.max(u);
    }
    let end = Usage::now();
    let base = base.unwrap_or(end);
    println!(
        "soak: {n} migrations in {:.0} s: {done} completed, {failed} failed by injected faults; \
         fds {} -> {} (peak {}), RSS {} -> {} MiB (peak {}), BPF objects {} -> {} (peak {})",
        t0.elapsed().as_secs_f64(),
        base.fds,
        end.fds,
        peak.fds,
        base.rss_mib,
        end.rss_mib,
        peak.rss_mib,
        base.bpf,
        end.bpf,
        peak.bpf
    );
    assert!(done >= n / 2, "{done} of {n} completed");
    assert!(end.fds <= base.fds + 4, "file descriptors grow: {} after migration 2, {} at the end", base.fds, end.fds);
    assert!(end.bpf <= base.bpf, "BPF objects grow: {} after migration 2, {} at the end", base.bpf, end.bpf);
    // A VM's RAM (64 MiB) leaked per migration would exceed this within a few migrations.
    assert!(
        end.rss_mib <= base.rss_mib + 192,
        "resident memory grows: {} MiB after migration 2, {} MiB at the end",
        base.rss_mib,
        end.rss_mib
    );
}
