//! What every VM behind the engine's boundary must do, checked the same way for each
//! implementation (the embedded VMM, the engine's fake VM, an attached QEMU): the tests of
//! each call [`check_source`] with a way to make its guest write.
use std::time::{Duration, Instant};

use crate::migratable::{Migratable, VmKind};

/// Makes the guest (or the VMM on its behalf) write guest RAM while the VM runs, and says
/// which RAM pages it wrote, when it knows.
pub type Poke<'a> = &'a mut dyn FnMut() -> Option<Vec<u64>>;

/// Longest wait for a running guest's writes to be reported: only a dirty log that never
/// reports reaches it.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

fn ascending_in_ram(pages: &[u64], total: u64, what: &str) -> Result<(), String> {
    ensure(pages.windows(2).all(|w| w[0] < w[1]), || format!("{what}: pages not strictly ascending"))?;
    ensure(pages.last().is_none_or(|&p| p < total), || format!("{what}: page beyond the {total} pages of RAM"))
}

/// Check a running source VM: shape and RAM agree, the dirty log follows the harvest rules
/// (reports ascending, inside RAM, restorable; a paused VM gives every held page; after
/// `stop` every page is dirty), pause/resume and the machine state work. Leaves the VM
/// running with logging off.
pub fn check_source(vm: &dyn Migratable, poke: Poke<'_>) -> Result<(), String> {
    let shape = vm.shape();
    let ram = vm.ram();
    let total = ram.pages();
    ensure(ram.size() == shape.ram_bytes, || format!("RAM of {} bytes, shape says {}", ram.size(), shape.ram_bytes))?;
    shape.validate().map_err(|e| format!("shape: {e}"))?;
    let layout = ram.layout();
    ensure(layout.regions().iter().all(|r| r.offset + r.len <= ram.size()), || "layout past RAM".into())?;
    if vm.kind() == VmKind::Embedded {
        ensure(layout.is_linear(), || "an embedded VM keeps RAM at GPA 0".into())?;
    }
    ensure(!vm.describe().is_empty(), || "describe() is empty".into())?;
    ensure(vm.fault().is_none(), || format!("the VM faulted: {:?}", vm.fault()))?;
    let log = vm.dirty_log();

    log.start().map_err(|e| format!("start: {e}"))?;
    let res = (|| {
        // Reports of a running guest, ascending and inside RAM; what the poke wrote shows up
        // by the time the VM is paused at the latest.
        let t0 = Instant::now();
        let mut seen: Vec<u64> = Vec::new();
        let mut wrote: Option<Vec<u64>> = None;
        while seen.is_empty() && log.pending() == 0 {
            let w = poke();
            if let Some(w) = w {
                wrote.get_or_insert_with(Vec::new).extend(w);
            }
            let got = log.take().map_err(|e| format!("take: {e}"))?;
            ascending_in_ram(&got, total, "take")?;
            seen.extend(got);
            ensure(t0.elapsed() < REPORT_TIMEOUT, || format!("no page reported within {REPORT_TIMEOUT:?}"))?;
            std::thread::sleep(Duration::from_millis(1));
        }
        // Restored pages come back.
        log.restore(&seen);
        let again = log.take().map_err(|e| format!("take after restore: {e}"))?;
        ensure(seen.iter().all(|p| again.binary_search(p).is_ok()), || "restored pages did not come back".into())?;
        vm.pause().map_err(|e| format!("pause: {e}"))?;
        let fin = log.take_final().map_err(|e| format!("take_final: {e}"))?;
        ascending_in_ram(&fin, total, "take_final")?;
        ensure(log.pending() == 0, || format!("{} page(s) still held with the VM paused", log.pending()))?;
        if let Some(w) = wrote {
            let got: std::collections::BTreeSet<u64> = again.iter().chain(&fin).copied().collect();
            let missing: Vec<u64> = w.iter().filter(|p| !got.contains(p)).copied().collect();
            ensure(missing.is_empty(), || format!("written pages never reported: {missing:?}"))?;
        }
        // The machine state of a paused VM; nothing written meanwhile.
        let state = vm.save_machine_state().map_err(|e| format!("save_machine_state: {e}"))?;
        ensure(state.bytes() > 0, || "an empty machine state".into())?;
        ensure(state.sections.iter().all(|s| s.len() <= crate::migratable::MAX_SECTION), || {
            "a section too large".into()
        })?;
        // A full resend is every page.
        log.mark_all();
        let everything = log.take().map_err(|e| format!("take after mark_all: {e}"))?;
        ensure(everything.len() as u64 == total, || format!("mark_all: take gave {} of {total}", everything.len()))?;
        vm.resume().map_err(|e| format!("resume: {e}"))?;
        ensure(vm.fault().is_none(), || format!("the VM faulted after resume: {:?}", vm.fault()))
    })();
    let stopped = log.stop().map_err(|e| format!("stop: {e}"));
    res?;
    stopped?;
    let all = log.take().map_err(|e| format!("take after stop: {e}"))?;
    ensure(all.len() as u64 == total, || format!("after stop: take gave {} of {total} pages", all.len()))?;
    Ok(())
}
