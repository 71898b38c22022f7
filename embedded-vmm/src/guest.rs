//! The embedded test guests: tiny long-mode programs that run at CPL 3.
//!
//! This host's KVM (PVM) emulates ring 0 but runs 64-bit CPL 3 code natively, so the VMM
//! builds page tables and segment state itself and starts each vCPU directly at CPL 3.
//! Programs are position-independent machine code assembled into this binary with
//! `global_asm!` and copied into guest RAM, so no assembler is needed at build time.
//!
//! Guest-physical layout (identity mapped, 2 MiB pages with U/S set):
//! ```text
//! 0x1000  PML4        0x2000  PDPT       0x3000  GDT
//! 0x4000  code        0x5000  parameter page (oracle iteration number)
//! 0x10000..0x50000    page directories (64 x 1 GiB)
//! 0x200000..0x400000  Migration Handler region (mh_abi::REGION; zero unless an MH runs)
//! 0x400000..end       workload data, split evenly between vCPUs
//! ```
use kvm_bindings::kvm_regs;
use kvm_hooks::boot::{write_gdt, write_identity_map, GDT, PDPT, PD_BASE, PML4};
use kvm_hooks::memory::{GuestRam, PAGE_SIZE};
use kvm_hooks::{Error, Result};

pub const CODE: u64 = 0x4000;
pub const PARAM: u64 = 0x5000;
/// First byte of the workload data region.
pub const DATA_START: u64 = mh_abi::REGION + mh_abi::REGION_SIZE;
/// Port `PROGRESS_PORT + vcpu` receives a vCPU's 32-bit progress counter.
pub const PROGRESS_PORT: u16 = 0x500;
/// Port `PAGE_STATE_PORT + vcpu` receives the guest-physical address of a page-state
/// request `{gpa u64, npages u64, attrs u64}` (like `KVM_HC_MAP_GPA_RANGE`'s arguments).
pub const PAGE_STATE_PORT: u16 = 0x600;

core::arch::global_asm!(
    ".pushsection .text.migaccel_guest,\"ax\"",
    // Count one more report in r13 and send it to the progress port in dx.
    ".macro report_progress",
    "inc r13",
    "mov eax, r13d",
    "out dx, eax",
    ".endm",
    // One more write done in r12: after r8 of them report, then go on at label 2.
    ".macro next_write_of_batch",
    "inc r12",
    "cmp r12, r8",
    "jb 2b",
    "xor r12d, r12d",
    "report_progress",
    "jmp 2b",
    ".endm",
    // walk: rdi=start rsi=end r8=pages per report dx=port r13=progress.
    // Increments the first byte of every page in [start,end) in a loop (QEMU's A/B test).
    ".globl migaccel_guest_walk",
    "migaccel_guest_walk:",
    "mov rbx, rdi",
    "xor r12d, r12d",
    "2:",
    "inc byte ptr [rbx]",
    "add rbx, 4096",
    "cmp rbx, rsi",
    "jb 3f",
    "mov rbx, rdi",
    "3:",
    "next_write_of_batch",
    ".globl migaccel_guest_walk_end",
    "migaccel_guest_walk_end:",
    // idle: report progress, touch nothing.
    ".globl migaccel_guest_idle",
    "migaccel_guest_idle:",
    "report_progress",
    "jmp migaccel_guest_idle",
    ".globl migaccel_guest_idle_end",
    "migaccel_guest_idle_end:",
    // oracle: rdi=start rsi=page mask (pages-1) r9=&iteration r14=xorshift state r8=batch.
    // Writes the current iteration number into pseudo-random pages (Linux dirty_log_test).
    ".globl migaccel_guest_oracle",
    "migaccel_guest_oracle:",
    "xor r12d, r12d",
    "2:",
    "mov rax, r14",
    "shl rax, 13",
    "xor r14, rax",
    "mov rax, r14",
    "shr rax, 7",
    "xor r14, rax",
    "mov rax, r14",
    "shl rax, 17",
    "xor r14, rax",
    "mov rax, r14",
    "and rax, rsi",
    "shl rax, 12",
    "add rax, rdi",
    "mov rcx, [r9]",
    "mov [rax], rcx",
    "next_write_of_batch",
    ".globl migaccel_guest_oracle_end",
    "migaccel_guest_oracle_end:",
    // pagestate: rdi=request buffer, rsi=range base, dx=page-state port. Announces 16-page
    // ranges cycling over 64 slots of 64 KiB, private on odd requests, shared on even ones.
    ".globl migaccel_guest_pagestate",
    "migaccel_guest_pagestate:",
    "xor r12d, r12d",
    "2:",
    "mov rax, r12",
    "and rax, 63",
    "shl rax, 16",
    "add rax, rsi",
    "mov [rdi], rax",
    "mov qword ptr [rdi + 8], 16",
    "mov rax, r12",
    "and rax, 1",
    "shl rax, 4",
    "mov [rdi + 16], rax",
    "mov eax, edi",
    "out dx, eax",
    "inc r12",
    "inc r13",
    "jmp 2b",
    ".globl migaccel_guest_pagestate_end",
    "migaccel_guest_pagestate_end:",
    // canary: rdi=start rsi=end r8=first private page r9=request buffer dx=page-state port
    // r14=progress port. Announces [start, r8) shared once, then loops over its range writing
    // SHARED_CANARY (shared pages) or PRIVATE_CANARY (private pages) at offset 0 and bumping a
    // counter at offset 8 of every page.
    ".globl migaccel_guest_canary",
    "migaccel_guest_canary:",
    "mov [r9], rdi",
    "mov rax, r8",
    "sub rax, rdi",
    "shr rax, 12",
    "mov [r9 + 8], rax",
    "mov qword ptr [r9 + 16], 0",
    "mov eax, r9d",
    "out dx, eax",
    "mov rdx, r14",
    "2:",
    "mov rbx, rdi",
    "3:",
    "movabs rax, {shared}",
    "cmp rbx, r8",
    "jb 4f",
    "movabs rax, {private}",
    "4:",
    "mov [rbx], rax",
    "inc qword ptr [rbx + 8]",
    "add rbx, 4096",
    "cmp rbx, rsi",
    "jb 3b",
    "report_progress",
    "jmp 2b",
    ".globl migaccel_guest_canary_end",
    "migaccel_guest_canary_end:",
    ".popsection",
    shared = const SHARED_CANARY,
    private = const PRIVATE_CANARY,
);

/// What the canary workload writes into the first 8 bytes of its private pages: a
/// confidential migration must never put these bytes on the wire.
pub const PRIVATE_CANARY: u64 = u64::from_le_bytes(*b"PRIVCNRY");
/// What it writes into the pages it announced shared (these travel in clear).
pub const SHARED_CANARY: u64 = u64::from_le_bytes(*b"SHRDCNRY");

extern "C" {
    static migaccel_guest_walk: u8;
    static migaccel_guest_walk_end: u8;
    static migaccel_guest_idle: u8;
    static migaccel_guest_idle_end: u8;
    static migaccel_guest_oracle: u8;
    static migaccel_guest_oracle_end: u8;
    static migaccel_guest_pagestate: u8;
    static migaccel_guest_pagestate_end: u8;
    static migaccel_guest_canary: u8;
    static migaccel_guest_canary_end: u8;
}

/// The guest programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    Walk,
    Idle,
    Oracle,
    PageState,
    Canary,
}

impl Program {
    /// The program's machine code.
    pub fn code(self) -> &'static [u8] {
        let (s, e) = match self {
            Program::Walk => (&raw const migaccel_guest_walk, &raw const migaccel_guest_walk_end),
            Program::Idle => (&raw const migaccel_guest_idle, &raw const migaccel_guest_idle_end),
            Program::Oracle => (&raw const migaccel_guest_oracle, &raw const migaccel_guest_oracle_end),
            Program::PageState => (&raw const migaccel_guest_pagestate, &raw const migaccel_guest_pagestate_end),
            Program::Canary => (&raw const migaccel_guest_canary, &raw const migaccel_guest_canary_end),
        };
        // SAFETY: both symbols are labels in the same read-only text section defined above,
        // start before end; the bytes between them are the program and live forever.
        unsafe { std::slice::from_raw_parts(s, (e as usize) - (s as usize)) }
    }
    fn offset(self) -> u64 {
        match self {
            Program::Walk => 0,
            Program::Idle => 0x200,
            Program::Oracle => 0x400,
            Program::PageState => 0x600,
            Program::Canary => 0x800,
        }
    }
    pub fn entry(self) -> u64 {
        CODE + self.offset()
    }
}

/// Write page tables, GDT and all programs into guest RAM.
pub fn install(ram: &GuestRam) -> Result<()> {
    ram.zero(0, DATA_START)?;
    write_identity_map(ram, PML4, PDPT, PD_BASE)?;
    write_gdt(ram, GDT)?;
    for p in [Program::Walk, Program::Idle, Program::Oracle, Program::PageState, Program::Canary] {
        let code = p.code();
        if code.len() as u64 > 0x200 {
            return Err(Error::Memory("guest program larger than its 512-byte slot".into()));
        }
        ram.write(p.entry(), code)?;
    }
    Ok(())
}

/// Registers to start `program` with.
pub struct Start {
    pub program: Program,
    pub rdi: u64,
    pub rsi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r14: u64,
}

pub fn initial_regs(vcpu: usize, s: &Start) -> kvm_regs {
    let port = if matches!(s.program, Program::PageState | Program::Canary) { PAGE_STATE_PORT } else { PROGRESS_PORT };
    kvm_regs {
        rip: s.program.entry(),
        rflags: 0x3002, // IOPL 3: port I/O is allowed at CPL 3
        rsp: PARAM + PAGE_SIZE - 64 * vcpu as u64,
        rdi: s.rdi,
        rsi: s.rsi,
        r8: s.r8.max(1),
        r9: s.r9,
        r14: if s.program == Program::Canary { u64::from(PROGRESS_PORT) + vcpu as u64 } else { s.r14 },
        rdx: u64::from(port) + vcpu as u64,
        ..Default::default()
    }
}

/// First byte [`prefill`] writes in a page: the workloads use only the bytes before it.
pub const PREFILL_OFFSET: u64 = 16;

/// Fill every workload data page from [`PREFILL_OFFSET`] on with a non-zero pattern, as
/// QEMU's migration-test guests fill their range before a migration: every page then holds
/// data and is resident, so a migration moves all of RAM, not just what a workload touched.
/// Call it before the guest runs (it writes host-side).
pub fn prefill(ram: &GuestRam) -> Result<()> {
    let page: Vec<u8> = (PREFILL_OFFSET..PAGE_SIZE).map(|i| (i % 251) as u8 | 1).collect();
    let mut gpa = DATA_START;
    while gpa < ram.size() {
        ram.write(gpa + PREFILL_OFFSET, &page)?;
        gpa += PAGE_SIZE;
    }
    Ok(())
}
