//! The receiver behind sealed frames. Seeds: every whole valid migration (the constructed
//! one and the recorded ones) sealed with the target's keys. With authentication on, no
//! mutated stream may resume: a receive that succeeds must have consumed one of those
//! streams, byte for byte.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// The sealed seeds: the only streams that may resume.
fn valid() -> &'static [Vec<u8>] {
    static V: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    V.get_or_init(|| migaccel_fuzz::valid_migrations().iter().map(|(_, m)| migaccel_fuzz::sealed(m)).collect())
}

fuzz_target!(init: migaccel_fuzz::migration_seed("sealed", true), |data: &[u8]| {
    if migaccel_fuzz::receive(data, true).is_ok() {
        let original = valid().iter().any(|v| data.starts_with(v));
        assert!(original, "a stream that is not a sealed original resumed a VM");
    }
});
