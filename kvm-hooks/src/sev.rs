//! AMD SEV through the `sev` crate, for what it truly provides on a host: platform status
//! (`/dev/sev`), guest-policy parsing (a NOSEND guest must not be migrated), and packaging
//! the MH's transport key as a launch secret for `LAUNCH_SECRET`, so that on SEV hardware
//! the host never sees the key in clear. This machine has no `/dev/sev`: the status says
//! so, and the packaging is tested against a locally generated PDH and an emulated
//! measurement (see the tests).
use sev::certs::sev::sev::Certificate;
use sev::firmware::host::{Build, Firmware};
use sev::launch::sev::{HeaderFlags, Measurement, Policy, PolicyFlags, Secret, Start};
use sev::session::{Initialized, Session};

#[derive(Debug, thiserror::Error)]
pub enum SevError {
    #[error("SEV guest policy {0:#x} has NOSEND set: the guest owner forbids migrating this VM")]
    NoSend(u32),
    #[error("SEV launch session: {0}")]
    Session(String),
    #[error("SEV launch measurement does not match the expected launch digest: the platform or the guest image is not the one expected")]
    Measurement,
}

/// What `/dev/sev` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platform {
    Absent(String),
    Present(String),
}

/// Platform status, or why there is none.
pub fn platform() -> Platform {
    match Firmware::open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Platform::Absent("no /dev/sev: this host has no SEV".into())
        }
        Err(e) => Platform::Absent(format!("/dev/sev: {e}")),
        Ok(mut fw) => match fw.platform_status() {
            Ok(s) => Platform::Present(format!("SEV firmware {}, {} guest(s), state {:?}", s.build, s.guests, s.state)),
            Err(e) => Platform::Absent(format!("/dev/sev: PLATFORM_STATUS failed: {e}")),
        },
    }
}

/// Parse a guest's launch policy (low 16 bits: flags, high 16: minimum firmware).
pub fn policy(p: u32) -> Policy {
    Policy::from(p)
}

/// Refuse a guest whose policy forbids sending it elsewhere. 0 = not a SEV guest.
pub fn check_send(p: u32) -> Result<(), SevError> {
    if policy(p).flags.contains(PolicyFlags::NO_SEND) {
        return Err(SevError::NoSend(p));
    }
    Ok(())
}

/// Policy flags by name, for reports.
pub fn describe(p: u32) -> String {
    let f = policy(p).flags;
    let v: Vec<&str> = [
        (PolicyFlags::NO_DEBUG, "NODBG"),
        (PolicyFlags::NO_KEY_SHARING, "NOKS"),
        (PolicyFlags::ENCRYPTED_STATE, "ES"),
        (PolicyFlags::NO_SEND, "NOSEND"),
        (PolicyFlags::DOMAIN, "DOMAIN"),
        (PolicyFlags::SEV, "SEV"),
    ]
    .iter()
    .filter(|(b, _)| f.contains(*b))
    .map(|(_, n)| *n)
    .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join("|")
    }
}

/// The guest owner's side of a launch: wraps the MH transport key for one guest launch.
/// `start` produces the session blob for `LAUNCH_START` (keys wrapped to the platform's PDH);
/// `package` checks the platform's `LAUNCH_MEASURE` against the expected launch digest and
/// only then encrypts the key for `LAUNCH_SECRET`.
pub struct SecretPackager {
    session: Session<Initialized>,
}

impl std::fmt::Debug for SecretPackager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretPackager")
    }
}

impl SecretPackager {
    pub fn start(policy_bits: u32, pdh: Certificate) -> Result<(SecretPackager, Start), SevError> {
        let session = Session::try_from(policy(policy_bits)).map_err(|e| SevError::Session(format!("{e:?}")))?;
        let start = session.start_pdh(pdh).map_err(|e| SevError::Session(format!("{e:?}")))?;
        Ok((SecretPackager { session }, start))
    }

    pub fn package(
        self,
        build: Build,
        launch_digest: &[u8],
        msr: Measurement,
        key: &[u8; 32],
    ) -> Result<Secret, SevError> {
        let m = self.session.measure().map_err(|e| SevError::Session(e.to_string()))?;
        let verified = m.verify_with_digest(build, msr, launch_digest).map_err(|_| SevError::Measurement)?;
        verified.secret(HeaderFlags::default(), key).map_err(|e| SevError::Session(format!("{e:?}")))
    }

    /// Test hook: the session's integrity key, to emulate the platform's measurement.
    #[cfg(test)]
    fn tik(&self) -> Vec<u8> {
        self.session.tik.to_vec()
    }
    #[cfg(test)]
    fn tek(&self) -> Vec<u8> {
        self.session.tek.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sev::certs::sev::sev::Usage;
    use sev::firmware::host::Version;

    #[test]
    fn nosend_is_refused_others_pass() {
        assert!(matches!(check_send(0x8 | 0x4), Err(SevError::NoSend(0xc))));
        assert!(check_send(0x8).unwrap_err().to_string().contains("NOSEND"));
        assert!(check_send(0).is_ok());
        assert!(check_send(0x1 | 0x2 | 0x4 | 0x30).is_ok());
        assert_eq!(describe(0x4 | 0x8), "ES|NOSEND");
        // Minimum firmware lives in the high half and does not change the flags.
        assert!(check_send(0x0101_0005).is_ok());
    }

    #[test]
    fn no_sev_here_is_reported() {
        if !std::path::Path::new("/dev/sev").exists() {
            assert!(matches!(platform(), Platform::Absent(m) if m.contains("no /dev/sev")));
        }
    }

    /// The SP's LAUNCH_MEASURE: HMAC-SHA256 under the session's TIK over
    /// 0x04 ‖ api major ‖ api minor ‖ build ‖ policy ‖ digest ‖ mnonce (SEV API §6.5).
    fn emulated_measure(tik: &[u8], build: Build, policy: u32, digest: &[u8], mnonce: [u8; 16]) -> Measurement {
        use openssl::{hash::MessageDigest, pkey::PKey, sign::Signer};
        let k = PKey::hmac(tik).unwrap();
        let mut s = Signer::new(MessageDigest::sha256(), &k).unwrap();
        s.update(&[0x04, build.version.major, build.version.minor, build.build]).unwrap();
        s.update(&policy.to_le_bytes()).unwrap();
        s.update(digest).unwrap();
        s.update(&mnonce).unwrap();
        let mut measure = [0u8; 32];
        measure.copy_from_slice(&s.sign_to_vec().unwrap());
        Measurement { measure, mnonce }
    }

    #[test]
    fn transport_key_is_packaged_only_for_the_measured_launch() {
        let build = Build { version: Version { major: 0, minor: 24 }, build: 15 };
        let policy_bits = 0x4 | 0x1; // ES | NODBG
        let digest = [0x5au8; 32];
        let key = [0x42u8; 32];
        // A locally generated PDH stands in for the platform's (no /dev/sev here).
        let (pdh, _prv) = Certificate::generate(Usage::PDH).unwrap();
        let (p, start) = SecretPackager::start(policy_bits, pdh).unwrap();
        assert_eq!(start.policy, policy(policy_bits));
        let (tik, tek) = (p.tik(), p.tek());
        let msr = emulated_measure(&tik, build, policy_bits, &digest, [7; 16]);
        let secret = p.package(build, &digest, msr, &key).unwrap();
        assert_eq!(secret.ciphertext.len(), 32);
        assert_ne!(&secret.ciphertext[..], &key[..], "the key never travels in clear");
        // What the SP would do: AES-128-CTR under the TEK with the header's IV.
        let plain = openssl::symm::decrypt(
            openssl::symm::Cipher::aes_128_ctr(),
            &tek,
            Some(&secret.header.iv),
            &secret.ciphertext,
        )
        .unwrap();
        assert_eq!(plain, key);

        // A measurement of another image (or from another session) is refused: no secret.
        let (pdh, _prv) = Certificate::generate(Usage::PDH).unwrap();
        let (p, _) = SecretPackager::start(policy_bits, pdh).unwrap();
        let tik = p.tik();
        let wrong = emulated_measure(&tik, build, policy_bits, &[0u8; 32], [7; 16]);
        assert!(matches!(p.package(build, &digest, wrong, &key), Err(SevError::Measurement)));
    }
}
