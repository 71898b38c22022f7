//! Write each target's seed corpus under DIR (`seeds DIR`): a whole valid migration, plain
//! and sealed; an encoded vCPU state; the documented config example; an empty ring.
use std::path::Path;

fn main() {
    let dir = std::env::args().nth(1).expect("usage: seeds DIR");
    let dir = Path::new(&dir);
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("create corpus dir");
        std::fs::write(d.join(name), bytes).expect("write seed");
    };
    let m = migaccel_fuzz::migration();
    put("frames", "migration", &migaccel_fuzz::plain(&m));
    put("sealed", "migration", &migaccel_fuzz::sealed(&m));
    put("vcpu_state", "default", &kvm_hooks::state::VcpuState::default().encode());
    put(
        "config",
        "example",
        b"[guest]\nram = \"1GiB\"\nvcpus = 2\nworkload = \"hot\"\n\n[migration]\ndowntime_target_ms = 30\ndirty_source = \"ring\"\nstreams = 4\n\n[receiver]\nmax_rounds = 10\n\n[auth]\ninsecure = true\n",
    );
    put("mh_ring", "empty", &[0u8; 64]);
}
