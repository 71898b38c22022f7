//! The QEMU process as `/proc` shows it: its binary, its command line, its guest-RAM file
//! descriptor and where it maps guest RAM.
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use kvm_hooks::process::Pidfd;

use crate::error::QemuError;

/// Open `pid` and check that it runs a QEMU system emulator.
pub fn open(pid: u32) -> Result<(Pidfd, PathBuf), QemuError> {
    let pidfd = Pidfd::open(pid).map_err(|source| QemuError::NoProcess { pid, source })?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|source| QemuError::NoProcess { pid, source })?;
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.starts_with("qemu-system-") && !name.starts_with("qemu-kvm") {
        return Err(QemuError::NotQemu { pid, exe: exe.display().to_string() });
    }
    Ok((pidfd, exe))
}

/// The process's command line, one argument per entry.
pub fn cmdline(pid: u32) -> Result<Vec<String>, QemuError> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|source| QemuError::NoProcess { pid, source })?;
    Ok(raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
}

/// The dirty-ring size QEMU's `-accel kvm,dirty-ring-size=N` asked for (0: none).
pub fn dirty_ring_size(args: &[String]) -> u64 {
    let mut size = 0;
    for w in args.windows(2) {
        if w[0] == "-accel" || w[0] == "--accel" || w[0] == "-machine" || w[0] == "-M" {
            for opt in w[1].split(',') {
                if let Some(v) = opt.strip_prefix("dirty-ring-size=") {
                    size = v.parse().unwrap_or(0);
                }
            }
        }
    }
    size
}

/// Guest RAM as QEMU holds it: the file, its size and where QEMU maps it.
pub struct RamFile {
    pub file: File,
    pub host_addr: u64,
}

/// Find the file of `size` bytes that QEMU maps shared as guest RAM: among its descriptors,
/// a memfd or regular file of that size whose inode QEMU maps with exactly that length.
pub fn ram_file(pidfd: &Pidfd, size: u64) -> Result<RamFile, QemuError> {
    let pid = pidfd.pid();
    let err = |what, msg: String| QemuError::Attach { pid, what, msg };
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| err("/proc maps", e.to_string()))?;
    // start-end perms offset dev inode path
    let mut shared: Vec<(u64, u64, u64)> = Vec::new(); // (start, len, inode)
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 || !f[1].ends_with('s') || f[2] != "00000000" {
            continue;
        }
        let Some((a, b)) = f[0].split_once('-') else { continue };
        let (Ok(a), Ok(b), Ok(ino)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16), f[4].parse::<u64>())
        else {
            continue;
        };
        shared.push((a, b - a, ino));
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| err("/proc fd", e.to_string()))?;
    let mut seen = Vec::new();
    for e in fds.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        let t = target.to_string_lossy();
        if !t.starts_with('/') {
            continue;
        }
        let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(meta) = std::fs::metadata(e.path()) else { continue };
        if meta.len() != size || !meta.file_type().is_file() {
            continue;
        }
        seen.push(t.to_string());
        let Some(&(start, _, _)) = shared.iter().find(|&&(_, len, ino)| ino == meta.ino() && len == size) else {
            continue;
        };
        let fd = pidfd.get_fd(n).map_err(|e| err("pidfd_getfd", format!("fd {n} ({t}): {e}")))?;
        return Ok(RamFile { file: File::from(fd), host_addr: start });
    }
    Err(QemuError::RamNotShared {
        pid,
        detail: if seen.is_empty() {
            format!("no file of {size} bytes among its descriptors")
        } else {
            format!("{} file(s) of {size} bytes, none mapped shared as a whole: {}", seen.len(), seen.join(", "))
        },
    })
}
