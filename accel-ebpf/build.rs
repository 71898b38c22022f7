//! Compile the BPF programs with clang (`-target bpf`). `BPF_CLANG` names the compiler;
//! otherwise `clang`, then `clang-16`..`clang-20`, are tried.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    let candidates: Vec<String> = match std::env::var("BPF_CLANG") {
        Ok(c) => vec![c],
        Err(_) => ["clang", "clang-20", "clang-19", "clang-18", "clang-17", "clang-16"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let clang = candidates.iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()));
    let Some(clang) = clang else {
        panic!(
            "accel-ebpf: no clang found (tried {candidates:?}). Install Debian's `clang-16` and `libbpf-dev` \
             (./dev setup does), or set BPF_CLANG to a clang that targets BPF."
        );
    };
    for name in ["migaccel", "qemu"] {
        compile(clang, name);
    }
}

/// Compile `bpf/NAME.bpf.c` into `$OUT_DIR/NAME.bpf.o`.
fn compile(clang: &str, name: &str) {
    let src = format!("bpf/{name}.bpf.c");
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join(format!("{name}.bpf.o"));
    let arch_inc = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let o = Command::new(clang)
        .args([
            "-target",
            "bpf",
            "-O2",
            "-g",
            "-mcpu=v3",
            "-D__TARGET_ARCH_x86",
            "-Wall",
            "-Werror",
            "-I",
            &arch_inc,
            "-c",
            &src,
            "-o",
        ])
        .arg(&out)
        .output()
        .expect("run clang");
    if !o.status.success() {
        panic!(
            "accel-ebpf: {clang} failed to compile {src} (is `libbpf-dev` installed for bpf/bpf_helpers.h?):\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
