//! The confidential Blobs payload decoder: blobs of 4,136 bytes and zero records of 40,
//! laid out by kinds the peer chose. Any input must decode into blobs that fill the
//! payload exactly, each page blob or zero record inside guest RAM and outside the MH
//! region, or end in an error; never a panic or a read past the payload.
#![no_main]
use accel_user::wire::payload::{Blobs, BLOB_HEADER, BLOB_LEN};
use libfuzzer_sys::fuzz_target;
use mh_abi as abi;

/// Guest RAM of the receiver: 64 MiB.
const RAM_PAGES: u64 = 16384;

fn seed() -> Vec<u8> {
    // Round 2: a page blob, a zero record, a page blob.
    let mut v = Blobs::prefix(2, 3).to_vec();
    for (kind, gfn) in [(abi::Kind::Page, 0x500u64), (abi::Kind::Zero, 0x501), (abi::Kind::Page, 0x502)] {
        let d = abi::Desc { gfn, seq: 0x1_0000_0000 + gfn, round: 2, kind: kind as u32, tag: [7; 16] };
        let mut h = [0u8; BLOB_HEADER];
        Blobs::put_header(&d, &mut h);
        v.extend_from_slice(&h);
        if kind.has_data() {
            v.extend_from_slice(&[0x5a; 4096]);
        }
    }
    v
}

fuzz_target!(init: migaccel_fuzz::seed("blobs", "three", seed), |data: &[u8]| {
    let Ok(b) = Blobs::decode(data, RAM_PAGES) else { return };
    let mut len = 8;
    assert!(!b.blobs.is_empty() && b.blobs.len() <= abi::NSLOTS as usize);
    for x in &b.blobs {
        let kind = abi::Kind::from_u32(x.desc.kind);
        assert_ne!(kind, abi::Kind::Invalid);
        assert_eq!(x.data.len(), if kind.has_data() { 4096 } else { 0 });
        if kind.is_page() {
            assert!(x.desc.gfn < RAM_PAGES && !abi::in_region(x.desc.gfn), "gfn {:#x}", x.desc.gfn);
        }
        len += if kind.has_data() { BLOB_LEN } else { BLOB_HEADER };
    }
    assert_eq!(len, data.len(), "the blobs fill the payload exactly");
});
