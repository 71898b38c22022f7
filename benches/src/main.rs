//! migaccel bench suite. Every speed figure is printed next to a baseline measured in the
//! same run, because this machine's numbers move from run to run.
//!
//! `migaccel-bench migrate` — loopback TCP ceiling (iperf3 and an in-process raw stream),
//! then live migrations of a guest with the idle, hot and ab workloads.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use accel_user::config::{ByteSize, Config, DirtySource, WorkloadKind};
use accel_user::session;
use anyhow::Context;
use clap::{Parser, Subcommand};

mod mh;

#[derive(Parser)]
#[command(name = "migaccel-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    /// Guest dirtying rate with and without the BPF dirty probe; harvest cost per page.
    Ebpf {
        /// Seconds per measurement window (8 windows per VM: 4 without, 4 with the probe).
        #[arg(long, default_value_t = 1)]
        secs: u64,
        /// VMs (each one with and without the probe).
        #[arg(long, default_value_t = 4)]
        pairs: u32,
        #[arg(long, default_value_t = 20)]
        harvest_ms: u64,
        /// Filter by vCPU thread ids instead of the process id.
        #[arg(long)]
        threads: bool,
        /// Attach an empty program instead of the probe: the floor any probe pays.
        #[arg(long)]
        noop: bool,
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
        /// Pre-allocate destination RAM before pages arrive (counted in setup, so in total).
        #[arg(long)]
        prefault: bool,
        /// Only these modes (blocking, copy, zerocopy, zerocopy-fixed).
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
    },
    /// The in-guest Migration Handler: export+import throughput per batch size against the
    /// AES-256-GCM ceiling, doorbell kinds, and direct vs confidential migrations.
    Mh {
        /// Pages moved per batch-size row (batch 1 moves at most 4096).
        #[arg(long, default_value_t = 65536)]
        pages: u64,
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        batches: Vec<u32>,
        /// Guest size for the whole-migration rows.
        #[arg(long, default_value = "512MiB", value_parser = |s: &str| s.parse::<ByteSize>())]
        migrate_ram: ByteSize,
    },
}

/// Guest dirtying rate (pages written per second by an `ab` guest whose dirty tracking is
/// re-armed every `harvest_ms`, as during precopy), with and without the BPF dirty probe
/// attached, alternating A/B; then harvest cost per page: mmapped BPF bitmap vs KVM ring.
fn ebpf_bench(secs: u64, pairs: u32, harvest_ms: u64, threads: bool, noop: bool) -> anyhow::Result<()> {
    use kvm_hooks::vm::DirtyPreference;
    use kvm_hooks::vmm::{GuestSpec, Machine, Workload};
    let spec = GuestSpec { ram_bytes: 512 << 20, vcpus: 2, workload: Workload::Ab };
    let pages_per_report = 4096.0; // `ab` reports every 4096 pages per vCPU
                                   // One VM per pair; inside it, windows without and with the probe alternate (the probe is
                                   // attached and detached between windows), so VM-to-VM variation (placement, first touch)
                                   // does not enter the ratio.
    let attach = |m: &Machine| -> anyhow::Result<(Option<accel_ebpf::NoopProbe>, Option<accel_ebpf::DirtyProbe>)> {
        if noop {
            return Ok((Some(accel_ebpf::NoopProbe::attach()?), None));
        }
        let slots: Vec<(u64, u64)> = m.ram().slots().iter().map(|s| (s.first_gfn(), s.pages())).collect();
        let target = if threads {
            accel_ebpf::Target::Threads(m.vcpu_tids())
        } else {
            accel_ebpf::Target::Process(std::process::id())
        };
        Ok((None, Some(accel_ebpf::DirtyProbe::attach(target, &slots)?)))
    };
    let window = |m: &Machine, p: Option<&accel_ebpf::DirtyProbe>| -> anyhow::Result<f64> {
        let r0: u64 = m.reports().iter().sum();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(harvest_ms));
            m.dirty().take()?;
            if let Some(p) = p {
                p.harvest(|_| {});
            }
        }
        let r1: u64 = m.reports().iter().sum();
        Ok((r1 - r0) as f64 * pages_per_report / t0.elapsed().as_secs_f64())
    };
    println!(
        "## guest dirtying rate, 512 MiB ab guest, 2 vCPUs, dirty ring re-armed every {harvest_ms} ms, {secs} s windows, probe filter: {}",
        if noop { "EMPTY PROGRAM (cost floor)" } else if threads { "vCPU thread ids (bitmap)" } else { "process id" }
    );
    println!(
        "| pair (one VM, 4+4 alternating windows) | without probe (pages/s) | with probe (pages/s) | with / without |"
    );
    println!("|---|---|---|---|");
    let (mut sa, mut sb) = (0.0, 0.0);
    for i in 0..pairs {
        let m = Machine::boot(spec, DirtyPreference::Ring { bytes: 64 << 10 })?;
        m.resume()?;
        std::thread::sleep(Duration::from_millis(500)); // first touch of every page
        let (mut a, mut b) = (0.0, 0.0);
        for k in 0..8 {
            // A B B A A B B A: drift within the VM's life cancels.
            let with = matches!(k % 4, 1 | 2);
            if with {
                let (_floor, p) = attach(&m)?;
                b += window(&m, p.as_ref())?;
                if let Some(p) = &p {
                    let lost = p.stats()?.lost;
                    anyhow::ensure!(lost == 0, "the probe lost {lost} records");
                }
            } else {
                a += window(&m, None)?;
            }
        }
        let (a, b) = (a / 4.0, b / 4.0);
        println!("| {} | {:.0} | {:.0} | {:.3} |", i + 1, a, b, b / a);
        sa += a;
        sb += b;
    }
    println!("| all | {:.0} | {:.0} | **{:.3}** |", sa / pairs as f64, sb / pairs as f64, sb / sa);
    println!();

    // Harvest cost: same rounds, guest paused, both sources hold the same pages.
    let m = Machine::boot(
        GuestSpec { ram_bytes: 512 << 20, vcpus: 2, workload: Workload::Oracle { pages: 65536 } },
        DirtyPreference::Ring { bytes: 1 << 20 },
    )?;
    let slots: Vec<(u64, u64)> = m.ram().slots().iter().map(|s| (s.first_gfn(), s.pages())).collect();
    let probe = accel_ebpf::DirtyProbe::attach(accel_ebpf::Target::Threads(m.vcpu_tids()), &slots)?;
    m.dirty().reset()?;
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
    println!("## harvest cost per dirty page ({pages} pages over 40 rounds, 512 MiB guest)");
    println!("| source | ns per page |");
    println!("|---|---|");
    println!(
        "| KVM dirty ring (harvest + KVM_RESET_DIRTY_RINGS + dedupe) | {:.1} |",
        ring_t.as_nanos() as f64 / pages as f64
    );
    println!("| BPF bitmap, mmapped (atomic swap per word) | {:.1} |", bpf_t.as_nanos() as f64 / pages as f64);
    println!();
    println!(
        "The BPF harvest alone does not re-protect pages: KVM re-arms them at the ring reset, which the owner does."
    );
    Ok(())
}

/// iperf3 loopback throughput with `parallel` streams, bytes/s.
fn iperf3_n(secs: u64, parallel: u32) -> Option<f64> {
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
        .output()
        .ok();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out?.stdout).ok()?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().map(|b| b / 8.0)
}

fn fill(m: &kvm_hooks::vmm::Machine) -> anyhow::Result<()> {
    let ram = m.ram();
    let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    let mut gpa = kvm_hooks::guest::DATA_START;
    while gpa < ram.size() {
        let n = (ram.size() - gpa).min(chunk.len() as u64);
        ram.write(gpa, &chunk[..n as usize])?;
        gpa += n;
    }
    Ok(())
}

fn transport_bench(
    rams: &[ByteSize],
    streams: &[u32],
    secs: u64,
    prefault: bool,
    only: &[String],
) -> anyhow::Result<()> {
    use accel_user::transport::TransportMode;
    println!("## loopback ceilings (same run)");
    for &n in streams {
        match iperf3_n(secs, n) {
            Some(b) => println!("iperf3, {n} stream(s): {:.2} GiB/s", gib(b)),
            None => println!("iperf3: not installed"),
        }
    }
    for &ram in rams {
        let mut runs = [ram_stream(ram.0)?, ram_stream(ram.0)?, ram_stream(ram.0)?];
        runs.sort_by(f64::total_cmp);
        println!(
            "guest RAM -> fresh memfd, 1 stream, no engine, {} MiB, median of 3: {:.2} GiB/s",
            ram.0 >> 20,
            gib(runs[1])
        );
    }
    println!();
    println!("| guest | mode | streams | total ms | GiB/s | CPU s/GiB (both ends) | zero-copy sends | kernel: no copy / copied |");
    println!("|---|---|---|---|---|---|---|---|");
    let modes = [
        ("blocking writev", TransportMode::Blocking, false),
        ("io_uring SEND(MSG)", TransportMode::Copy, false),
        ("io_uring SEND(MSG)_ZC", TransportMode::Zerocopy, false),
        ("io_uring SEND(MSG)_ZC + fixed buffers", TransportMode::Zerocopy, true),
    ];
    let keys = ["blocking", "copy", "zerocopy", "zerocopy-fixed"];
    for &ram in rams {
        for (k, (name, mode, fixed)) in modes.into_iter().enumerate() {
            if !only.is_empty() && !only.iter().any(|o| o == keys[k]) {
                continue;
            }
            for &n in streams {
                let mut c = Config::default();
                c.guest.ram = ram;
                c.guest.vcpus = 2;
                c.guest.workload = WorkloadKind::Idle;
                c.guest.warmup_ms = 100;
                c.receiver.run_after_ms = 100;
                c.migration.transport = mode;
                c.migration.fixed_buffers = fixed;
                c.migration.streams = n;
                c.migration.io_timeout_ms = 60_000;
                c.receiver.prefault = prefault;
                c.validate()?;
                let cpu = std::cell::Cell::new(Duration::ZERO);
                let prep = |m: &kvm_hooks::vmm::Machine| -> anyhow::Result<()> {
                    fill(m)?;
                    cpu.set(kvm_hooks::process_cpu_time());
                    Ok(())
                };
                let out = session::demo_opts(&c, &prep, false, &mut |_| {}).with_context(|| format!("{name} x {n}"))?;
                let used = kvm_hooks::process_cpu_time().saturating_sub(cpu.get());
                let r = &out.report.source;
                anyhow::ensure!(out.report.verification.guest_alive, "{name} x {n}: destination not running");
                let gbytes = r.bytes_total as f64 / (1u64 << 30) as f64;
                let (zs, zc) = match r.zerocopy {
                    Some(z) => (z.sends.to_string(), format!("{} / {}", z.zerocopy, z.copied)),
                    None => ("-".into(), "-".into()),
                };
                println!(
                    "| {} MiB | {name} | {n} | {:.0} | {:.2} | {:.2} | {zs} | {zc} |",
                    ram.0 >> 20,
                    r.total.as_secs_f64() * 1e3,
                    gbytes / r.total.as_secs_f64(),
                    used.as_secs_f64() / gbytes
                );
            }
        }
    }
    println!();
    println!("CPU s/GiB: process user+sys from after the guest was filled until the destination ran (source, destination and the idle guest's vCPU threads).");
    Ok(())
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

/// The data path of a migration without the engine: `ram` bytes of filled guest RAM
/// written to one loopback TCP stream and read into a fresh memfd-backed mapping (as a
/// destination VM's RAM is). Bytes/s.
fn ram_stream(ram: u64) -> anyhow::Result<f64> {
    let src = kvm_hooks::memory::GuestRam::new(ram)?;
    let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    for gpa in (0..ram).step_by(chunk.len()) {
        src.write(gpa, &chunk)?;
    }
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> anyhow::Result<u64> {
        let (s, _) = l.accept()?;
        let dst = kvm_hooks::memory::GuestRam::new(ram)?;
        let mut got = 0u64;
        while got < ram {
            let n = kvm_hooks::read_into_guest(std::os::fd::AsFd::as_fd(&s), &dst, got, (ram - got).min(1 << 20))?;
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
        let iov = [src.iovec(off, (ram - off).min(1 << 20))?];
        off += kvm_hooks::writev_raw(std::os::fd::AsFd::as_fd(&s), &iov)? as u64;
    }
    let got = rx.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(got as f64 / t0.elapsed().as_secs_f64())
}

fn gib(b: f64) -> f64 {
    b / (1u64 << 30) as f64
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Ebpf { secs, pairs, harvest_ms, threads, noop } => ebpf_bench(secs, pairs, harvest_ms, threads, noop)?,
        Cmd::Mh { pages, batches, migrate_ram } => mh::mh_bench(pages, &batches, migrate_ram)?,
        Cmd::Transport { ram, streams, ceiling_secs, prefault, modes } => {
            transport_bench(&ram, &streams, ceiling_secs, prefault, &modes)?
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
            let ip = iperf3_n(ceiling_secs, 1);
            let raw = raw_stream(ceiling_secs)?;
            // Median of three: writing into fresh memfd pages varies a lot from run to run here.
            let mut runs = [ram_stream(ram.0)?, ram_stream(ram.0)?, ram_stream(ram.0)?];
            runs.sort_by(f64::total_cmp);
            let same_path = runs[1];
            let tcp = ip.unwrap_or(raw);
            println!("## loopback ceiling (same run)");
            match ip {
                Some(b) => println!("iperf3, 1 stream:            {:.2} GiB/s", gib(b)),
                None => println!("iperf3: not installed (./dev setup installs it)"),
            }
            println!("in-process TCP, 1 stream, cache-hot 1 MiB buffer: {:.2} GiB/s", gib(raw));
            println!(
                "guest RAM -> fresh memfd over 1 stream, no engine, median of 3: {:.2} GiB/s (runs {:.2} / {:.2} / {:.2})",
                gib(same_path),
                gib(runs[0]),
                gib(runs[1]),
                gib(runs[2])
            );
            println!();
            println!("## live migration, {} MiB guest, {vcpus} vCPUs, dirty source {dirty_source:?}", ram.0 >> 20);
            println!("| workload | rounds | total ms | downtime ms | wire MiB | throughput GiB/s | precopy GiB/s | vs TCP ceiling | vs RAM stream | dirty pages/s | switchover |");
            println!("|---|---|---|---|---|---|---|---|---|---|---|");
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
                c.receiver.run_after_ms = 200;
                c.validate()?;
                // "filled": an idle guest whose RAM the host filled with non-zero data first, so
                // the run measures the engine and transport, not the guest.
                let noop = |_: &kvm_hooks::vmm::Machine| -> anyhow::Result<()> { Ok(()) };
                let prep: &dyn Fn(&kvm_hooks::vmm::Machine) -> anyhow::Result<()> = if filled { &fill } else { &noop };
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
                };
                let thr = r.throughput_mib_s / 1024.0;
                let pre = r.precopy_throughput_mib_s / 1024.0;
                println!(
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
                    }
                );
            }
            println!();
            println!("rounds include the final stop-and-copy round; ratios = precopy throughput / the same-run iperf3 (or in-process) TCP ceiling, and / the guest-RAM stream median.");
        }
    }
    Ok(())
}
