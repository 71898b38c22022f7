//! Frame payloads, one type each: `encode` writes the layout of `docs/protocol.md`,
//! `decode` checks every field (lengths, flags, reserved bytes, ranges) and names the one
//! that was wrong. A payload's length was already capped by its header
//! ([`FrameKind::max_len`]).
use kvm_hooks::layout::RamLayout;
use kvm_hooks::migratable::{VmKind, VmShape};

use super::frame::{perr, FrameKind, ProtocolError, Reader, MAX_RUNS, MAX_STATE_RANGES, MAX_TEXT, PAGE, RUN_ZERO};
pub use super::frame::{BLOB_HEADER, BLOB_LEN};

/// Most data streams one migration may use.
pub const MAX_STREAMS: u32 = 16;

/// Hello flag: confidential migration.
pub const HELLO_CONFIDENTIAL: u32 = 1;

/// PageStates flag: the last frame of the record.
pub const STATES_LAST: u32 = 1;

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
    /// Lanes (handler vCPUs) the source MH runs on: the destination MH runs as many
    /// (confidential only, 1 to `mh_abi::MAX_LANES`; 0 otherwise).
    pub mh_lanes: u32,
}

impl Hello {
    /// An embedded VM with RAM at GPA 0, no data streams (tests and tools).
    pub fn embedded(shape: &VmShape) -> Hello {
        Hello {
            kind: VmKind::Embedded,
            layout: RamLayout::linear(shape.ram_bytes),
            shape: *shape,
            streams: 0,
            session: 0,
            confidential: false,
            vm_id: 0,
            mh_lanes: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let spec = &self.shape;
        let mut v = Vec::with_capacity(56);
        v.extend_from_slice(&(PAGE as u32).to_le_bytes());
        v.extend_from_slice(&spec.vcpus.to_le_bytes());
        v.extend_from_slice(&spec.ram_bytes.to_le_bytes());
        v.extend_from_slice(&(self.kind as u32).to_le_bytes());
        v.extend_from_slice(&self.streams.to_le_bytes());
        v.extend_from_slice(&self.mh_lanes.to_le_bytes());
        v.extend_from_slice(&[0u8; 12]); // reserved
        v.extend_from_slice(&self.session.to_le_bytes());
        v.extend_from_slice(&(if self.confidential { HELLO_CONFIDENTIAL } else { 0 }).to_le_bytes());
        v.extend_from_slice(&self.vm_id.to_le_bytes());
        v.extend_from_slice(&self.layout.encode());
        v
    }

    pub fn decode(p: &[u8]) -> Result<Hello, ProtocolError> {
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
        let mh_lanes = r.u32("mh_lanes")?;
        let reserved_b = u64::from(r.u32("reserved")?) | r.u64("reserved")?;
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
        let confidential = flags & HELLO_CONFIDENTIAL != 0;
        let lanes_ok = if confidential { (1..=mh_abi::MAX_LANES).contains(&mh_lanes) } else { mh_lanes == 0 };
        if !lanes_ok {
            return Err(perr(
                k,
                format!(
                    "{mh_lanes} MH lanes (confidential {confidential}; 1 to {} when confidential)",
                    mh_abi::MAX_LANES
                ),
            ));
        }
        Ok(Hello { kind, layout, shape: VmShape { ram_bytes, vcpus }, streams, session, confidential, vm_id, mh_lanes })
    }
}

/// HelloAck: `status u32` (0 = accepted, 1 = refused), `text_len u32`, `lanes u32`, the
/// destination MH's challenge for each lane (`u64` each; confidential only, else none), then
/// the reason text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub status: u32,
    /// The blobs of lane `i` of this migration must be bound to the `i`th
    /// (`docs/mh-protocol.md`).
    pub challenges: Vec<u64>,
    pub text: String,
}

impl HelloAck {
    /// The destination created the VM.
    pub const ACCEPTED: u32 = 0;
    /// The destination refused; `text` says why.
    pub const REFUSED: u32 = 1;

    /// Encode without building a `HelloAck` (the text is cut to [`MAX_TEXT`]).
    pub fn encode(status: u32, challenges: &[u64], text: &str) -> Vec<u8> {
        let t = truncate(text);
        let mut v = Vec::with_capacity(12 + 8 * challenges.len() + t.len());
        v.extend_from_slice(&status.to_le_bytes());
        v.extend_from_slice(&(t.len() as u32).to_le_bytes());
        v.extend_from_slice(&(challenges.len() as u32).to_le_bytes());
        for c in challenges {
            v.extend_from_slice(&c.to_le_bytes());
        }
        v.extend_from_slice(t.as_bytes());
        v
    }

    pub fn decode(p: &[u8]) -> Result<HelloAck, ProtocolError> {
        let kind = FrameKind::HelloAck;
        let mut r = Reader::new(kind, p);
        let status = r.u32("status")?;
        let n = r.u32("text length")? as usize;
        let lanes = r.u32("lanes")?;
        if lanes > mh_abi::MAX_LANES {
            return Err(perr(kind, format!("{lanes} MH lanes exceeds the cap of {}", mh_abi::MAX_LANES)));
        }
        let challenges = (0..lanes).map(|_| r.u64("challenge")).collect::<Result<Vec<_>, _>>()?;
        if n > MAX_TEXT {
            return Err(perr(kind, format!("text of {n} bytes exceeds {MAX_TEXT}")));
        }
        let t = r.rest();
        if t.len() != n {
            return Err(perr(kind, format!("text length {n} but {} bytes follow", t.len())));
        }
        let text = String::from_utf8_lossy(t).into_owned();
        if status > HelloAck::REFUSED {
            return Err(perr(kind, format!("unknown status {status}")));
        }
        Ok(HelloAck { status, challenges, text })
    }
}

/// Join, the first frame of a data stream: `session u64, stream u32, reserved u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Join {
    pub session: u64,
    /// Index of the data stream, from 0.
    pub stream: u32,
}

impl Join {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.session.to_le_bytes().to_vec();
        v.extend_from_slice(&self.stream.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v
    }

    pub fn decode(p: &[u8]) -> Result<Join, ProtocolError> {
        let mut r = Reader::new(FrameKind::Join, p);
        let session = r.u64("session")?;
        let stream = r.u32("stream")?;
        r.u32("reserved")?;
        r.finish()?;
        Ok(Join { session, stream })
    }
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

/// Query: `session u64, ask u32 (Ask), reserved u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub session: u64,
    pub ask: Ask,
}

impl Query {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.session.to_le_bytes().to_vec();
        v.extend_from_slice(&(self.ask as u32).to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v
    }

    pub fn decode(p: &[u8]) -> Result<Query, ProtocolError> {
        let mut r = Reader::new(FrameKind::Query, p);
        let session = r.u64("session")?;
        let ask = match r.u32("ask")? {
            1 => Ask::Runs,
            2 => Ask::Withdraw,
            v => return Err(perr(FrameKind::Query, format!("ask {v} is neither 1 (runs?) nor 2 (withdraw)"))),
        };
        r.u32("reserved")?;
        r.finish()?;
        Ok(Query { session, ask })
    }
}

/// What the destination answers (`Answer`: `answer u32, reserved u32`). Either answer holds
/// for good: a destination that ran the VM keeps saying so, and one that said it never
/// will, never does (0 is never valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Answer {
    /// The VM runs on the destination.
    Runs = 1,
    /// The destination did not resume the VM and now never will.
    NeverRuns = 2,
}

impl Answer {
    pub fn encode(self) -> Vec<u8> {
        let mut v = (self as u32).to_le_bytes().to_vec();
        v.extend_from_slice(&0u32.to_le_bytes());
        v
    }

    pub fn decode(p: &[u8]) -> Result<Answer, ProtocolError> {
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
}

/// Abort: `len u32`, then the reason (UTF-8, at most [`MAX_TEXT`] bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    pub reason: String,
}

impl Abort {
    /// Encode a reason, cut to [`MAX_TEXT`] bytes on a character boundary.
    pub fn encode(reason: &str) -> Vec<u8> {
        let t = truncate(reason);
        let mut v = Vec::with_capacity(4 + t.len());
        v.extend_from_slice(&(t.len() as u32).to_le_bytes());
        v.extend_from_slice(t.as_bytes());
        v
    }

    pub fn decode(p: &[u8]) -> Result<Abort, ProtocolError> {
        let mut r = Reader::new(FrameKind::Abort, p);
        let n = r.u32("reason length")? as usize;
        let t = r.rest();
        if t.len() != n || n > MAX_TEXT {
            return Err(perr(FrameKind::Abort, format!("reason length {n} does not match {} bytes", t.len())));
        }
        Ok(Abort { reason: String::from_utf8_lossy(t).into_owned() })
    }
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

/// The start of a Pages frame: `round u32, nruns u32`, then `nruns` × (`gfn u64,
/// npages u32, flags u32`), then the data of the runs that are not zero, in order. A
/// receiver reads the 8-byte prefix, the run table, then the data straight into guest RAM:
/// [`PagesHead::decode`] and [`PagesHead::runs`] are the only places either is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagesHead {
    pub round: u32,
    pub nruns: u32,
    /// The frame's payload length (from its header).
    frame_len: u32,
}

impl PagesHead {
    /// Bytes of the prefix before the run table.
    pub const PREFIX: usize = 8;

    /// Write the prefix and run table of a frame of `runs` into `out` (cleared first).
    pub fn encode(round: u32, runs: &[Run], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&round.to_le_bytes());
        out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        for r in runs {
            out.extend_from_slice(&r.gfn.to_le_bytes());
            out.extend_from_slice(&r.npages.to_le_bytes());
            out.extend_from_slice(&r.flags.to_le_bytes());
        }
    }

    /// Decode the prefix of a frame of `frame_len` payload bytes: 1..=[`MAX_RUNS`] runs
    /// whose table fits in the frame.
    pub fn decode(prefix: &[u8; Self::PREFIX], frame_len: u32) -> Result<PagesHead, ProtocolError> {
        let k = FrameKind::Pages;
        let round = u32::from_le_bytes(prefix[0..4].try_into().expect("4"));
        let nruns = u32::from_le_bytes(prefix[4..8].try_into().expect("4"));
        if nruns == 0 || nruns > MAX_RUNS {
            return Err(perr(k, format!("{nruns} runs (must be 1..={MAX_RUNS})")));
        }
        let head = PagesHead { round, nruns, frame_len };
        if (frame_len as usize) < Self::PREFIX + head.table_len() {
            return Err(perr(k, format!("{nruns} runs do not fit in {frame_len} bytes")));
        }
        Ok(head)
    }

    /// Check a frame's length can hold the prefix before reading it.
    pub fn check_len(frame_len: u32) -> Result<(), ProtocolError> {
        if (frame_len as usize) < Self::PREFIX {
            return Err(perr(FrameKind::Pages, format!("{frame_len} bytes is shorter than the 8-byte prefix")));
        }
        Ok(())
    }

    /// Bytes of the run table (at most 64 KiB).
    pub fn table_len(&self) -> usize {
        16 * self.nruns as usize
    }

    /// Bytes of page data after the table.
    pub fn data_len(&self) -> u64 {
        u64::from(self.frame_len) - (Self::PREFIX + self.table_len()) as u64
    }

    /// Decode the run table and check it against guest RAM (`ram_pages`) and the frame's
    /// length: every run inside RAM, non-empty, known flags, data bytes exactly filling the
    /// rest of the frame.
    pub fn runs(&self, table: &[u8], ram_pages: u64) -> Result<Vec<Run>, ProtocolError> {
        let k = FrameKind::Pages;
        if table.len() != self.table_len() {
            return Err(perr(k, format!("a run table of {} bytes for {} runs", table.len(), self.nruns)));
        }
        let runs: Vec<Run> = table
            .chunks_exact(16)
            .map(|c| Run {
                gfn: u64::from_le_bytes(c[0..8].try_into().expect("8")),
                npages: u32::from_le_bytes(c[8..12].try_into().expect("4")),
                flags: u32::from_le_bytes(c[12..16].try_into().expect("4")),
            })
            .collect();
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
                        format!(
                            "run {i}: gfn {:#x} + {} pages is outside guest RAM ({ram_pages} pages)",
                            r.gfn, r.npages
                        ),
                    ))
                }
            }
            total += r.data_bytes();
        }
        if total != self.data_len() {
            return Err(perr(k, format!("runs describe {total} data bytes but the frame carries {}", self.data_len())));
        }
        Ok(runs)
    }

    /// Decode a whole Pages payload held in memory: the head, the runs and the data.
    pub fn split(p: &[u8], ram_pages: u64) -> Result<(PagesHead, Vec<Run>, &[u8]), ProtocolError> {
        let len = u32::try_from(p.len()).map_err(|_| perr(FrameKind::Pages, format!("{} bytes", p.len())))?;
        Self::check_len(len)?;
        let head = Self::decode(p[..Self::PREFIX].try_into().expect("8"), len)?;
        let table_end = Self::PREFIX + head.table_len();
        let runs = head.runs(&p[Self::PREFIX..table_end], ram_pages)?;
        Ok((head, runs, &p[table_end..]))
    }
}

/// EndOfRound: `round u32, reserved u32, pages u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndOfRound {
    pub round: u32,
    /// Pages the source sent in this round (over all streams).
    pub pages: u64,
}

impl EndOfRound {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.round.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&self.pages.to_le_bytes());
        v
    }

    pub fn decode(p: &[u8]) -> Result<EndOfRound, ProtocolError> {
        let mut r = Reader::new(FrameKind::EndOfRound, p);
        let round = r.u32("round")?;
        r.u32("reserved")?;
        let pages = r.u64("pages")?;
        r.finish()?;
        Ok(EndOfRound { round, pages })
    }
}

/// PageStates: `count u32, flags u32` (bit 0: last frame), then `count` shared ranges
/// `{gfn u64, npages u64}`, ascending and disjoint. Pages in no range are private.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageStates {
    /// Shared ranges `(gfn, npages)`.
    pub ranges: Vec<(u64, u64)>,
    /// The last frame of the record.
    pub last: bool,
}

impl PageStates {
    pub fn encode(ranges: &[(u64, u64)], last: bool) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + 16 * ranges.len());
        v.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        v.extend_from_slice(&(if last { STATES_LAST } else { 0 }).to_le_bytes());
        for &(g, n) in ranges {
            v.extend_from_slice(&g.to_le_bytes());
            v.extend_from_slice(&n.to_le_bytes());
        }
        v
    }

    /// Checks the layout and that each range is non-empty, ascending and disjoint within
    /// the frame; the receiver checks them against guest RAM.
    pub fn decode(p: &[u8]) -> Result<PageStates, ProtocolError> {
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
        let mut ranges = Vec::with_capacity(count as usize);
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
            ranges.push((gfn, n));
        }
        r.finish()?;
        Ok(PageStates { ranges, last: flags & STATES_LAST != 0 })
    }
}

/// Complete: `rounds u32, sections u32, pages_sent u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    pub rounds: u32,
    /// Sections of the machine state sent.
    pub sections: u32,
    pub pages_sent: u64,
}

impl Complete {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.rounds.to_le_bytes());
        v.extend_from_slice(&self.sections.to_le_bytes());
        v.extend_from_slice(&self.pages_sent.to_le_bytes());
        v
    }

    pub fn decode(p: &[u8]) -> Result<Complete, ProtocolError> {
        let mut r = Reader::new(FrameKind::Complete, p);
        let c = Complete { rounds: r.u32("rounds")?, sections: r.u32("sections")?, pages_sent: r.u64("pages_sent")? };
        r.finish()?;
        Ok(c)
    }
}

/// Resumed: `capture_us u64, reserved u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// Time the destination spent snapshotting RAM for verification before resuming,
    /// excluded from downtime.
    pub capture_us: u64,
}

impl Resumed {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.capture_us.to_le_bytes().to_vec();
        v.extend_from_slice(&0u64.to_le_bytes());
        v
    }

    pub fn decode(p: &[u8]) -> Result<Resumed, ProtocolError> {
        let mut r = Reader::new(FrameKind::Resumed, p);
        let capture_us = r.u64("capture_us")?;
        r.u64("reserved")?;
        r.finish()?;
        Ok(Resumed { capture_us })
    }
}

/// State: `index u32, len u32`, then the section's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State<'a> {
    pub index: u32,
    pub bytes: &'a [u8],
}

impl<'a> State<'a> {
    /// The 8 bytes before a section of `len` bytes (the section follows as its own part).
    pub fn prefix(index: u32, len: u32) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&index.to_le_bytes());
        b[4..].copy_from_slice(&len.to_le_bytes());
        b
    }

    pub fn decode(p: &'a [u8]) -> Result<State<'a>, ProtocolError> {
        let k = FrameKind::State;
        let mut r = Reader::new(k, p);
        let index = r.u32("section index")?;
        let len = r.u32("section length")? as usize;
        let bytes = r.rest();
        if bytes.len() != len {
            return Err(perr(k, format!("section length {len} but {} bytes follow", bytes.len())));
        }
        Ok(State { index, bytes })
    }
}

/// One blob of a received Blobs payload: its descriptor and its ciphertext (empty for a
/// zero record), borrowed.
#[derive(Debug, Clone, Copy)]
pub struct BlobRef<'a> {
    pub desc: mh_abi::Desc,
    pub data: &'a [u8],
}

/// Blobs (confidential): `round u32, count u32`, then `count` blobs, each a
/// [`BLOB_HEADER`]-byte header followed by 4096 bytes of ciphertext unless it is a zero
/// record ([`mh_abi::Kind::Zero`]).
#[derive(Debug, Clone)]
pub struct Blobs<'a> {
    pub round: u32,
    pub blobs: Vec<BlobRef<'a>>,
}

impl<'a> Blobs<'a> {
    pub fn prefix(round: u32, count: u32) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&round.to_le_bytes());
        b[4..8].copy_from_slice(&count.to_le_bytes());
        b
    }

    /// Write a blob's wire header (its descriptor fields) into `out[..BLOB_HEADER]`.
    pub fn put_header(d: &mh_abi::Desc, out: &mut [u8]) {
        out[0..4].copy_from_slice(&d.kind.to_le_bytes());
        out[4..8].copy_from_slice(&d.round.to_le_bytes());
        out[8..16].copy_from_slice(&d.gfn.to_le_bytes());
        out[16..24].copy_from_slice(&d.seq.to_le_bytes());
        out[24..40].copy_from_slice(&d.tag);
    }

    /// The wire length of a blob of kind `kind` (a raw descriptor value).
    pub fn wire_len(kind: u32) -> usize {
        match mh_abi::Kind::from_u32(kind) {
            mh_abi::Kind::Zero => BLOB_HEADER,
            _ => BLOB_LEN,
        }
    }

    /// Decode without copying the ciphertext. Each blob's kind must be known and a page's
    /// gfn inside guest RAM and outside the MH region; the blobs must fill the payload
    /// exactly.
    pub fn decode(p: &'a [u8], ram_pages: u64) -> Result<Blobs<'a>, ProtocolError> {
        let k = FrameKind::Blobs;
        let mut r = Reader::new(k, p);
        let round = r.u32("round")?;
        let count = r.u32("count")?;
        if count == 0 || count > mh_abi::NSLOTS {
            return Err(perr(k, format!("{count} blobs; a frame carries 1..={}", mh_abi::NSLOTS)));
        }
        let mut blobs = Vec::with_capacity(count as usize);
        let mut at = 8usize;
        for i in 0..count as usize {
            let c = p.get(at..at + BLOB_HEADER).ok_or_else(|| {
                perr(k, format!("blob {i} of {count}: its header overruns the {}-byte payload", p.len()))
            })?;
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
            let kind = mh_abi::Kind::from_u32(desc.kind);
            if kind == mh_abi::Kind::Invalid {
                return Err(perr(k, format!("blob {i}: unknown kind {}", desc.kind)));
            }
            if kind.is_page() && (desc.gfn >= ram_pages || mh_abi::in_region(desc.gfn)) {
                return Err(perr(
                    k,
                    format!("blob {i}: gfn {:#x} is outside guest RAM or inside the MH region", desc.gfn),
                ));
            }
            // A marker's gfn names its lane.
            if matches!(kind, mh_abi::Kind::Begin | mh_abi::Kind::End) && desc.gfn >= u64::from(mh_abi::MAX_LANES) {
                return Err(perr(
                    k,
                    format!("blob {i}: a marker for lane {}; an MH runs at most {}", desc.gfn, mh_abi::MAX_LANES),
                ));
            }
            let end = at + Self::wire_len(desc.kind);
            let data = p.get(at + BLOB_HEADER..end).ok_or_else(|| {
                perr(k, format!("blob {i} of {count}: its ciphertext overruns the {}-byte payload", p.len()))
            })?;
            blobs.push(BlobRef { desc, data });
            at = end;
        }
        if at != p.len() {
            return Err(perr(k, format!("{} bytes follow the {count} blobs", p.len() - at)));
        }
        Ok(Blobs { round, blobs })
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::HEADER_LEN;
    use super::*;

    #[test]
    fn hello_roundtrip() {
        use kvm_hooks::layout::{Gpa, RamRegion};
        for (ram_bytes, vcpus) in [(1 << 30, 3), (64 << 20, 1), (64 << 30, 64)] {
            let s = VmShape { ram_bytes, vcpus };
            assert_eq!(Hello::decode(&Hello::embedded(&s).encode()).unwrap().shape, s);
            let layout = RamLayout::linear(ram_bytes);
            let h = Hello {
                kind: VmKind::Qemu,
                layout,
                shape: s,
                streams: 4,
                session: 0xdead_beef,
                confidential: true,
                vm_id: 9,
                mh_lanes: 2,
            };
            assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
            // A lane count that does not fit the migration's kind.
            for (confidential, mh_lanes) in [(true, 0), (true, 5), (false, 1)] {
                let e = Hello { confidential, mh_lanes, ..h.clone() }.encode();
                assert!(Hello::decode(&e).unwrap_err().to_string().contains("MH lanes"), "{confidential} {mh_lanes}");
            }
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
            mh_lanes: 0,
        };
        let e = h.encode();
        assert!(e.len() as u32 + HEADER_LEN as u32 <= 24 + FrameKind::Hello.max_len());
        assert_eq!(Hello::decode(&e).unwrap(), h);
        let mut bad = e.clone();
        bad[16] = 7; // VM kind
        assert!(Hello::decode(&bad).unwrap_err().to_string().contains("unknown VM kind 7"));
        let mut bad = e.clone();
        bad.push(0);
        assert!(Hello::decode(&bad).unwrap_err().to_string().contains("after the RAM layout"));
        let mut bad = e.clone();
        bad[8..16].copy_from_slice(&(2 * g).to_le_bytes()); // RAM smaller than the layout
        assert!(Hello::decode(&bad).unwrap_err().to_string().contains("RAM layout"));
        let mut e = Hello::embedded(&VmShape { ram_bytes: 1 << 30, vcpus: 1 }).encode();
        e[28] = 99;
        assert!(Hello::decode(&e).unwrap_err().to_string().contains("reserved fields must be 0"));
        e[28] = 0;
        e[24] = 2; // MH lanes on a migration that is not confidential
        assert!(Hello::decode(&e).unwrap_err().to_string().contains("MH lanes"));
        assert!(Hello::decode(&e[..10]).is_err());
        let mut e =
            Hello { streams: 99, session: 1, ..Hello::embedded(&VmShape { ram_bytes: 1 << 30, vcpus: 1 }) }.encode();
        assert!(Hello::decode(&e).unwrap_err().to_string().contains("99 data streams"));
        let mut f = e.clone();
        f[48] = 0x80; // an unknown Hello flag
        assert!(Hello::decode(&f).unwrap_err().to_string().contains("unknown flags"));
        e.truncate(48);
        assert!(Hello::decode(&e).is_err());
        let j = Join { session: 7, stream: 3 };
        assert_eq!(Join::decode(&j.encode()).unwrap(), j);
        assert!(Join::decode(&j.encode()[..12]).is_err());
    }

    #[test]
    fn handover_query_and_answer_are_checked() {
        for ask in [Ask::Runs, Ask::Withdraw] {
            let q = Query { session: 0xfeed, ask };
            assert_eq!(Query::decode(&q.encode()).unwrap(), q);
        }
        for a in [Answer::Runs, Answer::NeverRuns] {
            assert_eq!(Answer::decode(&a.encode()).unwrap(), a);
        }
        let mut q = Query { session: 1, ask: Ask::Runs }.encode();
        q[8] = 0;
        assert!(Query::decode(&q).unwrap_err().to_string().contains("ask 0"));
        q[8] = 3;
        assert!(Query::decode(&q).unwrap_err().to_string().contains("ask 3"));
        assert!(Query::decode(&Query { session: 1, ask: Ask::Runs }.encode()[..12]).is_err());
        let mut a = Answer::Runs.encode();
        a[0] = 0;
        assert!(Answer::decode(&a).unwrap_err().to_string().contains("answer 0"));
        a[0] = 1;
        a.push(0);
        assert!(Answer::decode(&a).is_err(), "trailing bytes");
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
            let mut v = Blobs::prefix(3, count).to_vec();
            for b in blobs {
                let mut h = [0u8; 40];
                Blobs::put_header(&b.desc(), &mut h);
                v.extend_from_slice(&h);
                v.extend_from_slice(&b.data[..]);
            }
            v
        };
        let f1 = frame(&[&b], 1);
        let got = Blobs::decode(&f1, 0x1000).unwrap();
        assert_eq!((got.round, got.blobs.len(), got.blobs[0].desc), (3, 1, b.desc()));
        assert_eq!(got.blobs[0].data, &b.data[..]);
        let err = |f: &[u8], pages| Blobs::decode(f, pages).unwrap_err().to_string();
        assert!(err(&frame(&[], 0), 0x1000).contains("0 blobs"));
        assert!(err(&frame(&[&b], 257), 0x1000).contains("257 blobs"));
        assert!(err(&frame(&[&b], 2), 0x1000).contains("blob 1 of 2: its header overruns"));
        let mut f2 = f1.clone();
        f2.truncate(f1.len() - 1);
        assert!(err(&f2, 0x1000).contains("ciphertext overruns"));
        f2 = f1.clone();
        f2.push(0);
        assert!(err(&f2, 0x1000).contains("1 bytes follow"));
        // A zero record is its header alone, and is checked like a page.
        let mut z = b.clone();
        z.kind = mh_abi::Kind::Zero as u32;
        let mut fz = Blobs::prefix(3, 2).to_vec();
        for x in [&z, &b] {
            let mut h = [0u8; 40];
            Blobs::put_header(&x.desc(), &mut h);
            fz.extend_from_slice(&h);
            if x.kind == mh_abi::Kind::Page as u32 {
                fz.extend_from_slice(&x.data[..]);
            }
        }
        let got = Blobs::decode(&fz, 0x1000).unwrap();
        assert_eq!((got.blobs[0].desc, got.blobs[0].data.len(), got.blobs[1].data.len()), (z.desc(), 0, 4096));
        assert!(err(&fz, 0x500).contains("outside guest RAM"), "a zero record for a gfn outside RAM");
        // A zero record presented with a page of data after it: the data is read as the next blob.
        let mut fz2 = Blobs::prefix(3, 1).to_vec();
        let mut h = [0u8; 40];
        Blobs::put_header(&z.desc(), &mut h);
        fz2.extend_from_slice(&h);
        fz2.extend_from_slice(&z.data[..]);
        assert!(err(&fz2, 0x1000).contains("4096 bytes follow"));
        assert!(err(&frame(&[&b], 1), 0x500).contains("outside guest RAM"));
        let mut inside = b.clone();
        inside.gfn = mh_abi::REGION / PAGE;
        assert!(err(&frame(&[&inside], 1), 0x1000).contains("MH region"));
        let mut unknown = b.clone();
        unknown.kind = 9;
        assert!(err(&frame(&[&unknown], 1), 0x1000).contains("unknown kind"));
    }

    /// A Pages payload of `runs` with `data` bytes of page data.
    fn pages(runs: &[Run], data: u64) -> Vec<u8> {
        let mut m = Vec::new();
        PagesHead::encode(3, runs, &mut m);
        m.resize(m.len() + data as usize, 0xab);
        m
    }

    #[test]
    fn runs_are_checked_against_ram_and_length() {
        let ok = [Run { gfn: 0, npages: 2, flags: 0 }, Run { gfn: 10, npages: 5, flags: RUN_ZERO }];
        let p = pages(&ok, 2 * PAGE);
        let (head, runs, data) = PagesHead::split(&p, 16).unwrap();
        assert_eq!((head.round, head.nruns, runs, data.len() as u64), (3, 2, ok.to_vec(), 2 * PAGE));
        let err =
            |runs: &[Run], data: u64, ram: u64| PagesHead::split(&pages(runs, data), ram).unwrap_err().to_string();
        assert!(err(&ok, 2 * PAGE, 14).contains("outside guest RAM"));
        assert!(err(&ok, 3 * PAGE, 16).contains("data bytes"));
        assert!(err(&[Run { gfn: u64::MAX, npages: 2, flags: 0 }], 2 * PAGE, 16).contains("outside"), "no wrap");
        assert!(err(&[Run { gfn: 1, npages: 0, flags: 0 }], 0, 16).contains("zero pages"));
        assert!(err(&[Run { gfn: 1, npages: 1, flags: 8 }], PAGE, 16).contains("unknown flags"));
        assert!(err(&[], 0, 16).contains("0 runs"));
        let mut short = pages(&ok, 0);
        short.truncate(20); // two runs announced, one table entry and a half present
        assert!(PagesHead::split(&short, 16).unwrap_err().to_string().contains("do not fit"));
        assert!(PagesHead::split(&short[..5], 16).unwrap_err().to_string().contains("8-byte prefix"));
        let mut many = pages(&ok, 0);
        many[4..8].copy_from_slice(&(MAX_RUNS + 1).to_le_bytes());
        assert!(PagesHead::split(&many, 16).unwrap_err().to_string().contains("runs (must be"));
    }

    #[test]
    fn status_abort_and_state_frames() {
        let a = HelloAck::decode(&HelloAck::encode(HelloAck::REFUSED, &[0x1234], "too big")).unwrap();
        assert_eq!(a, HelloAck { status: 1, challenges: vec![0x1234], text: "too big".into() });
        let a = HelloAck::decode(&HelloAck::encode(HelloAck::ACCEPTED, &[1, 2, 3], "")).unwrap();
        assert_eq!(a.challenges, [1, 2, 3]);
        assert!(HelloAck::decode(&HelloAck::encode(1, &[7], "x")[..16]).is_err());
        assert!(HelloAck::decode(&HelloAck::encode(2, &[7], "x")).unwrap_err().to_string().contains("status 2"));
        let five = HelloAck::encode(0, &[1, 2, 3, 4, 5], "");
        assert!(HelloAck::decode(&five).unwrap_err().to_string().contains("5 MH lanes"));
        // A lane count that claims more challenges than the payload holds.
        let mut short = HelloAck::encode(0, &[1], "");
        short[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert!(HelloAck::decode(&short).is_err());
        assert_eq!(Abort::decode(&Abort::encode("boom")).unwrap().reason, "boom");
        let long = "é".repeat(2000);
        assert!(Abort::decode(&Abort::encode(&long)).unwrap().reason.len() <= MAX_TEXT);
        let e = EndOfRound { round: 4, pages: 99 };
        assert_eq!(EndOfRound::decode(&e.encode()).unwrap(), e);
        let ranges = vec![(3, 2), (5, 1), (100, 7)];
        let s = PageStates::decode(&PageStates::encode(&ranges, true)).unwrap();
        assert_eq!(s, PageStates { ranges: ranges.clone(), last: true });
        assert_eq!(
            PageStates::decode(&PageStates::encode(&[], false)).unwrap(),
            PageStates { ranges: vec![], last: false }
        );
        let c = Complete { rounds: 5, sections: 2, pages_sent: 77 };
        assert_eq!(Complete::decode(&c.encode()).unwrap(), c);
        assert_eq!(Resumed::decode(&Resumed { capture_us: 12 }.encode()).unwrap().capture_us, 12);
        let mut p = State::prefix(1, 3).to_vec();
        p.extend_from_slice(b"abc");
        assert_eq!(State::decode(&p).unwrap(), State { index: 1, bytes: &b"abc"[..] });
        p.push(0);
        assert!(State::decode(&p).is_err());
    }

    #[test]
    fn page_states_are_checked() {
        let err = |p: &[u8]| PageStates::decode(p).unwrap_err().to_string();
        let mut p = PageStates::encode(&[(3, 2), (5, 1)], true);
        assert!(err(&p[..p.len() - 1]).contains("bytes for 2 ranges"));
        p[4] = 3; // an unknown flag
        assert!(err(&p).contains("unknown flags"));
        assert!(err(&PageStates::encode(&[(3, 2), (4, 1)], true)).contains("not after the previous"));
        assert!(err(&PageStates::encode(&[(3, 0)], true)).contains("0 pages"));
        assert!(err(&PageStates::encode(&[(u64::MAX, 2)], true)).contains("2 pages"));
        let mut p = PageStates::encode(&[], true);
        p[0..4].copy_from_slice(&(MAX_STATE_RANGES + 1).to_le_bytes());
        assert!(err(&p).contains("exceed"));
        assert!(FrameKind::from_u16(11) == Some(FrameKind::PageStates));
    }
}
