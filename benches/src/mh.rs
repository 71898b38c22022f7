//! `migaccel-bench mh`: the in-guest Migration Handler path. Export+import throughput through
//! two real MHs (source and destination VMs, extra vCPUs) for batch sizes 1 (the RFC
//! prototype's one-page handshake) to 256 pages per doorbell, next to the same run's
//! single-core AES-256-GCM ceiling (`openssl speed`) and a host memcpy of the same pages
//! (the direct path's per-page work); then polling vs port-I/O kicks; then whole migrations,
//! direct vs confidential, of the same guest.
use crate::results::say;
use std::time::{Duration, Instant};

use accel_user::app::config::{ByteSize, Config, WorkloadKind};
use accel_user::app::session;
use embedded_vmm::guest::DATA_START;
use embedded_vmm::vmm::{GuestSpec, Machine, Workload};
use kvm_hooks::mh::{Blob, Launch, MhHost};
use kvm_hooks::vm::DirtyPreference;
use mh_abi::{Kind, Op, Request};

/// A fixed key with the spread of a random one (key files with few distinct bytes are refused).
const KEY: [u8; 32] = *b"migaccel-bench-mh-key-0123456789";

/// Single-core AES-256-GCM over 16 KiB buffers, bytes/s, from `openssl speed`.
pub(crate) fn openssl_aes_gcm() -> Option<f64> {
    let o = std::process::Command::new("openssl")
        .args(["speed", "-evp", "aes-256-gcm", "-bytes", "16384", "-seconds", "2"])
        .output()
        .ok()?;
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().find(|l| l.starts_with("AES-256-GCM"))?;
    let k: f64 = line.split_whitespace().last()?.trim_end_matches('k').parse().ok()?;
    Some(k * 1000.0)
}

fn vm(dest: bool, ram: u64, spin: u64) -> anyhow::Result<(Machine, MhHost)> {
    vm_lanes(dest, ram, spin, 1)
}

fn vm_lanes(dest: bool, ram: u64, spin: u64, lanes: u32) -> anyhow::Result<(Machine, MhHost)> {
    let spec = GuestSpec { ram_bytes: ram, vcpus: 1, workload: Workload::Idle };
    let mut m = if dest {
        Machine::destination(spec, DirtyPreference::Bitmap)?
    } else {
        Machine::boot(spec, DirtyPreference::Bitmap)?
    };
    m.launch_mh(&Launch { key: KEY, vm_id: 1, spin, zero_records: true, lanes }, Duration::from_secs(10))?;
    let h = m.take_mh().ok_or_else(|| anyhow::anyhow!("no MH"))?;
    Ok((m, h))
}

struct Run {
    pages: u64,
    export: Duration,
    import: Duration,
    total: Duration,
    doorbells: u64,
}

/// Marker blobs of every lane (`op` Begin or End; End in descending lane order, so lane 0
/// closes last) carried from `sh` to `dh`.
fn markers(sh: &mut MhHost, dh: &mut MhHost, op: Op, round: u32) -> anyhow::Result<()> {
    let lanes: Vec<u32> = if op == Op::Begin { (0..sh.lanes()).collect() } else { (0..sh.lanes()).rev().collect() };
    let mut blob = Blob::zeroed();
    for l in lanes {
        sh.run(&[Request { op: op as u16, id: 0, count: 1, slot: 0, gfn: u64::from(l), round }])?;
        sh.read_slot(0, &mut blob)?;
        dh.write_slot(0, &blob)?;
        dh.run(&[Request { op: Op::Marker as u16, id: 0, count: 1, slot: 0, gfn: u64::from(l), round }])?;
    }
    Ok(())
}

/// Move `pages` data pages from `src` to `dst` through both MHs (on all their lanes),
/// `batch` pages per doorbell.
fn transfer(sh: &mut MhHost, dh: &mut MhHost, pages: u64, batch: u32, round: u32) -> anyhow::Result<Run> {
    let mut blob = Blob::zeroed();
    // Open the stream, bound to the importer's challenges.
    sh.bind_export(&dh.challenges()?)?;
    markers(sh, dh, Op::Begin, round)?;
    let first = DATA_START / 4096;
    let (mut export, mut import) = (Duration::ZERO, Duration::ZERO);
    let mut doorbells = 0;
    let t0 = Instant::now();
    let mut gfn = first;
    while gfn < first + pages {
        let n = (batch as u64).min(first + pages - gfn) as u32;
        let t = Instant::now();
        sh.run(&[Request { op: Op::Export as u16, id: 0, count: n, slot: 0, gfn, round }])?;
        export += t.elapsed();
        for s in 0..n {
            sh.take_slot(s, Kind::Page, gfn + u64::from(s), &mut blob)?;
            dh.write_slot(s, &blob)?;
        }
        let t = Instant::now();
        dh.run(&[Request { op: Op::Import as u16, id: 0, count: n, slot: 0, gfn, round }])?;
        import += t.elapsed();
        doorbells += 1;
        gfn += u64::from(n);
    }
    let total = t0.elapsed();
    markers(sh, dh, Op::End, round)?;
    anyhow::ensure!(dh.counters()?.complete, "destination MH did not confirm the stream");
    // A finished import is final (the MH refuses to reopen it): the next transfer needs a
    // fresh destination.
    Ok(Run { pages, export, import, total, doorbells })
}

fn gbs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

pub fn mh_bench(pages: u64, batches: &[u32], lanes: &[u32], migrate_ram: &[ByteSize]) -> anyhow::Result<()> {
    let ram = (DATA_START + pages * 4096).next_multiple_of(2 << 20).max(64 << 20) + (2 << 20);
    let ceiling = openssl_aes_gcm();
    match ceiling {
        Some(c) => say!("single-core AES-256-GCM (openssl speed, 16 KiB): {:.2} GB/s", c / 1e9),
        None => say!("openssl not found: no AES ceiling this run"),
    }
    let (src, _) = vm(false, ram, 0)?;
    // Pseudo-random page contents (incompressible, no zero pages).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut page = vec![0u8; 4096];
    for p in 0..pages {
        for c in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        src.ram().write(DATA_START + p * 4096, &page)?;
    }
    // The direct path's per-page work on the host: one copy of each page.
    let (dst, _) = vm(true, ram, 0)?;
    let t = Instant::now();
    let mut buf = vec![0u8; (pages * 4096) as usize];
    src.ram().read(DATA_START, &mut buf)?;
    dst.ram().write(DATA_START, &buf)?;
    let direct = t.elapsed();
    drop(dst);
    say!("host copy of the same {} MiB (direct path, no network): {:.2} GB/s", pages >> 8, gbs(pages * 4096, direct));
    say!();
    say!(
        "| handler vCPUs | pages/doorbell | pages | export GB/s | import GB/s | export+import GB/s | of AES ceiling × vCPUs | doorbells | µs/doorbell |"
    );
    say!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    drop(src);
    // Each handler vCPU count from a fresh source holding the same pages.
    for &l in lanes {
        let (src, mut sh) = vm_lanes(false, ram, 0, l)?;
        src.ram().write(DATA_START, &buf)?;
        lane_rows(&src, &mut sh, ram, pages, batches, ceiling)?;
    }
    doorbell_rows(ram, pages, &buf)?;
    migration_rows(migrate_ram, lanes)
}

/// The export+import rows of one source (its MH on `sh.lanes()` lanes), one per batch size.
fn lane_rows(
    src: &Machine,
    sh: &mut MhHost,
    ram: u64,
    pages: u64,
    batches: &[u32],
    ceiling: Option<f64>,
) -> anyhow::Result<()> {
    let l = sh.lanes();
    for (i, &b) in batches.iter().enumerate() {
        // Batch 1 pays two port-I/O round trips per page: fewer pages keep it short.
        let n = if b < 16 { pages.min(4096) } else { pages };
        // A fresh destination each row (an import, once finished, is final), its RAM
        // allocated first as a confidential destination does.
        let (dst, mut dh) = vm_lanes(true, ram, 0, l)?;
        dst.ram().populate()?;
        let r = transfer(sh, &mut dh, n, b, i as u32 + 1)?;
        let bytes = r.pages * 4096;
        let mut a = vec![0u8; bytes as usize];
        let mut d = vec![0u8; bytes as usize];
        src.ram().read(DATA_START, &mut a)?;
        dst.ram().read(DATA_START, &mut d)?;
        anyhow::ensure!(a == d, "batch {b}: destination pages differ after import");
        let both = gbs(bytes, r.total);
        say!(
            "| {l} | {b} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {:.1} |",
            r.pages,
            gbs(bytes, r.export),
            gbs(bytes, r.import),
            both,
            ceiling.map_or("-".into(), |c| format!("{:.0} %", 100.0 * both * 1e9 / (c * f64::from(l)))),
            r.doorbells,
            r.total.as_secs_f64() * 1e6 / r.doorbells as f64,
        );
    }
    Ok(())
}

/// Doorbells: port-I/O kick at once vs polling first (MH spins on its request ring, the
/// host on the completion ring).
fn doorbell_rows(ram: u64, pages: u64, buf: &[u8]) -> anyhow::Result<()> {
    say!();
    say!("| doorbell (64 pages/doorbell) | export+import GB/s | µs/doorbell |");
    say!("|---|---:|---:|");
    for (name, spin) in [
        ("kick at once (spin 0)", 0u64),
        ("poll 2000 times, then kick", 2_000),
        ("poll 10^6 times, then kick", 1_000_000),
    ] {
        let (src, mut sh) = vm(false, ram, spin)?;
        sh.spin = spin as u32;
        let n = pages.min(16384);
        src.ram().write(DATA_START, &buf[..(n * 4096) as usize])?;
        // A first pass warms the source; the second, into a fresh destination whose RAM is
        // allocated first, is the measurement.
        let (_warm, mut wh) = vm(true, ram, spin)?;
        wh.spin = spin as u32;
        transfer(&mut sh, &mut wh, n, 64, 1)?;
        let (dst, mut dh) = vm(true, ram, spin)?;
        dst.ram().populate()?;
        dh.spin = spin as u32;
        let r = transfer(&mut sh, &mut dh, n, 64, 2)?;
        say!(
            "| {name} | {:.2} | {:.1} |",
            gbs(r.pages * 4096, r.total),
            r.total.as_secs_f64() * 1e6 / r.doorbells as f64
        );
    }

    Ok(())
}

/// Whole migrations, plain against confidential, of the same filled guests with the
/// product's defaults otherwise (the like-for-like cases: idle guests of each size,
/// and a hot 256 MiB guest); confidential also on each further handler vCPU count.
fn migration_rows(migrate_ram: &[ByteSize], lanes: &[u32]) -> anyhow::Result<()> {
    say!();
    say!("| guest (filled) | migration | total s | ÷ plain | downtime ms | pages through the MH | zero records |");
    say!("|---|---|---:|---:|---:|---:|---:|");
    let key = std::env::temp_dir().join(format!("migaccel-bench-{}.key", std::process::id()));
    std::fs::write(&key, KEY)?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let mut guests: Vec<(ByteSize, WorkloadKind)> = migrate_ram.iter().map(|&r| (r, WorkloadKind::Idle)).collect();
    guests.push((ByteSize(256 << 20), WorkloadKind::Hot));
    for (ram, workload) in guests {
        let mut plain = None;
        let mut runs = vec![
            ("plain".to_string(), false, true, 128, 1),
            ("confidential, pipelined, 128/doorbell".into(), true, true, 128, 1),
            ("confidential, one batch at a time, 256/doorbell".into(), true, false, 256, 1),
        ];
        for &l in lanes.iter().filter(|&&l| l > 1) {
            runs.push((format!("confidential, pipelined, 128/doorbell, {l} handler vCPUs"), true, true, 128, l));
        }
        for (name, conf, pipeline, batch, l) in runs {
            let mut c = Config::default();
            c.guest.ram = ram;
            c.guest.vcpus = 1;
            c.guest.workload = workload;
            c.guest.warmup_ms = 100;
            c.confidential.enabled = conf;
            c.confidential.key_file = Some(key.clone());
            (c.confidential.mh_pipeline, c.confidential.mh_batch) = (pipeline, batch);
            c.confidential.mh_vcpus = l;
            let fill = |m: &Machine| -> anyhow::Result<()> { crate::fill(m) };
            let out = session::demo_with(&c, &fill, &mut |_| {})?;
            anyhow::ensure!(out.report.verification.ok(), "{name}: verification failed {:?}", out.report.verification);
            let r = &out.report.source;
            let total = r.total.as_secs_f64();
            let base = *plain.get_or_insert(total);
            say!(
                "| {} MiB {} | {name} | {total:.2} | {:.2} | {:.1} | {} | {} |",
                ram.0 >> 20,
                if workload == WorkloadKind::Hot { "hot" } else { "idle" },
                total / base,
                r.downtime.as_secs_f64() * 1e3,
                r.mh_exported.map_or("-".into(), |n| n.to_string()),
                r.mh_zero_records.map_or("-".into(), |n| n.to_string()),
            );
        }
    }
    let _ = std::fs::remove_file(&key);
    Ok(())
}
