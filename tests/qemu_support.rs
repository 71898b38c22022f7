//! QEMU for the tests and the vs-qemu bench: the multiboot guest (`qemu/guest.S`) and a QEMU
//! process with its QMP connection.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// What `qemu/guest.S` stores at [`PREFILL_MARKER_GPA`] once its prefill is done.
pub const PREFILLED: u32 = 0x600D_F111;
pub const PREFILL_MARKER_GPA: u64 = 0x10_0800;

/// Where the guest counts its page writes (a qword, in steps of 16 pages).
pub const WRITE_COUNT_GPA: u64 = 0x10_0808;

/// Where QEMU's pc machine puts RAM beyond 3 GiB (the PCI hole sits below 4 GiB).
pub const HIGH_RAM_BASE: u64 = 1 << 32;

/// What `qemu/guest.S` is assembled with (`None`: the guest's default).
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestImage {
    /// Prefill up to here below 4 GiB.
    pub ram_end: Option<u64>,
    /// Prefill `[4 GiB, high_end)` too.
    pub high_end: Option<u64>,
    /// The hot loop walks `[16 MiB, hot_end)` ...
    pub hot_end: Option<u64>,
    /// ... and `[4 GiB, hot_high_end)`.
    pub hot_high_end: Option<u64>,
    /// A byte to COM1 every this many TSC ticks.
    pub heartbeat_ticks: Option<u64>,
}

impl GuestImage {
    /// A guest of `ram` bytes on QEMU's pc machine that prefills all of its RAM past
    /// 16 MiB and walks the first `hot` bytes of it (`u64::MAX`: all of it) at full speed.
    /// From 3.5 GiB on, pc puts RAM beyond 3 GiB at 4 GiB: both parts are filled and walked.
    pub fn filled(ram: u64, hot: u64, heartbeat_ticks: Option<u64>) -> GuestImage {
        let (low_end, high_end) =
            if ram >= 0xe000_0000 { (3 << 30, HIGH_RAM_BASE + ram - (3 << 30)) } else { (ram, HIGH_RAM_BASE) };
        let hot_low = (16u64 << 20).saturating_add(hot).min(low_end);
        let hot_high = HIGH_RAM_BASE.saturating_add(hot.saturating_sub(low_end - (16 << 20))).min(high_end);
        GuestImage {
            ram_end: Some(low_end),
            high_end: Some(high_end),
            hot_end: Some(hot_low),
            hot_high_end: Some(hot_high),
            heartbeat_ticks,
        }
    }
}

/// Assemble `qemu/guest.S` into a flat multiboot image in `dir`.
pub fn guest_image(dir: &Path, g: &GuestImage) -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu/guest.S");
    let syms = [
        ("RAM_END", g.ram_end),
        ("HIGH_END", g.high_end),
        ("HOT_END", g.hot_end),
        ("HOT_HIGH_END", g.hot_high_end),
        ("HEARTBEAT", g.heartbeat_ticks),
    ];
    let tag: Vec<String> = syms.iter().map(|(_, v)| format!("{:x}", v.unwrap_or(0))).collect();
    let tag = tag.join("-");
    let (obj, bin) = (dir.join(format!("guest-{tag}.o")), dir.join(format!("guest-{tag}.bin")));
    let run = |c: &mut Command| -> anyhow::Result<()> {
        let o = c.output().context("binutils (as, ld): ./dev setup installs them")?;
        anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Ok(())
    };
    let mut asm = Command::new("as");
    asm.arg("--64");
    for (name, v) in syms {
        if let Some(v) = v {
            asm.args(["--defsym", &format!("{name}={v:#x}")]);
        }
    }
    run(asm.arg("-o").arg(&obj).arg(&src))?;
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-Ttext=0x100000", "--oformat", "binary", "-o"])
        .arg(&bin)
        .arg(&obj))?;
    Ok(bin)
}

/// A QEMU process with its QMP connection, killed on drop.
pub struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
}

impl Qemu {
    /// Start `qemu-system-x86_64 -machine pc -accel ACCEL -m RAM_MIB -kernel KERNEL … EXTRA`
    /// with its QMP socket `NAME.sock` in `dir`, and negotiate QMP. COM1 is unconnected
    /// unless `extra` names a `-serial`.
    pub fn start(
        dir: &Path,
        name: &str,
        accel: &str,
        ram_mib: u64,
        kernel: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Qemu> {
        let sock = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "pc", "-accel", accel, "-m", &ram_mib.to_string(), "-kernel"])
            .arg(kernel)
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .args(if extra.contains(&"-serial") { &[][..] } else { &["-serial", "none"][..] })
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("qemu-system-x86_64 (./dev setup installs qemu-system-x86)")?;
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(30) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => bail!("QMP socket {}: {e}", sock.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Qemu { child, qmp: BufReader::new(s) };
        q.read()?; // greeting
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// The next QMP message that is not an event.
    fn read(&mut self) -> anyhow::Result<Value> {
        loop {
            let mut l = String::new();
            self.qmp.read_line(&mut l)?;
            anyhow::ensure!(!l.is_empty(), "QMP connection closed");
            let v: Value = serde_json::from_str(&l)?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Run QMP command `name`; its `return` value, or its error.
    pub fn cmd(&mut self, name: &str, args: Value) -> anyhow::Result<Value> {
        writeln!(self.qmp.get_mut(), "{}", json!({"execute": name, "arguments": args}))?;
        let r = self.read()?;
        if let Some(e) = r.get("error") {
            bail!("QMP {name}: {e}");
        }
        Ok(r["return"].clone())
    }

    /// Ask QEMU to quit without waiting for its answer.
    pub fn quit(&mut self) -> anyhow::Result<()> {
        writeln!(self.qmp.get_mut(), "{}", json!({"execute": "quit"}))?;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A qword of guest-physical memory, read through the monitor.
    pub fn read_u64(&mut self, gpa: u64) -> anyhow::Result<u64> {
        let r = self.cmd("human-monitor-command", json!({ "command-line": format!("xp /1gx {gpa:#x}") }))?;
        let text = r.as_str().unwrap_or_default();
        let v = text.rsplit(':').next().map(str::trim).and_then(|h| h.strip_prefix("0x"));
        v.and_then(|h| u64::from_str_radix(h, 16).ok()).with_context(|| format!("xp {gpa:#x}: {text}"))
    }

    /// CPU time of the QEMU process so far (every thread, vCPUs included).
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name (which may hold spaces) start at the state, field 3.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).context("/proc stat")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f
            .get(11)
            .and_then(|u| u.parse().ok())
            .zip(f.get(12).and_then(|s| s.parse().ok()))
            .map(|(u, s): (u64, u64)| u + s)
            .context("utime/stime")?;
        // USER_HZ is 100 on Linux.
        Ok(Duration::from_millis(ticks * 10))
    }

    /// Wait until the guest stored [`PREFILLED`] (read through the monitor).
    pub fn wait_prefilled(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let want = format!("{PREFILLED:#x}");
        loop {
            let cmd = format!("xp /1xw {PREFILL_MARKER_GPA:#x}");
            let r = self.cmd("human-monitor-command", json!({ "command-line": cmd }))?;
            let text = r.as_str().unwrap_or_default();
            if text.contains(&want) {
                return Ok(());
            }
            anyhow::ensure!(t0.elapsed() < timeout, "the QEMU guest never finished its prefill: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes arriving on a QEMU serial port (a `-chardev socket` server), each read timestamped:
/// the guest's heartbeat.
pub struct Heartbeat {
    beats: Arc<Mutex<Vec<Instant>>>,
}

impl Heartbeat {
    pub fn listen(sock: &Path) -> anyhow::Result<Heartbeat> {
        let t0 = Instant::now();
        let mut s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(30) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => bail!("serial socket {}: {e}", sock.display()),
            }
        };
        let beats = Arc::new(Mutex::new(Vec::new()));
        let b = beats.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().push(Instant::now());
            }
        });
        Ok(Heartbeat { beats })
    }
    pub fn last(&self) -> Option<Instant> {
        self.beats.lock().unwrap().last().copied()
    }
    pub fn first_after(&self, t: Instant) -> Option<Instant> {
        self.beats.lock().unwrap().iter().find(|&&b| b >= t).copied()
    }
    pub fn count(&self) -> usize {
        self.beats.lock().unwrap().len()
    }
    /// Wait for the first beat at or after `t`; a guest that beats every millisecond is
    /// late by `timeout` only when it does not run.
    pub fn wait_after(&self, t: Instant, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(b) = self.first_after(t) {
                return Ok(b);
            }
            anyhow::ensure!(Instant::now() < deadline, "no heartbeat within {timeout:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// QEMU the way migaccel attaches to it: guest RAM in a shared memfd backend, KVM's dirty
/// ring on, a second QMP socket `NAME-mig.sock` for migaccel (QEMU serves one client per
/// monitor; the test keeps the first) and COM1 on `NAME-serial.sock` for the heartbeat.
pub fn qemu_for_migaccel(
    dir: &Path,
    name: &str,
    ram_mib: u64,
    kernel: &Path,
    incoming: bool,
    extra: &[&str],
) -> anyhow::Result<(Qemu, Heartbeat, PathBuf)> {
    let serial = dir.join(format!("{name}-serial.sock"));
    let mig = dir.join(format!("{name}-mig.sock"));
    let _ = std::fs::remove_file(&serial);
    let _ = std::fs::remove_file(&mig);
    let chardev = format!("socket,id=hb,path={},server=on,wait=off", serial.display());
    let backend = format!("memory-backend-memfd,id=ram0,size={ram_mib}M,share=on");
    let qmp = format!("unix:{},server=on,wait=off", mig.display());
    let mut args = vec!["-object", &backend, "-machine", "memory-backend=ram0", "-qmp", &qmp];
    args.extend(["-chardev", &chardev, "-serial", "chardev:hb"]);
    if incoming {
        args.extend(["-incoming", "defer", "-S"]);
    }
    args.extend(extra);
    let q = Qemu::start(dir, name, "kvm,dirty-ring-size=4096", ram_mib, kernel, &args)?;
    let hb = Heartbeat::listen(&serial)?;
    Ok((q, hb, mig))
}

/// Compare two QEMU processes' guest RAM files page by page; the differing RAM offsets.
pub fn ram_diff(a: u32, b: u32, size: u64) -> anyhow::Result<Vec<u64>> {
    let open = |pid: u32| -> anyhow::Result<std::fs::File> {
        let fd = kvm_hooks::process::Pidfd::open(pid)?;
        Ok(qemu_vm::process::ram_file(&fd, size)?.file)
    };
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (open(a)?, open(b)?);
    let chunk = 64usize << 20;
    let (mut ba, mut bb) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut diff = Vec::new();
    let mut off = 0u64;
    while off < size {
        let n = chunk.min((size - off) as usize);
        // Positioned reads: the descriptors share their file offset with QEMU's.
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        for (i, (pa, pb)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
            if pa != pb {
                diff.push(off + i as u64 * 4096);
            }
        }
        off += n as u64;
    }
    Ok(diff)
}
