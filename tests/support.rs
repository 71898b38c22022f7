//! Helpers for the integration tests: configs, a frame-aware cutting proxy, network
//! namespaces and the path of the `migaccel` binary.
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use accel_user::app::config::{ByteSize, Config, DirtySource, WorkloadKind};

#[path = "qemu_support.rs"]
pub mod qemu;
use accel_user::wire::frame::{FrameKind, HEADER_LEN};

/// This test process's pre-shared key: random per run, the same for every test in it.
pub fn test_key() -> accel_user::wire::keys::TransportKey {
    static KEY: std::sync::OnceLock<accel_user::wire::keys::TransportKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| accel_user::wire::auth::ephemeral_key().expect("random key")).clone()
}

/// [`test_key`] as a key file (mode 0600) for `migaccel` processes (`--auth-key`).
pub fn test_key_file() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("migaccel-test-psk-{}", std::process::id()));
        let hex: String = test_key().0.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&p, hex).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    })
    .clone()
}

/// A small, quick config for tests.
pub fn config(workload: WorkloadKind, dirty: DirtySource) -> Config {
    let mut c = Config::default();
    c.auth.key = Some(test_key());
    c.guest.ram = ByteSize(128 << 20);
    c.guest.vcpus = 2;
    c.guest.workload = workload;
    c.guest.warmup_ms = 200;
    c.guest.hot_working_set = ByteSize(32 << 20);
    // Unpaced: a paced guest can write nothing in a very short round, and the policy then
    // (rightly) switches over, which would make "at least 3 rounds" a coin toss.
    c.guest.hot_rate = 0;
    c.migration.dirty_source = dirty;
    c.migration.max_rounds = 8;
    c.migration.io_timeout_ms = 5_000;
    // Generous: it guards against a hang, and a destination under load may need seconds
    // between `Complete` and `Resumed` (a test's verification snapshot of a large guest is
    // taken there); past it the source asks and, when the destination had not resumed yet,
    // the migration fails (safely: the source runs on).
    c.migration.ack_timeout_ms = 60_000;
    // Generous: the check ends as soon as every vCPU reported; only a dead guest waits it out.
    c.receiver.liveness_timeout_ms = 30_000;
    c
}

/// The `migaccel` binary next to this test executable (built by the test command).
pub fn migaccel_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let p = dir.join("migaccel");
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace --bins` first (the README test command does)",
        p.display()
    );
    p
}

/// Where the proxy cuts the source → destination stream.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// Forward everything.
    Never,
    /// Forward everything in writes of at most this many bytes, so the receiver sees
    /// short reads everywhere.
    Chunked(usize),
    /// Cut when the source starts sending the `n`-th frame (0-based) of this kind.
    AtFrame(FrameKind, usize),
    /// Forward everything to the destination; drop its `Resumed` and reset the source's
    /// connection instead (the acknowledgement is lost).
    SwallowResumed,
    /// Take the source's whole `Complete` without forwarding it, then reset both ends: the
    /// source has sent everything, the destination never hears of it.
    SwallowComplete,
}

/// What the proxy does with connections after the first (the source's handover queries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Later {
    /// Relay them unchanged, as a network that lost one connection still carries new ones.
    Relay,
    /// Refuse them: the destination is unreachable from now on.
    Refuse,
}

/// A TCP proxy that understands frame headers, so a test can cut the connection at an
/// exact protocol point. Cutting closes both directions (the destination sees EOF, the
/// source a reset or broken pipe).
pub struct Proxy {
    pub addr: String,
    pub cut_happened: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Cut the first connection as `cut` says; relay every later one.
    pub fn start(target: String, cut: Cut) -> Proxy {
        Proxy::start_with(target, cut, Later::Relay)
    }

    pub fn start_with(target: String, cut: Cut, later: Later) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let flag = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let st = stop.clone();
        let handle = std::thread::spawn(move || {
            let Ok((src, _)) = l.accept() else { return };
            if st.load(Ordering::SeqCst) {
                return;
            }
            let Ok(dst) = TcpStream::connect(&target) else { return };
            let first = std::thread::spawn(move || relay(src, dst, cut, &f));
            // Later connections until the proxy is dropped (which wakes this accept).
            let mut more = Vec::new();
            for c in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(src) = c else { continue };
                if later == Later::Refuse {
                    drop(src); // closed before a byte is read
                    continue;
                }
                let Ok(dst) = TcpStream::connect(&target) else { continue };
                let never = Arc::new(AtomicBool::new(false));
                more.push(std::thread::spawn(move || relay(src, dst, Cut::Never, &never)));
            }
            let _ = first.join();
            for m in more {
                let _ = m.join();
            }
        });
        Proxy { addr, cut_happened: flag, stop, handle: Some(handle) }
    }
}

/// Relay one connection both ways, cutting the source's side as `cut` says.
fn relay(src: TcpStream, dst: TcpStream, cut: Cut, flag: &Arc<AtomicBool>) {
    let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
    // destination → source: a plain copy, or frame by frame to drop `Resumed`.
    let f2 = flag.clone();
    let back = std::thread::spawn(move || {
        let (mut d, mut s) = (dst2, src2);
        if matches!(cut, Cut::SwallowResumed) {
            swallow_resumed(d, s, &f2);
        } else {
            let _ = std::io::copy(&mut d, &mut s);
            let _ = s.shutdown(Shutdown::Write);
        }
    });
    forward_frames(src, dst, cut, flag);
    let _ = back.join();
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr); // wakes the accept loop
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Bytes that follow a frame's header on the wire: its payload and, once the connection
/// authenticated (its first frame was `AuthInit` or `AuthReply`, or it is a handover query's,
/// sealed throughout), the tags of the records of every sealed frame after the handshake.
pub fn body_len(h: &[u8; HEADER_LEN], authenticated: &mut bool) -> usize {
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    match FrameKind::from_u16(u16::from_le_bytes([h[6], h[7]])) {
        Some(FrameKind::AuthInit | FrameKind::AuthReply | FrameKind::AuthConfirm) => {
            *authenticated = true;
            len
        }
        // A handover query's connection is sealed from its first frame on.
        Some(FrameKind::Query | FrameKind::Answer) => {
            *authenticated = true;
            accel_user::wire::seal::wire_len(len)
        }
        _ if *authenticated => accel_user::wire::seal::wire_len(len),
        _ => len,
    }
}

/// Relay the destination's frames to the source until `Resumed`, which is dropped: the
/// source's connection is reset instead.
fn swallow_resumed(mut dst: TcpStream, mut src: TcpStream, flag: &AtomicBool) {
    let mut auth = false;
    loop {
        let mut h = [0u8; HEADER_LEN];
        if dst.read_exact(&mut h).is_err() {
            break;
        }
        if FrameKind::from_u16(u16::from_le_bytes([h[6], h[7]])) == Some(FrameKind::Resumed) {
            flag.store(true, Ordering::SeqCst);
            let _ = src.shutdown(Shutdown::Both);
            let _ = dst.shutdown(Shutdown::Both);
            return;
        }
        let mut body = vec![0u8; body_len(&h, &mut auth)];
        if dst.read_exact(&mut body).is_err() || src.write_all(&h).is_err() || src.write_all(&body).is_err() {
            break;
        }
    }
    let _ = src.shutdown(Shutdown::Write);
}

fn forward_frames(mut src: TcpStream, mut dst: TcpStream, cut: Cut, flag: &AtomicBool) {
    let mut seen = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let mut auth = false;
    loop {
        let mut h = [0u8; HEADER_LEN];
        if src.read_exact(&mut h).is_err() {
            break;
        }
        let kind = FrameKind::from_u16(u16::from_le_bytes([h[6], h[7]]));
        if matches!(cut, Cut::SwallowComplete) && kind == Some(FrameKind::Complete) {
            let mut body = vec![0u8; body_len(&h, &mut auth)];
            let _ = src.read_exact(&mut body);
            flag.store(true, Ordering::SeqCst);
            let _ = src.shutdown(Shutdown::Both);
            let _ = dst.shutdown(Shutdown::Both);
            return;
        }
        if let (Cut::AtFrame(k, n), Some(got)) = (cut, kind) {
            if got == k {
                if seen == n {
                    flag.store(true, Ordering::SeqCst);
                    let _ = src.shutdown(Shutdown::Both);
                    let _ = dst.shutdown(Shutdown::Both);
                    return;
                }
                seen += 1;
            }
        }
        let chunk = if let Cut::Chunked(c) = cut { c.max(1) } else { usize::MAX };
        for piece in h.chunks(chunk.min(HEADER_LEN)) {
            if dst.write_all(piece).is_err() {
                return;
            }
        }
        let mut left = body_len(&h, &mut auth);
        while left > 0 {
            let n = left.min(buf.len());
            if src.read_exact(&mut buf[..n]).is_err() {
                let _ = dst.shutdown(Shutdown::Both);
                return;
            }
            for piece in buf[..n].chunks(chunk.min(n)) {
                if dst.write_all(piece).is_err() {
                    let _ = dst.shutdown(Shutdown::Both);
                    return;
                }
            }
            left -= n;
        }
    }
    let _ = dst.shutdown(Shutdown::Write);
}

/// One frame as a [`StallProxy`] relayed it: its kind (`None`: unknown), sequence number,
/// and whether its whole body arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub kind: Option<FrameKind>,
    pub seq: u64,
    pub whole: bool,
}

/// A relay of one connection that stops reading what the source sends at the start of its
/// `n`-th (0-based) frame of `kind` — a stalled link: the source's sends fill the socket
/// buffers and then wait — until the test releases it; it then relays everything that
/// still comes, to the end of the stream. Every frame header it relays is recorded.
pub struct StallProxy {
    pub addr: String,
    /// Set once the stall began.
    pub stalled: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
    pub frames: Arc<std::sync::Mutex<Vec<Relayed>>>,
    handle: Option<JoinHandle<()>>,
}

impl StallProxy {
    pub fn start(target: String, kind: FrameKind, n: usize) -> StallProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stalled = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (st, rel, fr) = (stalled.clone(), release.clone(), frames.clone());
        let handle = std::thread::spawn(move || {
            let Ok((mut src, _)) = l.accept() else { return };
            let Ok(mut dst) = TcpStream::connect(&target) else { return };
            let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let back = std::thread::spawn(move || {
                let (mut d, mut s) = (dst2, src2);
                let _ = std::io::copy(&mut d, &mut s);
                let _ = s.shutdown(Shutdown::Write);
            });
            let (mut seen, mut auth) = (0usize, false);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let mut h = [0u8; HEADER_LEN];
                if src.read_exact(&mut h).is_err() {
                    break;
                }
                let k = FrameKind::from_u16(u16::from_le_bytes([h[6], h[7]]));
                let seq = u64::from_le_bytes(h[16..24].try_into().unwrap());
                if k == Some(kind) {
                    if seen == n {
                        st.store(true, Ordering::SeqCst);
                        while !rel.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    seen += 1;
                }
                let _ = dst.write_all(&h);
                let mut left = body_len(&h, &mut auth);
                while left > 0 {
                    let m = left.min(buf.len());
                    let Ok(got) = src.read(&mut buf[..m]) else { break };
                    if got == 0 {
                        break;
                    }
                    let _ = dst.write_all(&buf[..got]);
                    left -= got;
                }
                fr.lock().unwrap().push(Relayed { kind: k, seq, whole: left == 0 });
                if left > 0 {
                    break;
                }
            }
            let _ = dst.shutdown(Shutdown::Write);
            let _ = back.join();
        });
        StallProxy { addr, stalled, release, frames, handle: Some(handle) }
    }

    /// Let the stalled link move again.
    pub fn release(&self) {
        self.release.store(true, Ordering::SeqCst);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.release();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A `migaccel receive` process listening on a free loopback port; killed on drop.
pub struct ReceiveProcess {
    pub addr: String,
    pub child: std::process::Child,
}

impl Drop for ReceiveProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `migaccel receive` with `extra` flags and return once it listens (its first log
/// line says so, so a source never races the bind); the rest of its log is drained.
pub fn spawn_receive_process(extra: &[&str]) -> ReceiveProcess {
    use std::io::BufRead;
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(migaccel_bin())
        .args(["receive", "--listen", &addr])
        .arg("--auth-key")
        .arg(test_key_file())
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "receiver: {line}");
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    ReceiveProcess { addr, child }
}

/// A failure after `Complete` left the source leaves it paused (the destination might run
/// the VM). A test that knows the destination never resumed (it was cut off or killed
/// before) resumes the source, as an operator would; any other failure left it running.
pub fn resume_if_fenced(err: &accel_user::source::SendError, src: &embedded_vmm::vmm::Machine) {
    if matches!(err, accel_user::source::SendError::HandoverUnknown { .. }) {
        assert!(!src.is_running(), "after a lost handover the source stays paused: {err}");
        src.resume().unwrap();
    }
}

/// How long a test waits for a guest event before calling it a hang. Generous on purpose:
/// a busy or slow host delays events by seconds, only a stuck guest misses them entirely.
pub const HANG: Duration = Duration::from_secs(60);

/// Wait until every vCPU of the running `m` has made `n` more progress reports. Panics
/// (naming the counters) only after [`HANG`].
pub fn wait_for_reports(m: &embedded_vmm::vmm::Machine, n: u64) {
    let before = m.reports();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < HANG {
        if m.reports().iter().zip(&before).all(|(a, b)| *a >= b + n) {
            return;
        }
        assert!(m.fault().is_none(), "guest fault: {:?}", m.fault());
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("VM does not make progress: {:?} -> {:?} in {HANG:?} (fault {:?})", before, m.reports(), m.fault());
}

/// Wait until every vCPU of `m` reported progress again (the VM runs).
pub fn assert_running(m: &embedded_vmm::vmm::Machine) {
    assert!(m.is_running(), "VM is not in the running state");
    wait_for_reports(m, 1);
}

/// `session::demo`, with the guest made to write between precopy rounds: after each
/// round's harvest the engine waits until every vCPU reported progress once more. So from
/// round 2 on every round has pages to send, however little CPU the host gives the guest.
pub fn demo_with_guest_writes(c: &Config) -> anyhow::Result<accel_user::app::session::DemoOutcome> {
    let mut on = |m: &embedded_vmm::vmm::Machine, e: accel_user::source::Event| {
        if let accel_user::source::Event::Round(_) = e {
            wait_for_reports(m, 1);
        }
    };
    accel_user::app::session::demo_opts(c, &|_| Ok(()), true, &mut on)
}

/// Two network namespaces joined by a veth pair, removed on drop.
pub struct NetnsPair {
    pub src: String,
    pub dst: String,
    pub src_ip: String,
    pub dst_ip: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new("ip").args(args).output()?;
    anyhow::ensure!(o.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    Ok(())
}

impl NetnsPair {
    /// Link-local addresses on a veth pair that exists only inside these namespaces.
    pub fn create(tag: &str) -> anyhow::Result<NetnsPair> {
        let id = std::process::id() % 10_000;
        let (src, dst) = (format!("mga-{tag}-s{id}"), format!("mga-{tag}-d{id}"));
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (va, vb) = (format!("mv{id}x{n}a"), format!("mv{id}x{n}b"));
        let p = NetnsPair {
            src: src.clone(),
            dst: dst.clone(),
            src_ip: "169.254.77.1".into(),
            dst_ip: "169.254.77.2".into(),
        };
        let _ = ip(&["netns", "del", &src]);
        let _ = ip(&["netns", "del", &dst]);
        ip(&["netns", "add", &src])?;
        ip(&["netns", "add", &dst])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &src])?;
        ip(&["link", "set", &vb, "netns", &dst])?;
        ip(&["-n", &src, "addr", "add", "169.254.77.1/30", "dev", &va])?;
        ip(&["-n", &dst, "addr", "add", "169.254.77.2/30", "dev", &vb])?;
        for (ns, dev) in [(&src, &va), (&dst, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(p)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.src]);
        let _ = ip(&["netns", "del", &self.dst]);
    }
}

/// Sees every source → destination frame: (kind, how many of this kind came before, payload)
/// and may rewrite the payload in place (same length).
pub type Tamper = Box<dyn FnMut(FrameKind, usize, &mut [u8]) + Send>;

/// A proxy that records every byte the source sends (a wire capture) and optionally lets a
/// test tamper with frames, as a man in the middle would.
pub struct Tap {
    pub addr: String,
    pub captured: Arc<std::sync::Mutex<Vec<u8>>>,
    handle: Option<JoinHandle<()>>,
}

impl Tap {
    pub fn start(target: String, mut tamper: Option<Tamper>) -> Tap {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let captured = Arc::new(std::sync::Mutex::new(Vec::new()));
        let cap = captured.clone();
        let handle = std::thread::spawn(move || {
            let Ok((mut src, _)) = l.accept() else { return };
            let Ok(mut dst) = TcpStream::connect(&target) else { return };
            // A destination that stopped reading must not hang the tap.
            let _ = dst.set_write_timeout(Some(Duration::from_secs(5)));
            let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let back = std::thread::spawn(move || {
                let (mut d, mut s) = (dst2, src2);
                let _ = std::io::copy(&mut d, &mut s);
                let _ = s.shutdown(Shutdown::Write);
            });
            let mut counts = std::collections::HashMap::new();
            let mut auth = false;
            loop {
                let mut h = [0u8; HEADER_LEN];
                if src.read_exact(&mut h).is_err() {
                    break;
                }
                let len = body_len(&h, &mut auth);
                let mut p = vec![0u8; len];
                if src.read_exact(&mut p).is_err() {
                    break;
                }
                if let Some(kind) = FrameKind::from_u16(u16::from_le_bytes([h[6], h[7]])) {
                    let n = counts.entry(kind as u16).or_insert(0usize);
                    if let Some(f) = tamper.as_mut() {
                        f(kind, *n, &mut p);
                    }
                    *n += 1;
                }
                {
                    let mut c = cap.lock().unwrap();
                    c.extend_from_slice(&h);
                    c.extend_from_slice(&p);
                }
                if dst.write_all(&h).is_err() || dst.write_all(&p).is_err() {
                    break;
                }
            }
            // Both ways: the destination may keep its socket open (a receiver holds clones).
            let _ = dst.shutdown(Shutdown::Both);
            let _ = back.join();
        });
        Tap { addr, captured, handle: Some(handle) }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Whether `hay` contains `needle`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// What a receiver thread leaves behind.
pub type RecvThread =
    JoinHandle<(accel_user::app::session::Receiver, Result<accel_user::dest::Received, accel_user::dest::RecvError>)>;

/// Listen on a fresh loopback port and receive one migration (RAM captured at resume) on a
/// thread; returns the address to send to.
pub fn spawn_receiver(cfg: &Config) -> (String, RecvThread) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let mut c = cfg.clone();
    if c.receiver.wait_ms == 0 {
        // A source that never comes fails the test instead of hanging it.
        c.receiver.wait_ms = HANG.as_millis() as u64;
    }
    (addr, std::thread::spawn(move || accel_user::app::session::receive(&c, &l, true)))
}

/// Panic unless `dst` equals `src` page for page, naming what the destination holds instead
/// (an older version, zeros, or foreign data) and `context`.
pub fn assert_ram_eq(src: &[u8], dst: &[u8], context: &dyn std::fmt::Debug) {
    let d = accel_user::app::verify::diff_pages(src, dst, 8);
    if d.is_empty() {
        return;
    }
    let show = |m: &[u8], g: u64| format!("{:02x?}", &m[(g * 4096) as usize..(g * 4096 + 8) as usize]);
    let detail: Vec<String> =
        d.iter().map(|&g| format!("gfn {g}: source {} destination {}", show(src, g), show(dst, g))).collect();
    panic!("pages differ {d:?}; {context:?}; {detail:#?}");
}

/// Migrate `src` to a fresh receiver of `cfg` through a [`Tap`]; the bytes the source sent.
pub fn record_migration(cfg: &Config, src: &embedded_vmm::vmm::Machine) -> Vec<u8> {
    let (addr, t) = spawn_receiver(cfg);
    let tap = Tap::start(addr, None);
    accel_user::app::session::send(cfg, src, &tap.addr, &mut |_| {}).expect("the recorded migration");
    let captured = tap.captured.clone();
    drop(tap);
    t.join().unwrap().1.expect("the recorded migration is received");
    let recording = captured.lock().unwrap().clone();
    recording
}

/// Send `recording` to `addr` byte for byte, as a replaying peer would (the receiver may
/// hang up partway; the writer stops then, or once the receiver's sockets close).
pub fn replay(addr: String, recording: Vec<u8>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&recording);
    })
}

/// Connect to `addr` and send a well-formed `AuthInit` with a made-up nonce and X25519 key,
/// as a peer without the pre-shared key can: the receiver answers it, nothing more.
pub fn keyless_auth_init(addr: &str) -> TcpStream {
    try_keyless_auth_init(addr).unwrap()
}

/// [`keyless_auth_init`] for peers that go on when the receiver has gone (a flood outlives
/// the migration it tries to keep out).
pub fn try_keyless_auth_init(addr: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    let mut f = accel_user::wire::frame::Header {
        kind: FrameKind::AuthInit,
        len: accel_user::wire::auth::INIT_LEN as u32,
        seq: 0,
    }
    .encode()
    .to_vec();
    f.extend_from_slice(&accel_user::wire::auth::SUITE.to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&[0x11; 64]);
    s.write_all(&f)?;
    Ok(s)
}
