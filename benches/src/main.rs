//! migaccel bench suite. Every speed figure is printed next to a baseline measured in the
//! same run, because this machine's numbers move from run to run.
//!
//! `migaccel-bench migrate` — loopback TCP ceiling (iperf3 and an in-process raw stream),
//! then live migrations of a guest with the idle, hot and ab workloads.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use accel_user::app::config::{ByteSize, Config, DirtySource, WorkloadKind};
use accel_user::app::session;
use anyhow::Context;
use clap::{Parser, Subcommand};

mod mh;
mod results;
mod vs_qemu;

use results::say;

#[derive(Parser)]
#[command(name = "migaccel-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Keep what this run printed, with its command, date, machine and commit, in
    /// `benches/results/NAME.json` (the source of `docs/benchmarks.md`).
    #[arg(long, global = true, value_name = "NAME")]
    save: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Render `docs/benchmarks.md` from the saved runs in `benches/results/`.
    Doc {
        /// Only say whether the page is current (fails if not).
        #[arg(long)]
        check: bool,
    },
    /// Migrate idle / hot / ab guests and compare with the loopback TCP ceiling.
    Migrate {
        #[arg(long, default_value = "1GiB", value_parser = |s: &str| s.parse::<ByteSize>())]
        ram: ByteSize,
        #[arg(long, default_value = "256MiB", value_parser = |s: &str| s.parse::<ByteSize>())]
        hot_working_set: ByteSize,
        #[arg(long, default_value_t = 50_000)]
        hot_rate: u64,
        #[arg(long, default_value_t = 2)]
        vcpus: u32,
        #[arg(long, value_enum, default_value_t = DirtySource::Ring)]
        dirty_source: DirtySource,
        /// Seconds for each ceiling measurement.
        #[arg(long, default_value_t = 3)]
        ceiling_secs: u64,
        /// Data pages per Pages frame.
        #[arg(long, default_value_t = 1024)]
        batch_pages: u32,
        /// Send zero pages as 4 KiB of data (no zero detection).
        #[arg(long)]
        no_zero_detect: bool,
        /// Only the transport-bound (filled, idle) case.
        #[arg(long)]
        transport_only: bool,
    },
    /// Guest dirtying rate without any program, with the BPF dirty probe and with an empty
    /// program (the floor any probe pays); program run time; harvest cost per page.
    Ebpf {
        /// Milliseconds per measurement window.
        #[arg(long, default_value_t = 500)]
        window_ms: u64,
        /// Cycles of six windows (none, probe, empty, empty, probe, none) per VM.
        #[arg(long, default_value_t = 2)]
        cycles: u32,
        /// VMs; each is one sample of the ratios.
        #[arg(long, alias = "pairs", default_value_t = 8)]
        vms: u32,
        #[arg(long, default_value_t = 20)]
        harvest_ms: u64,
        /// Filter by the process id instead of the vCPU thread ids.
        #[arg(long)]
        pid: bool,
    },
    /// Transport-bound migrations (idle guest, RAM filled by the host) for every transport
    /// mode with 1, 2 and 4 streams: throughput, CPU seconds per GiB, zero-copy counts.
    Transport {
        /// Guest sizes to move.
        #[arg(long, value_delimiter = ',', default_value = "1GiB,4GiB", value_parser = |s: &str| s.parse::<ByteSize>())]
        ram: Vec<ByteSize>,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        streams: Vec<u32>,
        #[arg(long, default_value_t = 3)]
        ceiling_secs: u64,
        /// Pre-allocate destination RAM at the handshake (counted in setup, so in total).
        #[arg(long)]
        prefault: bool,
        /// Destination RAM: `fresh` (allocated at the handshake, touched as pages land) and/or
        /// `prepared` (allocated and pre-faulted before the source connects).
        #[arg(long, value_delimiter = ',', default_value = "fresh,prepared")]
        dest: Vec<String>,
        /// Migrations per row; with more than one, repetitions interleave the rows, each
        /// migration measures its own single-stream ceiling just before it, rows show
        /// medians (GiB/s with min–max), and a second table pairs rows per repetition.
        #[arg(long, default_value_t = 1)]
        reps: u32,
        /// Only these modes (blocking, copy, zerocopy, zerocopy-fixed).
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
        /// Channels: `sealed` (authenticated, every frame AES-256-GCM, the default of
        /// `migaccel`) and/or `insecure` (`auth.insecure`). With both, a table of
        /// sealed ÷ insecure ratios from the same repetitions follows.
        #[arg(long, value_delimiter = ',', default_value = "sealed,insecure")]
        channel: Vec<String>,
    },
    /// QEMU's own migration of its guest against migaccel's of the embedded guest: same RAM,
    /// same workload class (idle or a full-speed hot range, both prefilled), interleaved.
    VsQemu {
        #[arg(long, value_delimiter = ',', default_value = "1GiB", value_parser = |s: &str| s.parse::<ByteSize>())]
        ram: Vec<ByteSize>,
        #[arg(long, default_value = "256MiB", value_parser = |s: &str| s.parse::<ByteSize>())]
        hot: ByteSize,
        #[arg(long, default_value_t = 3)]
        reps: u32,
        /// How long each guest runs after its prefill before the migration starts.
        #[arg(long, default_value_t = 1000)]
        warmup_ms: u64,
        /// Run only this system (its name as printed; repeat for more); the default runs all.
        #[arg(long)]
        only: Vec<String>,
        /// Also draw the totals as grouped bars (one group per RAM size and class) into FILE.svg.
        #[arg(long, value_name = "FILE")]
        plot: Option<std::path::PathBuf>,
    },
    /// The in-guest Migration Handler: export+import throughput per batch size against the
    /// AES-256-GCM ceiling, doorbell kinds, and direct vs confidential migrations.
    Mh {
        /// Pages moved per batch-size row (batch 1 moves at most 4096).
        #[arg(long, default_value_t = 65536)]
        pages: u64,
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,128,256")]
        batches: Vec<u32>,
        /// Handler vCPU counts (MH lanes) for the export+import rows and the migrations.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        lanes: Vec<u32>,
        /// Guest sizes for the whole-migration rows (idle, filled; a hot 256 MiB guest too).
        #[arg(long, value_delimiter = ',', default_value = "512MiB,2GiB", value_parser = |s: &str| s.parse::<ByteSize>())]
        migrate_ram: Vec<ByteSize>,
    },
}

/// Single-core AEGIS-256X4 sealing and opening of 256 KiB records that stay in cache (one
/// second each): the cipher's share of the sealed channel's cost. Bytes/s.
fn aegis_rates() -> (f64, f64) {
    use aegis::aegis256x4::Aegis256X4;
    let (key, hdr) = ([7u8; 32], [1u8; 24]);
    let mut buf = vec![0x5au8; 256 << 10];
    let mut tags = Vec::new();
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(1) {
        let mut nonce = [0u8; 32];
        nonce[..8].copy_from_slice(&n.to_le_bytes());
        tags.push(Aegis256X4::<16>::new(&key, &nonce).encrypt_in_place(&mut buf, &hdr));
        n += 1;
    }
    let seal = (n * buf.len() as u64) as f64 / t0.elapsed().as_secs_f64();
    // Open the last record sealed, again and again, each time from a copy of it.
    let mut nonce = [0u8; 32];
    nonce[..8].copy_from_slice(&(n - 1).to_le_bytes());
    let aead = Aegis256X4::<16>::new(&key, &nonce);
    let tag = *tags.last().expect("one record sealed");
    let mut work = buf.clone();
    let t0 = Instant::now();
    let mut m = 0u64;
    while t0.elapsed() < Duration::from_secs(1) {
        work.copy_from_slice(&buf);
        aead.decrypt_in_place(&mut work, &tag, &hdr).expect("the record opens");
        m += 1;
    }
    let open = (m * buf.len() as u64) as f64 / t0.elapsed().as_secs_f64();
    (seal, open)
}

/// Guest dirtying rate (pages written per second by an `ab` guest whose dirty tracking is
/// re-armed every `harvest_ms`, as during precopy) without a program, with the dirty probe
/// and with an empty program on the same tracepoint; the probe's kernel-counted run time;
/// then harvest cost per page: mmapped BPF bitmap vs KVM ring.
fn ebpf_bench(window_ms: u64, cycles: u32, vms: u32, harvest_ms: u64, threads: bool) -> anyhow::Result<()> {
    use embedded_vmm::vmm::{GuestSpec, Machine, Workload};
    use kvm_hooks::vm::DirtyPreference;
    anyhow::ensure!(vms >= 2 && cycles >= 1, "need at least 2 VMs and 1 cycle");
    let spec = GuestSpec { ram_bytes: 512 << 20, vcpus: 2, workload: Workload::Ab };
    let pages_per_report = 4096.0; // `ab` reports every 4096 pages per vCPU
    enum Attached {
        None,
        Probe(accel_ebpf::DirtyProbe),
        Empty(accel_ebpf::NoopProbe),
    }
    let attach = |m: &Machine, arm: usize| -> anyhow::Result<Attached> {
        Ok(match arm {
            0 => Attached::None,
            1 => {
                let slots: Vec<(u64, u64)> = m.ram().slot_ranges();
                let target = if threads {
                    accel_ebpf::Target::Threads(m.vcpu_tids())
                } else {
                    accel_ebpf::Target::Process(std::process::id())
                };
                Attached::Probe(accel_ebpf::DirtyProbe::attach(target, &slots)?)
            }
            _ => Attached::Empty(accel_ebpf::NoopProbe::attach()?),
        })
    };
    // Runs the guest for `ms` with the dirty ring re-armed as during precopy; pages/s.
    let window = |m: &Machine, a: &Attached, ms: u64| -> anyhow::Result<f64> {
        let r0: u64 = m.reports().iter().sum();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(ms) {
            std::thread::sleep(Duration::from_millis(harvest_ms));
            m.dirty().take()?;
            if let Attached::Probe(p) = a {
                p.harvest(|_| {});
            }
        }
        let r1: u64 = m.reports().iter().sum();
        Ok((r1 - r0) as f64 * pages_per_report / t0.elapsed().as_secs_f64())
    };
    say!(
        "## guest dirtying rate, 512 MiB ab guest, 2 vCPUs, dirty ring re-armed every {harvest_ms} ms, {window_ms} ms windows, probe filter: {}",
        if threads { "vCPU thread ids (bitmap)" } else { "process id" }
    );
    say!("Each VM runs {cycles} cycle(s) of six windows: none, probe, empty, empty, probe, none (drift within a VM cancels).");
    say!();
    say!("| VM | no program (pages/s) | probe (pages/s) | empty program (pages/s) | probe / none | empty / none |");
    say!("|---|---|---|---|---|---|");
    let (mut probe_r, mut empty_r, mut base) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..vms {
        let m = Machine::boot(spec, DirtyPreference::Ring { bytes: 64 << 10 })?;
        m.dirty().start()?; // logged as during precopy
        m.resume()?;
        std::thread::sleep(Duration::from_millis(500)); // first touch of every page
        let mut sum = [0.0f64; 3];
        for _ in 0..cycles {
            for arm in [0, 1, 2, 2, 1, 0] {
                let a = attach(&m, arm)?;
                sum[arm] += window(&m, &a, window_ms)?;
                if let Attached::Probe(p) = &a {
                    let lost = p.stats()?.lost;
                    anyhow::ensure!(lost == 0, "the probe lost {lost} records");
                }
            }
        }
        let n = 2.0 * f64::from(cycles);
        let [a, b, c] = sum.map(|x| x / n);
        say!("| {} | {a:.0} | {b:.0} | {c:.0} | {:.4} | {:.4} |", i + 1, b / a, c / a);
        probe_r.push(b / a);
        empty_r.push(c / a);
        base.push(a);
    }
    let (pm, pci) = mean_ci95(&probe_r);
    let (em, eci) = mean_ci95(&empty_r);
    let base = base.iter().sum::<f64>() / base.len() as f64;
    say!("| mean ± 95 % CI ({vms} VMs) | {base:.0} | | | **{pm:.4} ± {pci:.4}** | **{em:.4} ± {eci:.4}** |");
    say!();
    say!(
        "overhead (1 - ratio): probe {:.2} % ± {:.2}, empty program {:.2} % ± {:.2}; the probe's own code: {:.2} points",
        100.0 * (1.0 - pm),
        100.0 * pci,
        100.0 * (1.0 - em),
        100.0 * eci,
        100.0 * (em - pm)
    );
    say!();

    // The programs' own run time, as the kernel counts it (a separate window: the
    // accounting itself adds two clock reads per run).
    let m = Machine::boot(spec, DirtyPreference::Ring { bytes: 64 << 10 })?;
    m.dirty().start()?;
    m.resume()?;
    std::thread::sleep(Duration::from_millis(500));
    let stats = accel_ebpf::RunTimeStats::enable()?;
    say!("## program run time per dirty-ring push (kernel BPF run-time accounting, {} ms)", 4 * window_ms);
    say!("| program | runs | ns per run |");
    say!("|---|---|---|");
    let run_time = |a: &Attached| match a {
        Attached::Probe(p) => p.run_time(),
        Attached::Empty(p) => p.run_time(),
        Attached::None => Ok(accel_ebpf::RunTime::default()),
    };
    for (arm, name) in [(1, "dirty probe"), (2, "empty program")] {
        let a = attach(&m, arm)?;
        let r0 = run_time(&a)?;
        window(&m, &a, 4 * window_ms)?;
        let r1 = run_time(&a)?;
        let runs = r1.runs - r0.runs;
        let ns = (r1.time - r0.time).as_nanos() as f64 / runs.max(1) as f64;
        say!("| {name} | {runs} | {ns:.1} |");
    }
    drop(stats);
    let per_page = 1e9 * f64::from(spec.vcpus) / base;
    say!();
    say!("A guest page write that KVM logs costs {per_page:.0} ns of vCPU time here (2 vCPUs / no-program rate).");
    say!();

    // Harvest cost: same rounds, guest paused, both sources hold the same pages.
    let m = Machine::boot(
        GuestSpec { ram_bytes: 512 << 20, vcpus: 2, workload: Workload::Oracle { pages: 65536 } },
        DirtyPreference::Ring { bytes: 1 << 20 },
    )?;
    let slots: Vec<(u64, u64)> = m.ram().slot_ranges();
    let probe = accel_ebpf::DirtyProbe::attach(accel_ebpf::Target::Threads(m.vcpu_tids()), &slots)?;
    m.dirty().start()?;
    probe.harvest(|_| {});
    let (mut ring_t, mut bpf_t, mut pages) = (Duration::ZERO, Duration::ZERO, 0u64);
    for it in 0..40 {
        m.set_oracle_iteration(it + 2)?;
        m.resume()?;
        std::thread::sleep(Duration::from_millis(20));
        m.pause()?;
        let t = Instant::now();
        let mut n = 0u64;
        probe.harvest(|_| n += 1);
        bpf_t += t.elapsed();
        let t = Instant::now();
        let r = m.dirty().take()?;
        ring_t += t.elapsed();
        anyhow::ensure!(r.len() as u64 == n, "round {it}: ring {} pages, bitmap {n}", r.len());
        pages += n;
    }
    say!("## harvest cost per dirty page ({pages} pages over 40 rounds, 512 MiB guest)");
    say!("| source | ns per page |");
    say!("|---|---|");
    say!(
        "| KVM dirty ring (harvest + KVM_RESET_DIRTY_RINGS + dedupe) | {:.1} |",
        ring_t.as_nanos() as f64 / pages as f64
    );
    say!("| BPF bitmap, mmapped (atomic swap per word) | {:.1} |", bpf_t.as_nanos() as f64 / pages as f64);
    say!();
    say!("The BPF harvest alone does not re-protect pages: KVM re-arms them at the ring reset, which the owner does.");
    Ok(())
}

/// iperf3 loopback throughput, bytes/s: `parallel` streams, `len`-byte writes (iperf3's
/// default is 128 KiB).
fn iperf3_n(secs: u64, parallel: u32, len: Option<&str>) -> Option<f64> {
    let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port().to_string();
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("iperf3")
        .args(["-c", "127.0.0.1", "-p", &port, "-t", &secs.to_string(), "-P", &parallel.to_string(), "-J"])
        .args(len.map(|l| ["-l", l]).iter().flatten())
        .output()
        .ok();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out?.stdout).ok()?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().map(|b| b / 8.0)
}

fn fill(m: &embedded_vmm::vmm::Machine) -> anyhow::Result<()> {
    Ok(embedded_vmm::guest::prefill(m.ram())?)
}

/// Which rows the transport bench runs: transport modes and channels (empty modes: all).
#[derive(Clone, Copy)]
struct Rows<'a> {
    modes: &'a [String],
    channels: &'a [String],
}

fn transport_bench(
    rams: &[ByteSize],
    streams: &[u32],
    secs: u64,
    prefault: bool,
    dests: &[String],
    rows: Rows<'_>,
    reps: u32,
) -> anyhow::Result<()> {
    let Rows { modes: only, channels } = rows;
    for d in dests {
        anyhow::ensure!(d == "fresh" || d == "prepared", "--dest {d}: expected fresh or prepared");
    }
    for c in channels {
        anyhow::ensure!(c == "sealed" || c == "insecure", "--channel {c}: expected sealed or insecure");
    }
    use accel_user::wire::transport::TransportMode;
    say!("## loopback ceilings (same run)");
    let (one, [small, large]) = single_stream_ceiling(secs);
    for (len, b) in [("128K", small), ("1M", large)] {
        match b {
            Some(b) => say!("iperf3, 1 stream(s), {len} writes: {b:.2} GiB/s"),
            None => say!("iperf3: not installed"),
        }
    }
    for &n in streams.iter().filter(|&&n| n != 1) {
        match iperf3_n(secs, n, None) {
            Some(b) => say!("iperf3, {n} stream(s), 128K writes: {:.2} GiB/s", gib(b)),
            None => say!("iperf3: not installed"),
        }
    }
    if let Some(c) = one {
        say!("single-stream ceiling (best of the two): {c:.2} GiB/s");
    }
    if channels.iter().any(|c| c == "sealed") {
        say!("## cipher ceilings (same run, one core)");
        let (seal, open) = aegis_rates();
        say!("AEGIS-256X4 (the sealed channel's), 256 KiB records in cache: seal {:.2} GB/s, open (from a copy) {:.2} GB/s", seal / 1e9, open / 1e9);
        match mh::openssl_aes_gcm() {
            Some(c) => say!("AES-256-GCM (openssl speed, 16 KiB): {:.2} GB/s", c / 1e9),
            None => say!("openssl not found: no AES-256-GCM ceiling this run"),
        }
    }
    // RAM -> RAM over one stream: the ceiling for moving this much memory (median of 3).
    let mut ram_ceiling: Vec<f64> = Vec::new();
    for &ram in rams {
        for (what, pre) in [("fresh", false), ("pre-allocated", true)] {
            let mut runs = if pre {
                let pair = RamPair::new(ram.0, true)?;
                [pair.stream()?, pair.stream()?, pair.stream()?]
            } else {
                [ram_stream(ram.0, pre)?, ram_stream(ram.0, pre)?, ram_stream(ram.0, pre)?]
            };
            runs.sort_by(f64::total_cmp);
            say!(
                "guest RAM -> {what} memfd, 1 stream, 4 MiB writes / MSG_WAITALL receives, no engine, {} MiB, median of 3: {:.2} GiB/s",
                ram.0 >> 20,
                gib(runs[1])
            );
            if pre {
                ram_ceiling.push(gib(runs[1]));
            }
        }
    }
    say!();
    say!("| guest | destination RAM | mode | channel | streams | total ms | GiB/s | vs iperf3 1 stream | vs RAM->RAM 1 stream | round 0 GiB/s | CPU s/GiB (both ends) | zero-copy sends | kernel: no copy / copied |");
    say!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let modes = [
        ("blocking writev", TransportMode::Blocking, false),
        ("io_uring SEND(MSG)", TransportMode::Copy, false),
        ("io_uring SEND(MSG)_ZC", TransportMode::Zerocopy, false),
        ("io_uring SEND(MSG)_ZC + fixed buffers", TransportMode::Zerocopy, true),
    ];
    let keys = ["blocking", "copy", "zerocopy", "zerocopy-fixed"];
    // (mode index, streams, sealed) in table order. Sealed frames are sent from copies:
    // fixed buffers (guest RAM registered for zero-copy) only serve insecure migrations.
    let configs: Vec<(usize, u32, bool)> = channels
        .iter()
        .map(|c| c == "sealed")
        .flat_map(|sealed| {
            (0..modes.len())
                .filter(move |&k| only.is_empty() || only.iter().any(|o| o == keys[k]))
                .filter(move |&k| !(sealed && modes[k].2))
                .flat_map(move |k| streams.iter().map(move |&n| (k, n, sealed)))
        })
        .collect();
    let mut prep_ms: Vec<(u64, f64)> = Vec::new();
    let mut paired: Vec<String> = Vec::new();
    let mut sealing: Vec<String> = Vec::new();
    for (&ram, &ram_at_start) in rams.iter().zip(&ram_ceiling) {
        // With repetitions, each one measures RAM -> RAM over one stream right before it,
        // on a pair kept for this size (filling and pre-faulting it again would take longer
        // than the migration).
        let pair = if reps > 1 { Some(RamPair::new(ram.0, true)?) } else { None };
        for dest in dests {
            // Repetitions are interleaved: repetition r runs every row once, starting at row
            // r (rotated), so a slow minute of this host falls on all rows alike and rows
            // can be compared repetition by repetition.
            let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
            for rep in 0..reps as usize {
                for i in (0..configs.len()).map(|i| (i + rep) % configs.len()) {
                    let (k, n, sealed) = configs[i];
                    let (name, mode, fixed) = modes[k];
                    let mut c = Config::default();
                    c.auth.insecure = !sealed;
                    c.guest.ram = ram;
                    c.guest.vcpus = 2;
                    c.guest.workload = WorkloadKind::Idle;
                    c.guest.warmup_ms = 100;
                    c.migration.transport = mode;
                    c.migration.fixed_buffers = fixed;
                    c.migration.streams = n;
                    c.migration.io_timeout_ms = 60_000;
                    c.receiver.prefault = prefault;
                    if dest == "prepared" {
                        c.receiver.prepare_ram = ram;
                    }
                    c.validate()?;
                    // Each repetition measures the single-stream ceiling right before its
                    // migration: this host's loopback rate drifts by 2x within minutes, and a
                    // ratio against a ceiling taken at another time would measure the drift.
                    let ceiling = if reps > 1 { single_stream_ceiling(1).0 } else { one };
                    let ram_c = match &pair {
                        Some(p) => gib(p.stream()?),
                        None => ram_at_start,
                    };
                    let cpu = std::cell::Cell::new((Duration::ZERO, 0));
                    let prep = |m: &embedded_vmm::vmm::Machine| -> anyhow::Result<()> {
                        fill(m)?;
                        cpu.set(kvm_hooks::process_usage());
                        Ok(())
                    };
                    // Until the source hears `Resumed`: the destination's watch and both
                    // VMs' teardown (freeing guest RAM) are not migration work.
                    let mut at_resume = None;
                    let mut on = |_: &embedded_vmm::vmm::Machine, e| {
                        if let accel_user::source::Event::Resumed { .. } = e {
                            at_resume = Some(kvm_hooks::process_usage());
                        }
                    };
                    let out = session::demo_opts(&c, &prep, false, &mut on).with_context(|| format!("{name} x {n}"))?;
                    let (end, start) = (at_resume.context("no Resumed event")?, cpu.get());
                    let (used, switches) = (end.0.saturating_sub(start.0), end.1.saturating_sub(start.1));
                    let r = &out.report.source;
                    anyhow::ensure!(out.report.verification.guest_alive, "{name} x {n}: destination not running");
                    let gbytes = r.bytes_total as f64 / (1u64 << 30) as f64;
                    let d = &out.report.destination;
                    anyhow::ensure!(d.prepared_ram == (dest == "prepared"), "{name} x {n}: destination RAM not {dest}");
                    if d.prepared_ram {
                        prep_ms.push((ram.0 >> 20, d.prepare.as_secs_f64() * 1e3));
                    }
                    let rate = gbytes / r.total.as_secs_f64();
                    let r0 = r.precopy_rounds.first().context("no precopy round")?;
                    samples[i].push(Sample {
                        rate,
                        ceiling_ratio: ceiling.map(|c| rate / c),
                        ram_ratio: rate / ram_c,
                        r0_rate: r0.bytes as f64 / (1u64 << 30) as f64 / r0.elapsed.as_secs_f64(),
                        cpu: used.as_secs_f64() / gbytes,
                        switches: switches as f64 / gbytes,
                        total_ms: r.total.as_secs_f64() * 1e3,
                        zerocopy: r.zerocopy.map(|z| (z.sends, z.zerocopy, z.copied)),
                    });
                }
            }
            for (i, &(k, n, sealed)) in configs.iter().enumerate() {
                let channel = if sealed { "sealed" } else { "insecure" };
                let s = &samples[i];
                let col = |f: fn(&Sample) -> f64| -> Vec<f64> { s.iter().map(f).collect() };
                let rates = col(|x| x.rate);
                let spread = if reps > 1 {
                    format!(
                        " ({:.2}–{:.2})",
                        rates.iter().copied().fold(f64::MAX, f64::min),
                        rates.iter().copied().fold(0.0, f64::max)
                    )
                } else {
                    String::new()
                };
                let pct = |mut v: Vec<f64>| {
                    if v.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{:.0} %", 100.0 * median(&mut v))
                    }
                };
                let (zs, zc) = match s.last().and_then(|x| x.zerocopy) {
                    Some((sends, no_copy, copied)) => (sends.to_string(), format!("{no_copy} / {copied}")),
                    None => ("-".to_string(), "-".to_string()),
                };
                say!(
                    "| {} MiB | {dest} | {} | {channel} | {n} | {:.0} | {:.2}{spread} | {} | {} | {:.2} | {:.2} | {zs} | {zc} |",
                    ram.0 >> 20,
                    modes[k].0,
                    median(&mut col(|x| x.total_ms)),
                    median(&mut rates.clone()),
                    pct(s.iter().filter_map(|x| x.ceiling_ratio).collect()),
                    pct(col(|x| x.ram_ratio)),
                    median(&mut col(|x| x.r0_rate)),
                    median(&mut col(|x| x.cpu)),
                );
                // Repetition by repetition: this row against the iperf3 ceiling taken just
                // before it, and its CPU against the blocking rows of the same repetition.
                if reps > 1 {
                    let ci = |v: &[f64]| {
                        if v.len() < 2 {
                            "-".to_string()
                        } else {
                            let (m, h) = mean_ci95(v);
                            format!("{:.3} ± {:.3}", m, h)
                        }
                    };
                    let blocking = |streams: u32| configs.iter().position(|&c| c == (0, streams, sealed));
                    let cpu_vs = |j: Option<usize>| -> Vec<f64> {
                        match j {
                            Some(j) if j != i => s.iter().zip(&samples[j]).map(|(a, b)| a.cpu / b.cpu).collect(),
                            _ => Vec::new(),
                        }
                    };
                    let ceil: Vec<f64> = s.iter().filter_map(|x| x.ceiling_ratio).collect();
                    paired.push(format!(
                        "| {} MiB | {dest} | {} | {channel} | {n} | {} | {} | {} | {:.0} |",
                        ram.0 >> 20,
                        modes[k].0,
                        ci(&ceil),
                        ci(&cpu_vs(blocking(n))),
                        ci(&cpu_vs(blocking(1))),
                        median(&mut col(|x| x.switches))
                    ));
                }
                // Sealing's cost: this sealed row against the insecure row of the same mode
                // and streams, repetition by repetition (interleaved, so the same minutes).
                if let Some(j) = configs.iter().position(|&c| c == (k, n, false)).filter(|_| sealed) {
                    let ratio = |f: fn(&Sample) -> f64| -> Vec<f64> {
                        s.iter().zip(&samples[j]).map(|(a, b)| f(a) / f(b)).collect()
                    };
                    sealing.push(format!(
                        "| {} MiB | {dest} | {} | {n} | {:.2} | {:.2} | {:.2} |",
                        ram.0 >> 20,
                        modes[k].0,
                        median(&mut ratio(|x| x.rate)),
                        median(&mut ratio(|x| x.total_ms)),
                        median(&mut ratio(|x| x.cpu)),
                    ));
                }
            }
        }
    }
    if !sealing.is_empty() {
        say!();
        say!("## sealing's cost: sealed ÷ insecure, same mode and streams, median of per-repetition ratios");
        say!("| guest | destination RAM | mode | streams | GiB/s | total ms | CPU s/GiB |");
        say!("|---|---|---|---|---|---|---|");
        for row in &sealing {
            say!("{row}");
        }
    }
    for &ram in rams {
        let v: Vec<String> = prep_ms.iter().filter(|p| p.0 == ram.0 >> 20).map(|p| format!("{:.0}", p.1)).collect();
        if !v.is_empty() {
            say!();
            say!(
                "destination preparation, {} MiB (before the source connects, not in total): {} ms",
                ram.0 >> 20,
                v.join(" / ")
            );
        }
    }
    say!();
    say!("CPU s/GiB: process user+sys from after the guest was filled until the source heard `Resumed` (source, destination and the idle guest's vCPU threads; not the teardown).");
    if !paired.is_empty() {
        say!();
        say!("## repetition by repetition: mean ± 95 % CI of per-repetition ratios ({reps} repetitions, rows interleaved)");
        say!("| guest | destination RAM | mode | channel | streams | GiB/s ÷ iperf3 1 stream just before | CPU ÷ blocking, same streams, same repetition | CPU ÷ blocking 1 stream, same repetition | context switches per GiB (median) |");
        say!("|---|---|---|---|---|---|---|---|---|");
        for row in &paired {
            say!("{row}");
        }
    }
    Ok(())
}

/// One migration of a transport-bench row.
#[derive(Clone)]
struct Sample {
    rate: f64,
    /// Against the iperf3 single-stream ceiling measured just before (none without iperf3).
    ceiling_ratio: Option<f64>,
    ram_ratio: f64,
    /// Round 0 alone: all of RAM through the transport, without the handshake, the
    /// stop-and-copy and the destination's resume that `total_ms` includes.
    r0_rate: f64,
    /// CPU seconds per GiB, both ends.
    cpu: f64,
    /// Context switches per GiB, both ends.
    switches: f64,
    total_ms: f64,
    /// Zero-copy sends, sent without copy, copied (kernel's report).
    zerocopy: Option<(u64, u64, u64)>,
}

/// The same path our transport uses without any guest: one TCP stream over loopback,
/// 1 MiB writes from a buffer, a reader draining into a buffer. Bytes/s.
fn raw_stream(secs: u64) -> anyhow::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> u64 {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        s.write_all(&buf)?;
    }
    drop(s);
    let n = rx.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// The data path of a migration without the engine: filled guest RAM written to one
/// loopback TCP stream and received into a memfd-backed mapping (as a destination VM's RAM
/// is), fresh or pre-allocated. 4 MiB writes and 4 MiB `MSG_WAITALL` receives, the engine's
/// frame size: the single-stream ceiling for moving this much memory, not cache-hot buffers.
struct RamPair {
    src: kvm_hooks::memory::GuestRam,
    dst: std::sync::Arc<kvm_hooks::memory::GuestRam>,
    size: u64,
}

impl RamPair {
    fn new(size: u64, prealloc: bool) -> anyhow::Result<RamPair> {
        let src = kvm_hooks::memory::GuestRam::new(size)?;
        let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
        for gpa in (0..size).step_by(chunk.len()) {
            src.write(gpa, &chunk)?;
        }
        let dst = kvm_hooks::memory::GuestRam::new(size)?;
        if prealloc {
            dst.populate()?;
        }
        Ok(RamPair { src, dst: std::sync::Arc::new(dst), size })
    }

    /// One pass over all of RAM; bytes/s.
    fn stream(&self) -> anyhow::Result<f64> {
        const CHUNK: u64 = 4 << 20;
        let (ram, dst) = (self.size, self.dst.clone());
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let rx = std::thread::spawn(move || -> anyhow::Result<u64> {
            let (s, _) = l.accept()?;
            let mut got = 0u64;
            while got < ram {
                let n =
                    kvm_hooks::read_into_guest(std::os::fd::AsFd::as_fd(&s), &dst, got, (ram - got).min(CHUNK), true)?;
                anyhow::ensure!(n > 0, "early EOF");
                got += n as u64;
            }
            Ok(got)
        });
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let t0 = Instant::now();
        let mut off = 0u64;
        while off < ram {
            let iov = [self.src.iovec(off, (ram - off).min(CHUNK))?];
            off += kvm_hooks::writev_raw(std::os::fd::AsFd::as_fd(&s), &iov)? as u64;
        }
        let got = rx.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
        Ok(got as f64 / t0.elapsed().as_secs_f64())
    }
}

/// [`RamPair::stream`] on a new pair (a fresh destination is fresh only once).
fn ram_stream(ram: u64, prealloc: bool) -> anyhow::Result<f64> {
    RamPair::new(ram, prealloc)?.stream()
}

/// Mean and half-width of its 95 % confidence interval (Student's t, n - 1 degrees of freedom).
fn mean_ci95(v: &[f64]) -> (f64, f64) {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // t(0.975, df) for df = 1..=30; 1.96 (the normal limit) beyond.
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    let t = T.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (var / n as f64).sqrt())
}

/// The single-stream loopback ceiling in GiB/s: the better of iperf3's default 128 KiB
/// writes and 1 MiB writes (its largest), both from cache-hot buffers; then each of the two.
fn single_stream_ceiling(secs: u64) -> (Option<f64>, [Option<f64>; 2]) {
    let both = [iperf3_n(secs, 1, None).map(gib), iperf3_n(secs, 1, Some("1M")).map(gib)];
    (both.into_iter().flatten().reduce(f64::max), both)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn gib(b: f64) -> f64 {
    b / (1u64 << 30) as f64
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let (Some(_), Cmd::Doc { .. }) = (&cli.save, &cli.cmd) {
        anyhow::bail!("--save keeps a bench's results; `doc` renders them");
    }
    if cli.save.is_some() {
        results::begin();
    }
    match cli.cmd {
        Cmd::Doc { check } => results::doc(check)?,
        Cmd::Ebpf { window_ms, cycles, vms, harvest_ms, pid } => ebpf_bench(window_ms, cycles, vms, harvest_ms, !pid)?,
        Cmd::Mh { pages, batches, lanes, migrate_ram } => mh::mh_bench(pages, &batches, &lanes, &migrate_ram)?,
        Cmd::VsQemu { ram, hot, reps, warmup_ms, only, plot } => {
            vs_qemu::vs_qemu(&ram, hot, reps, warmup_ms, &only, plot.as_deref())?
        }
        Cmd::Transport { ram, streams, ceiling_secs, prefault, dest, modes, reps, channel } => {
            let rows = Rows { modes: &modes, channels: &channel };
            transport_bench(&ram, &streams, ceiling_secs, prefault, &dest, rows, reps.max(1))?
        }
        Cmd::Migrate {
            ram,
            hot_working_set,
            hot_rate,
            vcpus,
            dirty_source,
            ceiling_secs,
            batch_pages,
            no_zero_detect,
            transport_only,
        } => {
            let ip = iperf3_n(ceiling_secs, 1, None);
            let raw = raw_stream(ceiling_secs)?;
            // Median of three: writing into fresh memfd pages varies a lot from run to run here.
            let mut runs = [ram_stream(ram.0, false)?, ram_stream(ram.0, false)?, ram_stream(ram.0, false)?];
            runs.sort_by(f64::total_cmp);
            let same_path = runs[1];
            let tcp = ip.unwrap_or(raw);
            say!("## loopback ceiling (same run)");
            match ip {
                Some(b) => say!("iperf3, 1 stream:            {:.2} GiB/s", gib(b)),
                None => say!("iperf3: not installed (./dev setup installs it)"),
            }
            say!("in-process TCP, 1 stream, cache-hot 1 MiB buffer: {:.2} GiB/s", gib(raw));
            say!(
                "guest RAM -> fresh memfd over 1 stream, no engine, median of 3: {:.2} GiB/s (runs {:.2} / {:.2} / {:.2})",
                gib(same_path),
                gib(runs[0]),
                gib(runs[1]),
                gib(runs[2])
            );
            say!();
            say!("## live migration, {} MiB guest, {vcpus} vCPUs, dirty source {dirty_source:?}", ram.0 >> 20);
            say!("| workload | rounds | total ms | downtime ms | wire MiB | throughput GiB/s | precopy GiB/s | vs TCP ceiling | vs RAM stream | dirty pages/s | switchover |");
            say!("|---|---|---|---|---|---|---|---|---|---|---|");
            let cases = [
                (WorkloadKind::Idle, true),
                (WorkloadKind::Idle, false),
                (WorkloadKind::Hot, false),
                (WorkloadKind::Ab, false),
            ];
            for (w, filled) in cases.into_iter().take(if transport_only { 1 } else { 4 }) {
                let mut c = Config::default();
                c.guest.ram = ram;
                c.guest.vcpus = vcpus;
                c.guest.workload = w;
                c.guest.hot_working_set = hot_working_set;
                c.guest.hot_rate = hot_rate;
                c.guest.warmup_ms = 500;
                c.migration.dirty_source = dirty_source;
                c.migration.batch_pages = batch_pages;
                c.migration.zero_pages = !no_zero_detect;
                c.validate()?;
                // "filled": an idle guest whose RAM the host filled with non-zero data first, so
                // the run measures the engine and transport, not the guest.
                let noop = |_: &embedded_vmm::vmm::Machine| -> anyhow::Result<()> { Ok(()) };
                let prep: &dyn Fn(&embedded_vmm::vmm::Machine) -> anyhow::Result<()> =
                    if filled { &fill } else { &noop };
                let out = session::demo_with(&c, prep, &mut |_| {}).with_context(|| format!("{w:?} migration"))?;
                let r = &out.report.source;
                anyhow::ensure!(
                    out.report.verification.ok(),
                    "{w:?}: verification failed {:?}",
                    out.report.verification
                );
                let name = match w {
                    WorkloadKind::Idle if filled => "idle, RAM filled by host (transport-bound)".to_string(),
                    WorkloadKind::Idle => "idle".to_string(),
                    WorkloadKind::Hot => format!("hot {} MiB @ {hot_rate} pages/s", hot_working_set.0 >> 20),
                    WorkloadKind::Ab => "ab (all RAM)".to_string(),
                    WorkloadKind::Canary => "canary".to_string(),
                    WorkloadKind::Pagestate => "pagestate".to_string(),
                };
                let thr = r.throughput_mib_s / 1024.0;
                let pre = r.precopy_throughput_mib_s / 1024.0;
                say!(
                    "| {name} | {} | {:.0} | {:.1} | {:.0} | {:.2} | {:.2} | {:.0} % | {:.0} % | {:.0} | {} |",
                    r.precopy_rounds.len() + 1,
                    r.total.as_secs_f64() * 1e3,
                    r.downtime.as_secs_f64() * 1e3,
                    r.bytes_total as f64 / (1 << 20) as f64,
                    thr,
                    pre,
                    100.0 * pre * (1u64 << 30) as f64 / tcp,
                    100.0 * pre * (1u64 << 30) as f64 / same_path,
                    r.dirty_rate_pages_s,
                    match r.switchover {
                        accel_user::policy::SwitchReason::Converged { .. } => "converged",
                        accel_user::policy::SwitchReason::RoundLimit { .. } => "round limit",
                        accel_user::policy::SwitchReason::TimeLimit { .. } => "time limit",
                    }
                );
            }
            say!();
            say!("rounds include the final stop-and-copy round; ratios = precopy throughput / the same-run iperf3 (or in-process) TCP ceiling, and / the guest-RAM stream median.");
        }
    }
    if let Some(name) = &cli.save {
        eprintln!("saved this run to {}", results::save(name)?.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{mean_ci95, median};

    #[test]
    fn ci_uses_student_t_for_the_sample_size() {
        // n = 3: df 2, t = 4.303; sample sd 1, so the half-width is 4.303 / sqrt(3).
        let (m, h) = mean_ci95(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((h - 4.303 / 3f64.sqrt()).abs() < 1e-9, "{h}");
        // n = 16 (the eBPF bench's VMs): df 15, t = 2.131, not the normal 1.96.
        let v: Vec<f64> = (0..16).map(|i| f64::from(i % 2)).collect();
        let sd = (16.0 * 0.25 / 15.0f64).sqrt();
        let (_, h) = mean_ci95(&v);
        assert!((h - 2.131 * sd / 4.0).abs() < 1e-9, "{h}");
        // Beyond the table: the normal limit.
        let v: Vec<f64> = (0..40).map(|i| f64::from(i % 2)).collect();
        let sd = (40.0 * 0.25 / 39.0f64).sqrt();
        let (_, h) = mean_ci95(&v);
        assert!((h - 1.96 * sd / 40f64.sqrt()).abs() < 1e-9, "{h}");
        // One sample has no interval.
        assert!(mean_ci95(&[5.0]).1.is_nan());
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
