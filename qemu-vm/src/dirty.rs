//! The dirty log of a QEMU VM: KVM's dirty ring as the eBPF probes see it, QEMU's own
//! writes from its uprobes, and QEMU's dirty logging switched on and off over QMP.
//!
//! Safe to copy: a page the ring reported stays writable until QEMU resets its ring entry;
//! it is held back until its entry is below its ring's reset index (QEMU resets when a ring
//! fills and about once a second), or until the guest is paused. QEMU's own writes are
//! reported after they complete and are ready at once.
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use accel_ebpf::qemu::{HostWrite, QemuProbe};
use kvm_hooks::layout::{Gfn, RamLayout};
use kvm_hooks::memory::PAGE_SIZE;
use kvm_hooks::migratable::{DirtyCounters, DirtyLog};
use kvm_hooks::{Error, Result};
use serde_json::json;

use crate::qmp::Qmp;

/// The dirty-rate limit (MB/s) that switches QEMU's dirty logging on without slowing any
/// vCPU: far above what a vCPU can write.
const NO_LIMIT_MBPS: u64 = 100_000;

/// Longest QEMU may take to switch logging on after `set-vcpu-dirty-limit` (milliseconds
/// normally): only a hung QEMU reaches it.
const LOGGING_ON_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub struct QemuDirtyLog {
    probe: QemuProbe,
    qmp: Arc<Mutex<Qmp>>,
    layout: RamLayout,
    pages: u64,
    st: Mutex<State>,
}

#[derive(Default)]
struct State {
    logging: bool,
    /// The probes' counters when logging started: anything lost since fails the migration.
    base: accel_ebpf::qemu::QemuStats,
    /// Every page is to be sent (logging was off, or a full resend was asked for).
    all: bool,
    /// Guest frames reported by the ring whose entry was not yet re-protected.
    held: BTreeSet<u64>,
    /// RAM pages ready to hand out.
    ready: BTreeSet<u64>,
    duplicates: u64,
}

impl QemuDirtyLog {
    pub fn new(probe: QemuProbe, qmp: Arc<Mutex<Qmp>>, layout: RamLayout, pages: u64) -> Self {
        QemuDirtyLog { probe, qmp, layout, pages, st: Mutex::new(State { all: true, ..Default::default() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_complete(&self, st: &mut State) -> Result<()> {
        let s = self.probe.stats().map_err(|e| Error::Dirty(e.to_string()))?;
        let lost = s.lost - st.base.lost;
        if lost > 0 {
            return Err(Error::Dirty(format!("the eBPF probe could not place {lost} dirty-ring report(s)")));
        }
        let dropped = s.host_dropped - st.base.host_dropped;
        if dropped > 0 {
            return Err(Error::Dirty(format!("{dropped} write(s) QEMU made to guest RAM were lost")));
        }
        if s.smm > st.base.smm {
            // The guest wrote memory through its SMM view, which the layout does not place.
            tracing::info!("the guest wrote SMM memory: all of RAM is sent again");
            st.base.smm = s.smm;
            st.all = true;
        }
        if s.unplaced > st.base.unplaced {
            // A page reported with no fault naming it, on a memslot not placed yet.
            tracing::info!(
                "{} dirty page(s) could not be placed: all of RAM is sent again",
                s.unplaced - st.base.unplaced
            );
            st.base.unplaced = s.unplaced;
            st.all = true;
        }
        Ok(())
    }

    /// Collect what the probes recorded since the last call; with `paused`, every held
    /// report counts as safe (no vCPU runs).
    fn collect(&self, st: &mut State, paused: bool) -> Result<()> {
        let layout = &self.layout;
        self.probe.take_pushed(|gfn| {
            // Frames outside this backend's RAM (video memory, firmware) travel in QEMU's
            // own device stream.
            if layout.page_of(Gfn(gfn)).is_some() && !st.held.insert(gfn) {
                st.duplicates += 1;
            }
        });
        for w in self.probe.take_host_writes() {
            let pages: Box<dyn Iterator<Item = u64>> = match w {
                HostWrite::Gpa { gpa, len } if len > 0 => {
                    let (first, last) = (gpa / PAGE_SIZE, (gpa.saturating_add(len - 1)) / PAGE_SIZE);
                    let layout = &self.layout;
                    Box::new((first..=last).filter_map(move |g| layout.page_of(Gfn(g)).map(|p| p.0)))
                }
                HostWrite::Ram { offset, len } if len > 0 => {
                    let (first, last) = (offset / PAGE_SIZE, offset.saturating_add(len - 1) / PAGE_SIZE);
                    Box::new((first..=last.min(self.pages.saturating_sub(1))).filter(move |&p| p >= first))
                }
                HostWrite::Anywhere { vaddr, len } => {
                    tracing::info!(vaddr, len, "QEMU's debugger wrote guest RAM: all of it is sent again");
                    st.all = true;
                    Box::new(std::iter::empty())
                }
                _ => Box::new(std::iter::empty()),
            };
            st.ready.extend(pages);
        }
        let mut resets: HashMap<u32, Option<u32>> = HashMap::new();
        let held = std::mem::take(&mut st.held);
        for gfn in held {
            let safe = paused || {
                let (ring, entry) = self.probe.push_entry(gfn).unwrap_or((0, 0));
                let reset = match resets.get(&ring) {
                    Some(&r) => r,
                    None => {
                        let r = self.probe.reset_index(ring).map_err(|e| Error::Dirty(e.to_string()))?;
                        resets.insert(ring, r);
                        r
                    }
                };
                // Entry numbers wrap at 2^32; a ring holds at most 2^16 entries. A ring not
                // reset since attaching proves nothing.
                reset.is_some_and(|r| (r.wrapping_sub(entry) as i32) > 0)
            };
            if !safe {
                st.held.insert(gfn);
                continue;
            }
            // Frames outside this backend's RAM (video memory, firmware) travel in QEMU's
            // own device stream.
            if let Some(p) = self.layout.page_of(Gfn(gfn)) {
                st.ready.insert(p.0);
            }
        }
        self.check_complete(st)
    }

    fn take_with(&self, paused: bool) -> Result<Vec<u64>> {
        let mut st = self.lock();
        if st.logging {
            self.collect(&mut st, paused)?;
        }
        if st.all || !st.logging {
            // A full resend covers every ready page; held ones stay held until safe.
            st.all = false;
            st.ready.clear();
            return Ok((0..self.pages).collect());
        }
        Ok(std::mem::take(&mut st.ready).into_iter().collect())
    }
}

impl DirtyLog for QemuDirtyLog {
    fn start(&self) -> Result<()> {
        let mut st = self.lock();
        // Drop what was recorded before, then switch logging on: every report from now on
        // is kept (round 0's copy of a page reported during it is not trusted).
        self.probe.clear();
        let _ = self.probe.take_host_writes();
        st.held.clear();
        st.ready.clear();
        let before = self.probe.stats().map_err(|e| Error::Dirty(e.to_string()))?;
        self.qmp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cmd("set-vcpu-dirty-limit", json!({ "dirty-rate": NO_LIMIT_MBPS }))
            .map_err(|e| Error::Dirty(format!("switching QEMU's dirty logging on: {e}")))?;
        // QEMU switches logging on from a thread of its own after it answered: round 0 may
        // read a page only once a write to it would be reported.
        let t0 = std::time::Instant::now();
        loop {
            let s = self.probe.stats().map_err(|e| Error::Dirty(e.to_string()))?;
            if s.log_on > before.log_on {
                st.base = s;
                break;
            }
            if t0.elapsed() > LOGGING_ON_TIMEOUT {
                let _ = self.qmp.lock().unwrap_or_else(|e| e.into_inner()).cmd("cancel-vcpu-dirty-limit", json!({}));
                return Err(Error::Dirty(format!(
                    "QEMU did not switch dirty logging on within {LOGGING_ON_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        st.logging = true;
        st.all = false;
        Ok(())
    }

    fn stop(&self) -> Result<()> {
        let mut st = self.lock();
        if !st.logging {
            return Ok(());
        }
        let mut q = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        q.cmd("cancel-vcpu-dirty-limit", json!({}))
            .map_err(|e| Error::Dirty(format!("switching QEMU's dirty logging off: {e}")))?;
        st.logging = false;
        st.all = true;
        Ok(())
    }

    fn take(&self) -> Result<Vec<u64>> {
        self.take_with(false)
    }

    fn take_final(&self) -> Result<Vec<u64>> {
        self.take_with(true)
    }

    fn pending(&self) -> u64 {
        self.lock().held.len() as u64
    }

    fn restore(&self, pages: &[u64]) {
        self.lock().ready.extend(pages.iter().copied());
    }

    fn mark_all(&self) {
        self.lock().all = true;
    }

    fn describe(&self) -> String {
        "ebpf (QEMU's dirty ring, re-protected reports only; QEMU's own writes by uprobe)".into()
    }

    fn counters(&self) -> DirtyCounters {
        DirtyCounters { ring_full_exits: 0, duplicates: self.lock().duplicates }
    }
}
