//! The binary's error handling: bad config, bad flags, missing KVM each give one clear line.
use std::process::{Command, Output};

use migaccel_tests::migaccel_bin;

fn run(args: &[&str]) -> Output {
    Command::new(migaccel_bin()).args(args).output().expect("run migaccel")
}

/// Fails with exit code 1 and exactly one stderr line containing every `needle`.
fn one_line_error(args: &[&str], needles: &[&str]) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: status {:?}, stderr {err}", o.status);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one error line, got {lines:#?}");
    for n in needles {
        assert!(lines[0].contains(n), "{args:?}: {:?} does not mention {n:?}", lines[0]);
    }
}

fn config_file(name: &str, text: &str) -> String {
    let p = std::env::temp_dir().join(format!("migaccel-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn unknown_config_key() {
    let f = config_file("unknown", "[guest]\nrma = \"1GiB\"\n");
    one_line_error(&["--config", &f, "demo"], &["config", "unknown field `rma`"]);
}

#[test]
fn wrong_type_in_config() {
    let f = config_file("type", "[guest]\nvcpus = \"two\"\n");
    one_line_error(&["--config", &f, "demo"], &["vcpus", "invalid type"]);
}

#[test]
fn impossible_sizes() {
    one_line_error(&["demo", "--ram", "10MiB"], &["guest.ram", "64 MiB minimum"]);
    one_line_error(&["demo", "--ram", "65GiB"], &["guest.ram", "64 GiB maximum"]);
    let f = config_file("ws", "[guest]\nworkload = \"hot\"\nram = \"64MiB\"\nhot_working_set = \"1GiB\"\n");
    one_line_error(&["--config", &f, "demo"], &["guest.hot_working_set", "exceeds"]);
    one_line_error(&["demo", "--vcpus", "0"], &["guest.vcpus"]);
    one_line_error(&["demo", "--dirty-ring-entries", "100"], &["migration.dirty_ring_entries", "power of two"]);
}

#[test]
fn missing_config_file() {
    one_line_error(
        &["--config", "/nonexistent/migaccel.toml", "demo"],
        &["/nonexistent/migaccel.toml", "No such file"],
    );
}

#[test]
fn missing_kvm_device() {
    one_line_error(
        &["demo", "--kvm-device", "/nonexistent/kvm"],
        &["KVM device /nonexistent/kvm is not available", "No such file"],
    );
    one_line_error(
        &["send", "--to", "127.0.0.1:9", "--kvm-device", "/nonexistent/kvm", "--insecure"],
        &["/nonexistent/kvm"],
    );
}

#[test]
fn bad_flag_values() {
    let o = run(&["demo", "--ram", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.lines().next().unwrap().contains("--ram"), "{err}");
    one_line_error(&["receive", "--listen", "nowhere"], &["receiver.listen"]);
}

#[test]
fn send_to_nobody_names_the_phase() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let k = migaccel_tests::test_key_file();
    let k = k.to_str().unwrap();
    one_line_error(
        &["send", "--to", &format!("127.0.0.1:{port}"), "--ram", "64MiB", "--warmup-ms", "10", "--auth-key", k],
        &["handshake", "connect", "refused"],
    );
}

/// Both ends refuse to start without a key unless told `--insecure`; `keygen` writes a key
/// only its owner can read and never overwrites one.
#[test]
fn authentication_is_required_and_keygen_writes_keys() {
    for cmd in [&["receive", "--listen", "127.0.0.1:0"][..], &["send", "--to", "127.0.0.1:9"][..]] {
        one_line_error(cmd, &["auth.key_file is not set", "migaccel keygen", "--insecure"]);
    }
    use std::os::unix::fs::PermissionsExt;
    let p = std::env::temp_dir().join(format!("migaccel-cli-{}-keygen.key", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let path = p.to_str().unwrap();
    let o = run(&["keygen", path]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.len() == 65 && text.trim().chars().all(|c| c.is_ascii_hexdigit()), "{text:?}");
    one_line_error(&["keygen", path], &["keygen", path, "exists"]);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), text, "an existing key is never overwritten");
    let loose = key("auth-loose", 0o644);
    one_line_error(&["send", "--to", "127.0.0.1:9", "--auth-key", &loose], &["auth.key_file", "chmod 600"]);
    std::fs::remove_file(&p).unwrap();
}

/// Hostile key files get a one-line error from both ends, never a panic (exit 101) and
/// never the key's text: a multi-byte character across a digit pair, an all-zero key, a
/// symbolic link to a good key.
#[test]
fn hostile_key_files_are_refused_without_panic_or_leak() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir();
    let write = |name: &str, body: &[u8]| {
        let p = dir.join(format!("migaccel-cli-{}-{name}.key", std::process::id()));
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let good = key("hostile-good", 0o600);
    let good_text = std::fs::read_to_string(&good).unwrap();
    let mut utf8 = good_text.clone().into_bytes();
    // Across a digit pair (offsets 21 and 22): slicing the text by pairs once panicked here.
    utf8[21..23].copy_from_slice("é".as_bytes());
    let utf8 = write("utf8", &utf8);
    let zero = write("zero", &[0u8; 32]);
    let link = dir.join(format!("migaccel-cli-{}-link.key", std::process::id()));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&good, &link).unwrap();
    let cases = [(&utf8, "non-hex digit at offset 21"), (&zero, "distinct byte values"), (&link, "symbolic link")];
    for (path, want) in cases {
        let k = path.to_str().unwrap();
        for cmd in [
            &["send", "--to", "127.0.0.1:9", "--auth-key", k][..],
            &["receive", "--listen", "127.0.0.1:0", "--auth-key", k][..],
        ] {
            let o = run(cmd);
            assert_ne!(o.status.code(), Some(101), "{cmd:?} panicked");
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success() && err.contains(want), "{cmd:?}: {err}");
            assert!(!err.contains(&good_text.trim()[..16]), "{cmd:?} printed key text: {err}");
        }
    }
    for p in [utf8, zero, link] {
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn doctor_reports_host() {
    let o = run(&["doctor"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("[ ok ] KVM"), "{out}");
    assert!(out.contains("dirty ring"), "{out}");
    assert!(out.contains("SEV"), "{out}");
}

fn key(name: &str, mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = std::env::temp_dir().join(format!("migaccel-cli-{}-{name}.key", std::process::id()));
    let hex: String = (0..32u8).map(|i| format!("{:02x}", 0x11 ^ i.wrapping_mul(0x3b))).collect();
    std::fs::write(&p, hex).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn confidential_demo_runs_and_loose_keys_are_refused() {
    let k = key("good", 0o600);
    for lanes in ["1", "2"] {
        let o = run(&["demo", "--ram", "128MiB", "--confidential-key", &k, "--mh-vcpus", lanes, "--report", "json"]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}\n{out}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(&out).expect("json report");
        assert!(v["source"]["mh_exported"].as_u64().unwrap() > 0, "{out}");
        assert_eq!(v["verification"]["mismatched_pages"].as_array().map(Vec::len), Some(0), "{out}");
    }
    one_line_error(&["demo", "--confidential-key", &k, "--mh-vcpus", "5"], &["confidential.mh_vcpus", "1..=4"]);
    let loose = key("loose", 0o644);
    one_line_error(&["demo", "--ram", "128MiB", "--confidential-key", &loose], &["chmod 600", "0644"]);
    let c = config_file("nokey", "[confidential]\nenabled = true\n");
    one_line_error(&["--config", &c, "demo"], &["confidential.key_file"]);
}

/// Papercuts an operator meets first: every one answered at once, in one line that names
/// the option or key at fault, before a guest boots or a connection opens.
#[test]
fn bad_options_are_named_before_anything_runs() {
    // A size in TiB is a size (here one the guest limits refuse, naming the limit).
    one_line_error(&["demo", "--ram", "1TiB"], &["guest.ram", "64 GiB maximum"]);
    // A dump path that cannot be written: no guest boots, nothing connects (port 9 would
    // refuse the connection, and the message would say so).
    for p in ["/nonexistent/x", "/proc/self/status/x"] {
        one_line_error(&["send", "--to", "127.0.0.1:9", "--insecure", "--dump-memory", p], &["--dump-memory", p]);
        one_line_error(&["send", "--to", "127.0.0.1:9", "--insecure", "--plot", p], &["--plot", p]);
    }
    one_line_error(&["receive", "--insecure", "--max-ram", "0"], &["receiver.max_ram", "refuse every VM"]);
}

/// `demo --plot`: the migration's timeline is written as SVG that parses and names every
/// series; `--progress json` prints one JSON object per line on stderr, the last
/// `completed`.
#[test]
fn demo_plots_its_timeline_and_reports_progress_as_json() {
    let svg = std::env::temp_dir().join(format!("migaccel-cli-{}-timeline.svg", std::process::id()));
    let o =
        run(&["demo", "--ram", "128MiB", "--workload", "hot", "--progress", "json", "--plot", svg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let text = std::fs::read_to_string(&svg).expect("the plot was written");
    assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(200)]);
    for s in accel_user::app::plot::SERIES {
        assert!(text.contains(s), "series {s:?} missing from the plot");
    }
    let lines: Vec<serde_json::Value> =
        err.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect(l)).collect();
    assert!(lines.len() >= 4, "{err}");
    assert_eq!(lines.last().unwrap()["status"], "completed", "{err}");
    assert!(lines.iter().any(|l| l["status"] == "active" && l["ram"]["transferred"].as_u64() > Some(0)), "{err}");
    let _ = std::fs::remove_file(&svg);
}
