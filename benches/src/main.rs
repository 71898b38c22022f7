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
    },
}

/// iperf3 single-stream loopback throughput in bytes/s, if iperf3 is installed.
fn iperf3(secs: u64) -> Option<f64> {
    let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port().to_string();
    let mut server = Command::new("iperf3").args(["-s", "-1", "-p", &port]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("iperf3").args(["-c", "127.0.0.1", "-p", &port, "-t", &secs.to_string(), "-J"]).output().ok();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out?.stdout).ok()?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().map(|b| b / 8.0)
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

fn gib(b: f64) -> f64 {
    b / (1u64 << 30) as f64
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Migrate { ram, hot_working_set, hot_rate, vcpus, dirty_source, ceiling_secs } => {
            let ip = iperf3(ceiling_secs);
            let raw = raw_stream(ceiling_secs)?;
            let ceiling = ip.unwrap_or(raw).max(raw);
            println!("## loopback ceiling (same run)");
            match ip {
                Some(b) => println!("iperf3, 1 stream:            {:.2} GiB/s", gib(b)),
                None => println!("iperf3: not installed (./dev setup installs it)"),
            }
            println!("in-process TCP, 1 stream:    {:.2} GiB/s", gib(raw));
            println!();
            println!("## live migration, {} MiB guest, {vcpus} vCPUs, dirty source {dirty_source:?}", ram.0 >> 20);
            println!("| workload | rounds | total ms | downtime ms | wire MiB | throughput GiB/s | precopy GiB/s | vs ceiling | dirty pages/s | switchover |");
            println!("|---|---|---|---|---|---|---|---|---|---|");
            for w in [WorkloadKind::Idle, WorkloadKind::Hot, WorkloadKind::Ab] {
                let mut c = Config::default();
                c.guest.ram = ram;
                c.guest.vcpus = vcpus;
                c.guest.workload = w;
                c.guest.hot_working_set = hot_working_set;
                c.guest.hot_rate = hot_rate;
                c.guest.warmup_ms = 500;
                c.migration.dirty_source = dirty_source;
                c.receiver.run_after_ms = 200;
                c.validate()?;
                let out = session::demo(&c, &mut |_| {}).with_context(|| format!("{w:?} migration"))?;
                let r = &out.report.source;
                anyhow::ensure!(out.report.verification.ok(), "{w:?}: verification failed {:?}", out.report.verification);
                let name = match w {
                    WorkloadKind::Idle => "idle".to_string(),
                    WorkloadKind::Hot => format!("hot {} MiB @ {hot_rate} pages/s", hot_working_set.0 >> 20),
                    WorkloadKind::Ab => "ab (all RAM)".to_string(),
                };
                let thr = r.throughput_mib_s / 1024.0;
                let pre = r.precopy_throughput_mib_s / 1024.0;
                println!(
                    "| {name} | {} | {:.0} | {:.1} | {:.0} | {:.2} | {:.2} | {:.0} % | {:.0} | {} |",
                    r.precopy_rounds.len() + 1,
                    r.total.as_secs_f64() * 1e3,
                    r.downtime.as_secs_f64() * 1e3,
                    r.bytes_total as f64 / (1 << 20) as f64,
                    thr,
                    pre,
                    100.0 * pre * (1u64 << 30) as f64 / ceiling,
                    r.dirty_rate_pages_s,
                    match r.switchover {
                        accel_user::policy::SwitchReason::Converged { .. } => "converged",
                        accel_user::policy::SwitchReason::RoundLimit { .. } => "round limit",
                    }
                );
            }
            println!();
            println!("rounds include the final stop-and-copy round; 'vs ceiling' = precopy throughput / best same-run loopback ceiling.");
        }
    }
    Ok(())
}
