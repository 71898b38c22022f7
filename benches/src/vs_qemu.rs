//! `migaccel-bench vs-qemu`: QEMU's own migration of its guest against migaccel's migration
//! of the embedded guest, same RAM, same workload class, same machine, interleaved.
//!
//! Both guests fill their RAM first (a qword into every page past 16 MiB), then either idle
//! or increment the first byte of every page of a hot range at full speed. QEMU's guest is
//! `tests/qemu/guest.S` (multiboot, CPL 3), migrated between two QEMU processes over loopback
//! with QMP; migaccel's runs as two processes (`receive`, `send`). Each migaccel figure is
//! printed as a ratio to the best QEMU variant of the same cell and repetition.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use accel_user::config::ByteSize;
use anyhow::{bail, Context};
use migaccel_tests::qemu::{guest_image, Qemu};
use serde_json::{json, Value};

/// Where QEMU's pc machine puts RAM above 3 GiB is not contiguous; the guest maps 4 GiB.
const QEMU_MAX_RAM: u64 = 3 << 30;

/// One migration's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    total_ms: f64,
    downtime_ms: f64,
    setup_ms: f64,
    mib: f64,
}

/// QEMU migrating its own guest: auto-converge on (as migaccel's default), 10 Gbit/s
/// bandwidth cap, 50 ms downtime limit (migaccel's default target), optional multifd.
fn qemu_run(dir: &Path, kernel: &Path, ram: u64, multifd: u32, warmup: Duration) -> anyhow::Result<Run> {
    let port = free_port()?;
    let mib = ram >> 20;
    let mut dst = Qemu::start(dir, "dst", "kvm", mib, kernel, &["-incoming", "defer"])?;
    let mut src = Qemu::start(dir, "src", "kvm", mib, kernel, &[])?;
    src.wait_prefilled(Duration::from_secs(300))?;
    std::thread::sleep(warmup);
    let mut caps = vec![json!({"capability": "auto-converge", "state": true})];
    if multifd > 0 {
        caps.push(json!({"capability": "multifd", "state": true}));
    }
    for q in [&mut src, &mut dst] {
        q.cmd("migrate-set-capabilities", json!({ "capabilities": caps }))?;
        if multifd > 0 {
            q.cmd("migrate-set-parameters", json!({"multifd-channels": multifd}))?;
        }
    }
    let uri = format!("tcp:127.0.0.1:{port}");
    dst.cmd("migrate-incoming", json!({ "uri": uri }))?;
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 10u64 << 30 >> 3, "downtime-limit": 50}))?;
    src.cmd("migrate", json!({ "uri": uri }))?;
    let t0 = Instant::now();
    let r = loop {
        let r = src.cmd("query-migrate", json!({}))?;
        match r["status"].as_str() {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => bail!("QEMU migration {}: {r}", r["status"]),
            _ => {}
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(300), "QEMU migration did not finish: {r}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    anyhow::ensure!(f("total-time") > 0.0, "QEMU reported a completed migration without its time: {r}");
    Ok(Run {
        total_ms: f("total-time"),
        downtime_ms: f("downtime"),
        setup_ms: f("setup-time"),
        mib: r["ram"]["transferred"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// migaccel's two processes migrating the embedded guest with the same class.
fn migaccel_run(ram: u64, hot: u64, warmup: Duration) -> anyhow::Result<Run> {
    let bin = std::env::current_exe()?.with_file_name("migaccel");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut recv = Command::new(&bin)
        .args(["receive", "--listen", &addr, "--report", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("migaccel receive")?;
    let mut line = String::new();
    BufReader::new(recv.stderr.take().context("receiver stderr")?).read_line(&mut line)?;
    anyhow::ensure!(line.contains("listening on"), "receiver: {line}");
    let workload: Vec<String> = if hot == 0 {
        vec!["--workload".into(), "idle".into()]
    } else {
        vec![
            "--workload".into(),
            "hot".into(),
            "--hot-rate".into(),
            "0".into(),
            "--hot-working-set".into(),
            format!("{hot}"),
        ]
    };
    let out = Command::new(&bin)
        .args(["send", "--to", &addr, "--report", "json", "--prefill", "--vcpus", "1"])
        .args(["--ram", &format!("{ram}"), "--warmup-ms", &warmup.as_millis().to_string()])
        .args(&workload)
        .output()
        .context("migaccel send")?;
    let r = recv.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "send: {}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(r.status.success(), "receive failed");
    let s: Value = serde_json::from_slice(&out.stdout)?;
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    Ok(Run {
        total_ms: f("total_ms"),
        downtime_ms: f("downtime_ms"),
        setup_ms: f("setup_ms"),
        mib: f("bytes_total") / (1 << 20) as f64,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn vs_qemu(rams: &[ByteSize], hot: ByteSize, reps: u32, warmup_ms: u64) -> anyhow::Result<()> {
    for r in rams {
        if r.0 > QEMU_MAX_RAM {
            bail!("{} MiB: the QEMU guest here maps RAM below 3 GiB only (pc machine layout)", r.0 >> 20);
        }
    }
    let dir = std::env::temp_dir().join(format!("migaccel-vs-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let warmup = Duration::from_millis(warmup_ms);
    let classes = [("idle, prefilled", 0u64), ("hot 256 MiB at full speed, prefilled", hot.0)];
    let systems = ["QEMU precopy", "QEMU multifd 4", "migaccel"];
    println!("# vs-qemu: {reps} repetition(s), interleaved; 1 vCPU; warm-up {warmup_ms} ms after the prefill");
    println!();
    println!("| RAM | class | system | total ms | downtime ms | setup ms | MiB moved | total / best QEMU | downtime / best QEMU |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for ram in rams {
        for &(class, hot) in &classes {
            let kernel = guest_image(&dir, Some(ram.0), Some((16 << 20) + hot))?;
            let mut runs: Vec<Vec<Run>> = vec![Vec::new(); systems.len()];
            let mut ratios: Vec<(f64, f64)> = Vec::new();
            for rep in 0..reps as usize {
                let mut this = [None; 3];
                for k in (0..systems.len()).map(|k| (k + rep) % systems.len()) {
                    let r = match k {
                        0 => qemu_run(&dir, &kernel, ram.0, 0, warmup),
                        1 => qemu_run(&dir, &kernel, ram.0, 4, warmup),
                        _ => migaccel_run(ram.0, hot, warmup),
                    }
                    .with_context(|| format!("{} MiB, {class}, {}", ram.0 >> 20, systems[k]))?;
                    this[k] = Some(r);
                    runs[k].push(r);
                }
                let (q0, q1, m) = (this[0].unwrap(), this[1].unwrap(), this[2].unwrap());
                let best_total = q0.total_ms.min(q1.total_ms);
                let best_down = q0.downtime_ms.min(q1.downtime_ms);
                ratios.push((m.total_ms / best_total, m.downtime_ms / best_down));
            }
            for (k, name) in systems.iter().enumerate() {
                let col = |f: fn(&Run) -> f64| median(runs[k].iter().map(f).collect());
                let (rt, rd) = if k == 2 {
                    (
                        format!("{:.2}", median(ratios.iter().map(|r| r.0).collect())),
                        format!("{:.2}", median(ratios.iter().map(|r| r.1).collect())),
                    )
                } else {
                    ("".into(), "".into())
                };
                println!(
                    "| {} MiB | {class} | {name} | {:.0} | {:.1} | {:.1} | {:.0} | {rt} | {rd} |",
                    ram.0 >> 20,
                    col(|r| r.total_ms),
                    col(|r| r.downtime_ms),
                    col(|r| r.setup_ms),
                    col(|r| r.mib),
                );
            }
        }
    }
    println!();
    println!("Medians over repetitions; ratios are medians of per-repetition ratios against the better QEMU variant of the same repetition.");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
