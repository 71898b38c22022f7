//! Full vCPU state, saved and restored with one method per ioctl, in a versioned encoding.
//!
//! Encoding (little-endian): `magic u32 "VCPU"`, `version u16`, `sections u16`, then per
//! section `tag u16, reserved u16, len u32, bytes`. A section holds the raw kernel struct;
//! its length must match this build's struct size, so a layout change cannot go unnoticed.
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    Msrs,
};
use kvm_ioctls::VcpuFd;

use crate::error::{errno_io, Error, Result};

const MAGIC: u32 = u32::from_le_bytes(*b"VCPU");
pub const STATE_VERSION: u16 = 1;
/// Upper bound on an encoded state, checked before decoding.
pub const MAX_ENCODED: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
enum Tag {
    Regs = 1,
    Sregs = 2,
    Fpu = 3,
    Xsave = 4,
    Xcrs = 5,
    Msrs = 6,
    Lapic = 7,
    MpState = 8,
    Events = 9,
}

impl Tag {
    fn from_u16(v: u16) -> Option<Tag> {
        Some(match v {
            1 => Tag::Regs,
            2 => Tag::Sregs,
            3 => Tag::Fpu,
            4 => Tag::Xsave,
            5 => Tag::Xcrs,
            6 => Tag::Msrs,
            7 => Tag::Lapic,
            8 => Tag::MpState,
            9 => Tag::Events,
            _ => return None,
        })
    }
}

/// Kernel structs that are plain old data: any bit pattern is a valid value.
///
/// # Safety
/// Implementors must be `repr(C)`, contain no pointers, references or enums, and accept
/// every bit pattern.
unsafe trait Pod: Default {}
// SAFETY: each is a repr(C) bindgen struct of integers and integer arrays only.
unsafe impl Pod for kvm_regs {}
// SAFETY: as above (segments and descriptor tables are integers).
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_fpu {}
// SAFETY: as above; the flexible array member has size zero.
unsafe impl Pod for kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above (a byte array).
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: as above (unions of integers included).
unsafe impl Pod for kvm_vcpu_events {}

fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod, so viewing its storage as bytes is sound for its whole size.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn from_bytes<T: Pod>(b: &[u8], what: &str) -> Result<T> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(Error::StateEncoding(format!(
            "{what} section is {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<T>()
        )));
    }
    let mut v = T::default();
    // SAFETY: lengths are equal (checked above) and any bit pattern is a valid T (Pod).
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len()) };
    Ok(v)
}

/// Everything KVM holds about one vCPU that a migration must carry.
#[derive(Clone, Default)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    /// Raw `kvm_xsave` bytes (the struct is not `Clone`).
    pub xsave: Option<Vec<u8>>,
    pub xcrs: Option<kvm_xcrs>,
    pub msrs: Vec<(u32, u64)>,
    pub lapic: Option<kvm_lapic_state>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("xsave", &self.xsave.is_some())
            .field("lapic", &self.lapic.is_some())
            .finish()
    }
}

/// Save the state of a stopped vCPU. `msr_indices` is the host's MSR list; MSRs that this
/// KVM refuses to read are skipped.
pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    let io = |op: &'static str| move |e| Error::ioctl(op, errno_io(e));
    let regs = vcpu.get_regs().map_err(io("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(io("KVM_GET_SREGS"))?;
    let fpu = vcpu.get_fpu().map_err(io("KVM_GET_FPU"))?;
    let xsave = vcpu.get_xsave().ok().map(|x| bytes_of(&x).to_vec());
    let xcrs = vcpu.get_xcrs().ok();
    let lapic = vcpu.get_lapic().ok();
    let mp_state = vcpu.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?;
    let events = vcpu.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?;
    let mut msrs = Vec::new();
    let mut rest: Vec<u32> = msr_indices.to_vec();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut m = Msrs::from_entries(&entries).map_err(|e| Error::StateEncoding(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut m).map_err(io("KVM_GET_MSRS"))?;
        msrs.extend(m.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip it and continue after it.
        rest.drain(..(n + 1).min(rest.len()));
    }
    Ok(VcpuState { regs, sregs, fpu, xsave, xcrs, msrs, lapic, mp_state, events })
}

/// Restore `s` into a vCPU that is not running.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    let io = |op: &'static str| move |e| Error::ioctl(op, errno_io(e));
    vcpu.set_sregs(&s.sregs).map_err(io("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(io("KVM_SET_REGS"))?;
    vcpu.set_fpu(&s.fpu).map_err(io("KVM_SET_FPU"))?;
    if let Some(x) = &s.xcrs {
        vcpu.set_xcrs(x).map_err(io("KVM_SET_XCRS"))?;
    }
    if let Some(b) = &s.xsave {
        let x: kvm_xsave = from_bytes(b, "xsave")?;
        let x = &x;
        // SAFETY: `x` is a full legacy-size kvm_xsave as returned by KVM_GET_XSAVE on a vCPU
        // of the same layout; KVM_SET_XSAVE reads exactly size_of::<kvm_xsave>() bytes.
        unsafe { vcpu.set_xsave(x) }.map_err(io("KVM_SET_XSAVE"))?;
    }
    let mut rest: &[(u32, u64)] = &s.msrs;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            rest.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let m = Msrs::from_entries(&entries).map_err(|e| Error::StateEncoding(format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&m).map_err(io("KVM_SET_MSRS"))?;
        if n == entries.len() {
            break;
        }
        // KVM refused entry n. That is harmless only if the vCPU already holds that value
        // (e.g. a paravirtual MSR the guest never enabled); anything else would lose state.
        let (index, want) = rest[n];
        let mut probe = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
            .map_err(|e| Error::StateEncoding(format!("MSR list: {e:?}")))?;
        let got = match vcpu.get_msrs(&mut probe) {
            Ok(1) => Some(probe.as_slice()[0].data),
            _ => None,
        };
        if got != Some(want) {
            return Err(Error::StateEncoding(format!(
                "KVM_SET_MSRS refused MSR {index:#x} = {want:#x} (destination holds {got:x?})"
            )));
        }
        rest = &rest[n + 1..];
    }
    if let Some(l) = &s.lapic {
        vcpu.set_lapic(l).map_err(io("KVM_SET_LAPIC"))?;
    }
    vcpu.set_mp_state(s.mp_state).map_err(io("KVM_SET_MP_STATE"))?;
    vcpu.set_vcpu_events(&s.events).map_err(io("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

impl VcpuState {
    /// Encode as the versioned section format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 << 10);
        let mut n = 0u16;
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        let mut sec = |tag: Tag, b: &[u8]| {
            out.extend_from_slice(&(tag as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
            n += 1;
        };
        sec(Tag::Regs, bytes_of(&self.regs));
        sec(Tag::Sregs, bytes_of(&self.sregs));
        sec(Tag::Fpu, bytes_of(&self.fpu));
        if let Some(x) = &self.xsave {
            sec(Tag::Xsave, x);
        }
        if let Some(x) = &self.xcrs {
            sec(Tag::Xcrs, bytes_of(x));
        }
        let msrs: Vec<u8> =
            self.msrs.iter().flat_map(|&(i, d)| i.to_le_bytes().into_iter().chain(d.to_le_bytes())).collect();
        sec(Tag::Msrs, &msrs);
        if let Some(l) = &self.lapic {
            sec(Tag::Lapic, bytes_of(l));
        }
        sec(Tag::MpState, bytes_of(&self.mp_state));
        sec(Tag::Events, bytes_of(&self.events));
        out[6..8].copy_from_slice(&n.to_le_bytes());
        out
    }

    /// Decode, checking magic, version, section tags and sizes; never panics on bad input.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = |m: String| Error::StateEncoding(m);
        if b.len() > MAX_ENCODED {
            return Err(bad(format!("{} bytes exceeds the {MAX_ENCODED}-byte cap", b.len())));
        }
        if b.len() < 8 {
            return Err(bad(format!("{} bytes is shorter than the 8-byte header", b.len())));
        }
        let magic = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err(bad(format!("bad magic {magic:#x}")));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != STATE_VERSION {
            return Err(bad(format!("unsupported version {version} (this build reads {STATE_VERSION})")));
        }
        let count = u16::from_le_bytes([b[6], b[7]]);
        let mut s = VcpuState::default();
        let mut seen = [false; 10];
        let mut p = 8usize;
        for _ in 0..count {
            let hdr = b.get(p..p + 8).ok_or_else(|| bad(format!("section header truncated at byte {p}")))?;
            let tag_raw = u16::from_le_bytes([hdr[0], hdr[1]]);
            let len = u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes")) as usize;
            p += 8;
            let body = p
                .checked_add(len)
                .and_then(|end| b.get(p..end))
                .ok_or_else(|| bad(format!("section {tag_raw} of {len} bytes runs past the end")))?;
            p += len;
            let tag = Tag::from_u16(tag_raw).ok_or_else(|| bad(format!("unknown section tag {tag_raw}")))?;
            if std::mem::replace(&mut seen[tag as usize], true) {
                return Err(bad(format!("section {tag:?} appears twice")));
            }
            match tag {
                Tag::Regs => s.regs = from_bytes(body, "regs")?,
                Tag::Sregs => s.sregs = from_bytes(body, "sregs")?,
                Tag::Fpu => s.fpu = from_bytes(body, "fpu")?,
                Tag::Xsave => s.xsave = Some(from_bytes::<kvm_xsave>(body, "xsave").map(|_| body.to_vec())?),
                Tag::Xcrs => s.xcrs = Some(from_bytes(body, "xcrs")?),
                Tag::Lapic => s.lapic = Some(from_bytes(body, "lapic")?),
                Tag::MpState => s.mp_state = from_bytes(body, "mp_state")?,
                Tag::Events => s.events = from_bytes(body, "events")?,
                Tag::Msrs => {
                    if body.len() % 12 != 0 {
                        return Err(bad(format!("MSR section of {} bytes is not a multiple of 12", body.len())));
                    }
                    s.msrs = body
                        .chunks_exact(12)
                        .map(|c| {
                            (
                                u32::from_le_bytes(c[0..4].try_into().expect("4")),
                                u64::from_le_bytes(c[4..12].try_into().expect("8")),
                            )
                        })
                        .collect();
                }
            }
        }
        if p != b.len() {
            return Err(bad(format!("{} trailing bytes after {count} sections", b.len() - p)));
        }
        for (tag, name) in [
            (Tag::Regs, "regs"),
            (Tag::Sregs, "sregs"),
            (Tag::Fpu, "fpu"),
            (Tag::MpState, "mp_state"),
            (Tag::Events, "events"),
        ] {
            if !seen[tag as usize] {
                return Err(bad(format!("required section {name} missing")));
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        let mut s = VcpuState::default();
        s.regs.rip = 0x4000;
        s.msrs = vec![(0x10, 42)];
        s.xcrs = Some(kvm_xcrs::default());
        let e = s.encode();
        let d = VcpuState::decode(&e).unwrap();
        assert_eq!(d.regs.rip, 0x4000);
        assert_eq!(d.msrs, vec![(0x10, 42)]);
        assert!(d.xcrs.is_some() && d.xsave.is_none());
        for cut in [0, 7, 8, 20, e.len() - 1] {
            assert!(VcpuState::decode(&e[..cut]).is_err(), "truncated at {cut} must fail");
        }
        let mut v = e.clone();
        v[4] = 9;
        assert!(VcpuState::decode(&v).unwrap_err().to_string().contains("version 9"));
        let mut v = e.clone();
        v.push(0);
        assert!(VcpuState::decode(&v).unwrap_err().to_string().contains("trailing"));
        let mut v = e.clone();
        v[8] = 77; // first section tag
        assert!(VcpuState::decode(&v).unwrap_err().to_string().contains("unknown section tag 77"));
    }
}
