//! The config parser: any text parses to a valid config or to an error naming the key.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = accel_user::config::Config::parse(text) {
            c.validate().expect("a parsed config is valid");
        }
    }
});
