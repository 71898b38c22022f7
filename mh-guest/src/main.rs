//! The reference Migration Handler (MH): runs inside the guest on an extra vCPU, at CPL 3,
//! with its own identity page tables in the MH region. It serves the host's request ring:
//! EXPORT encrypts guest pages into the shared data slots (an all-zero page becomes a
//! zero record, a tag and no ciphertext, when the launch secret allows it), IMPORT
//! authenticates and decrypts slots into guest pages. Every request is checked before
//! anything is touched; the host is not trusted (ABI: `docs/mh-protocol.md`, constants:
//! `mh-abi`).
//!
//! The MH may run on several vCPUs (lanes, `abi::MAX_LANES` at most): the host starts each
//! with its lane in `r12`; each serves its own rings with its own state on its own stack,
//! and handles only the pages of its own granules. Lane 0 closes an import last.
//!
//! Plaintext never sits in shared memory: a page is copied into the MH's private buffer,
//! encrypted there and only the ciphertext is copied out; an import copies the ciphertext in
//! first, so the host cannot change it between authentication and decryption.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use aes_gcm::aead::array::Array;
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use mh_abi::{self as abi, CompStatus, Completion, Desc, Kick, Kind, Op, Request};

global_asm!(
    ".section .text.start,\"ax\"",
    ".globl _start",
    "_start:",
    // The lane (r12) picks the stack; only lane 0, started first, clears the bss. A lane
    // out of range, or one another vCPU already claimed, stops here (ud2: the vCPU shuts
    // down) before it touches a stack or the bss.
    "cmp r12, {max}",
    "jae 3f",
    "lea rax, [rip + {claimed}]",
    "mov ecx, 1",
    "xchg dword ptr [rax + r12 * 4], ecx",
    "test ecx, ecx",
    "jnz 3f",
    "test r12, r12",
    "jnz 1f",
    "mov rsp, {stack}",
    "lea rdi, [rip + __bss_start]",
    "lea rcx, [rip + __bss_end]",
    "sub rcx, rdi",
    "xor eax, eax",
    "rep stosb",
    "jmp 2f",
    "1:",
    "mov rsp, r12",
    "shl rsp, 16",
    "add rsp, {lane_stacks}",
    "2:",
    "and rsp, -16",
    "mov rdi, r12",
    "call mh_main",
    "4: jmp 4b",
    "3: ud2",
    stack = const abi::STACK_TOP,
    lane_stacks = const abi::LANE_STACKS,
    max = const abi::MAX_LANES,
    claimed = sym CLAIMED,
);

// State the lanes share, in MH-private memory (never the shared header) and in `.data`, so
// that no lane's start clears it (lane 0 clears the bss).

/// Lanes that started (claimed in `_start`): a second vCPU on a lane already running stops
/// instead of sharing its stack and state.
#[link_section = ".data.mh_lanes"]
static CLAIMED: [AtomicU32; abi::MAX_LANES as usize] = [const { AtomicU32::new(0) }; abi::MAX_LANES as usize];
/// Lanes whose import ended (an End marker verified): lane 0 reads them before it restores
/// vCPU state or closes its own import.
#[link_section = ".data.mh_lanes"]
static FINISHED: [AtomicU32; abi::MAX_LANES as usize] = [const { AtomicU32::new(0) }; abi::MAX_LANES as usize];
/// Import side: the export id each lane's Begin marker carried (0: none yet). Every lane
/// of one import must come from one export.
#[link_section = ".data.mh_lanes"]
static IMPORT: [AtomicU64; abi::MAX_LANES as usize] = [const { AtomicU64::new(0) }; abi::MAX_LANES as usize];
/// Export side: the id lane 0 drew at its Begin; the other lanes' Begin markers carry it.
#[link_section = ".data.mh_lanes"]
static EXPORT: AtomicU64 = AtomicU64::new(0);

/// This vCPU's lane, from the stack it runs on (for a fault raised outside the handler).
fn my_lane() -> u32 {
    let sp: u64;
    // SAFETY: reads the stack pointer only.
    unsafe { asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack)) };
    // Lane k (k >= 1) runs on [LANE_STACKS + (k-1) * 64 KiB, LANE_STACKS + k * 64 KiB).
    if sp >= abi::LANE_STACKS {
        (((sp - abi::LANE_STACKS) >> 16) as u32 + 1).min(abi::MAX_LANES - 1)
    } else {
        0
    }
}

// The x86_64-unknown-linux-gnu target's compiler_builtins leaves these to libc; string
// instructions keep LLVM from lowering them back into calls to themselves.
#[no_mangle]
unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsb", inout("rdi") d => _, inout("rsi") s => _, inout("rcx") n => _, options(nostack));
    d
}
#[no_mangle]
unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
        return memcpy(d, s, n);
    }
    asm!("std", "rep movsb", "cld", inout("rdi") d.add(n - 1) => _, inout("rsi") s.add(n - 1) => _,
         inout("rcx") n => _, options(nostack));
    d
}
#[no_mangle]
unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rdi") d => _, inout("rcx") n => _, in("al") c as u8, options(nostack));
    d
}
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (read_volatile(a.add(i)), read_volatile(b.add(i)));
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}
#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fault(abi::Fault::BadRing)
}

fn rd64(gpa: u64) -> u64 {
    // SAFETY: the MH's page tables identity-map all guest RAM; callers pass addresses inside
    // the MH region or pages already checked against the RAM size.
    unsafe { read_volatile(gpa as *const u64) }
}
fn wr64(gpa: u64, v: u64) {
    // SAFETY: as rd64; only MH-region addresses are written this way.
    unsafe { write_volatile(gpa as *mut u64, v) }
}
fn rd32(gpa: u64) -> u32 {
    // SAFETY: as rd64.
    unsafe { read_volatile(gpa as *const u32) }
}
fn wr32(gpa: u64, v: u32) {
    // SAFETY: as wr64.
    unsafe { write_volatile(gpa as *mut u32, v) }
}
fn copy_in(dst: &mut [u8], gpa: u64) {
    // SAFETY: gpa..gpa+len is inside guest RAM (checked by the caller) and identity mapped.
    unsafe { memcpy(dst.as_mut_ptr(), gpa as *const u8, dst.len()) };
}
fn copy_out(gpa: u64, src: &[u8]) {
    // SAFETY: as copy_in; the range never overlaps the MH's private state (checked).
    unsafe { memcpy(gpa as *mut u8, src.as_ptr(), src.len()) };
}
fn kick(k: Kick) {
    // SAFETY: port I/O exits to the host (IOPL 3 lets CPL 3 use it); no memory is touched.
    unsafe { asm!("out dx, eax", in("dx") abi::PORT, in("eax") k as u32, options(nostack, nomem)) };
}
fn fault(f: abi::Fault) -> ! {
    let h = abi::lane_addrs(my_lane()).header;
    wr32(h + abi::header::FAULT, f as u32);
    wr32(h + abi::header::STATUS, abi::Status::Faulted as u32);
    loop {
        kick(Kick::Fault);
    }
}

/// A random 64-bit value from RDRAND (falls back to the TSC if RDRAND keeps failing).
fn random() -> u64 {
    for _ in 0..32 {
        let (v, ok): (u64, u8);
        // SAFETY: rdrand only writes the named registers.
        unsafe { asm!("rdrand {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok, options(nomem, nostack)) };
        if ok != 0 {
            return v;
        }
    }
    // SAFETY: rdtsc only writes eax/edx.
    let (lo, hi): (u32, u32);
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32 | u64::from(lo)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Whether a page is all zero (an OR over 64-byte chunks, which LLVM vectorizes; no memcmp).
fn is_zero(p: &[u8; 4096]) -> bool {
    p.chunks_exact(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

#[repr(C, align(64))]
struct PageBuf([u8; 4096]);

struct Mh {
    cipher: Aes256Gcm,
    /// This vCPU's lane and the lane count, bound into every blob.
    lane: abi::Lane,
    addrs: abi::LaneAddrs,
    vm_id: u32,
    /// Imports open only blobs bound to this (published in the header at start).
    challenge: u64,
    /// Exports bind to this: the importer's challenge, read at the export's Begin.
    bind: u64,
    ram_pages: u64,
    /// Export all-zero pages as zero records (`secret::ZERO_RECORDS`).
    zero_records: bool,
    /// Export: next sequence number (random high half per boot, so nonces never repeat).
    seq: u64,
    /// Import: a Begin opened the stream; `next_seq` is what the next blob must carry.
    open: bool,
    /// An import ended (its End marker opened): this VM's memory is final. Kept here, not
    /// in the shared header the host can rewrite; no Reset clears it.
    finished: bool,
    /// Import: vCPU state was restored (the vCPUs may run from here on), so nothing but
    /// the End marker is taken: no page, no second state, no Reset, no Begin.
    restored: bool,
    /// Export: the export id this lane's last Begin carried; a lane other than 0 begins
    /// only once lane 0 drew a new one.
    exported: u64,
    next_seq: u64,
    last_round: u32,
    buf: PageBuf,
}

#[no_mangle]
extern "C" fn mh_main(lane: u64) -> ! {
    let addrs = abi::lane_addrs(lane as u32);
    let h = addrs.header;
    wr64(h + abi::header::MAGIC, abi::MAGIC);
    wr32(h + abi::header::VERSION, abi::VERSION);
    if rd64(abi::SECRET + abi::secret::VALID) == 0 {
        fault(abi::Fault::NoSecret);
    }
    let lanes = rd64(abi::SECRET + abi::secret::LANES).max(1);
    if lanes > u64::from(abi::MAX_LANES) || lane >= lanes {
        fault(abi::Fault::BadLane);
    }
    let mut key = [0u8; 32];
    copy_in(&mut key, abi::SECRET + abi::secret::KEY);
    let mut mh = Mh {
        cipher: Aes256Gcm::new(&Array::from(key)),
        lane: abi::Lane { index: lane as u32, count: lanes as u32 },
        addrs,
        vm_id: rd32(abi::SECRET + abi::secret::VM_ID),
        challenge: random(),
        bind: 0,
        ram_pages: rd64(abi::SECRET + abi::secret::RAM_SIZE) / abi::PAGE,
        zero_records: rd64(abi::SECRET + abi::secret::ZERO_RECORDS) != 0,
        // A random high half per boot whose low two bits are the lane (nonces never repeat
        // across lanes), then a counter.
        seq: (random() & !0x3_ffff_ffff) | (lane << 32) | 1,
        open: false,
        finished: false,
        restored: false,
        exported: 0,
        next_seq: 0,
        last_round: 0,
        buf: PageBuf([0; 4096]),
    };
    key.fill(0);
    wr64(h + abi::header::CHALLENGE, mh.challenge);
    wr32(h + abi::header::STATUS, abi::Status::Ready as u32);
    kick(Kick::Ready);
    mh.serve()
}

impl Mh {
    /// Whether every other lane's import ended, from the same export as this lane's (lane
    /// 0 asks before it restores vCPU state and before it ends its own import).
    fn others_done(&self) -> bool {
        let mine = IMPORT[self.lane.index as usize].load(Ordering::Acquire);
        (0..self.lane.count as usize)
            .filter(|&l| l != self.lane.index as usize)
            .all(|l| FINISHED[l].load(Ordering::Acquire) == 1 && IMPORT[l].load(Ordering::Acquire) == mine && mine != 0)
    }

    fn bump(&self, field: u64, by: u64) {
        let h = self.addrs.header;
        wr64(h + field, rd64(h + field).wrapping_add(by));
    }

    fn serve(&mut self) -> ! {
        let req = self.addrs.req;
        let mut idle: u64 = 0;
        loop {
            let prod = rd32(req + abi::RING_PROD);
            let cons = rd32(req + abi::RING_CONS);
            if prod == cons {
                idle += 1;
                if idle > rd64(self.addrs.header + abi::header::SPIN) {
                    self.bump(abi::header::WAITS, 1);
                    kick(Kick::Wait);
                    idle = 0;
                } else {
                    core::hint::spin_loop();
                }
                continue;
            }
            idle = 0;
            if prod.wrapping_sub(cons) > abi::RING_ENTRIES {
                fault(abi::Fault::BadRing);
            }
            fence(Ordering::Acquire);
            let mut c = cons;
            while c != prod {
                let mut raw = [0u8; abi::REQ_SIZE as usize];
                copy_in(&mut raw, req + abi::RING_BASE + u64::from(c % abi::RING_ENTRIES) * abi::REQ_SIZE);
                let r = Request::decode(&raw);
                let (status, done) = self.handle(&r);
                self.complete(Completion { id: r.id, status: status as u32, done });
                self.bump(abi::header::REQUESTS, 1);
                c = c.wrapping_add(1);
                wr32(req + abi::RING_CONS, c);
            }
            kick(Kick::Done);
        }
    }

    /// Post a completion; waits (with kicks) while the host has not drained the ring.
    fn complete(&mut self, c: Completion) {
        let comp = self.addrs.comp;
        let prod = rd32(comp + abi::RING_PROD);
        while prod.wrapping_sub(rd32(comp + abi::RING_CONS)) >= abi::RING_ENTRIES {
            kick(Kick::Done);
        }
        copy_out(comp + abi::RING_BASE + u64::from(prod % abi::RING_ENTRIES) * abi::COMP_SIZE, &c.encode());
        fence(Ordering::Release);
        wr32(comp + abi::RING_PROD, prod.wrapping_add(1));
    }

    /// Check a page run against guest RAM, the MH region and this lane's granules.
    fn pages_ok(&self, gfn: u64, count: u32) -> bool {
        let Some(end) = gfn.checked_add(u64::from(count)) else { return false };
        let (rs, re) = (abi::REGION / abi::PAGE, (abi::REGION + abi::REGION_SIZE) / abi::PAGE);
        let own = self.lane.count == 1
            || (gfn / abi::GRANULE_PAGES == (end - 1) / abi::GRANULE_PAGES
                && abi::lane_of(gfn, self.lane.count) == self.lane.index);
        end <= self.ram_pages && (end <= rs || gfn >= re) && own
    }

    fn handle(&mut self, r: &Request) -> (CompStatus, u32) {
        let op = Op::from_u16(r.op);
        let slots_ok = r.count >= 1
            && r.count <= abi::NSLOTS
            && r.slot < abi::NSLOTS
            && r.slot.checked_add(r.count).is_some_and(|e| e <= abi::NSLOTS);
        match op {
            Op::Invalid => (CompStatus::BadRequest, 0),
            // A finished import is never reopened: replaying it would roll memory back. Once
            // any lane finished, no lane starts over either (its pages would come from
            // another export than the finished lane's).
            Op::Reset if self.finished || self.restored || FINISHED.iter().any(|f| f.load(Ordering::Acquire) == 1) => {
                (CompStatus::NoStream, 0)
            }
            Op::Reset => {
                // A fresh challenge: blobs bound to the old one (everything a host may have
                // recorded) no longer verify.
                let h = self.addrs.header;
                self.challenge = random();
                wr64(h + abi::header::CHALLENGE, self.challenge);
                self.open = false;
                self.next_seq = 0;
                self.last_round = 0;
                IMPORT[self.lane.index as usize].store(0, Ordering::Release);
                wr64(h + abi::header::COMPLETE, 0);
                wr64(h + abi::header::NEXT_SEQ, 0);
                (CompStatus::Ok, 0)
            }
            _ if !slots_ok => (CompStatus::BadRequest, 0),
            Op::Export | Op::Import if !self.pages_ok(r.gfn, r.count) => (CompStatus::BadGfn, 0),
            Op::SaveCpu | Op::RestoreCpu if u64::from(r.count) > abi::VMSA_PAGES => (CompStatus::BadRequest, 0),
            // A marker names its lane in the gfn field, and is bound to it.
            Op::Begin | Op::End | Op::Marker if r.count != 1 || r.gfn != u64::from(self.lane.index) => {
                (CompStatus::BadRequest, 0)
            }
            // vCPU state travels in lane 0's stream only.
            Op::SaveCpu | Op::RestoreCpu if self.lane.index != 0 => (CompStatus::BadRequest, 0),
            Op::Export => self.export(r, r.gfn, Kind::Page),
            Op::SaveCpu => self.export(r, abi::VMSA / abi::PAGE, Kind::Cpu),
            Op::Begin => self.marker_out(r, Kind::Begin),
            Op::End => self.marker_out(r, Kind::End),
            // Once the vCPU state is restored the guest may run: no page may change under it.
            Op::Import | Op::RestoreCpu if self.restored => (CompStatus::NoStream, 0),
            Op::Import => self.import(r, r.gfn, Kind::Page),
            // The vCPUs may run once their state is restored: every other lane's pages must
            // be in by then.
            Op::RestoreCpu if !self.others_done() => (CompStatus::LanesOpen, 0),
            Op::RestoreCpu => {
                // Once any state page is restored (even if a later one fails) the vCPUs
                // could run: from here on only End is taken.
                let (status, done) = self.import(r, abi::VMSA / abi::PAGE, Kind::Cpu);
                self.restored |= done > 0;
                (status, done)
            }
            Op::Marker => self.marker_in(r),
        }
    }

    /// Seal the private buffer as blob `kind` for `gfn` into slot `slot`. A zero record
    /// seals no bytes (its tag authenticates the binding alone) and leaves the slot's data
    /// area untouched.
    fn seal(&mut self, slot: u32, gfn: u64, round: u32, kind: Kind) {
        let seq = self.seq;
        self.seq = seq.wrapping_add(1);
        let nonce = Array::from(abi::nonce(self.vm_id, seq));
        let aad = abi::aad(self.vm_id, self.bind, gfn, round, seq, kind, self.lane);
        let data: &mut [u8] = if kind.has_data() { &mut self.buf.0[..] } else { &mut [] };
        let tag = match self.cipher.encrypt_inout_detached(&nonce, &aad, data.into()) {
            Ok(t) => t,
            Err(_) => fault(abi::Fault::BadRing),
        };
        let mut t = [0u8; 16];
        t.copy_from_slice(&tag);
        if kind.has_data() {
            copy_out(abi::SLOTS + u64::from(slot) * abi::PAGE, &self.buf.0);
        }
        let d = Desc { gfn, seq, round, kind: kind as u32, tag: t };
        copy_out(abi::SLOT_DESC + u64::from(slot) * abi::DESC_SIZE, &d.encode());
    }

    fn export(&mut self, r: &Request, first: u64, kind: Kind) -> (CompStatus, u32) {
        let mut zeros = 0;
        for i in 0..r.count {
            let gfn = first + u64::from(i);
            let mut b = core::mem::replace(&mut self.buf.0, [0; 4096]);
            copy_in(&mut b, gfn * abi::PAGE);
            self.buf.0 = b;
            // Only the handler can tell a private page is zero: the host sees ciphertext.
            let k = if kind == Kind::Page && self.zero_records && is_zero(&self.buf.0) {
                zeros += 1;
                Kind::Zero
            } else {
                kind
            };
            self.seal(r.slot + i, gfn, r.round, k);
        }
        self.bump(abi::header::EXPORTED, u64::from(r.count));
        self.bump(abi::header::ZEROS, zeros);
        (CompStatus::Ok, r.count)
    }

    fn marker_out(&mut self, r: &Request, kind: Kind) -> (CompStatus, u32) {
        self.buf.0.fill(0);
        if kind == Kind::Begin {
            // A new export: bound to the importer the host names now (a wrong one only
            // makes the importer refuse every blob). Lane 0 draws the export's id, the
            // other lanes carry it, so the importer can tell that its lanes' streams
            // belong to one export.
            self.bind = rd64(self.addrs.header + abi::header::PEER_CHALLENGE);
            if self.lane.index == 0 {
                EXPORT.store(random() | 1, Ordering::Release);
            }
            let id = EXPORT.load(Ordering::Acquire);
            if id == 0 || id == self.exported {
                return (CompStatus::NoStream, 0);
            }
            self.exported = id;
            self.buf.0[8..16].copy_from_slice(&id.to_le_bytes());
        }
        self.buf.0[0..8].copy_from_slice(&self.seq.to_le_bytes());
        self.seal(r.slot, u64::from(self.lane.index), r.round, kind);
        (CompStatus::Ok, 1)
    }

    /// Authenticate slot `slot` as a blob of `kind` for `gfn` and decrypt it into the private
    /// buffer; a Page request also takes a zero record, which leaves the buffer zeroed. The
    /// sequence and round rules are checked before the (costly) decryption. Returns the
    /// kind the blob was.
    fn open_blob(&mut self, slot: u32, gfn: u64, kind: Kind) -> Result<Kind, CompStatus> {
        let mut raw = [0u8; 40];
        copy_in(&mut raw, abi::SLOT_DESC + u64::from(slot) * abi::DESC_SIZE);
        let d = Desc::decode(&raw);
        if kind != Kind::Begin {
            if !self.open {
                return Err(CompStatus::NoStream);
            }
            if d.seq != self.next_seq {
                return Err(CompStatus::BadSequence);
            }
            if d.round < self.last_round {
                return Err(CompStatus::BadRound);
            }
        }
        let got = Kind::from_u32(d.kind);
        if !got.answers(kind) {
            return Err(CompStatus::AuthFailed);
        }
        if got.has_data() {
            let mut b = core::mem::replace(&mut self.buf.0, [0; 4096]);
            copy_in(&mut b, abi::SLOTS + u64::from(slot) * abi::PAGE);
            self.buf.0 = b;
        } else {
            self.buf.0.fill(0);
        }
        let nonce = Array::from(abi::nonce(self.vm_id, d.seq));
        let aad = abi::aad(self.vm_id, self.challenge, gfn, d.round, d.seq, got, self.lane);
        let tag = Array::from(d.tag);
        let data: &mut [u8] = if got.has_data() { &mut self.buf.0[..] } else { &mut [] };
        if self.cipher.decrypt_inout_detached(&nonce, &aad, data.into(), &tag).is_err() {
            // Nothing of a refused blob stays in the buffer.
            self.buf.0.fill(0);
            self.bump(abi::header::REFUSED, 1);
            return Err(CompStatus::AuthFailed);
        }
        self.next_seq = d.seq.wrapping_add(1);
        self.last_round = d.round;
        wr64(self.addrs.header + abi::header::NEXT_SEQ, self.next_seq);
        Ok(got)
    }

    fn import(&mut self, r: &Request, first: u64, kind: Kind) -> (CompStatus, u32) {
        for i in 0..r.count {
            let gfn = first + u64::from(i);
            match self.open_blob(r.slot + i, gfn, kind) {
                Ok(got) => {
                    if got == Kind::Zero {
                        self.bump(abi::header::ZEROS, 1);
                    }
                }
                Err(e) => {
                    if e != CompStatus::AuthFailed {
                        self.bump(abi::header::REFUSED, 1);
                    }
                    return (e, i);
                }
            }
            copy_out(gfn * abi::PAGE, &self.buf.0);
            self.bump(abi::header::IMPORTED, 1);
        }
        (CompStatus::Ok, r.count)
    }

    fn marker_in(&mut self, r: &Request) -> (CompStatus, u32) {
        let mut raw = [0u8; 40];
        copy_in(&mut raw, abi::SLOT_DESC + u64::from(r.slot) * abi::DESC_SIZE);
        match Kind::from_u32(Desc::decode(&raw).kind) {
            Kind::Begin => {
                if self.open || self.finished {
                    return (CompStatus::NoStream, 0);
                }
                if let Err(e) = self.open_blob(r.slot, u64::from(self.lane.index), Kind::Begin) {
                    return (e, 0);
                }
                let id = u64::from_le_bytes(self.buf.0[8..16].try_into().unwrap_or([0; 8]));
                IMPORT[self.lane.index as usize].store(id, Ordering::Release);
                self.buf.0.fill(0);
                self.open = true;
                (CompStatus::Ok, 1)
            }
            Kind::End => {
                // Lane 0 ends last: its end means every lane's pages, of one export, are in.
                if self.lane.index == 0 && self.open && !self.others_done() {
                    return (CompStatus::LanesOpen, 0);
                }
                if let Err(e) = self.open_blob(r.slot, u64::from(self.lane.index), Kind::End) {
                    return (e, 0);
                }
                self.open = false;
                self.finished = true;
                FINISHED[self.lane.index as usize].store(1, Ordering::Release);
                wr64(self.addrs.header + abi::header::COMPLETE, 1);
                (CompStatus::Ok, 1)
            }
            _ => (CompStatus::BadRequest, 0),
        }
    }
}
