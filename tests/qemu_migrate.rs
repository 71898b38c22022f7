//! QEMU → QEMU migrations by migaccel: real QEMU processes, migaccel attached to both
//! through pidfds and QMP, the guest's RAM moved by migaccel and only the device state by
//! QEMU (`x-ignore-shared`). The destination starts paused (`-S`) and is left paused, so
//! both RAM files can be compared page for page before it runs.
use accel_user::wire::payload;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use accel_user::app::config::Config;
use accel_user::app::session;
use accel_user::source::Event;
use migaccel_tests::qemu::{guest_image, qemu_for_migaccel, ram_diff, GuestImage, Heartbeat, Qemu, WRITE_COUNT_GPA};
use qemu_vm::{QemuVm, QemuVms};
use serde_json::json;

/// The destination QEMU writes this page itself while it loads the device state (the
/// chipset's shadow-BIOS area below 1 MiB): not a page migaccel moves wrong.
const WRITTEN_BY_DESTINATION_QEMU: u64 = 0xe8000;

struct Pair {
    dir: PathBuf,
    src: Qemu,
    src_hb: Heartbeat,
    src_mig: PathBuf,
    dst: Qemu,
    dst_hb: Heartbeat,
    dst_mig: PathBuf,
    ram: u64,
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("migaccel-qm-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A source guest that prefilled its RAM and writes `hot` bytes of it at full speed, with
/// a heartbeat every ~1 ms; and a destination QEMU waiting for it.
fn pair(tag: &str, ram: u64, hot: u64, src_extra: &[&str]) -> Pair {
    let dir = tmpdir(tag);
    let kernel = guest_image(&dir, &GuestImage::filled(ram, hot, Some(3_000_000))).unwrap();
    let (mut src, src_hb, src_mig) = qemu_for_migaccel(&dir, "src", ram >> 20, &kernel, false, src_extra).unwrap();
    src.wait_prefilled(Duration::from_secs(600)).unwrap();
    let (dst, dst_hb, dst_mig) = qemu_for_migaccel(&dir, "dst", ram >> 20, &kernel, true, &[]).unwrap();
    Pair { dir, src, src_hb, src_mig, dst, dst_hb, dst_mig, ram }
}

fn config() -> Config {
    let mut c = Config::default();
    c.auth.key = Some(migaccel_tests::test_key());
    c.receiver.listen = "127.0.0.1:0".into();
    c
}

/// Migrate in this process: a receiver thread filling the destination QEMU (left paused),
/// the source attached here. `on` sees the source's events.
fn migrate(p: &Pair, c: &Config, on: &mut dyn FnMut(Event)) -> accel_user::report::SourceReport {
    let vms = QemuVms::attach(p.dst.pid(), &p.dst_mig, true, true).expect("attach to the destination QEMU");
    let r = session::receiver_for(c, false, vms).expect("receiver");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let cc = c.clone();
    let t = std::thread::spawn(move || {
        let (r, res) = session::receive_with(&cc, &l, r);
        res.map(|got| (got, r.into_machine().map(|m| m.pid())))
    });
    let vm = QemuVm::attach(p.src.pid(), &p.src_mig).expect("attach to the source QEMU");
    let rep = session::send_vm(c, &vm, &addr, on).expect("migration");
    let (got, pid) = t.join().unwrap().expect("the destination receives the VM");
    assert_eq!(pid, Some(p.dst.pid()));
    assert!(got.pages >= p.ram / 4096, "every page arrived at least once");
    rep
}

/// After a migration: both QEMUs paused, RAM equal page for page, the source's QEMU moved
/// only device state, and once resumed the destination guest runs (heartbeat, page writes).
fn check_handover(p: &mut Pair) {
    assert_eq!(p.src.cmd("query-status", json!({})).unwrap()["status"], "postmigrate");
    assert_eq!(p.dst.cmd("query-status", json!({})).unwrap()["status"], "paused");
    let diff = ram_diff(p.src.pid(), p.dst.pid(), p.ram).unwrap();
    let unexpected: Vec<String> =
        diff.iter().filter(|&&o| o != WRITTEN_BY_DESTINATION_QEMU).map(|o| format!("{o:#x}")).collect();
    assert!(
        unexpected.is_empty(),
        "{} page(s) differ, first: {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(8)]
    );
    let m = p.src.cmd("query-migrate", json!({})).unwrap();
    assert_eq!(m["status"], "completed", "{m}");
    let moved = m["ram"]["transferred"].as_u64().unwrap();
    eprintln!("QEMU's own stream: {moved} bytes of RAM sections (device memory such as VGA, firmware)");
    assert!(moved < 32 << 20, "QEMU moved {moved} bytes: guest RAM went through QEMU, not migaccel");
    // The destination runs the guest on: its heartbeat and its page writes go on.
    let writes = p.dst.read_u64(WRITE_COUNT_GPA).unwrap();
    let before = p.dst_hb.count();
    let resumed = Instant::now();
    p.dst.cmd("cont", json!({})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.dst_hb.first_after(resumed).is_none() || p.dst.read_u64(WRITE_COUNT_GPA).unwrap() == writes {
        assert!(Instant::now() < deadline, "the destination guest does not run after resume");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(p.dst_hb.count() > before);
    let _ = std::fs::remove_dir_all(&p.dir);
}

fn full_speed(tag: &str, ram: u64) {
    let mut p = pair(tag, ram, 256 << 20, &[]);
    // The destination's RAM holds something already (as after an earlier, failed receive)
    // where the source's RAM is zero: it must not survive the migration.
    {
        use std::os::unix::fs::FileExt;
        let fd = kvm_hooks::process::Pidfd::open(p.dst.pid()).unwrap();
        let f = qemu_vm::process::ram_file(&fd, p.ram).unwrap().file;
        f.write_all_at(&[0xEE; 4096], 8 << 20).unwrap();
    }
    let rep = migrate(&p, &config(), &mut |_| {});
    eprintln!(
        "{tag}: total {:?}, downtime {:?}, {} rounds, {} MiB",
        rep.total,
        rep.downtime,
        rep.precopy_rounds.len(),
        rep.bytes_total >> 20
    );
    let last_src = p.src_hb.last().expect("the source guest sent heartbeats");
    assert!(last_src > Instant::now() - Duration::from_secs(600));
    check_handover(&mut p);
}

/// 1 GiB, prefilled, 256 MiB written at full speed, over loopback.
#[test]
fn qemu_to_qemu_1g_full_speed() {
    full_speed("1g", 1 << 30);
}

/// 4 GiB: QEMU's pc machine puts 1 GiB of it above the PCI hole (GPA 4 GiB = RAM offset
/// 3 GiB); the guest prefills and writes both parts.
#[test]
fn qemu_to_qemu_4g_above_the_pci_hole() {
    full_speed("4g", 4 << 30);
}

/// QEMU writes guest RAM itself (its gdb stub's `M` packet) on pages the guest never
/// touches, after round 0 has read them: the uprobes on QEMU's write functions report
/// them, and the destination ends with those bytes.
#[test]
fn writes_qemu_makes_itself_reach_the_destination() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let gdb = format!("tcp:127.0.0.1:{port}");
    let mut p = pair("gdb", 256 << 20, 32 << 20, &["-gdb", &gdb]);
    // Pages past the guest's range at 16 MiB .. 48 MiB: the guest never writes 200 MiB.
    let target: u64 = 200 << 20;
    let mut g = Gdb::connect(port);
    let mut wrote = false;
    let rep = migrate(&p, &config(), &mut |e| {
        if let Event::Round(r) = e {
            if r.round == 0 {
                // Round 0 has read these pages (as they were) and harvested: the writes
                // reach no KVM dirty log.
                for i in 0..4u64 {
                    g.write(target + i * 4096 + 8 * i, &[0xA5, 0x5A, i as u8, 0xC3]);
                }
                wrote = true;
            }
        }
    });
    assert!(wrote && rep.precopy_rounds.len() + 1 >= 2);
    drop(g);
    for i in 0..4u64 {
        let v = p.dst.read_u64(target + i * 4096 + 8 * i).unwrap();
        assert_eq!(v & 0xffff_ffff, u64::from(u32::from_le_bytes([0xA5, 0x5A, i as u8, 0xC3])), "page {i}");
    }
    // The gdb stub stopped the source guest: compare RAM, not liveness.
    let diff = ram_diff(p.src.pid(), p.dst.pid(), p.ram).unwrap();
    assert!(diff.iter().all(|&o| o == WRITTEN_BY_DESTINATION_QEMU), "{diff:x?}");
    let _ = std::fs::remove_dir_all(&p.dir);
    let _ = &mut p;
}

/// A minimal gdb remote-protocol client: enough to write guest memory.
struct Gdb {
    s: TcpStream,
}

impl Gdb {
    fn connect(port: u16) -> Gdb {
        let t0 = Instant::now();
        let s = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t0.elapsed() < Duration::from_secs(30), "gdb stub: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut g = Gdb { s };
        g.packet("?");
        g
    }

    /// Send one packet and return the reply's payload.
    fn packet(&mut self, body: &str) -> String {
        let sum: u8 = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        write!(self.s, "${body}#{sum:02x}").unwrap();
        self.reply()
    }

    /// The next packet's payload (acknowledged).
    fn reply(&mut self) -> String {
        let mut reply = Vec::new();
        let mut b = [0u8; 1];
        loop {
            self.s.read_exact(&mut b).unwrap();
            match b[0] {
                b'+' if reply.is_empty() => continue,
                b'#' => {
                    let mut cs = [0u8; 2];
                    self.s.read_exact(&mut cs).unwrap();
                    self.s.write_all(b"+").unwrap();
                    let text = String::from_utf8_lossy(&reply).into_owned();
                    return text.trim_start_matches('$').to_string();
                }
                c => reply.push(c),
            }
        }
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut r = self.packet(&format!("M{addr:x},{:x}:{hex}", bytes.len()));
        // Stop notifications (the stub reports the VM stopping) may come first.
        while r.starts_with('T') || r.starts_with('S') {
            r = self.reply();
        }
        assert_eq!(r, "OK", "gdb M at {addr:#x}");
    }
}

/// A receiver thread filling `vms` on a loopback port: its address, and its outcome.
fn receiving(c: &Config, vms: QemuVms) -> (String, std::thread::JoinHandle<Result<(), accel_user::dest::RecvError>>) {
    let r = session::receiver_for(c, false, vms).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let cc = c.clone();
    (addr, std::thread::spawn(move || session::receive_with(&cc, &l, r).1.map(|_| ())))
}

fn attach_err(pid: u32, qmp: &std::path::Path) -> String {
    match QemuVm::attach(pid, qmp) {
        Ok(_) => panic!("attached to process {pid}"),
        Err(e) => e.to_string(),
    }
}

/// Everything that keeps migaccel from attaching is refused with what to do about it.
#[test]
fn attach_refuses_what_it_cannot_migrate() {
    let dir = tmpdir("attach");
    let kernel = guest_image(&dir, &GuestImage::default()).unwrap();
    let nowhere = dir.join("nowhere.sock");
    let e = attach_err(1 << 22, &nowhere);
    assert!(e.contains("no process 4194304"), "{e}");
    let e = attach_err(std::process::id(), &nowhere);
    assert!(e.contains("is not QEMU"), "{e}");
    // Private RAM (QEMU's default), dirty ring on.
    let mig = dir.join("private-mig.sock");
    let qmp = format!("unix:{},server=on,wait=off", mig.display());
    let private = Qemu::start(&dir, "private", "kvm,dirty-ring-size=4096", 128, &kernel, &["-qmp", &qmp]).unwrap();
    let e = attach_err(private.pid(), &mig);
    assert!(e.contains("not shared memory") && e.contains("memory-backend-memfd,id=ram0,size=<RAM>,share=on"), "{e}");
    // The socket of another QEMU.
    let (other, _hb, other_mig) = qemu_for_migaccel(&dir, "other", 128, &kernel, false, &[]).unwrap();
    let e = attach_err(private.pid(), &other_mig);
    assert!(e.contains(&format!("served by process {}", other.pid())), "{e}");
    // A socket that does not exist.
    let e = attach_err(other.pid(), &nowhere);
    assert!(e.contains("cannot connect") && e.contains("-qmp unix:"), "{e}");
    // Shared RAM, no dirty ring.
    let nr = dir.join("noring-mig.sock");
    let nr_qmp = format!("unix:{},server=on,wait=off", nr.display());
    let noring = Qemu::start(
        &dir,
        "noring",
        "kvm",
        128,
        &kernel,
        &[
            "-object",
            "memory-backend-memfd,id=ram0,size=128M,share=on",
            "-machine",
            "memory-backend=ram0",
            "-qmp",
            &nr_qmp,
        ],
    )
    .unwrap();
    let e = attach_err(noring.pid(), &nr);
    assert!(e.contains("without KVM's dirty ring") && e.contains("-accel kvm,dirty-ring-size=4096"), "{e}");
    // A destination that is not waiting for a migration.
    let e = QemuVms::attach(other.pid(), &other_mig, false, false).err().expect("refused").to_string();
    assert!(e.contains("-incoming defer"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination QEMU of another RAM size is refused at the handshake; nothing moved, the
/// source runs on and its QEMU is as it was (no dirty limit, capability restored).
#[test]
fn a_destination_that_cannot_match_is_refused() {
    let dir = tmpdir("mismatch");
    let kernel = guest_image(&dir, &GuestImage::default()).unwrap();
    let (mut src, _hb, src_mig) = qemu_for_migaccel(&dir, "src", 256, &kernel, false, &[]).unwrap();
    let (dst, _dhb, dst_mig) = qemu_for_migaccel(&dir, "dst", 512, &kernel, true, &[]).unwrap();
    let c = config();
    let vms = QemuVms::attach(dst.pid(), &dst_mig, true, false).unwrap();
    let (addr, t) = receiving(&c, vms);
    let vm = QemuVm::attach(src.pid(), &src_mig).unwrap();
    let e = session::send_vm(&c, &vm, &addr, &mut |_| {}).expect_err("refused").to_string();
    assert!(e.contains("cannot take this VM") && e.contains("512 MiB") && e.contains("256 MiB"), "{e}");
    assert!(t.join().unwrap().is_err());
    drop(vm);
    assert_eq!(src.cmd("query-status", json!({})).unwrap()["status"], "running");
    assert_eq!(src.cmd("query-vcpu-dirty-limit", json!({})).unwrap(), json!([]));
    let caps = src.cmd("query-migrate-capabilities", json!({})).unwrap();
    let ignore = caps.as_array().unwrap().iter().find(|c| c["capability"] == "x-ignore-shared").unwrap();
    assert_eq!(ignore["state"], false);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The source QEMU killed during precopy: the migration fails with "exited", and the
/// destination never runs.
#[test]
fn source_qemu_killed_mid_precopy() {
    let mut p = pair("srckill", 256 << 20, 32 << 20, &[]);
    let c = config();
    let vms = QemuVms::attach(p.dst.pid(), &p.dst_mig, false, false).unwrap();
    let (addr, t) = receiving(&c, vms);
    let vm = QemuVm::attach(p.src.pid(), &p.src_mig).unwrap();
    let pid = p.src.pid() as i32;
    let e = session::send_vm(&c, &vm, &addr, &mut |e| {
        if let Event::Round(r) = e {
            if r.round == 0 {
                // SAFETY: signalling a child process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    })
    .expect_err("the source QEMU died");
    assert!(e.to_string().contains(&format!("QEMU process {pid} exited")), "{e}");
    assert!(t.join().unwrap().is_err(), "the destination must not resume");
    assert_eq!(p.dst.cmd("query-status", json!({})).unwrap()["status"], "inmigrate");
    drop(vm);
    let _ = std::fs::remove_dir_all(&p.dir);
}

/// The destination QEMU killed before it got the device state: the receiver cannot resume
/// it, and the source guest runs on with dirty logging off.
#[test]
fn destination_qemu_killed_before_device_state() {
    let mut p = pair("dstkill", 256 << 20, 32 << 20, &[]);
    let c = config();
    let vms = QemuVms::attach(p.dst.pid(), &p.dst_mig, false, false).unwrap();
    let (addr, t) = receiving(&c, vms);
    let vm = QemuVm::attach(p.src.pid(), &p.src_mig).unwrap();
    let dpid = p.dst.pid() as i32;
    let e = session::send_vm(&c, &vm, &addr, &mut |e| {
        if let Event::Switchover(_) = e {
            // SAFETY: signalling a child process this test started.
            unsafe { libc::kill(dpid, libc::SIGKILL) };
        }
    })
    .expect_err("the destination QEMU died");
    eprintln!("{e}");
    let rerr = t.join().unwrap().expect_err("the receiver cannot resume a dead QEMU").to_string();
    assert!(rerr.contains(&format!("QEMU process {dpid}")), "{rerr}");
    drop(vm);
    assert_eq!(p.src.cmd("query-status", json!({})).unwrap()["status"], "running");
    assert_eq!(p.src.cmd("query-vcpu-dirty-limit", json!({})).unwrap(), json!([]));
    let w = p.src.read_u64(WRITE_COUNT_GPA).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.src.read_u64(WRITE_COUNT_GPA).unwrap() == w {
        assert!(Instant::now() < deadline, "the source guest does not run after the failed migration");
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_dir_all(&p.dir);
}

/// Two hosts: `migaccel receive` and `migaccel send` as processes in two network
/// namespaces joined by a veth pair, each attached to its QEMU; 1 GiB at full speed.
#[test]
fn qemu_to_qemu_between_network_namespaces() {
    use std::io::BufRead;
    let ns = migaccel_tests::NetnsPair::create("qm").expect("network namespaces (root, iproute2)");
    let mut p = pair("netns", 1 << 30, 256 << 20, &[]);
    let key = migaccel_tests::test_key_file();
    let bin = migaccel_tests::migaccel_bin();
    let listen = format!("{}:47190", ns.dst_ip);
    let mut recv = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.dst])
        .arg(&bin)
        .args(["receive", "--listen", &listen, "--leave-paused", "--report", "json", "--auth-key"])
        .arg(&key)
        .args(["--qemu-pid", &p.dst.pid().to_string(), "--qmp"])
        .arg(&p.dst_mig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(recv.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "receiver: {line}");
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::stderr()));
    let send = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.src])
        .arg(&bin)
        .args(["send", "--to", &listen, "--report", "json", "--auth-key"])
        .arg(&key)
        .args(["--qemu-pid", &p.src.pid().to_string(), "--qmp"])
        .arg(&p.src_mig)
        .output()
        .unwrap();
    assert!(send.status.success(), "send: {}", String::from_utf8_lossy(&send.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&send.stdout).unwrap();
    let out = recv.wait_with_output().unwrap();
    assert!(out.status.success(), "receive failed");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["qemu_status"], "paused", "{got}");
    eprintln!("netns: total {} ms, downtime {} ms", rep["total_ms"], rep["downtime_ms"]);
    check_handover(&mut p);
}

/// An attached QEMU VM meets the boundary's conformance suite (as the embedded VMM and the
/// fake VM do); afterwards its QEMU runs on as it was.
#[test]
fn qemu_vm_conforms() {
    let dir = tmpdir("conform");
    let kernel = guest_image(&dir, &GuestImage::filled(256 << 20, 32 << 20, None)).unwrap();
    let (mut q, _hb, mig) = qemu_for_migaccel(&dir, "c", 256, &kernel, false, &[]).unwrap();
    q.wait_prefilled(Duration::from_secs(600)).unwrap();
    let vm = QemuVm::attach(q.pid(), &mig).unwrap();
    kvm_hooks::conformance::check_source(&vm, &mut || None).unwrap();
    drop(vm);
    assert_eq!(q.cmd("query-status", json!({})).unwrap()["status"], "running");
    assert_eq!(q.cmd("query-vcpu-dirty-limit", json!({})).unwrap(), json!([]));
    let _ = std::fs::remove_dir_all(&dir);
}

/// BPF program ids a process holds (its fdinfo names them).
fn bpf_prog_ids(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        if let Ok(text) = std::fs::read_to_string(e.path()) {
            for l in text.lines() {
                if let Some(v) = l.strip_prefix("prog_id:") {
                    ids.extend(v.trim().parse::<u64>().ok());
                }
            }
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// `migaccel send` killed with SIGKILL mid-precopy: its BPF programs and uprobes go with it;
/// QEMU's dirty limit stays, a new attach names it and the QMP command of docs/qemu.md
/// clears it; the guest runs on.
#[test]
fn a_killed_migaccel_leaves_only_what_the_docs_name() {
    use std::io::BufRead;
    let mut p = pair("kill9", 256 << 20, 32 << 20, &[]);
    // A destination that accepts the VM and then stops reading: the source blocks in round 0.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let stall = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut h = [0u8; accel_user::wire::frame::HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let h = accel_user::wire::frame::Header::decode(&h).unwrap();
        let mut body = vec![0u8; h.len as usize];
        s.read_exact(&mut body).unwrap();
        let ack = payload::HelloAck::encode(0, &[], "accepted");
        let hdr = accel_user::wire::frame::Header {
            kind: accel_user::wire::frame::FrameKind::HelloAck,
            len: ack.len() as u32,
            seq: 0,
        };
        s.write_all(&hdr.encode()).unwrap();
        s.write_all(&ack).unwrap();
        s // kept open, never read again
    });
    let mut send = std::process::Command::new(migaccel_tests::migaccel_bin())
        .args(["send", "--to", &addr, "--insecure", "--streams", "1", "--qemu-pid", &p.src.pid().to_string(), "--qmp"])
        .arg(&p.src_mig)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(send.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("destination accepted the VM") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "send exited early");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.src.cmd("query-vcpu-dirty-limit", json!({})).unwrap() == json!([]) {
        assert!(Instant::now() < deadline, "dirty logging never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    let progs = bpf_prog_ids(send.id());
    assert!(progs.len() >= 4, "the probes are loaded: {progs:?}");
    send.kill().unwrap();
    send.wait().unwrap();
    let _conn = stall.join().unwrap();
    // The kernel frees programs whose last descriptor closed.
    let live = |id: u64| {
        std::process::Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .unwrap()
            .status
            .success()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while progs.iter().any(|&id| live(id)) {
        assert!(Instant::now() < deadline, "BPF programs of the killed migaccel are still loaded");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(p.src.cmd("query-status", json!({})).unwrap()["status"], "running");
    let e = attach_err(p.src.pid(), &p.src_mig);
    assert!(e.contains("cancel-vcpu-dirty-limit"), "{e}");
    p.src.cmd("cancel-vcpu-dirty-limit", json!({})).unwrap();
    drop(QemuVm::attach(p.src.pid(), &p.src_mig).expect("attaches once the limit is cleared"));
    let _ = std::fs::remove_dir_all(&p.dir);
}
