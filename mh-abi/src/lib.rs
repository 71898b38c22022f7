//! The Migration Handler (MH) ABI, shared by the host (`kvm-hooks`, `accel-user`) and the
//! reference MH that runs inside the guest (`mh-guest`). `no_std`, no dependencies: the
//! guest image links it too. Specified in `docs/mh-protocol.md`; every number here is
//! little-endian and every field the other side wrote is validated before use.
//!
//! The MH region is 2 MiB of guest RAM at [`REGION`]. Guest-physical layout:
//! ```text
//! +0x000000 header      magic, version, status, fault, counters (MH writes); MH GDT at +0x800
//! +0x001000 secret      transport key, VM id, RAM size (the launch secret; host writes once)
//! +0x002000 request     ring, host -> MH   (prod: host, cons: MH)
//! +0x003000 completion  ring, MH -> host   (prod: MH, cons: host)
//! +0x004000 slot descriptors, NSLOTS x 64 bytes
//! +0x008000 VMSA area   vCPU state pages (SEV-ES style), VMSA_PAGES pages
//! +0x020000 MH page tables (PML4, PDPT, 64 PDs: 64 GiB identity map)
//! +0x062000 lanes 1..3  header, request ring, completion ring of each further handler vCPU
//! +0x070000 MH stack    (lane 0: 64 KiB, grows down from +0x080000)
//! +0x080000 MH image    (code, data, bss; 256 KiB)
//! +0x0c0000 lane stacks (lanes 1..3: 64 KiB each)
//! +0x100000 data slots  NSLOTS x 4 KiB of ciphertext
//! ```
//!
//! An MH may run on several vCPUs, its **lanes** ([`MAX_LANES`] at most, the count in the
//! launch secret): each lane serves its own rings and keeps its own stream state, and owns
//! the guest pages of every `lanes`-th granule of 128 KiB ([`lane_of`]): small enough that
//! one batch of pages spreads over every lane. The data slots and
//! their descriptors are shared: the host says which slots each request uses.
#![no_std]

/// Guest-physical base of the MH region.
pub const REGION: u64 = 0x20_0000;
/// Size of the MH region.
pub const REGION_SIZE: u64 = 0x20_0000;
pub const PAGE: u64 = 4096;

pub const HEADER: u64 = REGION;
/// The MH vCPU's own GDT (second half of the header page), so it never depends on guest pages.
pub const GDT: u64 = REGION + 0x800;
pub const SECRET: u64 = REGION + 0x1000;
pub const REQ_RING: u64 = REGION + 0x2000;
pub const COMP_RING: u64 = REGION + 0x3000;
pub const SLOT_DESC: u64 = REGION + 0x4000;
pub const VMSA: u64 = REGION + 0x8000;
pub const VMSA_PAGES: u64 = 24;
pub const PAGE_TABLES: u64 = REGION + 0x2_0000;
pub const STACK_TOP: u64 = REGION + 0x8_0000;
pub const IMAGE: u64 = REGION + 0x8_0000;
pub const IMAGE_MAX: u64 = 0x4_0000;
/// Stack tops of lanes 1.. are `LANE_STACKS + lane * 0x10000` (64 KiB each).
pub const LANE_STACKS: u64 = IMAGE + IMAGE_MAX;
/// Header, request ring and completion ring pages of lanes 1.. (lane 0 uses [`HEADER`],
/// [`REQ_RING`] and [`COMP_RING`]).
pub const LANE_PAGES: u64 = REGION + 0x6_2000;
/// Most handler vCPUs (lanes) one MH runs on.
pub const MAX_LANES: u32 = 4;
/// Pages of one lane granule (128 KiB): lane `k` of `n` owns the pages of every granule `g`
/// with `g % n == k`. A host batch of 128 contiguous pages touches four granules, so every
/// lane of up to four gets a share of it.
pub const GRANULE_PAGES: u64 = 32;

/// The lane that owns page `gfn` when the MH runs on `lanes` lanes.
pub fn lane_of(gfn: u64, lanes: u32) -> u32 {
    ((gfn / GRANULE_PAGES) % u64::from(lanes.max(1))) as u32
}

/// Guest-physical addresses of one lane's header page and rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneAddrs {
    pub header: u64,
    pub req: u64,
    pub comp: u64,
    pub stack_top: u64,
}

/// Where lane `lane` (below [`MAX_LANES`]) keeps its header, rings and stack.
pub const fn lane_addrs(lane: u32) -> LaneAddrs {
    if lane == 0 {
        return LaneAddrs { header: HEADER, req: REQ_RING, comp: COMP_RING, stack_top: STACK_TOP };
    }
    let base = LANE_PAGES + (lane as u64 - 1) * 3 * PAGE;
    LaneAddrs { header: base, req: base + PAGE, comp: base + 2 * PAGE, stack_top: LANE_STACKS + lane as u64 * 0x1_0000 }
}
pub const SLOTS: u64 = REGION + 0x10_0000;
/// Data slots: the most pages one doorbell can carry.
pub const NSLOTS: u32 = 256;

pub const MAGIC: u64 = u64::from_le_bytes(*b"MIGACCMH");
/// 4: the MH runs on one or more lanes (handler vCPUs); every blob is bound to its lane and
/// the lane count. 3: an all-zero page exports as a zero record ([`Kind::Zero`]); blobs are
/// bound to the importing MH's challenge (`header::CHALLENGE`).
pub const VERSION: u32 = 4;

/// Port the MH vCPU uses to talk to its host thread (`out dx, eax` with a [`Kick`]).
pub const PORT: u16 = 0x700;

/// What an MH `out` to [`PORT`] means.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    Invalid = 0,
    /// Booted, the header says ready (or faulted).
    Ready = 1,
    /// Completions were posted.
    Done = 2,
    /// Idle: block until the host rings the doorbell.
    Wait = 3,
    /// Fatal: the header's fault field says why; the MH stops.
    Fault = 4,
}

impl Kick {
    pub fn from_u32(v: u32) -> Kick {
        match v {
            1 => Kick::Ready,
            2 => Kick::Done,
            3 => Kick::Wait,
            4 => Kick::Fault,
            _ => Kick::Invalid,
        }
    }
}

/// Header fields (offsets from [`HEADER`]).
pub mod header {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x08;
    /// [`super::Status`], written by the MH.
    pub const STATUS: u64 = 0x0c;
    /// [`super::Fault`] code when status is Faulted.
    pub const FAULT: u64 = 0x10;
    /// Host-set: spins on an empty request ring before the MH sends [`super::Kick::Wait`].
    pub const SPIN: u64 = 0x18;
    /// Pages exported / imported, blobs refused (MH counters).
    pub const EXPORTED: u64 = 0x20;
    pub const IMPORTED: u64 = 0x28;
    pub const REFUSED: u64 = 0x30;
    /// Import side: sequence number the next blob must carry (0 before Begin).
    pub const NEXT_SEQ: u64 = 0x38;
    /// Import side: 1 once a valid End blob closed the stream with no gap.
    pub const COMPLETE: u64 = 0x40;
    /// Doorbells the MH waited for (Wait kicks) and requests handled.
    pub const WAITS: u64 = 0x48;
    pub const REQUESTS: u64 = 0x50;
    /// MH-set at start: a random value of its own. As an importer it opens only blobs
    /// bound to it, so blobs recorded from any earlier migration never open here.
    pub const CHALLENGE: u64 = 0x58;
    /// Host-set before an export's Begin: the importing MH's challenge (relayed from the
    /// destination). The exporter binds every blob of that migration to it.
    pub const PEER_CHALLENGE: u64 = 0x60;
    /// Zero records exported (source) or imported (destination): pages that travelled as a
    /// tag instead of a page of ciphertext.
    pub const ZEROS: u64 = 0x68;
}

/// Secret-page fields (offsets from [`SECRET`]).
pub mod secret {
    /// 32-byte AES-256-GCM transport key.
    pub const KEY: u64 = 0x00;
    /// VM id bound into every blob.
    pub const VM_ID: u64 = 0x20;
    /// Guest RAM size in bytes (the MH never touches a gfn at or above it).
    pub const RAM_SIZE: u64 = 0x28;
    /// Non-zero once the host wrote the secret.
    pub const VALID: u64 = 0x30;
    /// Non-zero: the exporter sends all-zero pages as zero records. A zero record tells
    /// whoever moves the blobs that the page is zero, so whether to allow that is the
    /// guest owner's choice, made at launch.
    pub const ZERO_RECORDS: u64 = 0x38;
    /// Lanes (handler vCPUs) the MH runs on, 1 to [`super::MAX_LANES`] (0 reads as 1).
    /// Exporter and importer must run the same count: it is bound into every blob.
    pub const LANES: u64 = 0x40;
}

#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Invalid = 0,
    Ready = 1,
    Faulted = 2,
}

/// Why the MH stopped (header FAULT).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Invalid = 0,
    NoSecret = 1,
    BadRing = 2,
    /// The launch secret's lane count is out of range, or this vCPU's lane is not below it.
    /// (A vCPU on a lane another vCPU already runs, or on a lane of 4 or more, stops at its
    /// first instruction: the host sees the vCPU shut down.)
    BadLane = 3,
}

/// Ring geometry: both rings have [`RING_ENTRIES`] entries after a 128-byte header whose
/// producer index is at +0 and consumer index at +64 (separate cache lines). Indices are
/// free-running u32; `prod - cons` must never exceed `RING_ENTRIES`.
pub const RING_ENTRIES: u32 = 64;
pub const RING_PROD: u64 = 0;
pub const RING_CONS: u64 = 64;
pub const RING_BASE: u64 = 128;
pub const REQ_SIZE: u64 = 32;
pub const COMP_SIZE: u64 = 16;

/// Request operations.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Invalid = 0,
    /// Encrypt pages `[gfn, gfn+count)` into slots `[slot, slot+count)`; a page that is all
    /// zero becomes a zero record (descriptor only, kind [`Kind::Zero`]).
    Export = 1,
    /// Decrypt slots `[slot, slot+count)` into pages `[gfn, gfn+count)`; a zero record's
    /// page is zeroed once its tag verifies.
    Import = 2,
    /// Encrypt VMSA pages `[0, count)` into slots (kind Cpu).
    SaveCpu = 3,
    /// Decrypt slots into VMSA pages `[0, count)`.
    RestoreCpu = 4,
    /// Forget an unfinished import stream (next blob must be Begin) and draw a fresh
    /// challenge (`header::CHALLENGE`), so no blob bound to the old one verifies; keeps the
    /// key. Refused (`NoStream`) once an import finished: its memory is final.
    Reset = 5,
    /// Export: produce a Begin marker in `slot` (starts a blob stream).
    Begin = 6,
    /// Export: produce an End marker in `slot` (closes the stream; carries the count).
    End = 7,
    /// Import: check a Begin or End marker in `slot`.
    Marker = 8,
}

impl Op {
    pub fn from_u16(v: u16) -> Op {
        match v {
            1 => Op::Export,
            2 => Op::Import,
            3 => Op::SaveCpu,
            4 => Op::RestoreCpu,
            5 => Op::Reset,
            6 => Op::Begin,
            7 => Op::End,
            8 => Op::Marker,
            _ => Op::Invalid,
        }
    }
}

/// A request (32 bytes): `op u16, _ u16, id u32, count u32, slot u32, gfn u64, round u32, _ u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    pub op: u16,
    pub id: u32,
    pub count: u32,
    pub slot: u32,
    pub gfn: u64,
    pub round: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQ_SIZE as usize] {
        let mut b = [0u8; REQ_SIZE as usize];
        b[0..2].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b[12..16].copy_from_slice(&self.slot.to_le_bytes());
        b[16..24].copy_from_slice(&self.gfn.to_le_bytes());
        b[24..28].copy_from_slice(&self.round.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8; REQ_SIZE as usize]) -> Request {
        Request {
            op: u16::from_le_bytes([b[0], b[1]]),
            id: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            count: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            slot: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            gfn: u64::from_le_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            round: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        }
    }
}

/// Completion status.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompStatus {
    Invalid = 0,
    Ok = 1,
    /// Unknown op, count 0 or above NSLOTS, slot range outside the slot area.
    BadRequest = 2,
    /// A gfn outside guest RAM or inside the MH region.
    BadGfn = 3,
    /// Authentication failed: tampered, wrong key, relocated (gfn), or wrong kind.
    AuthFailed = 4,
    /// Sequence number out of order: replayed, reordered or missing blob.
    BadSequence = 5,
    /// Round went backwards.
    BadRound = 6,
    /// Import before a Begin marker, or after End; a Begin or Reset after a finished import;
    /// an Import, a second RestoreCpu, a Reset or a Begin after vCPU state was restored; an export Begin on a lane other than 0 before lane 0 began a new export.
    NoStream = 7,
    /// Lane 0's End marker or RestoreCpu while another lane's import has not ended, or
    /// ended for another export: lane 0 restores vCPU state and closes the import last, so
    /// its end means every lane's pages, all of one export, are in.
    LanesOpen = 8,
}

impl CompStatus {
    pub fn from_u32(v: u32) -> CompStatus {
        match v {
            1 => CompStatus::Ok,
            2 => CompStatus::BadRequest,
            3 => CompStatus::BadGfn,
            4 => CompStatus::AuthFailed,
            5 => CompStatus::BadSequence,
            6 => CompStatus::BadRound,
            7 => CompStatus::NoStream,
            8 => CompStatus::LanesOpen,
            _ => CompStatus::Invalid,
        }
    }
    pub fn describe(self) -> &'static str {
        match self {
            CompStatus::Invalid => "invalid status",
            CompStatus::Ok => "ok",
            CompStatus::BadRequest => "malformed request (op, count or slot range)",
            CompStatus::BadGfn => "gfn outside guest RAM, inside the MH region or owned by another lane",
            CompStatus::AuthFailed => {
                "blob failed authentication (tampered, wrong key, relocated, or bound to another migration)"
            }
            CompStatus::BadSequence => "blob out of sequence (replayed, reordered or missing)",
            CompStatus::BadRound => "blob round went backwards",
            CompStatus::NoStream => "no open blob stream (missing Begin, or after End)",
            CompStatus::LanesOpen => {
                "lane 0's vCPU state or End before every other lane's import of the same export ended"
            }
        }
    }
}

/// A completion (16 bytes): `id u32, status u32, done u32, _ u32`. `done` counts the pages
/// handled before the first failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Completion {
    pub id: u32,
    pub status: u32,
    pub done: u32,
}

impl Completion {
    pub fn encode(&self) -> [u8; COMP_SIZE as usize] {
        let mut b = [0u8; COMP_SIZE as usize];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..12].copy_from_slice(&self.done.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8; COMP_SIZE as usize]) -> Completion {
        Completion {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            status: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            done: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        }
    }
}

/// Blob kinds, bound into every blob's additional data.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Invalid = 0,
    Page = 1,
    Cpu = 2,
    Begin = 3,
    End = 4,
    /// An all-zero page: the descriptor and a tag over no ciphertext (the slot's data area
    /// is neither written nor read). Bound like a Page blob, under its own kind, so a Page
    /// blob cannot pass as a zero record nor the reverse.
    Zero = 5,
}

impl Kind {
    pub fn from_u32(v: u32) -> Kind {
        match v {
            1 => Kind::Page,
            2 => Kind::Cpu,
            3 => Kind::Begin,
            4 => Kind::End,
            5 => Kind::Zero,
            _ => Kind::Invalid,
        }
    }
    /// Whether a blob of this kind carries a page of ciphertext (all but zero records).
    pub fn has_data(self) -> bool {
        self != Kind::Zero
    }
    /// Whether a blob of this kind answers an Export/Import of guest pages.
    pub fn is_page(self) -> bool {
        matches!(self, Kind::Page | Kind::Zero)
    }
    /// Whether a blob of this kind answers a request for `asked`: the same kind, or a zero
    /// record where a page was asked.
    pub fn answers(self, asked: Kind) -> bool {
        self == asked || (asked == Kind::Page && self == Kind::Zero)
    }
}

/// Slot descriptor (64 bytes at `SLOT_DESC + 64*slot`):
/// `gfn u64, seq u64, round u32, kind u32, tag [u8;16], _ [u8;24]`.
/// Export: the MH fills it. Import: the host copies the blob's fields in; the MH checks them
/// against the request (the gfn it authenticates is the request's, never the descriptor's).
pub const DESC_SIZE: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    pub gfn: u64,
    pub seq: u64,
    pub round: u32,
    pub kind: u32,
    pub tag: [u8; 16],
}

impl Desc {
    pub fn encode(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0..8].copy_from_slice(&self.gfn.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.round.to_le_bytes());
        b[20..24].copy_from_slice(&self.kind.to_le_bytes());
        b[24..40].copy_from_slice(&self.tag);
        b
    }
    pub fn decode(b: &[u8; 40]) -> Desc {
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&b[24..40]);
        Desc {
            gfn: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            seq: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            round: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            kind: u32::from_le_bytes([b[20], b[21], b[22], b[23]]),
            tag,
        }
    }
}

/// AES-GCM nonce of a blob: `vm_id u32 || seq u64`. Each lane's sequence counter starts at
/// a random high half whose low two bits are the lane, so lanes never share a nonce and a
/// counter never repeats while the VM lives: (key, nonce) is never reused for one VM.
pub fn nonce(vm_id: u32, seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[0..4].copy_from_slice(&vm_id.to_le_bytes());
    n[4..12].copy_from_slice(&seq.to_le_bytes());
    n
}

/// A lane and the lane count, as bound into a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    pub index: u32,
    pub count: u32,
}

/// Additional data of a blob: binds it to (VM id, the importer's challenge, gfn, round,
/// sequence, kind, lane, lane count), so a blob replayed from another migration, reordered,
/// presented for another page or to another lane, or to an importer that splits the pages
/// differently fails authentication.
pub fn aad(vm_id: u32, challenge: u64, gfn: u64, round: u32, seq: u64, kind: Kind, lane: Lane) -> [u8; 52] {
    let mut a = [0u8; 52];
    a[44..48].copy_from_slice(&lane.index.to_le_bytes());
    a[48..52].copy_from_slice(&lane.count.to_le_bytes());
    a[0..8].copy_from_slice(b"MGMHBLB3");
    a[8..12].copy_from_slice(&vm_id.to_le_bytes());
    a[12..20].copy_from_slice(&challenge.to_le_bytes());
    a[20..28].copy_from_slice(&gfn.to_le_bytes());
    a[28..32].copy_from_slice(&round.to_le_bytes());
    a[32..40].copy_from_slice(&seq.to_le_bytes());
    a[40..44].copy_from_slice(&(kind as u32).to_le_bytes());
    a
}

// The layout fits the region (checked at compile time).
const _: () = {
    assert!(SLOTS + NSLOTS as u64 * PAGE <= REGION + REGION_SIZE);
    assert!(SLOT_DESC + NSLOTS as u64 * DESC_SIZE <= VMSA);
    assert!(VMSA + VMSA_PAGES * PAGE <= PAGE_TABLES);
    assert!(PAGE_TABLES + 66 * PAGE <= LANE_PAGES);
    assert!(LANE_PAGES + (MAX_LANES as u64 - 1) * 3 * PAGE <= STACK_TOP - 0x1_0000);
    assert!(lane_addrs(1).stack_top - 0x1_0000 >= IMAGE + IMAGE_MAX);
    assert!(lane_addrs(MAX_LANES - 1).stack_top <= SLOTS);
    assert!(RING_BASE + RING_ENTRIES as u64 * REQ_SIZE <= PAGE);
};

/// The MH region's guest frames.
pub const REGION_GFNS: core::ops::Range<u64> = REGION / PAGE..(REGION + REGION_SIZE) / PAGE;

/// True when page `gfn` lies inside the MH region (never exported over, never imported into).
pub fn in_region(gfn: u64) -> bool {
    let gpa = gfn.wrapping_mul(PAGE);
    (REGION..REGION + REGION_SIZE).contains(&gpa) && gfn < (1 << 52)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let r = Request { op: Op::Import as u16, id: 7, count: 3, slot: 9, gfn: 0x1234_5678, round: 4 };
        assert_eq!(Request::decode(&r.encode()), r);
        let c = Completion { id: 7, status: CompStatus::AuthFailed as u32, done: 2 };
        assert_eq!(Completion::decode(&c.encode()), c);
        let d = Desc { gfn: 5, seq: 6, round: 7, kind: Kind::Cpu as u32, tag: [9; 16] };
        assert_eq!(Desc::decode(&d.encode()), d);
        assert_eq!(Op::from_u16(0), Op::Invalid);
        assert_eq!(Op::from_u16(99), Op::Invalid);
        assert_eq!(CompStatus::from_u32(1234), CompStatus::Invalid);
        assert_eq!(CompStatus::from_u32(8), CompStatus::LanesOpen);
        for k in [Kind::Page, Kind::Cpu, Kind::Begin, Kind::End, Kind::Zero] {
            assert_eq!(Kind::from_u32(k as u32), k);
        }
        assert_eq!(Kind::from_u32(6), Kind::Invalid);
        assert!(!Kind::Zero.has_data() && Kind::Page.has_data() && Kind::Cpu.has_data());
        assert!(Kind::Zero.answers(Kind::Page) && Kind::Page.answers(Kind::Page));
        assert!(!Kind::Page.answers(Kind::Zero) && !Kind::Zero.answers(Kind::Cpu));
    }

    #[test]
    fn lanes_split_ram_by_granule_and_keep_apart() {
        assert_eq!(lane_of(0, 1), 0);
        assert_eq!(lane_of(GRANULE_PAGES * 7 + 3, 1), 0);
        assert_eq!(lane_of(GRANULE_PAGES - 1, 2), 0);
        assert_eq!(lane_of(GRANULE_PAGES, 2), 1);
        assert_eq!(lane_of(GRANULE_PAGES * 5, 3), 2);
        assert_eq!(lane_of(5, 0), 0, "no lane count reads as one lane");
        // No two lanes share a page of the region.
        let mut pages = [0u64; 3 * MAX_LANES as usize];
        for l in 0..MAX_LANES {
            let a = lane_addrs(l);
            pages[3 * l as usize..3 * l as usize + 3].copy_from_slice(&[a.header, a.req, a.comp]);
            assert!(a.stack_top > REGION && a.stack_top <= REGION + REGION_SIZE);
        }
        for (i, a) in pages.iter().enumerate() {
            assert!(in_region(a / PAGE));
            assert!(pages[i + 1..].iter().all(|b| b != a), "page {a:#x} is used twice");
        }
    }

    #[test]
    fn region_bounds() {
        assert!(in_region(REGION / PAGE) && in_region((REGION + REGION_SIZE) / PAGE - 1));
        assert!(!in_region(REGION / PAGE - 1) && !in_region((REGION + REGION_SIZE) / PAGE));
    }

    #[test]
    fn binding_differs_per_field() {
        let l = Lane { index: 1, count: 2 };
        let base = aad(1, 5, 2, 3, 4, Kind::Page, l);
        assert_ne!(base, aad(9, 5, 2, 3, 4, Kind::Page, l));
        assert_ne!(base, aad(1, 9, 2, 3, 4, Kind::Page, l), "the importer's challenge");
        assert_ne!(base, aad(1, 5, 9, 3, 4, Kind::Page, l));
        assert_ne!(base, aad(1, 5, 2, 9, 4, Kind::Page, l));
        assert_ne!(base, aad(1, 5, 2, 3, 9, Kind::Page, l));
        assert_ne!(base, aad(1, 5, 2, 3, 4, Kind::Cpu, l));
        assert_ne!(base, aad(1, 5, 2, 3, 4, Kind::Zero, l), "a page blob is not a zero record");
        assert_ne!(base, aad(1, 5, 2, 3, 4, Kind::Page, Lane { index: 0, count: 2 }), "another lane");
        assert_ne!(base, aad(1, 5, 2, 3, 4, Kind::Page, Lane { index: 1, count: 3 }), "another lane count");
        assert_ne!(nonce(1, 2), nonce(1, 3));
    }
}
