//! The receiver behind sealed frames. Seeds: a whole valid migration sealed with the
//! target's keys. With authentication on, no mutated stream may resume: a receive that
//! succeeds must have consumed the valid stream, byte for byte.
#![no_main]
use std::sync::OnceLock;

use accel_user::seal::Sealed;
use libfuzzer_sys::fuzz_target;

fn valid() -> &'static [u8] {
    static V: OnceLock<Vec<u8>> = OnceLock::new();
    V.get_or_init(|| migaccel_fuzz::sealed(&migaccel_fuzz::migration()))
}

fuzz_target!(|data: &[u8]| {
    let (s2d, d2s) = migaccel_fuzz::keys();
    let mut t = Sealed::new(Box::new(migaccel_fuzz::Bytes::new(data)), (d2s, s2d));
    let mut r = migaccel_fuzz::receiver();
    if r.run(&mut t).is_ok() {
        assert!(data.starts_with(valid()), "a stream that is not the sealed original resumed a VM");
    }
});
