//! SEV guest policy: the launch policy a SEV guest was started with decides whether it may
//! be migrated at all (AMD SEV API, "Guest Policy"). This host has no `/dev/sev`, so the
//! policy comes from the config (`confidential.sev_policy`).

/// Policy bits (SEV API §3, Table 2).
pub const POLICY_NODBG: u32 = 1 << 0;
pub const POLICY_NOKS: u32 = 1 << 1;
pub const POLICY_ES: u32 = 1 << 2;
/// The guest must not be sent to another platform.
pub const POLICY_NOSEND: u32 = 1 << 3;
pub const POLICY_DOMAIN: u32 = 1 << 4;
pub const POLICY_SEV: u32 = 1 << 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("SEV guest policy {0:#x} has NOSEND set: the guest owner forbids migrating this VM")]
    NoSend(u32),
}

/// Refuse a guest whose policy forbids sending it; 0 means "not a SEV guest".
pub fn check_policy(policy: u32) -> Result<(), PolicyError> {
    if policy & POLICY_NOSEND != 0 {
        return Err(PolicyError::NoSend(policy));
    }
    Ok(())
}

/// Human-readable policy flags, for reports and `doctor`.
pub fn describe(policy: u32) -> String {
    let names = [
        (POLICY_NODBG, "NODBG"),
        (POLICY_NOKS, "NOKS"),
        (POLICY_ES, "ES"),
        (POLICY_NOSEND, "NOSEND"),
        (POLICY_DOMAIN, "DOMAIN"),
        (POLICY_SEV, "SEV"),
    ];
    let v: Vec<&str> = names.iter().filter(|(b, _)| policy & b != 0).map(|(_, n)| *n).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nosend_is_refused_others_pass() {
        assert_eq!(check_policy(POLICY_NOSEND | POLICY_ES), Err(PolicyError::NoSend(0xc)));
        assert!(check_policy(POLICY_NOSEND).unwrap_err().to_string().contains("NOSEND"));
        assert!(check_policy(0).is_ok());
        assert!(check_policy(POLICY_NODBG | POLICY_NOKS | POLICY_ES).is_ok());
        assert_eq!(describe(POLICY_ES | POLICY_NOSEND), "ES|NOSEND");
    }
}
