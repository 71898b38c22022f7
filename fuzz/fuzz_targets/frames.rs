//! The frame decoder and the receiver's state machine, fed a source's byte stream (the
//! plain protocol, as behind the authentication or with `auth.insecure`). Seeds: a whole
//! valid migration, constructed, and real ones recorded by `tests/fuzz_seeds.rs`. Any input must end in an error or a clean receive, never a
//! panic, a hang or a write outside guest RAM.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: migaccel_fuzz::migration_seed("frames", false), |data: &[u8]| {
    let mut r = migaccel_fuzz::receiver();
    let mut t = migaccel_fuzz::Bytes::new(data);
    let _ = r.run(&mut t);
});
