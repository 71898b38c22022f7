//! The vCPU state decoder: any bytes decode to a state or to an error naming the field;
//! what decodes encodes back to the same bytes. Seeds: a default state and the real ones of
//! the recorded migrations.
#![no_main]
use kvm_hooks::state::VcpuState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: migaccel_fuzz::vcpu_state_seeds(), |data: &[u8]| {
    if let Ok(s) = VcpuState::decode(data) {
        let again = VcpuState::decode(&s.encode()).expect("an encoded state decodes");
        assert_eq!(again.encode(), s.encode());
    }
});
