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
//! Payload layouts are in `docs/protocol.md` and `payload.rs`. Every length is
//! checked against a per-kind cap before anything is allocated or read.
use kvm_hooks::migratable::MAX_SECTION;

pub const MAGIC: u32 = u32::from_le_bytes(*b"MGAX");
/// 2: confidential migrations carry the page-state record (`PageStates`).
/// 3: `Hello` carries the VM's shape only (RAM, vCPUs), no guest workload.
/// 4: connections are authenticated (`AuthInit`/`AuthReply`/`AuthConfirm`) and every later
/// frame is sealed: its payload encrypted, a 16-byte tag after it (see `wire::seal`).
/// 5: `Hello` names the kind of VM and carries its RAM layout; the machine state travels
/// as opaque `State` sections (vCPU registers, or QEMU's device stream), counted in `Complete`.
/// 6: sealed frames travel as AEGIS-256X4 records of at most 256 KiB (see `wire::seal`).
/// 7: the handover query: a source that lost its link after `Complete` asks on a new
/// connection whether the destination runs the VM (`Query`/`Answer`), and says `Done` once
/// it learnt that it does.
/// 8: a Blobs frame may carry zero records (kind 5): the blob header without ciphertext.
/// 9: a confidential `Hello` names the MH's lane count; `HelloAck` carries one challenge per
/// lane.
pub const PROTOCOL_VERSION: u16 = 9;
pub const HEADER_LEN: usize = 24;
pub const PAGE: u64 = 4096;
/// Most runs in one Pages frame.
pub const MAX_RUNS: u32 = 4096;
/// Most page data in one Pages frame (bytes).
pub const MAX_PAGE_DATA: u64 = 16 << 20;
/// Largest payload of any frame.
pub const MAX_FRAME: u32 = (8 + 16 * MAX_RUNS as u64 + MAX_PAGE_DATA) as u32;
/// A blob's wire header: `kind u32, round u32, gfn u64, seq u64, tag [16]`.
pub const BLOB_HEADER: usize = 40;
/// One blob with its page of ciphertext on the wire: the header, then `data [4096]` (a zero
/// record is the header alone).
pub const BLOB_LEN: usize = BLOB_HEADER + 4096;
/// Largest text carried in a frame (abort reasons, refusals).
pub const MAX_TEXT: usize = 1024;
/// Most shared ranges in one PageStates frame.
pub const MAX_STATE_RANGES: u32 = 65536;
/// `AuthInit`: suite, reserved, nonce, ephemeral public key (`wire::auth`).
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
    /// `payload::State`).
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
    /// then `count` blobs (see `payload::Blobs`).
    Blobs = 10,
    /// Source → destination (confidential mode): the guest's shared ranges at switchover,
    /// so the destination VMM's page-state record matches (see `payload::PageStates`).
    PageStates = 11,
    /// Source → destination, first frame of an authenticated control connection: the
    /// source's nonce and ephemeral key (see `wire::auth`).
    AuthInit = 12,
    /// Destination → source: the destination's nonce and ephemeral key, and its proof that
    /// it holds the pre-shared key.
    AuthReply = 13,
    /// Source → destination: the source's proof. Every frame after it is sealed.
    AuthConfirm = 14,
    /// Source → destination, first frame of a query connection: does the VM of this
    /// session run there (see `payload::Query`)? Sealed with a query key of the session.
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
            FrameKind::HelloAck => 12 + 8 * mh_abi::MAX_LANES + MAX_TEXT as u32,
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

/// A payload error of `kind`.
pub(crate) fn perr(kind: FrameKind, msg: impl Into<String>) -> ProtocolError {
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

/// A piece of a frame's payload.
#[derive(Debug, Clone, Copy)]
pub enum Part<'a> {
    /// Host memory.
    Buf(&'a [u8]),
    /// Guest RAM, sent straight from the mapping.
    Guest { gpa: u64, len: u64 },
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
}
