//! Wire protocol v7: framed, versioned, little-endian.
//!
//! Every frame starts with a fixed 24-byte header:
//! ```text
//! 0  magic   u32  "MGAX"
//! 4  version u16  PROTOCOL_VERSION
//! 6  kind    u16  FrameKind (0 = Invalid, never sent)
//! 8  len     u32  payload bytes that follow
//! 12 flags   u32  reserved, must be 0
//! 16 seq     u64  frame sequence number on this stream, from 0
//! ```
//! Payload layouts are in `docs/protocol.md`. Every length is checked against a per-kind
//! cap before anything is allocated or read.
use kvm_hooks::layout::RamLayout;
use kvm_hooks::migratable::{VmKind, VmShape, MAX_SECTION};

pub const MAGIC: u32 = u32::from_le_bytes(*b"MGAX");
/// 2: confidential migrations carry the page-state record (`PageStates`).
/// 3: `Hello` carries the VM's shape only (RAM, vCPUs), no guest workload.
/// 4: connections are authenticated (`AuthInit`/`AuthReply`/`AuthConfirm`) and every later
/// frame is sealed: its payload encrypted, a 16-byte tag after it (see `seal.rs`).
/// 5: `Hello` names the kind of VM and carries its RAM layout; the machine state travels
/// as opaque `State` sections (vCPU registers, or QEMU's device stream), counted in `Complete`.
/// 6: sealed frames travel as AEGIS-256X4 records of at most 256 KiB (see `seal.rs`).
/// 7: the handover query: a source that lost its link after `Complete` asks on a new
/// connection whether the destination runs the VM (`Query`/`Answer`), and says `Done` once
/// it learnt that it does.
pub const PROTOCOL_VERSION: u16 = 7;
pub const HEADER_LEN: usize = 24;
pub const PAGE: u64 = 4096;
/// Most runs in one Pages frame.
pub const MAX_RUNS: u32 = 4096;
/// Most page data in one Pages frame (bytes).
pub const MAX_PAGE_DATA: u64 = 16 << 20;
/// Largest payload of any frame.
pub const MAX_FRAME: u32 = (8 + 16 * MAX_RUNS as u64 + MAX_PAGE_DATA) as u32;
/// Largest text carried in a frame (abort reasons, refusals).
pub const MAX_TEXT: usize = 1024;
/// Most shared ranges in one PageStates frame.
pub const MAX_STATE_RANGES: u32 = 65536;
/// PageStates flag: the last frame of the record.
pub const STATES_LAST: u32 = 1;

/// `AuthInit`: suite, reserved, nonce, ephemeral public key (`auth.rs`).
pub const AUTH_INIT_LEN: usize = 8 + 32 + 32;
/// `AuthReply`: suite, reserved, nonce, ephemeral public key, proof.
pub const AUTH_REPLY_LEN: usize = 8 + 32 + 32 + 32;
/// `AuthConfirm`: the source's proof.
pub const AUTH_CONFIRM_LEN: usize = 32;

/// Run flag: the run's pages are all zero; no data follows for it.
pub const RUN_ZERO: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    Invalid = 0,
    /// Source → destination: protocol version and VM shape.
    Hello = 1,
    /// Destination → source: accept (VM created) or refuse with a reason.
    HelloAck = 2,
    /// Source → destination: a batch of page runs for one round.
    Pages = 3,
    /// Source → destination: round `n` is complete.
    EndOfRound = 4,
    /// Source → destination: one section of the VM's machine state (see
    /// [`encode_state_prefix`]).
    State = 5,
    /// Source → destination: everything sent; verify and resume.
    Complete = 6,
    /// Destination → source: the VM is running.
    Resumed = 7,
    /// Either way: give up, with a reason. The destination never resumes after it.
    Abort = 8,
    /// Source → destination, first frame of a data stream: which session and stream.
    Join = 9,
    /// Encrypted blobs from the source MH (confidential mode): `round u32, count u32`,
    /// then `count` blobs (see [`encode_blob`]).
    Blobs = 10,
    /// Source → destination (confidential mode): the guest's shared ranges at switchover,
    /// so the destination VMM's page-state record matches (see [`encode_page_states`]).
    PageStates = 11,
    /// Source → destination, first frame of an authenticated control connection: the
    /// source's nonce and ephemeral key (see `auth.rs`).
    AuthInit = 12,
    /// Destination → source: the destination's nonce and ephemeral key, and its proof that
    /// it holds the pre-shared key.
    AuthReply = 13,
    /// Source → destination: the source's proof. Every frame after it is sealed.
    AuthConfirm = 14,
    /// Source → destination, first frame of a query connection: does the VM of this
    /// session run there (see [`encode_query`])? Sealed with a query key of the session.
    Query = 15,
    /// Destination → source on a query connection: the VM runs here, or it never will.
    Answer = 16,
    /// Source → destination, after `Resumed`: the source knows the VM runs there and asks
    /// nothing more.
    Done = 17,
}

impl FrameKind {
    pub fn from_u16(v: u16) -> Option<FrameKind> {
        use FrameKind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Pages,
            4 => EndOfRound,
            5 => State,
            6 => Complete,
            7 => Resumed,
            8 => Abort,
            9 => Join,
            10 => Blobs,
            11 => PageStates,
            12 => AuthInit,
            13 => AuthReply,
            14 => AuthConfirm,
            15 => Query,
            16 => Answer,
            17 => Done,
            _ => return None,
        })
    }

    /// Largest payload this kind may carry.
    pub fn max_len(self) -> u32 {
        match self {
            FrameKind::Invalid => 0,
            FrameKind::Hello => 64 + 24 * kvm_hooks::layout::MAX_REGIONS as u32,
            FrameKind::HelloAck => 16 + MAX_TEXT as u32,
            FrameKind::Pages => MAX_FRAME,
            FrameKind::EndOfRound => 16,
            FrameKind::State => 8 + MAX_SECTION as u32,
            FrameKind::Complete => 32,
            FrameKind::Resumed => 16,
            FrameKind::Abort => 4 + MAX_TEXT as u32,
            FrameKind::Join => 16,
            FrameKind::Blobs => 8 + mh_abi::NSLOTS * BLOB_LEN as u32,
            FrameKind::PageStates => 8 + 16 * MAX_STATE_RANGES,
            FrameKind::AuthInit => AUTH_INIT_LEN as u32,
            FrameKind::AuthReply => AUTH_REPLY_LEN as u32,
            FrameKind::AuthConfirm => AUTH_CONFIRM_LEN as u32,
            FrameKind::Query => 16,
            FrameKind::Answer => 8,
            FrameKind::Done => 0,
        }
    }
}

/// Decoding errors: each says which field was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("bad magic {0:#010x} (not a migaccel stream)")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    Version(u16),
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("{kind:?} frame of {len} bytes exceeds its {max}-byte cap")]
    Oversized { kind: FrameKind, len: u32, max: u32 },
    #[error("reserved header flags {0:#x} are set")]
    Flags(u32),
    #[error("frame sequence {got}, expected {want}")]
    Sequence { got: u64, want: u64 },
    #[error("{kind:?} payload: {msg}")]
    Payload { kind: FrameKind, msg: String },
    #[error("{kind:?} frame {seq} failed authentication (edited, replayed, reordered or sealed with another key)")]
    Unauthentic { kind: FrameKind, seq: u64 },
}

fn perr(kind: FrameKind, msg: impl Into<String>) -> ProtocolError {
    ProtocolError::Payload { kind, msg: msg.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub len: u32,
    pub seq: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Decode and check a header: magic, version, kind, flags and the kind's length cap.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let magic = u32::from_le_bytes(b[0..4].try_into().expect("4"));
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version(version));
        }
        let k = u16::from_le_bytes([b[6], b[7]]);
        let kind = FrameKind::from_u16(k).ok_or(ProtocolError::UnknownKind(k))?;
        let len = u32::from_le_bytes(b[8..12].try_into().expect("4"));
        let flags = u32::from_le_bytes(b[12..16].try_into().expect("4"));
        if flags != 0 {
            return Err(ProtocolError::Flags(flags));
        }
        if len > kind.max_len() {
            return Err(ProtocolError::Oversized { kind, len, max: kind.max_len() });
        }
        Ok(Header { kind, len, seq: u64::from_le_bytes(b[16..24].try_into().expect("8")) })
    }
}

/// Little-endian cursor over a payload; every read is bounds-checked.
pub struct Reader<'a> {
    b: &'a [u8],
    kind: FrameKind,
}

impl<'a> Reader<'a> {
    pub fn new(kind: FrameKind, b: &'a [u8]) -> Self {
        Reader { b, kind }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtocolError> {
        if self.b.len() < n {
            return Err(perr(self.kind, format!("truncated at {what}")));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    pub fn u16(&mut self, what: &str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2")))
    }
    pub fn u32(&mut self, what: &str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4")))
    }
    pub fn u64(&mut self, what: &str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8")))
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(perr(self.kind, format!("{} unexpected trailing bytes", self.b.len())))
        }
    }
}

/// Most data streams one migration may use.
pub const MAX_STREAMS: u32 = 16;

/// Hello: the VM's kind, shape and RAM layout, how many data streams follow and a session
/// id they quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Which kind of VM reads the machine state back.
    pub kind: VmKind,
    /// Where the guest sees its RAM (the destination must give it the same).
    pub layout: RamLayout,
    /// RAM size and vCPUs travel; what the guest runs does not (it is in RAM and vCPU
    /// state).
    pub shape: VmShape,
    /// Data streams besides the control connection (0 = pages travel on the control stream).
    pub streams: u32,
    pub session: u64,
    /// Confidential VM: private pages and vCPU state travel only as MH blobs.
    pub confidential: bool,
    /// VM id both MHs bind into every blob (confidential only).
    pub vm_id: u32,
}

/// Hello flag: confidential migration.
pub const HELLO_CONFIDENTIAL: u32 = 1;

/// Hello payload of an embedded VM with RAM at GPA 0 (tests and tools).
pub fn encode_hello(shape: &VmShape) -> Vec<u8> {
    encode_hello_full(&Hello {
        kind: VmKind::Embedded,
        layout: RamLayout::linear(shape.ram_bytes),
        shape: *shape,
        streams: 0,
        session: 0,
        confidential: false,
        vm_id: 0,
    })
}

pub fn encode_hello_full(h: &Hello) -> Vec<u8> {
    let spec = &h.shape;
    let mut v = Vec::with_capacity(56);
    v.extend_from_slice(&(PAGE as u32).to_le_bytes());
    v.extend_from_slice(&spec.vcpus.to_le_bytes());
    v.extend_from_slice(&spec.ram_bytes.to_le_bytes());
    v.extend_from_slice(&(h.kind as u32).to_le_bytes());
    v.extend_from_slice(&h.streams.to_le_bytes());
    v.extend_from_slice(&[0u8; 16]); // reserved
    v.extend_from_slice(&h.session.to_le_bytes());
    v.extend_from_slice(&(if h.confidential { HELLO_CONFIDENTIAL } else { 0 }).to_le_bytes());
    v.extend_from_slice(&h.vm_id.to_le_bytes());
    v.extend_from_slice(&h.layout.encode());
    v
}

pub fn decode_hello(p: &[u8]) -> Result<VmShape, ProtocolError> {
    decode_hello_full(p).map(|h| h.shape)
}

pub fn decode_hello_full(p: &[u8]) -> Result<Hello, ProtocolError> {
    let k = FrameKind::Hello;
    let mut r = Reader::new(k, p);
    let page = r.u32("page_size")?;
    if u64::from(page) != PAGE {
        return Err(perr(k, format!("page size {page}, this build uses {PAGE}")));
    }
    let vcpus = r.u32("vcpus")?;
    let ram_bytes = r.u64("ram_bytes")?;
    let kind = r.u32("vm kind")?;
    let streams = r.u32("streams")?;
    let reserved_b = r.u64("reserved")? | r.u64("reserved")?;
    let session = r.u64("session")?;
    let flags = r.u32("flags")?;
    let vm_id = r.u32("vm_id")?;
    let kind = VmKind::from_u32(kind).ok_or_else(|| perr(k, format!("unknown VM kind {kind}")))?;
    if ram_bytes % PAGE != 0 {
        return Err(perr(k, format!("guest RAM of {ram_bytes} bytes is not whole pages")));
    }
    let rest = r.rest();
    let (layout, n) = RamLayout::decode(rest, ram_bytes).map_err(|e| perr(k, e.to_string()))?;
    if n != rest.len() {
        return Err(perr(k, format!("{} bytes after the RAM layout", rest.len() - n)));
    }
    if reserved_b != 0 {
        return Err(perr(k, "reserved fields must be 0".to_string()));
    }
    if flags & !HELLO_CONFIDENTIAL != 0 {
        return Err(perr(k, format!("unknown flags {flags:#x}")));
    }
    if streams > MAX_STREAMS {
        return Err(perr(k, format!("{streams} data streams exceeds the cap of {MAX_STREAMS}")));
    }
    Ok(Hello {
        kind,
        layout,
        shape: VmShape { ram_bytes, vcpus },
        streams,
        session,
        confidential: flags & HELLO_CONFIDENTIAL != 0,
        vm_id,
    })
}

/// One blob on the wire: `kind u32, round u32, gfn u64, seq u64, tag [16], data [4096]`.
pub const BLOB_LEN: usize = 40 + 4096;

pub fn encode_blobs_prefix(round: u32, count: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..4].copy_from_slice(&round.to_le_bytes());
    b[4..8].copy_from_slice(&count.to_le_bytes());
    b
}

/// Write a blob's 40-byte wire header (its descriptor fields) into `out[..40]`.
pub fn put_blob_header(d: &mh_abi::Desc, out: &mut [u8]) {
    out[0..4].copy_from_slice(&d.kind.to_le_bytes());
    out[4..8].copy_from_slice(&d.round.to_le_bytes());
    out[8..16].copy_from_slice(&d.gfn.to_le_bytes());
    out[16..24].copy_from_slice(&d.seq.to_le_bytes());
    out[24..40].copy_from_slice(&d.tag);
}

/// One blob of a received Blobs payload: its descriptor and its ciphertext, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct BlobRef<'a> {
    pub desc: mh_abi::Desc,
    pub data: &'a [u8],
}

/// Decode a Blobs payload (its length was capped by the header) without copying the
/// ciphertext. Each blob's gfn is checked against guest RAM and the MH region; kinds must be
/// known.
pub fn decode_blobs(p: &[u8], ram_pages: u64) -> Result<(u32, Vec<BlobRef<'_>>), ProtocolError> {
    let k = FrameKind::Blobs;
    let mut r = Reader::new(k, p);
    let round = r.u32("round")?;
    let count = r.u32("count")?;
    if count == 0 || count > mh_abi::NSLOTS {
        return Err(perr(k, format!("{count} blobs; a frame carries 1..={}", mh_abi::NSLOTS)));
    }
    if r.rest().len() != count as usize * BLOB_LEN {
        return Err(perr(k, format!("{} payload bytes for {count} blobs of {BLOB_LEN}", p.len() - 8)));
    }
    let mut out = Vec::with_capacity(count as usize);
    for (i, c) in p[8..].chunks_exact(BLOB_LEN).enumerate() {
        let f = |o: usize| u64::from_le_bytes(c[o..o + 8].try_into().expect("8"));
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&c[24..40]);
        let desc = mh_abi::Desc {
            kind: u32::from_le_bytes(c[0..4].try_into().expect("4")),
            round: u32::from_le_bytes(c[4..8].try_into().expect("4")),
            gfn: f(8),
            seq: f(16),
            tag,
        };
        match mh_abi::Kind::from_u32(desc.kind) {
            mh_abi::Kind::Invalid => return Err(perr(k, format!("blob {i}: unknown kind {}", desc.kind))),
            mh_abi::Kind::Page if desc.gfn >= ram_pages || mh_abi::in_region(desc.gfn) => {
                return Err(perr(
                    k,
                    format!("blob {i}: gfn {:#x} is outside guest RAM or inside the MH region", desc.gfn),
                ))
            }
            _ => {}
        }
        out.push(BlobRef { desc, data: &c[40..] });
    }
    Ok((round, out))
}

/// Join: `session u64, stream u32, reserved u32`.
pub fn encode_join(session: u64, stream: u32) -> Vec<u8> {
    let mut v = session.to_le_bytes().to_vec();
    v.extend_from_slice(&stream.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

pub fn decode_join(p: &[u8]) -> Result<(u64, u32), ProtocolError> {
    let mut r = Reader::new(FrameKind::Join, p);
    let session = r.u64("session")?;
    let stream = r.u32("stream")?;
    r.u32("reserved")?;
    r.finish()?;
    Ok((session, stream))
}

/// Why a source asks the destination about a session (`Query`; 0 is never valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Ask {
    /// After `Complete`, without `Resumed` or `Abort`: does the VM run there?
    Runs = 1,
    /// Before `Complete`, with the control link lost: the source runs the VM again, so the
    /// destination must never resume it.
    Withdraw = 2,
}

/// What the destination answers (`Answer`). Either answer holds for good: a destination
/// that ran the VM keeps saying so, and one that said it never will, never does (0 is
/// never valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Answer {
    /// The VM runs on the destination.
    Runs = 1,
    /// The destination did not resume the VM and now never will.
    NeverRuns = 2,
}

/// Query: `session u64, ask u32 (Ask), reserved u32`.
pub fn encode_query(session: u64, ask: Ask) -> Vec<u8> {
    let mut v = session.to_le_bytes().to_vec();
    v.extend_from_slice(&(ask as u32).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

pub fn decode_query(p: &[u8]) -> Result<(u64, Ask), ProtocolError> {
    let mut r = Reader::new(FrameKind::Query, p);
    let session = r.u64("session")?;
    let ask = match r.u32("ask")? {
        1 => Ask::Runs,
        2 => Ask::Withdraw,
        v => return Err(perr(FrameKind::Query, format!("ask {v} is neither 1 (runs?) nor 2 (withdraw)"))),
    };
    r.u32("reserved")?;
    r.finish()?;
    Ok((session, ask))
}

/// Answer: `answer u32 (Answer), reserved u32`.
pub fn encode_answer(a: Answer) -> Vec<u8> {
    let mut v = (a as u32).to_le_bytes().to_vec();
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

pub fn decode_answer(p: &[u8]) -> Result<Answer, ProtocolError> {
    let mut r = Reader::new(FrameKind::Answer, p);
    let a = match r.u32("answer")? {
        1 => Answer::Runs,
        2 => Answer::NeverRuns,
        v => return Err(perr(FrameKind::Answer, format!("answer {v} is neither 1 (runs) nor 2 (never runs)"))),
    };
    r.u32("reserved")?;
    r.finish()?;
    Ok(a)
}

/// HelloAck: status (0 = accepted, 1 = refused), the destination MH's challenge (confidential
/// only, else 0) and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub status: u32,
    /// The blobs of this migration must be bound to it (`docs/mh-protocol.md`).
    pub challenge: u64,
    pub text: String,
}

pub fn encode_hello_ack(status: u32, challenge: u64, text: &str) -> Vec<u8> {
    let t = truncate(text);
    let mut v = Vec::with_capacity(16 + t.len());
    v.extend_from_slice(&status.to_le_bytes());
    v.extend_from_slice(&(t.len() as u32).to_le_bytes());
    v.extend_from_slice(&challenge.to_le_bytes());
    v.extend_from_slice(t.as_bytes());
    v
}

pub fn decode_hello_ack(p: &[u8]) -> Result<HelloAck, ProtocolError> {
    let kind = FrameKind::HelloAck;
    let mut r = Reader::new(kind, p);
    let status = r.u32("status")?;
    let n = r.u32("text length")? as usize;
    let challenge = r.u64("challenge")?;
    if n > MAX_TEXT {
        return Err(perr(kind, format!("text of {n} bytes exceeds {MAX_TEXT}")));
    }
    let t = r.rest();
    if t.len() != n {
        return Err(perr(kind, format!("text length {n} but {} bytes follow", t.len())));
    }
    let text = String::from_utf8_lossy(t).into_owned();
    if status > 1 {
        return Err(perr(kind, format!("unknown status {status}")));
    }
    Ok(HelloAck { status, challenge, text })
}

pub fn encode_abort(text: &str) -> Vec<u8> {
    let t = truncate(text);
    let mut v = Vec::with_capacity(4 + t.len());
    v.extend_from_slice(&(t.len() as u32).to_le_bytes());
    v.extend_from_slice(t.as_bytes());
    v
}

pub fn decode_abort(p: &[u8]) -> Result<String, ProtocolError> {
    let mut r = Reader::new(FrameKind::Abort, p);
    let n = r.u32("reason length")? as usize;
    let t = r.rest();
    if t.len() != n || n > MAX_TEXT {
        return Err(perr(FrameKind::Abort, format!("reason length {n} does not match {} bytes", t.len())));
    }
    Ok(String::from_utf8_lossy(t).into_owned())
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_TEXT {
        return s;
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One run of consecutive pages in a Pages frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub gfn: u64,
    pub npages: u32,
    pub flags: u32,
}

impl Run {
    pub fn is_zero(&self) -> bool {
        self.flags & RUN_ZERO != 0
    }
    pub fn data_bytes(&self) -> u64 {
        if self.is_zero() {
            0
        } else {
            u64::from(self.npages) * PAGE
        }
    }
}

/// Pages frame prefix: `round u32, nruns u32`, then `nruns` × (`gfn u64, npages u32, flags u32`).
pub fn encode_pages_meta(round: u32, runs: &[Run], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&round.to_le_bytes());
    out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for r in runs {
        out.extend_from_slice(&r.gfn.to_le_bytes());
        out.extend_from_slice(&r.npages.to_le_bytes());
        out.extend_from_slice(&r.flags.to_le_bytes());
    }
}

/// Validate a run table against guest RAM and the frame length: every run inside RAM,
/// non-empty, known flags, and data bytes exactly filling the rest of the frame.
pub fn check_runs(runs: &[Run], ram_pages: u64, data_len: u64) -> Result<(), ProtocolError> {
    let k = FrameKind::Pages;
    let mut total = 0u64;
    for (i, r) in runs.iter().enumerate() {
        if r.npages == 0 {
            return Err(perr(k, format!("run {i} has zero pages")));
        }
        if r.flags & !RUN_ZERO != 0 {
            return Err(perr(k, format!("run {i} has unknown flags {:#x}", r.flags)));
        }
        match r.gfn.checked_add(u64::from(r.npages)) {
            Some(end) if end <= ram_pages => {}
            _ => {
                return Err(perr(
                    k,
                    format!("run {i}: gfn {:#x} + {} pages is outside guest RAM ({ram_pages} pages)", r.gfn, r.npages),
                ))
            }
        }
        total += r.data_bytes();
    }
    if total != data_len {
        return Err(perr(k, format!("runs describe {total} data bytes but the frame carries {data_len}")));
    }
    Ok(())
}

pub fn decode_runs(table: &[u8]) -> Vec<Run> {
    table
        .chunks_exact(16)
        .map(|c| Run {
            gfn: u64::from_le_bytes(c[0..8].try_into().expect("8")),
            npages: u32::from_le_bytes(c[8..12].try_into().expect("4")),
            flags: u32::from_le_bytes(c[12..16].try_into().expect("4")),
        })
        .collect()
}

/// EndOfRound: `round u32, reserved u32, pages u64`.
pub fn encode_end_of_round(round: u32, pages: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&round.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&pages.to_le_bytes());
    v
}

pub fn decode_end_of_round(p: &[u8]) -> Result<(u32, u64), ProtocolError> {
    let mut r = Reader::new(FrameKind::EndOfRound, p);
    let round = r.u32("round")?;
    r.u32("reserved")?;
    let pages = r.u64("pages")?;
    r.finish()?;
    Ok((round, pages))
}

/// PageStates: `count u32, flags u32` (bit 0: last frame), then `count` shared ranges
/// `{gfn u64, npages u64}`, ascending and disjoint. Pages in no range are private.
pub fn encode_page_states(ranges: &[(u64, u64)], last: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 16 * ranges.len());
    v.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    v.extend_from_slice(&(if last { STATES_LAST } else { 0 }).to_le_bytes());
    for &(g, n) in ranges {
        v.extend_from_slice(&g.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
    }
    v
}

/// Decode a PageStates payload: its ranges and whether it is the last frame. Checks the
/// layout and that each range is non-empty, ascending and disjoint within the frame; the
/// receiver checks them against guest RAM.
pub fn decode_page_states(p: &[u8]) -> Result<(Vec<(u64, u64)>, bool), ProtocolError> {
    let k = FrameKind::PageStates;
    let mut r = Reader::new(k, p);
    let count = r.u32("count")?;
    let flags = r.u32("flags")?;
    if count > MAX_STATE_RANGES {
        return Err(perr(k, format!("{count} ranges exceed {MAX_STATE_RANGES}")));
    }
    if flags & !STATES_LAST != 0 {
        return Err(perr(k, format!("unknown flags {flags:#x}")));
    }
    if p.len() != 8 + 16 * count as usize {
        return Err(perr(k, format!("{} bytes for {count} ranges", p.len())));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut end = 0u64;
    for i in 0..count {
        let gfn = r.u64("gfn")?;
        let n = r.u64("npages")?;
        let e = gfn
            .checked_add(n)
            .filter(|_| n > 0)
            .ok_or_else(|| perr(k, format!("range {i}: {n} pages at gfn {gfn:#x}")))?;
        if i > 0 && gfn < end {
            return Err(perr(k, format!("range {i} at gfn {gfn:#x} is not after the previous one")));
        }
        end = e;
        out.push((gfn, n));
    }
    r.finish()?;
    Ok((out, flags & STATES_LAST != 0))
}

/// Complete: `rounds u32, sections u32, pages_sent u64` (sections: of the machine state).
pub fn encode_complete(rounds: u32, sections: u32, pages_sent: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&rounds.to_le_bytes());
    v.extend_from_slice(&sections.to_le_bytes());
    v.extend_from_slice(&pages_sent.to_le_bytes());
    v
}

pub fn decode_complete(p: &[u8]) -> Result<(u32, u32, u64), ProtocolError> {
    let mut r = Reader::new(FrameKind::Complete, p);
    let t = (r.u32("rounds")?, r.u32("sections")?, r.u64("pages_sent")?);
    r.finish()?;
    Ok(t)
}

/// Resumed: `capture_us u64` (time the destination spent snapshotting RAM for verification
/// before resuming, excluded from downtime), `reserved u64`.
pub fn encode_resumed(capture_us: u64) -> Vec<u8> {
    let mut v = capture_us.to_le_bytes().to_vec();
    v.extend_from_slice(&0u64.to_le_bytes());
    v
}

pub fn decode_resumed(p: &[u8]) -> Result<u64, ProtocolError> {
    let mut r = Reader::new(FrameKind::Resumed, p);
    let c = r.u64("capture_us")?;
    r.u64("reserved")?;
    r.finish()?;
    Ok(c)
}

/// State: `index u32, len u32`, then the section's bytes.
pub fn encode_state_prefix(index: u32, len: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&index.to_le_bytes());
    b[4..].copy_from_slice(&len.to_le_bytes());
    b
}

pub fn decode_state(p: &[u8]) -> Result<(u32, &[u8]), ProtocolError> {
    let k = FrameKind::State;
    let mut r = Reader::new(k, p);
    let index = r.u32("section index")?;
    let len = r.u32("section length")? as usize;
    let rest = r.rest();
    if rest.len() != len {
        return Err(perr(k, format!("section length {len} but {} bytes follow", rest.len())));
    }
    Ok((index, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_checks() {
        let h = Header { kind: FrameKind::Pages, len: 4096, seq: 7 };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[0] = b'X';
        assert!(matches!(Header::decode(&b), Err(ProtocolError::BadMagic(_))));
        let mut b = h.encode();
        b[4] = 2; // the previous version, whose Hello named the guest's workload
        assert_eq!(Header::decode(&b), Err(ProtocolError::Version(2)));
        let mut b = h.encode();
        b[6] = 0;
        assert_eq!(Header::decode(&b), Err(ProtocolError::UnknownKind(0)), "Invalid is never accepted");
        let big = Header { kind: FrameKind::Hello, len: 1 << 20, seq: 0 };
        assert!(matches!(Header::decode(&big.encode()), Err(ProtocolError::Oversized { .. })));
        let mut b = h.encode();
        b[12] = 1;
        assert_eq!(Header::decode(&b), Err(ProtocolError::Flags(1)));
    }

    #[test]
    fn hello_roundtrip() {
        use kvm_hooks::layout::{Gpa, RamRegion};
        for (ram_bytes, vcpus) in [(1 << 30, 3), (64 << 20, 1), (64 << 30, 64)] {
            let s = VmShape { ram_bytes, vcpus };
            assert_eq!(decode_hello(&encode_hello(&s)).unwrap(), s);
            let layout = RamLayout::linear(ram_bytes);
            let h = Hello {
                kind: VmKind::Qemu,
                layout,
                shape: s,
                streams: 4,
                session: 0xdead_beef,
                confidential: true,
                vm_id: 9,
            };
            assert_eq!(decode_hello_full(&encode_hello_full(&h)).unwrap(), h);
        }
        // QEMU's pc machine with 4 GiB: RAM beyond 3 GiB sits at 4 GiB.
        let g = 1u64 << 30;
        let split = RamLayout::new(
            vec![
                RamRegion { gpa: Gpa(0), len: 3 * g, offset: 0 },
                RamRegion { gpa: Gpa(4 * g), len: g, offset: 3 * g },
            ],
            4 * g,
        )
        .unwrap();
        let h = Hello {
            kind: VmKind::Qemu,
            layout: split,
            shape: VmShape { ram_bytes: 4 * g, vcpus: 1 },
            streams: 0,
            session: 1,
            confidential: false,
            vm_id: 0,
        };
        let e = encode_hello_full(&h);
        assert!(e.len() as u32 + HEADER_LEN as u32 <= 24 + FrameKind::Hello.max_len());
        assert_eq!(decode_hello_full(&e).unwrap(), h);
        let mut bad = e.clone();
        bad[16] = 7; // VM kind
        assert!(decode_hello_full(&bad).unwrap_err().to_string().contains("unknown VM kind 7"));
        let mut bad = e.clone();
        bad.push(0);
        assert!(decode_hello_full(&bad).unwrap_err().to_string().contains("after the RAM layout"));
        let mut bad = e.clone();
        bad[8..16].copy_from_slice(&(2 * g).to_le_bytes()); // RAM smaller than the layout
        assert!(decode_hello_full(&bad).unwrap_err().to_string().contains("RAM layout"));
        let mut e = encode_hello(&VmShape { ram_bytes: 1 << 30, vcpus: 1 });
        e[24] = 99;
        assert!(decode_hello(&e).unwrap_err().to_string().contains("reserved fields must be 0"));
        assert!(decode_hello(&e[..10]).is_err());
        let mut e = encode_hello_full(&Hello {
            kind: VmKind::Embedded,
            layout: RamLayout::linear(1 << 30),
            shape: VmShape { ram_bytes: 1 << 30, vcpus: 1 },
            streams: 99,
            session: 1,
            confidential: false,
            vm_id: 0,
        });
        assert!(decode_hello_full(&e).unwrap_err().to_string().contains("99 data streams"));
        let mut f = e.clone();
        f[48] = 0x80; // an unknown Hello flag
        assert!(decode_hello_full(&f).unwrap_err().to_string().contains("unknown flags"));
        e.truncate(48);
        assert!(decode_hello_full(&e).is_err());
        assert_eq!(decode_join(&encode_join(7, 3)).unwrap(), (7, 3));
        assert!(decode_join(&encode_join(7, 3)[..12]).is_err());
    }

    #[test]
    fn handover_query_and_answer_are_checked() {
        for ask in [Ask::Runs, Ask::Withdraw] {
            assert_eq!(decode_query(&encode_query(0xfeed, ask)).unwrap(), (0xfeed, ask));
        }
        for a in [Answer::Runs, Answer::NeverRuns] {
            assert_eq!(decode_answer(&encode_answer(a)).unwrap(), a);
        }
        let mut q = encode_query(1, Ask::Runs);
        q[8] = 0;
        assert!(decode_query(&q).unwrap_err().to_string().contains("ask 0"));
        q[8] = 3;
        assert!(decode_query(&q).unwrap_err().to_string().contains("ask 3"));
        assert!(decode_query(&encode_query(1, Ask::Runs)[..12]).is_err());
        let mut a = encode_answer(Answer::Runs);
        a[0] = 0;
        assert!(decode_answer(&a).unwrap_err().to_string().contains("answer 0"));
        a[0] = 1;
        a.push(0);
        assert!(decode_answer(&a).is_err(), "trailing bytes");
        for k in [FrameKind::Query, FrameKind::Answer, FrameKind::Done] {
            assert_eq!(FrameKind::from_u16(k as u16), Some(k));
        }
    }

    #[test]
    fn blobs_are_bounded_and_checked() {
        let mut b = kvm_hooks::mh::Blob::zeroed();
        b.kind = mh_abi::Kind::Page as u32;
        b.gfn = 0x500;
        let frame = |blobs: &[&kvm_hooks::mh::Blob], count: u32| {
            let mut v = encode_blobs_prefix(3, count).to_vec();
            for b in blobs {
                let mut h = [0u8; 40];
                put_blob_header(&b.desc(), &mut h);
                v.extend_from_slice(&h);
                v.extend_from_slice(&b.data[..]);
            }
            v
        };
        let f1 = frame(&[&b], 1);
        let (round, got) = decode_blobs(&f1, 0x1000).unwrap();
        assert_eq!((round, got.len(), got[0].desc), (3, 1, b.desc()));
        assert_eq!(got[0].data, &b.data[..]);
        assert!(decode_blobs(&frame(&[], 0), 0x1000).unwrap_err().to_string().contains("0 blobs"));
        assert!(decode_blobs(&frame(&[&b], 257), 0x1000).unwrap_err().to_string().contains("257 blobs"));
        assert!(decode_blobs(&frame(&[&b], 2), 0x1000).unwrap_err().to_string().contains("for 2 blobs"));
        assert!(decode_blobs(&frame(&[&b], 1), 0x500).unwrap_err().to_string().contains("outside guest RAM"));
        let mut inside = b.clone();
        inside.gfn = mh_abi::REGION / PAGE;
        assert!(decode_blobs(&frame(&[&inside], 1), 0x1000).unwrap_err().to_string().contains("MH region"));
        let mut unknown = b.clone();
        unknown.kind = 9;
        assert!(decode_blobs(&frame(&[&unknown], 1), 0x1000).unwrap_err().to_string().contains("unknown kind"));
    }

    #[test]
    fn runs_are_checked_against_ram_and_length() {
        let ok = [Run { gfn: 0, npages: 2, flags: 0 }, Run { gfn: 10, npages: 5, flags: RUN_ZERO }];
        check_runs(&ok, 16, 2 * PAGE).unwrap();
        assert!(check_runs(&ok, 14, 2 * PAGE).unwrap_err().to_string().contains("outside guest RAM"));
        assert!(check_runs(&ok, 16, 3 * PAGE).unwrap_err().to_string().contains("data bytes"));
        let wrap = [Run { gfn: u64::MAX, npages: 2, flags: 0 }];
        assert!(check_runs(&wrap, 16, 2 * PAGE).is_err(), "gfn overflow must not wrap");
        let zero = [Run { gfn: 1, npages: 0, flags: 0 }];
        assert!(check_runs(&zero, 16, 0).is_err());
        let flags = [Run { gfn: 1, npages: 1, flags: 8 }];
        assert!(check_runs(&flags, 16, PAGE).is_err());
        let mut m = Vec::new();
        encode_pages_meta(3, &ok, &mut m);
        assert_eq!(decode_runs(&m[8..]), ok.to_vec());
    }

    #[test]
    fn status_abort_and_state_frames() {
        let a = decode_hello_ack(&encode_hello_ack(1, 0x1234, "too big")).unwrap();
        assert_eq!(a, HelloAck { status: 1, challenge: 0x1234, text: "too big".into() });
        assert!(decode_hello_ack(&encode_hello_ack(1, 7, "x")[..16]).is_err());
        assert!(decode_hello_ack(&encode_hello_ack(2, 7, "x")).unwrap_err().to_string().contains("status 2"));
        assert_eq!(decode_abort(&encode_abort("boom")).unwrap(), "boom");
        let long = "é".repeat(2000);
        assert!(decode_abort(&encode_abort(&long)).unwrap().len() <= MAX_TEXT);
        assert_eq!(decode_end_of_round(&encode_end_of_round(4, 99)).unwrap(), (4, 99));
        let ranges = vec![(3, 2), (5, 1), (100, 7)];
        assert_eq!(decode_page_states(&encode_page_states(&ranges, true)).unwrap(), (ranges.clone(), true));
        assert_eq!(decode_page_states(&encode_page_states(&[], false)).unwrap(), (vec![], false));
        assert_eq!(decode_complete(&encode_complete(5, 2, 77)).unwrap(), (5, 2, 77));
        assert_eq!(decode_resumed(&encode_resumed(12)).unwrap(), 12);
        let mut p = encode_state_prefix(1, 3).to_vec();
        p.extend_from_slice(b"abc");
        assert_eq!(decode_state(&p).unwrap(), (1, &b"abc"[..]));
        p.push(0);
        assert!(decode_state(&p).is_err());
    }

    #[test]
    fn page_states_are_checked() {
        let err = |p: &[u8]| decode_page_states(p).unwrap_err().to_string();
        let mut p = encode_page_states(&[(3, 2), (5, 1)], true);
        assert!(err(&p[..p.len() - 1]).contains("bytes for 2 ranges"));
        p[4] = 3; // an unknown flag
        assert!(err(&p).contains("unknown flags"));
        assert!(err(&encode_page_states(&[(3, 2), (4, 1)], true)).contains("not after the previous"));
        assert!(err(&encode_page_states(&[(3, 0)], true)).contains("0 pages"));
        assert!(err(&encode_page_states(&[(u64::MAX, 2)], true)).contains("2 pages"));
        let mut p = encode_page_states(&[], true);
        p[0..4].copy_from_slice(&(MAX_STATE_RANGES + 1).to_le_bytes());
        assert!(err(&p).contains("exceed"));
        assert!(FrameKind::from_u16(11) == Some(FrameKind::PageStates));
    }
}
