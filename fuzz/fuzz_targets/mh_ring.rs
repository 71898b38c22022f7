//! The host's end of the Migration Handler rings: whatever a hostile guest writes into the
//! completion ring and the blob slots is checked (producer index, ids, status, counts, blob
//! kind and gfn) before the host uses it.
#![no_main]
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvm_hooks::memory::GuestRam;
use kvm_hooks::mh::{Bell, MhHost};
use libfuzzer_sys::fuzz_target;
use mh_abi as abi;

fn ram() -> &'static Arc<GuestRam> {
    static R: OnceLock<Arc<GuestRam>> = OnceLock::new();
    R.get_or_init(|| Arc::new(GuestRam::new(64 << 20).expect("guest RAM")))
}

fuzz_target!(init: migaccel_fuzz::seed("mh_ring", "empty", || vec![0u8; 64]), |data: &[u8]| {
    let ram = ram();
    ram.zero(abi::REGION, abi::REGION_SIZE).expect("zero the MH region");
    let mut h = MhHost::new(ram.clone(), Arc::new(Bell::default()), Duration::ZERO, 1);
    // Three requests in flight, as an export of a batch leaves them.
    for slot in [0u32, 4, 8] {
        let r = abi::Request { op: abi::Op::Export as u16, count: 4, slot, gfn: 0x1000 + u64::from(slot), round: 1, ..Default::default() };
        h.submit(r).expect("room in the ring");
    }
    // The guest's answer: the completion ring (prod, cons, entries), then slot descriptors.
    let comp = data.len().min(0x1000);
    ram.write(abi::COMP_RING, &data[..comp]).expect("completion ring");
    if data.len() > comp {
        let desc = (data.len() - comp).min(0x4000);
        ram.write(abi::SLOT_DESC, &data[comp..comp + desc]).expect("descriptors");
    }
    if let Ok(done) = h.poll() {
        let mut page = vec![0u8; abi::PAGE as usize];
        for (r, c) in done {
            for i in 0..c.done {
                let _ = h.take_slot_into(r.slot + i, abi::Kind::Page, r.gfn + u64::from(i), &mut page);
            }
        }
    }
});
