//! QEMU for the tests and the vs-qemu bench: the multiboot guest (`qemu/guest.S`) and a QEMU
//! process with its QMP connection.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// What `qemu/guest.S` stores at [`PREFILL_MARKER_GPA`] once its prefill is done.
pub const PREFILLED: u32 = 0x600D_F111;
pub const PREFILL_MARKER_GPA: u64 = 0x10_0800;

/// Assemble `qemu/guest.S` into a flat multiboot image in `dir`: prefill up to `ram_end`,
/// then the hot loop up to `hot_end` (`None`: the guest's defaults, no prefill and a
/// 64 MiB hot range).
pub fn guest_image(dir: &Path, ram_end: Option<u64>, hot_end: Option<u64>) -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu/guest.S");
    let tag = format!("{:x}-{:x}", ram_end.unwrap_or(0), hot_end.unwrap_or(0));
    let (obj, bin) = (dir.join(format!("guest-{tag}.o")), dir.join(format!("guest-{tag}.bin")));
    let run = |c: &mut Command| -> anyhow::Result<()> {
        let o = c.output().context("binutils (as, ld): ./dev setup installs them")?;
        anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Ok(())
    };
    let mut asm = Command::new("as");
    asm.arg("--64");
    for (name, v) in [("RAM_END", ram_end), ("HOT_END", hot_end)] {
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
    /// with its QMP socket `NAME.sock` in `dir`, and negotiate QMP.
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
            .args(["-display", "none", "-monitor", "none", "-serial", "none", "-no-reboot", "-qmp"])
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
