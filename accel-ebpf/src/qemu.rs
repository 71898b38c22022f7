//! The probes on a QEMU process's VM (`bpf/qemu.bpf.c`): guest frames its vCPUs dirty, the
//! ring entry of each report and how far each ring was re-protected, and the writes QEMU
//! makes to guest RAM itself (uprobes on its exported memory-write functions).
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope};
use aya::programs::{TracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use memmap2::{MmapOptions, MmapRaw};

use crate::{ensure_tracepoints, perr, EbpfError, MAX_WORDS};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qemu.bpf.o"));

/// What the probes need to know about the QEMU process.
#[derive(Debug, Clone)]
pub struct QemuTarget {
    pub pid: u32,
    /// The QEMU binary, for the uprobes (`/proc/PID/exe`).
    pub exe: PathBuf,
    /// `&address_space_io` in the running process (port I/O is never guest RAM), 0 if unknown.
    pub io_as: u64,
    /// QEMU's mapping of guest RAM (start, length): DMA writes are host pointers into it.
    pub ram_host: u64,
    pub ram_len: u64,
    /// Guest frames past the highest RAM frame (sizes the per-frame push record).
    pub gfn_end: u64,
}

/// One write QEMU made to guest RAM itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostWrite {
    /// `len` bytes at guest-physical `gpa`.
    Gpa { gpa: u64, len: u64 },
    /// `len` bytes at offset `offset` of QEMU's RAM mapping.
    Ram { offset: u64, len: u64 },
    /// A write whose guest-physical address cannot be known (a debugger writing at guest
    /// virtual address `vaddr`): any page may have changed.
    Anywhere { vaddr: u64, len: u64 },
}

/// The probes' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QemuStats {
    pub pushes: u64,
    /// Pushes that could not be recorded: the dirty record is incomplete.
    pub lost: u64,
    pub slots_learned: u64,
    pub resets: u64,
    pub host_writes: u64,
    /// QEMU writes that could not be recorded: the record of them is incomplete.
    pub host_dropped: u64,
    /// Pushes past the backend's RAM (QEMU's own blocks: video memory, firmware).
    pub outside: u64,
    /// Pushes in the SMM address space, whose pages the layout does not place.
    pub smm: u64,
    /// Faults whose frame disagreed with their memslot's base (both frames were marked).
    pub mismatches: u64,
    /// Times QEMU switched its global dirty logging on.
    pub log_on: u64,
    /// Pushes on a memslot whose base was not known yet, with no fault naming their frame.
    pub unplaced: u64,
}

/// QEMU's exported functions that write guest memory, with the program that reads their
/// arguments and, for fixed-width stores, the width. Calls inside QEMU's own memory code may
/// be inlined copies that no uprobe sees; `cpu_memory_rw_debug` (its inlined write has no
/// guest-physical address to report) stands for the debugger's writes.
const WRITERS: &[(&str, &str, u64)] = &[
    ("address_space_write", "q_gpa_write", 0),
    ("address_space_write_rom", "q_gpa_write", 0),
    ("address_space_rw", "q_gpa_rw", 0),
    ("address_space_set", "q_gpa_set", 0),
    ("address_space_stb", "q_gpa_store", 1),
    ("address_space_stw", "q_gpa_store", 2),
    ("address_space_stw_le", "q_gpa_store", 2),
    ("address_space_stw_be", "q_gpa_store", 2),
    ("address_space_stl", "q_gpa_store", 4),
    ("address_space_stl_le", "q_gpa_store", 4),
    ("address_space_stl_be", "q_gpa_store", 4),
    ("address_space_stl_notdirty", "q_gpa_store", 4),
    ("address_space_stq", "q_gpa_store", 8),
    ("address_space_stq_le", "q_gpa_store", 8),
    ("address_space_stq_be", "q_gpa_store", 8),
    ("address_space_unmap", "q_unmap", 0),
    ("address_space_cache_invalidate", "q_cache_invalidate", 0),
    ("cpu_memory_rw_debug", "q_debug_write", 0),
];

/// The probes on one QEMU process. Everything detaches when this is dropped, and when this
/// process dies (nothing is pinned).
pub struct QemuProbe {
    // Mappings before the object that owns the map fds.
    dirty: MmapRaw,
    seq: MmapRaw,
    words: usize,
    gfn_end: u64,
    host: Arc<Mutex<HostWrites>>,
    stop: Arc<AtomicBool>,
    drain: Option<JoinHandle<()>>,
    ebpf: Ebpf,
}

struct HostWrites {
    ring: RingBuf<MapData>,
    got: Vec<HostWrite>,
    malformed: u64,
}

impl HostWrites {
    fn drain(&mut self) {
        while let Some(item) = self.ring.next() {
            let b: &[u8] = &item;
            if b.len() < 24 {
                self.malformed += 1;
                continue;
            }
            let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
            let kind = u32::from_le_bytes(b[0..4].try_into().expect("4"));
            let (addr, len) = (u64_at(8), u64_at(16));
            match kind {
                1 => self.got.push(HostWrite::Gpa { gpa: addr, len }),
                2 => self.got.push(HostWrite::Ram { offset: addr, len }),
                3 => self.got.push(HostWrite::Anywhere { vaddr: addr, len }),
                _ => self.malformed += 1,
            }
        }
    }
}

fn merr(map: &'static str) -> impl Fn(String) -> EbpfError {
    move |msg| EbpfError::Map { map, msg }
}

fn mmap_map(ebpf: &Ebpf, name: &'static str, len: usize) -> Result<MmapRaw, EbpfError> {
    let Some(Map::Array(md)) = ebpf.map(name) else {
        return Err(merr(name)("missing or not an array".into()));
    };
    MmapOptions::new()
        .len(len)
        .map_raw(md.fd().as_fd().as_raw_fd())
        .map_err(|e| merr(name)(format!("mmap (BPF_F_MMAPABLE): {e}")))
}

impl QemuProbe {
    /// Load and attach every program for `t`. Fails (never silently degrades) when a
    /// tracepoint, a symbol of the QEMU binary or the verifier refuses.
    pub fn attach(t: &QemuTarget) -> Result<QemuProbe, EbpfError> {
        ensure_tracepoints(&["kvm_dirty_ring_push", "kvm_dirty_ring_reset"])?;
        if !Path::new("/sys/kernel/tracing/events/kvmmmu/kvm_mmu_spte_requested").exists() {
            return Err(EbpfError::TracepointMissing("kvmmmu:kvm_mmu_spte_requested"));
        }
        let words = t.gfn_end.div_ceil(64) as usize;
        if words > MAX_WORDS || t.gfn_end == 0 {
            return Err(EbpfError::Layout(format!(
                "guest frames up to {} exceed the bitmap's {} pages",
                t.gfn_end,
                MAX_WORDS * 64
            )));
        }
        let seq_entries = t.gfn_end as u32;
        let mut ebpf = EbpfLoader::new()
            .override_global("target_tgid", &t.pid, true)
            .override_global("io_as", &t.io_as, true)
            .override_global("ram_host", &t.ram_host, true)
            .override_global("ram_len", &t.ram_len, true)
            .override_global("gfn_end", &t.gfn_end, true)
            .map_max_entries("push_seq", seq_entries)
            .load(OBJECT)
            .map_err(|e| EbpfError::Load(e.to_string()))?;
        let dirty = mmap_map(&ebpf, "qdirty", MAX_WORDS * 8)?;
        let seq = mmap_map(&ebpf, "push_seq", (seq_entries as usize * 8).next_multiple_of(4096))?;
        for (prog, cat, name) in [
            ("q_spte", "kvmmmu", "kvm_mmu_spte_requested"),
            ("q_push", "kvm", "kvm_dirty_ring_push"),
            ("q_reset", "kvm", "kvm_dirty_ring_reset"),
            ("q_ioctl_exit", "syscalls", "sys_exit_ioctl"),
        ] {
            let p: &mut TracePoint = ebpf
                .program_mut(prog)
                .ok_or(EbpfError::Program { program: prog, step: "lookup", msg: "not in the object".into() })?
                .try_into()
                .map_err(perr(prog, "type"))?;
            p.load().map_err(perr(prog, "verifier load"))?;
            p.attach(cat, name).map_err(perr(prog, "attach"))?;
        }
        attach_uprobes(&mut ebpf, t)?;
        let ring =
            RingBuf::try_from(ebpf.take_map("host_writes").ok_or_else(|| merr("host_writes")("missing".into()))?)
                .map_err(|e| merr("host_writes")(e.to_string()))?;
        let host = Arc::new(Mutex::new(HostWrites { ring, got: Vec::new(), malformed: 0 }));
        let stop = Arc::new(AtomicBool::new(false));
        // The ring buffer holds ~32k writes: a thread keeps it drained between harvests.
        let drain = {
            let (host, stop) = (host.clone(), stop.clone());
            std::thread::Builder::new()
                .name("qemu-host-writes".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        host.lock().unwrap_or_else(|e| e.into_inner()).drain();
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
                .map_err(|e| EbpfError::Load(format!("drain thread: {e}")))?
        };
        Ok(QemuProbe { dirty, seq, words, gfn_end: t.gfn_end, host, stop, drain: Some(drain), ebpf })
    }

    /// Take every guest frame pushed since the last call (an atomic swap per word).
    pub fn take_pushed(&self, f: impl FnMut(u64)) -> u64 {
        crate::harvest_bitmap(&self.dirty, self.words, f)
    }

    /// Drop every push recorded so far (before logging starts).
    pub fn clear(&self) {
        self.take_pushed(|_| {});
    }

    /// The ring and entry of the latest push of `gfn`.
    pub fn push_entry(&self, gfn: u64) -> Option<(u32, u32)> {
        if gfn >= self.gfn_end {
            return None;
        }
        // SAFETY: gfn < gfn_end = the map's entries, all inside the mapping; the programs
        // write the value with one aligned 8-byte store, read here with one atomic load.
        let v = unsafe { &*self.seq.as_ptr().cast::<AtomicU64>().add(gfn as usize) }.load(Ordering::Acquire);
        Some(((v >> 32) as u32, v as u32))
    }

    /// The reset index of ring `ring` as of the last reset ioctl that returned (its pages
    /// re-protected, TLBs flushed); `None` while no reset of it was seen since attaching.
    pub fn reset_index(&self, ring: u32) -> Result<Option<u32>, EbpfError> {
        let a: Array<_, u64> =
            Array::try_from(self.ebpf.map("ring_reset").ok_or_else(|| merr("ring_reset")("missing".into()))?)
                .map_err(|e| merr("ring_reset")(e.to_string()))?;
        let v = a.get(&ring, 0).map_err(|e| merr("ring_reset")(e.to_string()))?;
        Ok((v >> 32 == 1).then_some(v as u32))
    }

    /// Every write QEMU made to guest RAM since the last call, in order.
    pub fn take_host_writes(&self) -> Vec<HostWrite> {
        let mut h = self.host.lock().unwrap_or_else(|e| e.into_inner());
        h.drain();
        std::mem::take(&mut h.got)
    }

    pub fn stats(&self) -> Result<QemuStats, EbpfError> {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("qstats").ok_or_else(|| merr("qstats")("missing".into()))?)
                .map_err(|e| merr("qstats")(e.to_string()))?;
        let g = |i: u32| a.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
        let malformed = self.host.lock().unwrap_or_else(|e| e.into_inner()).malformed;
        Ok(QemuStats {
            pushes: g(0),
            lost: g(1),
            slots_learned: g(2),
            resets: g(3),
            host_writes: g(4),
            host_dropped: g(5) + malformed,
            outside: g(6),
            smm: g(7),
            mismatches: g(8),
            log_on: g(9),
            unplaced: g(10),
        })
    }
}

fn attach_uprobes(ebpf: &mut Ebpf, t: &QemuTarget) -> Result<(), EbpfError> {
    let pid = std::num::NonZeroU32::new(t.pid).ok_or_else(|| EbpfError::Layout("pid 0".into()))?;
    let scope = UProbeScope::OneProcess(pid);
    {
        let p: &mut UProbe = ebpf
            .program_mut("q_log_on")
            .ok_or(EbpfError::Program { program: "q_log_on", step: "lookup", msg: "not in the object".into() })?
            .try_into()
            .map_err(perr("q_log_on", "type"))?;
        p.load().map_err(perr("q_log_on", "verifier load"))?;
        p.attach("memory_global_dirty_log_start", &t.exe, scope).map_err(|e| EbpfError::Program {
            program: "q_log_on",
            step: "attach",
            msg: format!("memory_global_dirty_log_start in {}: {e}", t.exe.display()),
        })?;
    }
    let mut loaded: Vec<&'static str> = Vec::new();
    for (i, &(func, prog, width)) in WRITERS.iter().enumerate() {
        let cookie = (width << 8) | i as u64;
        for (name, ret) in [(prog, false), ("q_return", true)] {
            let p: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or(EbpfError::Program {
                    program: "uprobe",
                    step: "lookup",
                    msg: format!("{name} not in the object"),
                })?
                .try_into()
                .map_err(perr("uprobe", "type"))?;
            if !loaded.contains(&name) {
                p.load().map_err(perr("uprobe", "verifier load"))?;
                loaded.push(name);
            }
            let at = UProbeAttachPoint { location: UProbeAttachLocation::Symbol(func), cookie: Some(cookie) };
            p.attach(at, &t.exe, scope).map_err(|e| EbpfError::Program {
                program: if ret { "q_return" } else { "uprobe" },
                step: "attach",
                msg: format!("{func} in {}: {e}", t.exe.display()),
            })?;
        }
    }
    Ok(())
}

impl Drop for QemuProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
    }
}
