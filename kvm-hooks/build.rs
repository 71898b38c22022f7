//! Build the reference Migration Handler (`../mh-guest`, a `no_std` program) into a flat
//! guest image at `$OUT_DIR/mh.bin`, which `kvm_hooks::mh` embeds. It is its own cargo
//! workspace, built for the host's `x86_64-unknown-linux-gnu` target with AES-NI enabled
//! (no runtime CPU detection in the guest), linked at `mh_abi::IMAGE`, then `objcopy`'d.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR")).join("..");
    let guest = root.join("mh-guest");
    for p in ["mh-guest/src", "mh-guest/Cargo.toml", "mh-guest/Cargo.lock", "mh-guest/link.ld", "mh-abi/src"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out.join("mh-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let flags = [
        "-C",
        "target-feature=+aes,+pclmulqdq,+avx",
        "-C",
        "relocation-model=static",
        "-C",
        "link-arg=-nostartfiles",
        "-C",
        "link-arg=-nostdlib",
        "-C",
        "link-arg=-static",
        "-C",
        "link-arg=-no-pie",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["-C".into(), format!("link-arg=-T{}", guest.join("link.ld").display())])
    .collect::<Vec<_>>()
    .join("\x1f");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--locked", "--target", "x86_64-unknown-linux-gnu", "--target-dir"])
        .arg(&target_dir);
    for v in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags);
    let o = cmd.output().expect("run cargo for mh-guest");
    if !o.status.success() {
        panic!(
            "kvm-hooks: building the Migration Handler image (mh-guest) failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/mh-guest");
    objcopy(&elf, &out.join("mh.bin"));
}

fn objcopy(elf: &Path, bin: &Path) {
    let o = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(elf)
        .arg(bin)
        .output()
        .expect("run objcopy (Debian package binutils)");
    if !o.status.success() {
        panic!("kvm-hooks: objcopy of the MH image failed:\n{}", String::from_utf8_lossy(&o.stderr));
    }
}
