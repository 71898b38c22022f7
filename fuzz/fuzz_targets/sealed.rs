//! The receiver behind sealed frames. Seeds: a whole valid migration sealed with the
//! target's keys. With authentication on, no mutated stream may resume: a receive that
//! succeeds must have consumed the valid stream, byte for byte.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn valid() -> &'static [u8] {
    static V: OnceLock<Vec<u8>> = OnceLock::new();
    V.get_or_init(|| migaccel_fuzz::sealed(&migaccel_fuzz::migration()))
}

fuzz_target!(init: migaccel_fuzz::migration_seed("sealed", true), |data: &[u8]| {
    if migaccel_fuzz::receive(data, true).is_ok() {
        assert!(data.starts_with(valid()), "a stream that is not the sealed original resumed a VM");
    }
});
