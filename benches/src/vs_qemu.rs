//! `migaccel-bench vs-qemu`: QEMU's own migration of its guest against migaccel's migration
//! of the embedded guest, same RAM, same workload class, same machine, interleaved.
//!
//! Both guests fill their RAM first (every page past 16 MiB), then idle, or increment the
//! first byte of every page of a 256 MiB range, or of all their RAM, at full speed. QEMU's
//! guest is `tests/qemu/guest.S` (multiboot, CPL 3), migrated between two QEMU processes over
//! loopback with QMP in several configurations; migaccel's runs as two processes (`receive`,
//! `send`) with a fresh and with a prepared destination. Each migaccel figure is printed as
//! a ratio to the best QEMU configuration of the same cell and repetition that treats its
//! destination's memory alike (fresh / preallocated), and its total also to the best of all.
//!
//! "QEMU + migaccel" is the product: the same QEMU guest, migaccel attached to both QEMU
//! processes (`send`/`receive --qemu-pid`), moving RAM itself while QEMU moves only its
//! devices; with a fresh destination (compared with QEMU without preallocation) and with
//! the destination's RAM allocated by migaccel when it attaches (compared with
//! `-mem-prealloc`). Those two run `--insecure`, like for like with QEMU over plain TCP; the
//! two "sealed" systems run migaccel's default channel (authenticated, every frame sealed)
//! and are set against QEMU with TLS (`tls-creds-psk`, plain precopy and multifd 4).
//!
//! The guest-visible blackout is measured by each guest's heartbeat: QEMU's guest writes a
//! byte to its serial port every millisecond of TSC time (timestamped by this process as it
//! arrives from each QEMU); the embedded guest's progress reports are stamped by its VMM
//! (idle: one per millisecond; walking: one per 4096 pages). Blackout = the destination's
//! first heartbeat after the migration minus the source's last one.
use crate::results::say;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use accel_user::app::config::ByteSize;
use anyhow::{bail, Context};
use migaccel_tests::qemu::{guest_image, qemu_for_migaccel, GuestImage, Heartbeat, Qemu, WRITE_COUNT_GPA};
use serde_json::{json, Value};

/// One migration's figures (NaN where a system cannot report one).
#[derive(Debug, Clone, Copy)]
struct Run {
    total_ms: f64,
    setup_ms: f64,
    downtime_ms: f64,
    blackout_ms: f64,
    mib: f64,
    rounds: f64,
    /// Guest page writes per second before the migration and during its precopy.
    writes_before: f64,
    writes_during: f64,
    /// CPU seconds of both processes over the migration (vCPU threads included).
    cpu_s: f64,
}

/// A migaccel cell against QEMU's best of the same repetition: total, downtime and
/// blackout against plain QEMU with the same destination memory, total against the best
/// plain QEMU of all, total against the best QEMU with TLS with the same memory.
type Ratios = (f64, f64, f64, f64, f64);

/// A QEMU configuration.
#[derive(Debug, Clone, Copy)]
struct QemuCfg {
    name: &'static str,
    multifd: u32,
    dirty_ring: bool,
    prealloc: bool,
    /// Encrypted and authenticated: `tls-creds-psk` on both sides (QEMU's own channel
    /// protection; it refuses zero-copy with TLS).
    tls: bool,
}

const QEMU_CFGS: [QemuCfg; 10] = [
    QemuCfg { name: "QEMU precopy", multifd: 0, dirty_ring: false, prealloc: false, tls: false },
    QemuCfg { name: "QEMU multifd 4", multifd: 4, dirty_ring: false, prealloc: false, tls: false },
    QemuCfg { name: "QEMU dirty ring", multifd: 0, dirty_ring: true, prealloc: false, tls: false },
    QemuCfg { name: "QEMU precopy, prealloc", multifd: 0, dirty_ring: false, prealloc: true, tls: false },
    QemuCfg { name: "QEMU multifd 4, prealloc", multifd: 4, dirty_ring: false, prealloc: true, tls: false },
    QemuCfg { name: "QEMU dirty ring, prealloc", multifd: 0, dirty_ring: true, prealloc: true, tls: false },
    QemuCfg { name: "QEMU precopy, TLS", multifd: 0, dirty_ring: false, prealloc: false, tls: true },
    QemuCfg { name: "QEMU multifd 4, TLS", multifd: 4, dirty_ring: false, prealloc: false, tls: true },
    QemuCfg { name: "QEMU precopy, TLS, prealloc", multifd: 0, dirty_ring: false, prealloc: true, tls: true },
    QemuCfg { name: "QEMU multifd 4, TLS, prealloc", multifd: 4, dirty_ring: false, prealloc: true, tls: true },
];

/// Both migaccel ends' key file (`dir/migaccel.key`, from `migaccel keygen`) and the same
/// key for both QEMUs' `tls-creds-psk` (`dir/tls/keys.psk`, user `qemu`): made once per run.
fn keys(dir: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let tls = dir.join("tls");
    let key = dir.join("migaccel.key");
    if !key.exists() {
        let bin = std::env::current_exe()?.with_file_name("migaccel");
        let out = Command::new(bin).arg("keygen").arg(&key).output().context("migaccel keygen")?;
        anyhow::ensure!(out.status.success(), "migaccel keygen: {}", String::from_utf8_lossy(&out.stderr));
        let hex = std::fs::read_to_string(&key)?;
        std::fs::create_dir_all(&tls)?;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(tls.join("keys.psk"))?;
        writeln!(f, "qemu:{}", hex.trim())?;
    }
    Ok((tls, key))
}

fn start_qemu(
    dir: &Path,
    name: &str,
    ram: u64,
    kernel: &Path,
    c: &QemuCfg,
    incoming: bool,
) -> anyhow::Result<(Qemu, Heartbeat)> {
    let serial = dir.join(format!("{name}-serial.sock"));
    let _ = std::fs::remove_file(&serial);
    let chardev = format!("socket,id=hb,path={},server=on,wait=off", serial.display());
    let mut extra = vec!["-chardev", &chardev, "-serial", "chardev:hb"];
    if c.prealloc {
        extra.push("-mem-prealloc");
    }
    let tls_obj;
    if c.tls {
        let endpoint = if incoming { "server" } else { "client" };
        tls_obj = format!("tls-creds-psk,id=tls0,endpoint={endpoint},dir={}", keys(dir)?.0.display());
        extra.extend(["-object", &tls_obj]);
    }
    if incoming {
        extra.extend(["-incoming", "defer"]);
    }
    let accel = if c.dirty_ring { "kvm,dirty-ring-size=4096" } else { "kvm" };
    let q = Qemu::start(dir, name, accel, ram >> 20, kernel, &extra)?;
    let hb = Heartbeat::listen(&serial)?;
    Ok((q, hb))
}

/// QEMU migrating its own guest: auto-converge on (as migaccel's default), 10 Gbit/s
/// bandwidth cap, 50 ms downtime limit (migaccel's default target).
fn qemu_run(dir: &Path, kernel: &Path, ram: u64, c: &QemuCfg, warmup: Duration) -> anyhow::Result<Run> {
    let port = free_port()?;
    let (mut dst, dst_hb) = start_qemu(dir, "dst", ram, kernel, c, true)?;
    let (mut src, src_hb) = start_qemu(dir, "src", ram, kernel, c, false)?;
    src.wait_prefilled(Duration::from_secs(600))?;
    std::thread::sleep(warmup);
    let mut caps = vec![json!({"capability": "auto-converge", "state": true})];
    if c.multifd > 0 {
        caps.push(json!({"capability": "multifd", "state": true}));
    }
    for q in [&mut src, &mut dst] {
        q.cmd("migrate-set-capabilities", json!({ "capabilities": caps }))?;
        if c.multifd > 0 {
            q.cmd("migrate-set-parameters", json!({"multifd-channels": c.multifd}))?;
        }
        if c.tls {
            q.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}))?;
        }
    }
    let uri = format!("tcp:127.0.0.1:{port}");
    dst.cmd("migrate-incoming", json!({ "uri": uri }))?;
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 10u64 << 30 >> 3, "downtime-limit": 50}))?;
    let (w0, tw0) = (src.read_u64(WRITE_COUNT_GPA)?, Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let (w1, tw1) = (src.read_u64(WRITE_COUNT_GPA)?, Instant::now());
    let cpu0 = src.cpu_time()? + dst.cpu_time()?;
    src.cmd("migrate", json!({ "uri": uri }))?;
    let t0 = Instant::now();
    let r = loop {
        let r = src.cmd("query-migrate", json!({}))?;
        match r["status"].as_str() {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => bail!("QEMU migration {}: {r}", r["status"]),
            _ => {}
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(600), "QEMU migration did not finish: {r}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let cpu = (src.cpu_time()? + dst.cpu_time()?).saturating_sub(cpu0);
    let w2 = src.read_u64(WRITE_COUNT_GPA)?;
    // QEMU 7.2 now and then answers the first query after completion with zero times; its
    // figures are filled in moments later.
    let mut r = r;
    for _ in 0..100 {
        if r["total-time"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        r = src.cmd("query-migrate", json!({}))?;
    }
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    anyhow::ensure!(f("total-time") > 0.0, "QEMU reported a completed migration without its time: {r}");
    let last_src = src_hb.last().context("the source guest sent no heartbeat")?;
    let first_dst = dst_hb.wait_after(last_src, Duration::from_secs(30)).context("the destination guest")?;
    let precopy_s = (f("total-time") - f("downtime")) / 1e3;
    Ok(Run {
        total_ms: f("total-time"),
        setup_ms: f("setup-time"),
        downtime_ms: f("downtime"),
        blackout_ms: (first_dst - last_src).as_secs_f64() * 1e3,
        mib: r["ram"]["transferred"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        rounds: r["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
        writes_before: (w1 - w0) as f64 / (tw1 - tw0).as_secs_f64(),
        writes_during: w2.saturating_sub(w1) as f64 / precopy_s,
        cpu_s: cpu.as_secs_f64(),
    })
}

impl Run {
    /// A cell that did not run to the end.
    fn failed() -> Run {
        let n = f64::NAN;
        Run {
            total_ms: n,
            setup_ms: n,
            downtime_ms: n,
            blackout_ms: n,
            mib: n,
            rounds: n,
            writes_before: n,
            writes_during: n,
            cpu_s: n,
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// migaccel's two processes migrating the embedded guest with the same class.
fn migaccel_run(ram: u64, hot: u64, prepared: bool, warmup: Duration) -> anyhow::Result<Run> {
    let bin = std::env::current_exe()?.with_file_name("migaccel");
    let addr = format!("127.0.0.1:{}", free_port()?);
    // Like for like with QEMU over plain TCP: migaccel runs without its channel protection
    // too (`--insecure`); the QEMU + migaccel "sealed" systems and `transport --channel`
    // measure what sealing costs.
    let mut args: Vec<String> =
        ["receive", "--listen", &addr, "--report", "json", "--insecure"].map(String::from).into();
    if prepared {
        args.extend(["--prepare-ram".into(), ram.to_string()]);
    }
    let recv = spawn_receiver(&bin, &args)?;
    // The embedded guest's data RAM starts at 4 MiB; QEMU's at 16 MiB: the same hot pages.
    let working_set = if hot == u64::MAX { ram - (16 << 20) } else { hot };
    let workload: Vec<String> = if hot == 0 {
        vec!["--workload".into(), "idle".into()]
    } else {
        vec![
            "--workload".into(),
            "hot".into(),
            "--hot-rate".into(),
            "0".into(),
            "--hot-working-set".into(),
            format!("{working_set}"),
        ]
    };
    let out = Command::new(&bin)
        .args(["send", "--to", &addr, "--report", "json", "--prefill", "--vcpus", "1", "--insecure"])
        .args(["--ram", &format!("{ram}"), "--warmup-ms", &warmup.as_millis().to_string()])
        .args(&workload)
        .stderr(Stdio::piped())
        .output()
        .context("migaccel send")?;
    let r = recv.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "send: {}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(r.status.success(), "receive failed");
    let s: Value = serde_json::from_slice(&out.stdout)?;
    let d: Value = serde_json::from_slice(&r.stdout).context("the receiver's JSON report")?;
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let blackout = f(&d, "guest_first_report_unix_us") - f(&s, "guest_last_report_unix_us");
    Ok(Run {
        total_ms: f(&s, "total_ms"),
        setup_ms: f(&s, "setup_ms"),
        downtime_ms: f(&s, "downtime_ms"),
        blackout_ms: blackout / 1e3,
        mib: f(&s, "bytes_total") / (1 << 20) as f64,
        rounds: s["precopy_rounds"].as_array().map_or(f64::NAN, |r| r.len() as f64 + 1.0),
        writes_before: f(&s, "guest_writes_per_s_setup"),
        writes_during: f(&s, "guest_writes_per_s_precopy"),
        cpu_s: (f(&s, "cpu_ms") + f(&d, "cpu_ms")) / 1e3,
    })
}

/// Start `migaccel receive` with `args` and wait for its listening line; its log is drained.
fn spawn_receiver(bin: &Path, args: &[String]) -> anyhow::Result<std::process::Child> {
    let mut recv = Command::new(bin).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut err = BufReader::new(recv.stderr.take().context("receiver stderr")?);
    let mut line = String::new();
    loop {
        line.clear();
        anyhow::ensure!(err.read_line(&mut line)? > 0, "the receiver exited before listening");
        if line.contains("listening on") {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    Ok(recv)
}

/// QEMU's guest migrated QEMU → QEMU by migaccel attached to both processes; `sealed`:
/// with migaccel's default channel (authenticated, every frame sealed), else `--insecure`.
fn migaccel_qemu_run(
    dir: &Path,
    kernel: &Path,
    ram: u64,
    prepared: bool,
    sealed: bool,
    warmup: Duration,
) -> anyhow::Result<Run> {
    let bin = std::env::current_exe()?.with_file_name("migaccel");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let (dst, dst_hb, dst_mig) = qemu_for_migaccel(dir, "mdst", ram >> 20, kernel, true, &[])?;
    let (mut src, src_hb, src_mig) = qemu_for_migaccel(dir, "msrc", ram >> 20, kernel, false, &[])?;
    src.wait_prefilled(Duration::from_secs(600))?;
    std::thread::sleep(warmup);
    let channel: Vec<String> =
        if sealed { vec!["--auth-key".into(), keys(dir)?.1.display().to_string()] } else { vec!["--insecure".into()] };
    let mut args: Vec<String> = ["receive", "--listen", &addr, "--report", "json"].map(String::from).into();
    args.extend(channel.iter().cloned());
    args.extend(["--qemu-pid".into(), dst.pid().to_string(), "--qmp".into(), dst_mig.display().to_string()]);
    if !prepared {
        args.push("--no-populate".into());
    }
    // Attaching (and, prepared, allocating RAM) happens before the listening line.
    let recv = spawn_receiver(&bin, &args)?;
    let (w0, tw0) = (src.read_u64(WRITE_COUNT_GPA)?, Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let (w1, tw1) = (src.read_u64(WRITE_COUNT_GPA)?, Instant::now());
    let cpu0 = src.cpu_time()? + dst.cpu_time()?;
    let out = Command::new(&bin)
        .args(["send", "--to", &addr, "--report", "json", "--qemu-pid", &src.pid().to_string()])
        .args(&channel)
        .arg("--qmp")
        .arg(&src_mig)
        .stderr(Stdio::piped())
        .output()
        .context("migaccel send")?;
    let cpu = (src.cpu_time()? + dst.cpu_time()?).saturating_sub(cpu0);
    let r = recv.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "send: {}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(r.status.success(), "receive failed");
    let w2 = src.read_u64(WRITE_COUNT_GPA)?;
    let s: Value = serde_json::from_slice(&out.stdout)?;
    let d: Value = serde_json::from_slice(&r.stdout).context("the receiver's JSON report")?;
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let last_src = src_hb.last().context("the source guest sent no heartbeat")?;
    let first_dst = dst_hb.wait_after(last_src, Duration::from_secs(30)).context("the destination guest")?;
    let precopy_s = (f(&s, "total_ms") - f(&s, "downtime_ms")) / 1e3;
    let _ = d;
    Ok(Run {
        total_ms: f(&s, "total_ms"),
        setup_ms: f(&s, "setup_ms"),
        downtime_ms: f(&s, "downtime_ms"),
        blackout_ms: (first_dst - last_src).as_secs_f64() * 1e3,
        mib: f(&s, "bytes_total") / (1 << 20) as f64,
        rounds: s["precopy_rounds"].as_array().map_or(f64::NAN, |r| r.len() as f64 + 1.0),
        writes_before: (w1 - w0) as f64 / (tw1 - tw0).as_secs_f64(),
        writes_during: w2.saturating_sub(w1) as f64 / precopy_s,
        // Both QEMUs (vCPU threads included) and migaccel's two processes.
        cpu_s: cpu.as_secs_f64() + (f(&s, "cpu_ms") + f(&d, "cpu_ms")) / 1e3,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
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

/// TSC ticks per millisecond, from the CPU's nominal clock (`constant_tsc` hosts).
fn tsc_ticks_per_ms() -> anyhow::Result<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo")?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .context("cpu MHz in /proc/cpuinfo")?;
    Ok((mhz * 1e3) as u64)
}

/// `only`: the systems to run (exact names as printed); empty runs all of them. A system
/// left out leaves its rows empty, and ratios against it are NaN.
pub fn vs_qemu(
    rams: &[ByteSize],
    hot: ByteSize,
    reps: u32,
    warmup_ms: u64,
    only: &[String],
    plot: Option<&Path>,
) -> anyhow::Result<()> {
    for r in rams {
        // Source and destination hold the guest's RAM at once.
        if 2 * r.0 + (1 << 30) > accel_user::host::mem_available().unwrap_or(u64::MAX) {
            bail!("{} MiB: two guests of this size do not fit in this host's available memory", r.0 >> 20);
        }
    }
    let dir = std::env::temp_dir().join(format!("migaccel-vs-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let warmup = Duration::from_millis(warmup_ms);
    let ticks = tsc_ticks_per_ms()?;
    let hot_name = format!("hot {} MiB at full speed, prefilled", hot.0 >> 20);
    let classes = [("idle, prefilled", 0u64), (hot_name.as_str(), hot.0), ("all RAM at full speed", u64::MAX)];
    let mut systems: Vec<String> = QEMU_CFGS.iter().map(|c| c.name.to_string()).collect();
    systems.push("migaccel".into());
    systems.push("migaccel, prepared destination".into());
    systems.push("QEMU + migaccel".into());
    systems.push("QEMU + migaccel, prepared destination".into());
    systems.push("QEMU + migaccel, sealed".into());
    systems.push("QEMU + migaccel, sealed, prepared destination".into());
    let nq = QEMU_CFGS.len();
    if let Some(bad) = only.iter().find(|o| !systems.contains(o)) {
        bail!("--only {bad:?}: no such system (one of: {})", systems.join(", "));
    }
    let selected = |k: usize| only.is_empty() || only.contains(&systems[k]);
    say!("# vs-qemu: {reps} repetition(s), interleaved; 1 vCPU; warm-up {warmup_ms} ms after the prefill");
    say!();
    say!(
        "| RAM | class | system | total ms | setup ms | downtime ms | blackout ms | MiB moved | rounds | guest writes/s before | during precopy | CPU s | total / best QEMU | downtime / best QEMU | blackout / best QEMU | total / best QEMU of all | total / best QEMU with TLS |"
    );
    say!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // Per cell (RAM, class): each system's median total, for the chart.
    let mut chart: Vec<accel_user::app::plot::Group> = Vec::new();
    for ram in rams {
        for &(class, hot) in &classes {
            let kernel = guest_image(&dir, &GuestImage::filled(ram.0, hot, Some(ticks)))?;
            let mut runs: Vec<Vec<Run>> = vec![Vec::new(); systems.len()];
            let mut ratios: Vec<Vec<Ratios>> = vec![Vec::new(); systems.len() - nq];
            for rep in 0..reps as usize {
                let mut this: Vec<Option<Run>> = vec![None; systems.len()];
                for k in (0..systems.len()).map(|k| (k + rep) % systems.len()) {
                    if !selected(k) {
                        this[k] = Some(Run::failed());
                        runs[k].push(Run::failed());
                        continue;
                    }
                    let r = if k < nq {
                        qemu_run(&dir, &kernel, ram.0, &QEMU_CFGS[k], warmup)
                    } else if k < nq + 2 {
                        migaccel_run(ram.0, hot, k == nq + 1, warmup)
                    } else {
                        let j = k - nq - 2;
                        migaccel_qemu_run(&dir, &kernel, ram.0, j % 2 == 1, j >= 2, warmup)
                    }
                    .with_context(|| format!("{} MiB, {class}, {}", ram.0 >> 20, systems[k]));
                    // A system that fails a cell (QEMU itself has crashed here) leaves it
                    // empty; the other systems' figures still count.
                    let r = r.unwrap_or_else(|e| {
                        eprintln!("FAILED: {e:#}");
                        Run::failed()
                    });
                    eprintln!(
                        "{} MiB, {class}, {}: total {:.0} ms, downtime {:.1} ms, blackout {:.1} ms",
                        ram.0 >> 20,
                        systems[k],
                        r.total_ms,
                        r.downtime_ms,
                        r.blackout_ms
                    );
                    this[k] = Some(r);
                    runs[k].push(r);
                }
                let q: Vec<Run> = this[..nq].iter().map(|r| r.expect("every QEMU cell ran")).collect();
                // Like for like: a fresh migaccel destination against QEMU without
                // preallocation, a prepared one against QEMU with `-mem-prealloc`.
                for (j, m) in this[nq..].iter().enumerate() {
                    let m = m.expect("every migaccel cell ran");
                    // Plain QEMU (no TLS) for the first four ratios, QEMU with TLS for the last.
                    let best = |f: fn(&Run) -> f64, all: bool, tls: bool| {
                        let same = |c: &QemuCfg| c.tls == tls && (all || c.prealloc == (j % 2 == 1));
                        q.iter().zip(&QEMU_CFGS).filter(|(_, c)| same(c)).map(|(r, _)| f(r)).fold(f64::NAN, f64::min)
                    };
                    ratios[j].push((
                        m.total_ms / best(|r| r.total_ms, false, false),
                        m.downtime_ms / best(|r| r.downtime_ms, false, false),
                        m.blackout_ms / best(|r| r.blackout_ms, false, false),
                        m.total_ms / best(|r| r.total_ms, true, false),
                        m.total_ms / best(|r| r.total_ms, false, true),
                    ));
                }
            }
            let short = class.split(',').next().unwrap_or(class);
            chart.push((
                format!("{} GiB {short}", ram.0 as f64 / (1u64 << 30) as f64),
                systems
                    .iter()
                    .enumerate()
                    .filter(|&(k, _)| selected(k))
                    .map(|(k, name)| (name.clone(), median(runs[k].iter().map(|r| r.total_ms).collect())))
                    .collect(),
            ));
            for (k, name) in systems.iter().enumerate().filter(|&(k, _)| selected(k)) {
                let col = |f: fn(&Run) -> f64| median(runs[k].iter().map(f).collect());
                let ratio = |f: fn(&Ratios) -> f64| {
                    if k < nq {
                        String::new()
                    } else {
                        format!("{:.2}", median(ratios[k - nq].iter().map(f).collect()))
                    }
                };
                let rate = |v: f64| if v.is_nan() { "–".to_string() } else { format!("{:.1} M", v / 1e6) };
                say!(
                    "| {} MiB | {class} | {name} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {} | {} | {:.2} | {} | {} | {} | {} | {} |",
                    ram.0 >> 20,
                    col(|r| r.total_ms),
                    col(|r| r.setup_ms),
                    col(|r| r.downtime_ms),
                    col(|r| r.blackout_ms),
                    col(|r| r.mib),
                    col(|r| r.rounds),
                    rate(col(|r| r.writes_before)),
                    rate(col(|r| r.writes_during)),
                    col(|r| r.cpu_s),
                    ratio(|r| r.0),
                    ratio(|r| r.1),
                    ratio(|r| r.2),
                    ratio(|r| r.3),
                    ratio(|r| r.4),
                );
            }
        }
    }
    say!();
    say!(
        "Medians over repetitions. Ratios are medians of per-repetition ratios against the best QEMU configuration without TLS of the same repetition with the same destination memory (fresh: QEMU without preallocation; prepared: QEMU with -mem-prealloc), each column's own best; 'of all' against the best of the six without TLS; 'with TLS' against the best QEMU with tls-creds-psk and the same destination memory."
    );
    if let Some(p) = plot {
        let title = format!("total migration time per system (median of {reps}; lower is better)");
        let svg = accel_user::app::plot::bars(&title, "total ms", &chart).map_err(anyhow::Error::msg)?;
        std::fs::write(p, svg).with_context(|| format!("--plot {}", p.display()))?;
        eprintln!("wrote the chart to {}", p.display());
        // The results page lives in docs/: a chart there is linked by its name.
        let shown = p.strip_prefix("docs").unwrap_or(p);
        say!("![{title}]({})", shown.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
