//! The host's end of the Migration Handler rings: whatever a hostile guest writes into the
//! completion ring and the blob slots is checked (producer index, ids, status, counts, blob
//! kind and gfn) before the host uses it. Blob kinds include zero records (no ciphertext):
//! a slot is accepted only with the kind asked for, or as a zero record for a page. The MH
//! runs on 1 to 4 lanes (from the input): each lane's completion ring is the guest's.
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
    let lanes = 1 + u32::from(data.get(1).copied().unwrap_or(0) % abi::MAX_LANES as u8);
    let bells = (0..lanes).map(|_| Arc::new(Bell::default())).collect();
    let mut h = MhHost::new(ram.clone(), bells, Duration::ZERO, 1);
    // Three requests in flight, as an export of a batch leaves them; each crosses a granule
    // boundary, so with several lanes it is split between two.
    for slot in [0u32, 4, 8] {
        let gfn = 0x1000 + u64::from(slot) * abi::GRANULE_PAGES - 2;
        let r = abi::Request { op: abi::Op::Export as u16, count: 4, slot, gfn, round: 1, ..Default::default() };
        h.submit(r).expect("room in the ring");
    }
    // The guest's answer: each lane's completion ring (prod, cons, entries), then slot
    // descriptors.
    let comp = data.len().min(0x1000);
    let share = comp.div_ceil(lanes as usize).max(1);
    for (lane, part) in data[..comp].chunks(share).enumerate() {
        ram.write(abi::lane_addrs(lane as u32).comp, part).expect("completion ring");
    }
    if data.len() > comp {
        let desc = (data.len() - comp).min(0x4000);
        ram.write(abi::SLOT_DESC, &data[comp..comp + desc]).expect("descriptors");
    }
    if let Ok(done) = h.poll() {
        let mut page = vec![0u8; abi::PAGE as usize];
        // The kind the host asks for comes from the input too (pages, vCPU state, markers).
        let want = match data.first().map(|b| b % 3) {
            Some(1) => abi::Kind::Cpu,
            Some(2) => abi::Kind::Begin,
            _ => abi::Kind::Page,
        };
        for (r, c) in done {
            for i in 0..c.done {
                let gfn = r.gfn + u64::from(i);
                page.fill(0xa5);
                if let Ok(d) = h.take_slot_into(r.slot + i, want, gfn, &mut page) {
                    let got = abi::Kind::from_u32(d.kind);
                    assert!(got == want || (want == abi::Kind::Page && got == abi::Kind::Zero), "{got:?} for {want:?}");
                    assert_eq!(d.gfn, gfn);
                    if got == abi::Kind::Zero {
                        assert!(page.iter().all(|&b| b == 0xa5), "a zero record's slot data was read");
                    }
                    // The blob goes back into a slot as an import would place it.
                    let body: &[u8] = if got.has_data() { &page } else { &[] };
                    h.write_slot_parts(r.slot + i, &d, body).expect("a taken blob fits its slot");
                }
            }
        }
    }
});
