//! The config parser: any text parses to a valid config or to an error naming the key.
#![no_main]
use libfuzzer_sys::fuzz_target;

/// The seed: the documented example and every section.
const EXAMPLE: &[u8] = b"[guest]\nram = \"1GiB\"\nvcpus = 2\nworkload = \"hot\"\n\n[migration]\ndowntime_target_ms = 30\ndirty_source = \"ring\"\nstreams = 4\n\n[receiver]\nmax_rounds = 10\n\n[confidential]\nmh_batch = 64\n\n[auth]\ninsecure = true\n";

fuzz_target!(init: migaccel_fuzz::seed("config", "example", || EXAMPLE.to_vec()), |data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = accel_user::app::config::Config::parse(text) {
            c.validate().expect("a parsed config is valid");
        }
    }
});
