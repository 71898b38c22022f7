//! `migaccel`: live-migrate KVM guests.
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use accel_user::app::config::{ByteSize, Config, DirtySource, PageStateSource, WorkloadKind};
use accel_user::app::session;
use accel_user::source::Event;
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvm_hooks::migratable::Migratable;

#[derive(Parser)]
#[command(name = "migaccel", version, about = "Fast live migration of KVM guests")]
struct Cli {
    /// TOML config file (see docs/config.md); flags override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log filter (e.g. info, debug, accel_user=trace).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the embedded guest, migrate it live over loopback into a second VM, verify.
    Demo(Common),
    /// Boot the embedded guest described by the config and migrate it to a receiver.
    Send {
        /// Receiver address (IP:port).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        common: Common,
    },
    /// Wait for one incoming migration, resume the VM, check it runs.
    Receive {
        /// Address to listen on (IP:port); default from the config.
        #[arg(long)]
        listen: Option<String>,
        /// Refuse VMs with more RAM than this.
        #[arg(long, value_parser = parse_size)]
        max_ram: Option<ByteSize>,
        /// Longest wait, after resuming, for every vCPU of the VM to report progress.
        #[arg(long)]
        liveness_timeout_ms: Option<u64>,
        /// Allocate and pre-fault this much guest RAM before listening (the source VM must
        /// have exactly this much).
        #[arg(long, value_parser = parse_size)]
        prepare_ram: Option<ByteSize>,
        /// With --qemu-pid: leave the received VM paused (QEMU started with -S).
        #[arg(long)]
        leave_paused: bool,
        /// With --qemu-pid: do not allocate QEMU's guest RAM when attaching (qemu.populate).
        #[arg(long)]
        no_populate: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Write a fresh random pre-shared key to FILE (mode 0600; refuses to overwrite), for
    /// `--auth-key` / `auth.key_file` on both hosts.
    Keygen {
        /// Where to write the key (64 hex digits and a newline).
        file: PathBuf,
    },
    /// Report what this host supports.
    Doctor,
    /// Boot the embedded guest described by the config and let it run (a VMM, nothing
    /// else: something for `watch` to watch).
    Run {
        /// How long to run.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Keep KVM dirty logging on for the whole run, as QEMU's `calc-dirty-rate` or
        /// `set-vcpu-dirty-limit` turn it on outside a migration (so `watch` sees pushes).
        #[arg(long)]
        dirty_log: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Watch a VM that another process owns (QEMU, another migaccel) with the eBPF probes:
    /// dirty-ring pushes per memslot and page-state events, until it exits or time is up.
    Watch {
        /// The VMM's process id.
        #[arg(long)]
        pid: u32,
        /// How long to watch at most.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// One sample line per interval.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
        /// Report format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        report: Format,
    },
}

#[derive(Args, Clone, Default)]
struct Common {
    /// Guest RAM (e.g. 512MiB, 2GiB).
    #[arg(long, value_parser = parse_size)]
    ram: Option<ByteSize>,
    #[arg(long)]
    vcpus: Option<u32>,
    #[arg(long, value_enum)]
    workload: Option<WorkloadKind>,
    #[arg(long, value_parser = parse_size)]
    hot_working_set: Option<ByteSize>,
    /// Pages per second for the hot workload (0 = unlimited).
    #[arg(long)]
    hot_rate: Option<u64>,
    #[arg(long)]
    warmup_ms: Option<u64>,
    /// Write every data page before the guest starts.
    #[arg(long)]
    prefill: bool,
    #[arg(long)]
    downtime_ms: Option<u64>,
    #[arg(long)]
    min_rounds: Option<u32>,
    #[arg(long)]
    max_rounds: Option<u32>,
    #[arg(long)]
    batch_pages: Option<u32>,
    /// Most bytes per second a precopy round sends (e.g. 100MiB; 0 = no cap).
    #[arg(long, value_parser = parse_size)]
    max_bandwidth: Option<ByteSize>,
    /// Longest the migration may run before it switches over (0 = no limit); then
    /// `--time-limit-action` says what happens.
    #[arg(long)]
    time_limit_ms: Option<u64>,
    /// At the time limit: cancel (the source runs on) or force a switchover.
    #[arg(long, value_enum)]
    time_limit_action: Option<accel_user::policy::LimitAction>,
    /// Progress on stderr: plain lines, or one JSON object per line (for tools).
    #[arg(long, value_enum)]
    progress: Option<ProgressFormat>,
    #[arg(long, value_enum)]
    dirty_source: Option<DirtySource>,
    #[arg(long)]
    dirty_ring_entries: Option<u32>,
    #[arg(long)]
    kvm_device: Option<PathBuf>,
    /// How pages travel.
    #[arg(long, value_enum)]
    transport: Option<accel_user::wire::transport::TransportMode>,
    /// Page streams (1 = pages on the control connection).
    #[arg(long)]
    streams: Option<u32>,
    /// Register guest RAM as io_uring fixed buffers for zero-copy sends (pins all of it
    /// before connecting).
    #[arg(long)]
    fixed_buffers: bool,
    /// Do not throttle vCPUs when the guest dirties memory faster than the link.
    #[arg(long)]
    no_auto_converge: bool,
    /// Confidential migration through the in-guest Migration Handler, with the transport
    /// key in FILE (32 raw bytes or 64 hex digits, mode 0600).
    #[arg(long, value_name = "FILE")]
    confidential_key: Option<PathBuf>,
    /// Confidential mode: classify pages by the VMM's record or by the eBPF page-state map.
    #[arg(long, value_enum)]
    page_state_source: Option<PageStateSource>,
    /// Confidential mode: handler vCPUs (lanes) the Migration Handler runs on, 1 to 4.
    #[arg(long, value_name = "N")]
    mh_vcpus: Option<u32>,
    /// Pre-shared key both ends authenticate with (32 raw bytes or 64 hex digits, mode
    /// 0600; the same file on both hosts). `migaccel keygen FILE` writes one.
    #[arg(long, value_name = "FILE")]
    auth_key: Option<PathBuf>,
    /// Migrate without authentication or integrity: any process that reaches the
    /// receiver can make it run a VM of its choosing. For isolated test networks only.
    #[arg(long)]
    insecure: bool,
    /// The destination's identity, bound into the handshake (`auth.destination_id`): on
    /// `receive` this host's name, on `send` the host the VM is meant for.
    #[arg(long, value_name = "NAME")]
    destination_id: Option<String>,
    /// Report format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    report: Format,
    /// Write guest RAM as it stood at switchover (source) / at resume (destination).
    #[arg(long, value_name = "PATH")]
    dump_memory: Option<PathBuf>,
    /// Draw the migration's timeline (per round: pages sent, dirty pages found,
    /// throughput, the guest's dirtying rate; downtime in the title) as SVG into FILE.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Migrate (send) or fill (receive) this running QEMU process's VM instead of the
    /// embedded guest (docs/qemu.md).
    #[arg(long, value_name = "PID")]
    qemu_pid: Option<u32>,
    /// That QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
}

#[derive(Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
enum ProgressFormat {
    /// One line per round and phase.
    #[default]
    Text,
    /// One JSON object per line, the fields of QMP's `query-migrate` where they apply.
    Json,
    /// Nothing.
    None,
}

#[derive(Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
enum Format {
    #[default]
    Text,
    Json,
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse()
}

impl Common {
    fn apply(&self, c: &mut Config) {
        if let Some(p) = self.qemu_pid {
            c.qemu.pid = p;
        }
        if let Some(p) = &self.qmp {
            c.qemu.qmp = Some(p.clone());
        }
        let g = &mut c.guest;
        if let Some(v) = self.ram {
            g.ram = v;
        }
        if let Some(v) = self.vcpus {
            g.vcpus = v;
        }
        if let Some(v) = self.workload {
            g.workload = v;
        }
        if let Some(v) = self.hot_working_set {
            g.hot_working_set = v;
        }
        if let Some(v) = self.hot_rate {
            g.hot_rate = v;
        }
        if let Some(v) = self.warmup_ms {
            g.warmup_ms = v;
        }
        if self.prefill {
            g.prefill = true;
        }
        let m = &mut c.migration;
        if let Some(v) = self.downtime_ms {
            m.downtime_target_ms = v;
        }
        if let Some(v) = self.min_rounds {
            m.min_rounds = v;
        }
        if let Some(v) = self.max_rounds {
            m.max_rounds = v;
        }
        if let Some(v) = self.batch_pages {
            m.batch_pages = v;
        }
        if let Some(v) = self.max_bandwidth {
            m.max_bandwidth = v;
        }
        if let Some(v) = self.time_limit_ms {
            m.time_limit_ms = v;
        }
        if let Some(v) = self.time_limit_action {
            m.time_limit_action = v;
        }
        if let Some(v) = self.dirty_source {
            m.dirty_source = v;
        }
        if let Some(v) = self.dirty_ring_entries {
            m.dirty_ring_entries = v;
        }
        if let Some(v) = self.transport {
            m.transport = v;
        }
        if let Some(v) = self.streams {
            m.streams = v;
        }
        if self.fixed_buffers {
            m.fixed_buffers = true;
        }
        if self.no_auto_converge {
            m.auto_converge = false;
        }
        if let Some(v) = &self.kvm_device {
            c.host.kvm_device = v.clone();
        }
        if let Some(k) = &self.auth_key {
            c.auth.key_file = Some(k.clone());
            c.auth.insecure = false;
        }
        if self.insecure {
            c.auth.insecure = true;
            c.auth.key_file = None;
        }
        if let Some(id) = &self.destination_id {
            c.auth.destination_id = Some(id.clone());
        }
        if let Some(k) = &self.confidential_key {
            c.confidential.enabled = true;
            c.confidential.key_file = Some(k.clone());
        }
        if let Some(v) = self.page_state_source {
            c.confidential.page_state_source = v;
        }
        if let Some(n) = self.mh_vcpus {
            c.confidential.mh_vcpus = n;
        }
    }
}

fn load(cli: &Cli, common: &Common) -> anyhow::Result<Config> {
    let mut c = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    common.apply(&mut c);
    c.validate()?;
    c.resolve_key().map_err(anyhow::Error::msg)?;
    if let Some(p) = &common.dump_memory {
        check_target("--dump-memory", p)?;
    }
    if let Some(p) = &common.plot {
        check_target("--plot", p)?;
    }
    Ok(c)
}

/// Output paths (`--dump-memory`, `--plot`) are checked before a guest boots or a
/// connection opens: a migration must not run only to fail at its end on a path that
/// cannot be written.
fn check_target(flag: &str, p: &Path) -> anyhow::Result<()> {
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let what = || format!("{flag} {}", p.display());
    let meta = std::fs::metadata(dir).with_context(|| format!("{}: directory {}", what(), dir.display()))?;
    anyhow::ensure!(meta.is_dir(), "{}: {} is not a directory", what(), dir.display());
    rustix::fs::access(dir, rustix::fs::Access::WRITE_OK)
        .with_context(|| format!("{}: directory {} is not writable", what(), dir.display()))?;
    Ok(())
}

/// Progress on stderr, as `--progress` says (default: text, none with `--report json`):
/// text is a progress bar on a terminal and one line per event otherwise.
fn progress(common: &Common, ram_bytes: u64) -> impl FnMut(Event) {
    use accel_user::app::progress::{Progress, Style};
    use std::io::IsTerminal;
    let json = common.report == Format::Json;
    let style = match common.progress.unwrap_or(if json { ProgressFormat::None } else { ProgressFormat::Text }) {
        ProgressFormat::Text => Some(Style::Text),
        ProgressFormat::Json => Some(Style::Json),
        ProgressFormat::None => None,
    };
    let mut p = style.map(|s| Progress::new(s, ram_bytes));
    let bar = (style == Some(Style::Text) && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(ram_bytes);
        if let Ok(s) = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {wide_msg}",
        ) {
            b.set_style(s);
        }
        b
    });
    move |e| {
        let Some(p) = p.as_mut() else { return };
        let line = p.line(&e);
        match &bar {
            Some(b) => {
                b.set_length(b.length().unwrap_or(0).max(p.transferred()));
                b.set_position(p.transferred());
                match e {
                    Event::Resumed { .. } => b.finish_with_message(line),
                    _ => b.set_message(line),
                }
            }
            None => eprintln!("{line}"),
        }
    }
}

/// `send --qemu-pid`: attach to the running QEMU and migrate its VM.
fn send_qemu(cfg: &Config, to: &str, common: &Common) -> anyhow::Result<()> {
    let qmp = cfg.qemu.qmp.as_deref().context("qemu.qmp")?;
    let vm = qemu_vm::QemuVm::attach(cfg.qemu.pid, qmp)?;
    eprintln!("attached to {}", vm.describe());
    let rep = session::send_vm(cfg, &vm, to, &mut progress(common, vm.ram().size()));
    let rep = match rep {
        Ok(r) => r,
        Err(e) => {
            drop(vm); // dirty logging off before the error is reported
            return Err(e.into());
        }
    };
    finish_send(common, vm.ram(), &rep)
}

/// After a successful `send`: `--dump-memory`, then the report.
/// Guest RAM is read only when it is dumped: copying it whole (8 GiB for an 8 GiB VM) to
/// print a report once got the sender killed for memory.
fn finish_send(
    common: &Common,
    ram: &kvm_hooks::memory::GuestRam,
    rep: &accel_user::report::SourceReport,
) -> anyhow::Result<()> {
    if let Some(p) = &common.dump_memory {
        dump_ram(p, ram)?;
    }
    plot(common, rep)?;
    if common.report == Format::Json {
        println!("{}", serde_json::to_string_pretty(rep)?);
    } else {
        print!("{}", rep.text());
    }
    Ok(())
}

/// `--plot FILE`: the timeline of the migration `rep` reports.
fn plot(common: &Common, rep: &accel_user::report::SourceReport) -> anyhow::Result<()> {
    let Some(path) = &common.plot else { return Ok(()) };
    let rounds: Vec<_> = rep.precopy_rounds.iter().chain(std::iter::once(&rep.final_round)).copied().collect();
    let switchover = match rep.switchover {
        accel_user::policy::SwitchReason::Converged { .. } => "converged",
        accel_user::policy::SwitchReason::RoundLimit { .. } => "round limit",
        accel_user::policy::SwitchReason::TimeLimit { .. } => "time limit",
    };
    let svg =
        accel_user::app::plot::timeline(&rounds, switchover, rep.total, rep.downtime).map_err(anyhow::Error::msg)?;
    std::fs::write(path, svg).with_context(|| format!("--plot {}", path.display()))?;
    eprintln!("wrote the migration's timeline to {}", path.display());
    Ok(())
}

/// `receive --qemu-pid`: fill the waiting QEMU (`-incoming defer`) and resume it.
fn receive_qemu(cfg: &Config, common: &Common) -> anyhow::Result<()> {
    let qmp = cfg.qemu.qmp.as_deref().context("qemu.qmp")?;
    anyhow::ensure!(
        cfg.receiver.prepare_ram.0 == 0,
        "--prepare-ram: a QEMU destination receives into QEMU's own RAM; leave it out"
    );
    let vms = qemu_vm::QemuVms::attach(cfg.qemu.pid, qmp, cfg.qemu.leave_paused, cfg.qemu.populate)?;
    let r = session::receiver_for(cfg, common.dump_memory.is_some(), vms)?;
    let l = TcpListener::bind(&cfg.receiver.listen).with_context(|| format!("listen on {}", cfg.receiver.listen))?;
    listening_line(cfg, &l)?;
    let (r, res) = session::receive_with(cfg, &l, r);
    let got = res?;
    let m = r.into_machine().context("receiver finished without a VM")?;
    if let Some(p) = &common.dump_memory {
        dump(p, got.snapshot.as_deref().unwrap_or_default())?;
    }
    let status = m.status()?;
    if common.report == Format::Json {
        let v = serde_json::json!({
            "pages": got.pages, "rounds": got.rounds, "bytes": got.bytes,
            "total_ms": got.total_time.as_secs_f64() * 1e3, "cpu_ms": got.cpu.as_secs_f64() * 1e3,
            "qemu_pid": m.pid(), "qemu_status": status,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "received {} pages in {} rounds ({:.1} ms); QEMU process {} is {status}",
            got.pages,
            got.rounds,
            got.total_time.as_secs_f64() * 1e3,
            m.pid()
        );
    }
    Ok(())
}

/// The line callers wait for (they may stop reading after it).
fn listening_line(cfg: &Config, l: &TcpListener) -> anyhow::Result<()> {
    if cfg.auth.insecure {
        eprintln!(
            "listening on {} (INSECURE: authentication is off, any process that can reach this address can send a VM to run here; docs/security.md)",
            l.local_addr()?
        );
    } else {
        eprintln!("listening on {} (authenticated: pre-shared key)", l.local_addr()?);
    }
    Ok(())
}

fn dump(path: &Path, ram: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("--dump-memory {}", path.display()))?;
    f.write_all(ram).with_context(|| format!("--dump-memory {}", path.display()))?;
    eprintln!("wrote {} bytes of guest RAM to {}", ram.len(), path.display());
    Ok(())
}

/// Write guest RAM to `path` from its mapping, a piece at a time.
fn dump_ram(path: &Path, ram: &kvm_hooks::memory::GuestRam) -> anyhow::Result<()> {
    let ctx = || format!("--dump-memory {}", path.display());
    let mut f = std::fs::File::create(path).with_context(ctx)?;
    let mut buf = vec![0u8; 64 << 20];
    let mut at = 0u64;
    while at < ram.size() {
        let n = (ram.size() - at).min(buf.len() as u64) as usize;
        ram.read(at, &mut buf[..n]).with_context(ctx)?;
        f.write_all(&buf[..n]).with_context(ctx)?;
        at += n as u64;
    }
    eprintln!("wrote {} bytes of guest RAM to {}", ram.size(), path.display());
    Ok(())
}

fn suffixed(p: &Path, s: &str) -> PathBuf {
    let mut o = p.as_os_str().to_owned();
    o.push(s);
    o.into()
}

/// SIGINT and SIGTERM cancel the migration where stopping is clean (before the commit point
/// the source runs on and the destination discards its copy); a second one ends the process
/// at once.
fn cancel_on_signals(cfg: &Config) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("install signal handlers")?;
    let cancel = cfg.cancel.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for sig in signals.forever() {
            let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
            if cancel.is_cancelled() {
                eprintln!("migaccel: {name} again: exiting now");
                std::process::exit(130);
            }
            eprintln!("migaccel: {name}: cancelling the migration (once more to exit at once)");
            cancel.cancel(name);
        }
    })?;
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Demo(common) => {
            let cfg = load(&cli, common)?;
            cancel_on_signals(&cfg)?;
            let json = common.report == Format::Json;
            let out = session::demo(&cfg, &mut progress(common, cfg.guest.ram.0))?;
            if let Some(p) = &common.dump_memory {
                dump(&suffixed(p, ".src"), &out.source_ram)?;
                dump(&suffixed(p, ".dst"), &out.dest_ram)?;
            }
            plot(common, &out.report.source)?;
            let r = &out.report;
            if json {
                println!("{}", serde_json::to_string_pretty(r)?);
            } else {
                print!("{}", r.source.text());
                let v = &r.verification;
                println!(
                    "verification: {} pages compared, {} mismatched, A/B invariant {}, destination guest {}",
                    v.pages_compared,
                    v.mismatched_pages.len(),
                    v.ab_invariant_error.as_deref().unwrap_or("ok"),
                    if v.guest_alive { "running" } else { "NOT running" }
                );
            }
            if !r.verification.ok() {
                bail!("verification failed: {:?}", r.verification);
            }
            Ok(())
        }
        Cmd::Send { to, common } => {
            let cfg = load(&cli, common)?;
            cancel_on_signals(&cfg)?;
            // No guest boots for a migration that cannot authenticate.
            cfg.auth_key().map_err(anyhow::Error::msg)?;
            if cfg.qemu.pid != 0 {
                return send_qemu(&cfg, to, common);
            }
            let m = session::boot_source(&cfg)?;
            let rep = session::send(&cfg, &m, to, &mut progress(common, m.ram().size()))?;
            finish_send(common, m.ram(), &rep)
        }
        Cmd::Receive { listen, max_ram, liveness_timeout_ms, prepare_ram, leave_paused, no_populate, common } => {
            let mut cfg = load(&cli, common)?;
            if let Some(l) = listen {
                cfg.receiver.listen = l.clone();
            }
            if let Some(v) = max_ram {
                cfg.receiver.max_ram = *v;
            }
            if let Some(v) = liveness_timeout_ms {
                cfg.receiver.liveness_timeout_ms = *v;
            }
            if let Some(v) = prepare_ram {
                cfg.receiver.prepare_ram = *v;
            }
            cfg.qemu.leave_paused |= *leave_paused;
            if *no_populate {
                cfg.qemu.populate = false;
            }
            cfg.validate()?;
            cancel_on_signals(&cfg)?;
            if cfg.qemu.pid != 0 {
                return receive_qemu(&cfg, common);
            }
            // Prepared before listening: a source that connects finds the destination ready.
            let r = session::receiver(&cfg, common.dump_memory.is_some())?;
            let l = TcpListener::bind(&cfg.receiver.listen)
                .with_context(|| format!("listen on {}", cfg.receiver.listen))?;
            // One line: callers wait for it and may stop reading after it.
            listening_line(&cfg, &l)?;
            let (r, res) = session::receive_with(&cfg, &l, r);
            let got = res?;
            let m = r.into_machine().context("receiver finished without a VM")?;
            if let Some(p) = &common.dump_memory {
                dump(p, got.snapshot.as_deref().unwrap_or_default())?;
            }
            let rep = session::observe(&m, &got, Duration::from_millis(cfg.receiver.liveness_timeout_ms));
            if common.report == Format::Json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                println!(
                    "received {} pages in {} rounds ({:.1} ms); guest progress {:?} -> {:?}: {}",
                    rep.pages,
                    rep.rounds,
                    rep.total.as_secs_f64() * 1e3,
                    rep.progress_at_resume,
                    rep.progress_after,
                    if rep.guest_alive { "running" } else { "NOT running" }
                );
            }
            if !rep.guest_alive {
                bail!("the destination guest is not making progress after resume");
            }
            Ok(())
        }
        Cmd::Keygen { file } => keygen(file),
        Cmd::Doctor => doctor(),
        Cmd::Run { seconds, dirty_log, common } => {
            let cfg = load(&cli, common)?;
            let until = secs("--seconds", *seconds)?;
            let m = session::boot_source(&cfg)?;
            if *dirty_log {
                m.dirty().start()?;
            }
            eprintln!("guest running (process {}); {} vCPU(s)", std::process::id(), cfg.guest.vcpus);
            let t0 = std::time::Instant::now();
            while t0.elapsed() < until {
                std::thread::sleep(Duration::from_millis(50).min(until.saturating_sub(t0.elapsed())));
                if let Some(f) = m.fault() {
                    bail!("the guest stopped: {f}");
                }
            }
            println!("ran {:.1} s; guest progress {:?}", t0.elapsed().as_secs_f64(), m.progress());
            Ok(())
        }
        Cmd::Watch { pid, seconds, interval_ms, report } => {
            let until = secs("--seconds", *seconds)?;
            if *interval_ms == 0 {
                bail!("--interval-ms must be at least 1");
            }
            let json = *report == Format::Json;
            let mut on = |s: &accel_user::app::watch::Sample| {
                if !json {
                    println!(
                        "{:>7.1} s  {:>9} pushes  {:>10.0} pages/s  {:>5} page-state events",
                        s.at_ms as f64 / 1e3,
                        s.pushes,
                        s.pushes_per_s,
                        s.page_state_events
                    );
                }
            };
            let rep = accel_user::app::watch::watch(*pid, until, Duration::from_millis(*interval_ms), &mut on)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                print!("{}", rep.text());
            }
            Ok(())
        }
    }
}

fn keygen(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = accel_user::wire::auth::ephemeral_key()?;
    let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("keygen: create {}", path.display()))?;
    writeln!(f, "{hex}").with_context(|| format!("keygen: write {}", path.display()))?;
    eprintln!("wrote a new pre-shared key to {} (copy it to the other host over a trusted channel)", path.display());
    Ok(())
}

/// A positive, finite number of seconds.
fn secs(flag: &str, v: f64) -> anyhow::Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 1e6) {
        bail!("{flag} {v} is not a number of seconds in (0, 1000000]");
    }
    Ok(Duration::from_secs_f64(v))
}

fn doctor() -> anyhow::Result<()> {
    let mut bad = 0;
    let mut line = |ok: bool, what: &str, detail: String| {
        println!("[{}] {what}: {detail}", if ok { " ok " } else { "FAIL" });
        bad += u32::from(!ok);
    };
    match kvm_hooks::vm::probe() {
        Ok(c) => {
            line(true, "KVM", format!("{} (API {})", kvm_hooks::vm::kvm_device().display(), c.api_version));
            line(
                c.dirty_ring_max_bytes > 0,
                "dirty ring",
                if c.dirty_ring_max_bytes > 0 {
                    format!("up to {} entries per vCPU", c.dirty_ring_max_bytes / 16)
                } else {
                    "not supported; the dirty bitmap will be used".into()
                },
            );
            line(
                c.manual_dirty_log_protect > 0,
                "manual dirty-log protect",
                format!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = {}", c.manual_dirty_log_protect),
            );
            line(true, "vCPUs", format!("recommended {}, max {}", c.nr_vcpus, c.max_vcpus));
        }
        Err(e) => line(false, "KVM", e.to_string()),
    }
    match accel_ebpf::ensure_tracepoints(&["kvm_dirty_ring_push", "kvm_hypercall", "kvm_vmgexit_enter"]) {
        Ok(()) => line(true, "KVM tracepoints", "kvm_dirty_ring_push, kvm_hypercall, kvm_vmgexit_enter present".into()),
        Err(e) => line(false, "KVM tracepoints", e.to_string()),
    }
    match accel_ebpf::test_run_page_state("map_gpa_range", &[12, 0x1000, 1, 1 << 4]) {
        Ok((ev, _)) if ev.len() == 1 => line(true, "BPF", "programs load; BPF_PROG_TEST_RUN works".into()),
        Ok((ev, _)) => line(false, "BPF", format!("test run produced {} events, expected 1", ev.len())),
        Err(e) => line(false, "BPF", e.to_string()),
    }
    match kvm_hooks::uring::probe() {
        Ok(u) => line(
            u.sendmsg && u.recv,
            "io_uring",
            format!("SENDMSG {} RECV {} SEND_ZC {} SENDMSG_ZC {}", u.sendmsg, u.recv, u.send_zc, u.sendmsg_zc),
        ),
        Err(e) => line(false, "io_uring", e.to_string()),
    }
    match kvm_hooks::sev::platform() {
        kvm_hooks::sev::Platform::Present(s) => line(true, "SEV", s),
        kvm_hooks::sev::Platform::Absent(why) => line(
            false,
            "SEV",
            format!("{why}; confidential migration runs with the reference MH, without hardware memory encryption"),
        ),
    }
    line(
        kvm_hooks::mh::IMAGE.len() > 64,
        "Migration Handler",
        format!("reference MH image built in ({} bytes, AES-256-GCM)", kvm_hooks::mh::IMAGE.len()),
    );
    if bad > 0 {
        println!("{bad} check(s) failed");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let mut msg = chain[0].clone();
            for c in &chain[1..] {
                if !msg.contains(c.as_str()) {
                    msg.push_str(": ");
                    msg.push_str(c);
                }
            }
            eprintln!("migaccel: error: {msg}");
            // A handover whose outcome is unknown leaves the source paused: its own exit code,
            // so whoever runs migaccel can tell it from a failure after which the source runs.
            // A cancelled migration has its own too: the source runs on, the destination
            // discarded its copy.
            match (e.downcast_ref::<accel_user::source::SendError>(), e.downcast_ref::<accel_user::dest::RecvError>()) {
                (Some(accel_user::source::SendError::HandoverUnknown { .. }), _) => ExitCode::from(3),
                (Some(accel_user::source::SendError::Cancelled { .. }), _)
                | (_, Some(accel_user::dest::RecvError::Cancelled(_))) => ExitCode::from(4),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
