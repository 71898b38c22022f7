//! Real guests on /dev/kvm: boot, run, pause, save and restore state into a second VM.
use std::time::Duration;

use embedded_vmm::vmm::{GuestSpec, Machine, Workload};
use kvm_hooks::vm::DirtyPreference;

const RING: DirtyPreference = DirtyPreference::Ring { bytes: 64 << 10 };

fn spec(workload: Workload) -> GuestSpec {
    GuestSpec { ram_bytes: 64 << 20, vcpus: 2, workload }
}

fn wait_progress(m: &Machine, min: u64) -> Vec<u64> {
    for _ in 0..500 {
        let p = m.progress();
        if p.iter().all(|&x| x >= min) {
            return p;
        }
        assert!(m.fault().is_none(), "guest fault: {:?}", m.fault());
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no progress: {:?} fault {:?}", m.progress(), m.fault());
}

#[test]
fn ab_guest_runs_and_dirties_pages() {
    let m = Machine::boot(spec(Workload::Ab), RING).unwrap();
    m.dirty().start().unwrap();
    m.resume().unwrap();
    wait_progress(&m, 2);
    m.pause().unwrap();
    let dirty = m.dirty().take().unwrap();
    let (s0, e1) = (spec(Workload::Ab).vcpu_range(0).0, spec(Workload::Ab).vcpu_range(1).1);
    let data_pages = (e1 - s0) / 4096;
    assert!(dirty.len() as u64 >= data_pages, "every data page written: {} < {data_pages}", dirty.len());
    let b = m.ram().read_u64(s0).unwrap() as u8;
    assert!(b >= 1, "first data byte incremented");
}

#[test]
fn state_moves_to_a_second_vm_and_guest_continues() {
    let src = Machine::boot(spec(Workload::Ab), RING).unwrap();
    src.resume().unwrap();
    wait_progress(&src, 3);
    src.pause().unwrap();
    let states = src.save_states().unwrap();
    for s in &states {
        assert!(s.lapic.is_some(), "LAPIC state saved");
        assert!(s.xsave.is_some() && s.xcrs.is_some(), "xsave/xcrs saved");
        assert!(s.msrs.len() > 10, "MSRs saved: {}", s.msrs.len());
        assert_eq!(s.sregs.cs.selector, 0x33, "CPL 3 code segment");
    }
    let enc: Vec<Vec<u8>> = states.iter().map(|s| s.encode()).collect();
    let dst = Machine::destination(*src.spec(), DirtyPreference::Bitmap).unwrap();
    dst.ram().write(0, &src.ram().snapshot()).unwrap();
    let dec: Vec<_> = enc.iter().map(|b| kvm_hooks::state::VcpuState::decode(b).unwrap()).collect();
    dst.restore_states(&dec).unwrap();
    let before = src.progress();
    dst.resume().unwrap();
    let after = wait_progress(&dst, before.iter().copied().max().unwrap() + 2);
    assert!(after.iter().zip(&before).all(|(a, b)| a > b), "{after:?} vs {before:?}");
}

/// The embedded VMM meets the boundary's conformance suite (as the fake VM and QEMU do).
#[test]
fn embedded_vm_conforms() {
    use kvm_hooks::migratable::Migratable;
    for dirty in [RING, DirtyPreference::Bitmap] {
        let m = Machine::boot(spec(Workload::Ab), dirty).unwrap();
        m.resume().unwrap();
        wait_progress(&m, 1);
        // The guest writes by itself; which pages, the suite learns from the dirty log.
        kvm_hooks::conformance::check_source(&m as &dyn Migratable, &mut || None).unwrap();
        assert!(m.fault().is_none());
    }
}
