//! The transport key of confidential migrations: read from a key file that only its owner
//! may read. On a SEV host the same key would reach the MH as a launch secret; here the
//! VMM writes it into the MH's secret page (see `docs/mh-protocol.md`).
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {}: mode {mode:04o} lets group or others access it; run `chmod 600` on it", .path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {}: not a regular file", .path.display())]
    NotAFile { path: PathBuf },
    #[error("key file {}: {msg}", .path.display())]
    Format { path: PathBuf, msg: String },
}

/// A 32-byte AES-256-GCM key. Its Debug output never shows the bytes; dropped keys are
/// overwritten.
#[derive(Clone, PartialEq, Eq)]
pub struct TransportKey(pub [u8; 32]);

impl std::fmt::Debug for TransportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransportKey(<redacted>)")
    }
}

impl Drop for TransportKey {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// Load a key file: exactly 32 raw bytes, or 64 hex digits (a trailing newline is fine).
/// The file must be a regular file with no group or other permission bits.
pub fn load(path: &Path) -> Result<TransportKey, KeyError> {
    let p = || path.to_path_buf();
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read { path: p(), source })?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile { path: p() });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: p(), mode });
    }
    if meta.size() > 256 {
        return Err(KeyError::Format {
            path: p(),
            msg: format!("{} bytes; a key is 32 bytes or 64 hex digits", meta.size()),
        });
    }
    let raw = std::fs::read(path).map_err(|source| KeyError::Read { path: p(), source })?;
    parse(&raw).map_err(|msg| KeyError::Format { path: p(), msg })
}

fn parse(raw: &[u8]) -> Result<TransportKey, String> {
    if raw.len() == 32 {
        let mut k = [0u8; 32];
        k.copy_from_slice(raw);
        return Ok(TransportKey(k));
    }
    let text =
        std::str::from_utf8(raw).map_err(|_| format!("{} bytes that are neither 32 raw bytes nor hex", raw.len()))?;
    let hex = text.trim();
    if hex.len() != 64 {
        return Err(format!("{} hex digits; a key is 64 hex digits (or 32 raw bytes)", hex.len()));
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("non-hex digit near offset {}", 2 * i))?;
    }
    Ok(TransportKey(k))
}

/// A fresh VM id for a Migration Handler launch (bound into every blob it exports).
pub fn random_vm_id() -> u32 {
    let mut b = [0u8; 4];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(1);
        b = (t as u32 ^ std::process::id()).to_le_bytes();
    }
    u32::from_le_bytes(b).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(mode: u32, body: &[u8]) -> tempfile_lite::Temp {
        let t = tempfile_lite::Temp::new();
        let mut f = std::fs::File::create(&t.0).unwrap();
        f.write_all(body).unwrap();
        std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(mode)).unwrap();
        t
    }

    mod tempfile_lite {
        pub struct Temp(pub std::path::PathBuf);
        impl Temp {
            pub fn new() -> Temp {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let n = N.fetch_add(1, Ordering::Relaxed);
                Temp(std::env::temp_dir().join(format!("migaccel-key-{}-{n}", std::process::id())))
            }
        }
        impl Drop for Temp {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn accepts_raw_and_hex_with_strict_modes() {
        let raw = file(0o600, &[7u8; 32]);
        assert_eq!(load(&raw.0).unwrap().0, [7u8; 32]);
        let hex = file(0o400, format!("{}\n", "ab".repeat(32)).as_bytes());
        assert_eq!(load(&hex.0).unwrap().0, [0xab; 32]);
        assert_eq!(format!("{:?}", load(&hex.0).unwrap()), "TransportKey(<redacted>)");
    }

    #[test]
    fn refuses_loose_modes_bad_sizes_and_missing_files() {
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let f = file(mode, &[1u8; 32]);
            let e = load(&f.0).unwrap_err().to_string();
            assert!(e.contains("chmod 600") && e.contains(&format!("{mode:04o}")), "{e}");
        }
        let short = file(0o600, &[1u8; 31]);
        assert!(load(&short.0).unwrap_err().to_string().contains("hex digits"));
        let bad = file(0o600, "zz".repeat(32).as_bytes());
        assert!(load(&bad.0).unwrap_err().to_string().contains("non-hex"));
        let big = file(0o600, &[b'a'; 1000]);
        assert!(load(&big.0).unwrap_err().to_string().contains("1000 bytes"));
        let e = load(Path::new("/nonexistent/migaccel.key")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/migaccel.key"), "{e}");
        assert!(matches!(load(Path::new("/tmp")), Err(KeyError::NotAFile { .. })));
    }
}
