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
    #[error("key file {}: a symbolic link; name the key file itself", .path.display())]
    Symlink { path: PathBuf },
    #[error("key file {}: owned by uid {owner}, not by the running user (uid {user})", .path.display())]
    Owner { path: PathBuf, owner: u32, user: u32 },
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

/// Largest key file read: 64 hex digits with room for whitespace.
const MAX_KEY_FILE: u64 = 256;

/// Load a key file: exactly 32 raw bytes, or 64 hex digits (surrounding whitespace is
/// fine). The file must be a regular file owned by the running user with no group or other
/// permission bits, and not a symbolic link (a key planted behind a link, or by another
/// user, is not the operator's key). Its bytes are parsed, never printed: errors name
/// offsets, not contents.
pub fn load(path: &Path) -> Result<TransportKey, KeyError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let p = || path.to_path_buf();
    // O_NOFOLLOW: the last component may not be a symlink (ELOOP); checked on the open file
    // (fstat), so the file cannot be swapped between the checks and the read.
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |source| match source.raw_os_error() {
                Some(libc::ELOOP) => KeyError::Symlink { path: p() },
                _ => KeyError::Read { path: p(), source },
            },
        )?;
    let meta = f.metadata().map_err(|source| KeyError::Read { path: p(), source })?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile { path: p() });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(KeyError::Owner { path: p(), owner: meta.uid(), user: me });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: p(), mode });
    }
    if meta.size() > MAX_KEY_FILE {
        return Err(KeyError::Format {
            path: p(),
            msg: format!("{} bytes; a key is 32 bytes or 64 hex digits", meta.size()),
        });
    }
    let mut raw = Vec::with_capacity(MAX_KEY_FILE as usize + 1);
    let read = f.take(MAX_KEY_FILE + 1).read_to_end(&mut raw);
    let r = read
        .map_err(|source| KeyError::Read { path: p(), source })
        .and_then(|_| parse(&raw).map_err(|msg| KeyError::Format { path: p(), msg }));
    raw.fill(0);
    std::hint::black_box(&raw);
    r
}

/// The key in `raw`: 32 raw bytes or 64 hex digits. Never panics; messages never quote it.
fn parse(raw: &[u8]) -> Result<TransportKey, String> {
    let key = if raw.len() == 32 {
        let mut k = [0u8; 32];
        k.copy_from_slice(raw);
        TransportKey(k)
    } else {
        let start = raw.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(raw.len());
        let end = raw.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
        let hex = &raw[start..end];
        if hex.len() != 64 {
            return Err(format!(
                "{} bytes that are neither 32 raw bytes nor 64 hex digits ({} non-blank)",
                raw.len(),
                hex.len()
            ));
        }
        let digit = |i: usize| -> Result<u8, String> {
            let c = hex[i];
            (c as char).to_digit(16).map(|d| d as u8).ok_or_else(|| format!("non-hex digit at offset {}", start + i))
        };
        let mut k = TransportKey([0u8; 32]);
        for i in 0..32 {
            k.0[i] = digit(2 * i)? << 4 | digit(2 * i + 1)?;
        }
        k
    };
    weak(&key.0)?;
    Ok(key)
}

/// Refuse keys no random source makes: a 32-byte random key has about 30 distinct byte
/// values, and fewer than 8 happens with a probability far below 2^-100. A key like
/// all zeros or one repeated digit pair would let any peer test guesses offline.
fn weak(k: &[u8; 32]) -> Result<(), String> {
    let mut seen = [false; 256];
    k.iter().for_each(|&b| seen[b as usize] = true);
    let distinct = seen.iter().filter(|&&x| x).count();
    if distinct < 8 {
        return Err(format!(
            "the key has only {distinct} distinct byte values: not a random key; make one with `migaccel keygen`"
        ));
    }
    Ok(())
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

    /// 32 bytes no one would call weak.
    fn good_key() -> [u8; 32] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(0x3b) ^ 0xa5)
    }

    fn hex(k: &[u8]) -> String {
        k.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn accepts_raw_and_hex_with_strict_modes() {
        let raw = file(0o600, &good_key());
        assert_eq!(load(&raw.0).unwrap().0, good_key());
        let h = file(0o400, format!("  {}\n", hex(&good_key())).as_bytes());
        assert_eq!(load(&h.0).unwrap().0, good_key());
        assert_eq!(format!("{:?}", load(&h.0).unwrap()), "TransportKey(<redacted>)");
    }

    #[test]
    fn refuses_loose_modes_bad_sizes_and_missing_files() {
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let f = file(mode, &good_key());
            let e = load(&f.0).unwrap_err().to_string();
            assert!(e.contains("chmod 600") && e.contains(&format!("{mode:04o}")), "{e}");
        }
        let short = file(0o600, &good_key()[..31]);
        assert!(load(&short.0).unwrap_err().to_string().contains("hex digits"));
        let bad = file(0o600, "zz".repeat(32).as_bytes());
        assert!(load(&bad.0).unwrap_err().to_string().contains("non-hex digit at offset 0"));
        let big = file(0o600, &[b'a'; 1000]);
        assert!(load(&big.0).unwrap_err().to_string().contains("1000 bytes"));
        let e = load(Path::new("/nonexistent/migaccel.key")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/migaccel.key"), "{e}");
        assert!(matches!(load(Path::new("/tmp")), Err(KeyError::NotAFile { .. })));
    }

    /// Multi-byte UTF-8 across a digit pair once panicked (slicing a str inside a
    /// character) and printed the key: bytes are parsed, and no message quotes them.
    #[test]
    fn odd_bytes_never_panic_nor_leak_the_key() {
        let mut text = hex(&good_key()).into_bytes();
        // "é" (2 bytes) replacing digits 9 and 10: still 64 bytes.
        text[9..11].copy_from_slice("é".as_bytes());
        let f = file(0o600, &text);
        let e = load(&f.0).unwrap_err().to_string();
        assert!(e.contains("non-hex digit at offset 9"), "{e}");
        let secret = hex(&good_key());
        assert!(!e.contains(&secret[..8]) && !e.contains(&secret[40..48]), "the error quotes key text: {e}");
        // Every single-byte edit of a valid hex key: an error or a key, never a panic.
        for at in 0..64 {
            for b in [0u8, b' ', 0x80, 0xc3, 0xff, b'g'] {
                let mut t = hex(&good_key()).into_bytes();
                t[at] = b;
                let _ = parse(&t);
            }
        }
    }

    #[test]
    fn refuses_weak_keys() {
        for k in [[0u8; 32], [0x11; 32], std::array::from_fn(|i| (i % 7) as u8)] {
            let f = file(0o600, &k);
            let e = load(&f.0).unwrap_err().to_string();
            assert!(e.contains("distinct byte values") && e.contains("keygen"), "{e}");
            let h = file(0o600, hex(&k).as_bytes());
            assert!(load(&h.0).unwrap_err().to_string().contains("distinct byte values"));
        }
        // Eight distinct values is the floor.
        let k: [u8; 32] = std::array::from_fn(|i| (i % 8) as u8);
        assert!(load(&file(0o600, &k).0).is_ok());
    }

    #[test]
    fn refuses_symlinks_and_other_owners() {
        let target = file(0o600, &good_key());
        let link = tempfile_lite::Temp::new();
        std::os::unix::fs::symlink(&target.0, &link.0).unwrap();
        let e = load(&link.0).unwrap_err();
        assert!(matches!(e, KeyError::Symlink { .. }), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // A key another user owns (created here as root and given away, or a system file).
        let me = rustix::process::geteuid().as_raw();
        if me == 0 {
            let f = file(0o600, &good_key());
            std::os::unix::fs::chown(&f.0, Some(65534), None).unwrap();
            let e = load(&f.0).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534") && e.contains("uid 0"), "{e}");
        } else {
            let e = load(Path::new("/etc/hostname")).unwrap_err().to_string();
            assert!(e.contains("owned by uid 0"), "{e}");
        }
    }
}
