//! What the fuzz targets share: a transport over the fuzzer's bytes, the receiver they
//! drive, and the fixed keys and seed stream of the sealed target.
use std::time::Duration;

use accel_user::dest::{Receiver, RecvOptions};
use accel_user::fake_vm::FakeVms;
use accel_user::wire::frame::{self, FrameKind, Header, HEADER_LEN, RUN_ZERO};
use accel_user::wire::framer::Framer;
use accel_user::wire::payload::{self, Run};
use accel_user::wire::seal::FrameKey;
use accel_user::wire::transport::{Part, Transport, TransportError};
use kvm_hooks::memory::GuestRam;

/// A peer that sends the fuzzer's bytes and swallows whatever the receiver answers.
pub struct Bytes {
    data: Vec<u8>,
    at: usize,
    framer: Framer,
}

impl Bytes {
    pub fn new(data: &[u8]) -> Self {
        Bytes { data: data.to_vec(), at: 0, framer: Framer::default() }
    }
    fn take(&mut self, n: usize) -> Result<&[u8], TransportError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len()).ok_or(TransportError::Closed)?;
        let at = std::mem::replace(&mut self.at, end);
        Ok(&self.data[at..end])
    }
}

impl Transport for Bytes {
    fn send_frame(&mut self, kind: FrameKind, parts: &[Part<'_>], _: Option<&GuestRam>) -> Result<(), TransportError> {
        self.framer.header(kind, parts)?;
        self.framer.sent();
        Ok(())
    }
    fn send_raw(&mut self, hdr: Option<&[u8; HEADER_LEN]>, _: &[u8], last: bool) -> Result<(), TransportError> {
        self.framer.check_piece(hdr)?;
        self.framer.piece_sent(last);
        Ok(())
    }
    fn framer(&self) -> &Framer {
        &self.framer
    }
    fn framer_mut(&mut self) -> &mut Framer {
        &mut self.framer
    }
    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        buf.copy_from_slice(self.take(buf.len())?);
        Ok(())
    }
    fn recv_into_guest(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> Result<(), TransportError> {
        let b = self.take(usize::try_from(len).map_err(|_| TransportError::Closed)?)?;
        ram.write(gpa, b).map_err(|e| TransportError::Guest(e.to_string()))
    }
    fn set_recv_timeout(&mut self, _: Duration) {}
    fn shutdown(&mut self) {}
    fn shutdown_write(&mut self) {}
    fn bytes_sent(&self) -> u64 {
        0
    }
}

/// A receiver as `migaccel receive` runs it, on VMs without KVM, capped at 64 MiB.
pub fn receiver() -> Receiver<FakeVms> {
    let o = RecvOptions {
        max_ram: 64 << 20,
        max_vcpus: 4,
        capture: false,
        io_timeout: Duration::from_secs(5),
        prefault: false,
        confidential: None,
        max_rounds: 16,
        deadline: Duration::from_secs(60),
        check_host_memory: false,
        cancel: Default::default(),
    };
    Receiver::new(o, FakeVms::default())
}

/// The keys the sealed target's stream is sealed with (as after a handshake).
pub fn keys() -> (FrameKey, FrameKey) {
    (FrameKey::new([0x5a; 32]), FrameKey::new([0xa5; 32]))
}

/// A whole valid migration of a 64 MiB, one-vCPU VM, as the source sends it: every page in
/// round 0 (zero runs and a few data pages), two pages again in round 1, the vCPU state,
/// Complete. The frames as (kind, payload).
pub fn migration() -> Vec<(FrameKind, Vec<u8>)> {
    let shape = kvm_hooks::migratable::VmShape { ram_bytes: 64 << 20, vcpus: 1 };
    let pages = shape.ram_bytes / frame::PAGE;
    let mut f = vec![(FrameKind::Hello, payload::Hello::embedded(&shape).encode())];
    let mut pages_frame = |round: u32, runs: &[Run], fill: u8| {
        let mut p = Vec::new();
        payload::PagesHead::encode(round, runs, &mut p);
        for r in runs.iter().filter(|r| !r.is_zero()) {
            p.extend(std::iter::repeat_n(fill, r.data_bytes() as usize));
        }
        f.push((FrameKind::Pages, p));
    };
    pages_frame(
        0,
        &[Run { gfn: 0, npages: 2, flags: 0 }, Run { gfn: 2, npages: (pages - 2) as u32, flags: RUN_ZERO }],
        0x11,
    );
    let mut f2 = std::mem::take(&mut f);
    f2.push((FrameKind::EndOfRound, payload::EndOfRound { round: 0, pages }.encode()));
    let mut p = Vec::new();
    payload::PagesHead::encode(1, &[Run { gfn: 7, npages: 2, flags: 0 }], &mut p);
    p.extend(std::iter::repeat_n(0x22, 2 * frame::PAGE as usize));
    f2.push((FrameKind::Pages, p));
    f2.push((FrameKind::EndOfRound, payload::EndOfRound { round: 1, pages: 2 }.encode()));
    let state = kvm_hooks::state::VcpuState::default().encode();
    let mut v = payload::State::prefix(0, state.len() as u32).to_vec();
    v.extend_from_slice(&state);
    f2.push((FrameKind::State, v));
    f2.push((FrameKind::Complete, payload::Complete { rounds: 2, sections: 1, pages_sent: pages + 2 }.encode()));
    f2
}

/// `frames` as plain wire bytes (header ‖ payload each).
pub fn plain(frames: &[(FrameKind, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (seq, (kind, p)) in frames.iter().enumerate() {
        out.extend_from_slice(&Header { kind: *kind, len: p.len() as u32, seq: seq as u64 }.encode());
        out.extend_from_slice(p);
    }
    out
}

/// `frames` sealed with [`keys`], as a source sends them after the handshake.
pub fn sealed(frames: &[(FrameKind, Vec<u8>)]) -> Vec<u8> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("loopback");
    let a = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (mut b, _) = l.accept().expect("accept");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut b, &mut v).expect("read");
        v
    });
    let inner = accel_user::wire::transport::TcpTransport::new(a, Duration::from_secs(5)).expect("transport");
    let mut t = accel_user::wire::seal::Sealed::new(Box::new(inner), keys());
    for (kind, p) in frames {
        t.send_frame(*kind, &[Part::Buf(p)], None).expect("seal");
    }
    drop(t);
    reader.join().expect("reader")
}

/// Write `bytes` as seed `name` of `target` under `$MIGACCEL_FUZZ_SEEDS` (when set). Called
/// from each target's init, which runs before libFuzzer reads its corpus directories.
pub fn seed(target: &str, name: &str, bytes: impl FnOnce() -> Vec<u8>) {
    if let Some(dir) = std::env::var_os("MIGACCEL_FUZZ_SEEDS") {
        let d = std::path::Path::new(&dir).join(target);
        std::fs::create_dir_all(&d).expect("create the seed directory");
        std::fs::write(d.join(name), bytes()).expect("write a seed");
    }
}

/// Receive `stream` (sealed with [`keys`] when `sealed`); whether a VM was resumed.
pub fn receive(stream: &[u8], sealed: bool) -> Result<(), String> {
    let mut r = receiver();
    let res = if sealed {
        let (s2d, d2s) = keys();
        r.run(&mut accel_user::wire::seal::Sealed::new(Box::new(Bytes::new(stream)), (d2s, s2d)))
    } else {
        r.run(&mut Bytes::new(stream))
    };
    res.map(|_| ()).map_err(|e| e.to_string())
}

/// Split a plain recording into its frames.
pub fn frames_of(rec: &[u8]) -> Option<Vec<(FrameKind, Vec<u8>)>> {
    let (mut at, mut out) = (0usize, Vec::new());
    while at < rec.len() {
        let h: [u8; HEADER_LEN] = rec.get(at..at + HEADER_LEN)?.try_into().ok()?;
        let h = Header::decode(&h).ok()?;
        let body = rec.get(at + HEADER_LEN..at + HEADER_LEN + h.len as usize)?;
        out.push((h.kind, body.to_vec()));
        at += HEADER_LEN + h.len as usize;
    }
    Some(out)
}

/// Real migrations recorded by `tests/fuzz_seeds.rs` into `$MIGACCEL_FUZZ_SEEDS/frames`
/// (name, frames); none when the variable is unset.
pub fn recorded() -> Vec<(String, Vec<(FrameKind, Vec<u8>)>)> {
    let Some(dir) = std::env::var_os("MIGACCEL_FUZZ_SEEDS") else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(std::path::Path::new(&dir).join("frames")) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("recorded-") {
            let rec = std::fs::read(e.path()).expect("read a recorded seed");
            let frames = frames_of(&rec).unwrap_or_else(|| {
                panic!(
                    "{name} is not a sequence of frames of this protocol version (recorded by another \
                     version? delete target/fuzz-seeds and target/fuzz-corpus to record again)"
                )
            });
            out.push((name, frames));
        }
    }
    out
}

/// Every whole valid migration the stream targets start from: the constructed one and the
/// recorded ones.
pub fn valid_migrations() -> Vec<(String, Vec<(FrameKind, Vec<u8>)>)> {
    let mut v = vec![("migration".to_string(), migration())];
    v.extend(recorded());
    v
}

/// The init of the two stream targets: write every whole-migration seed, and make sure each
/// is received (a seed that is not starts the fuzzer at the first frame instead of
/// everywhere).
pub fn migration_seed(target: &str, sealed_stream: bool) {
    for (name, m) in valid_migrations() {
        let stream = if sealed_stream { sealed(&m) } else { plain(&m) };
        if let Err(e) = receive(&stream, sealed_stream) {
            panic!(
                "the {target} seed {name} is not received: {e} (recorded by another version? \
                 delete target/fuzz-seeds and target/fuzz-corpus to record again)"
            );
        }
        seed(target, &name, || stream);
    }
}

/// The init of the vCPU state target: an encoded default state, and every real vCPU state
/// of the recorded migrations.
pub fn vcpu_state_seeds() {
    seed("vcpu_state", "default", || kvm_hooks::state::VcpuState::default().encode());
    for (name, frames) in recorded() {
        let states = frames.iter().filter(|(k, p)| *k == FrameKind::State && p.len() > 8);
        for (i, (_, p)) in states.enumerate() {
            seed("vcpu_state", &format!("{name}-vcpu{i}"), || p[8..].to_vec());
        }
    }
}
