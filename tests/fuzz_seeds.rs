//! Real migrations recorded as seeds for the stream fuzz targets (`./dev fuzz` runs this
//! with `MIGACCEL_FUZZ_SEEDS` set): the bytes a source sends, unauthenticated, for a small
//! idle guest with one and with two vCPUs. Without the variable the recordings are only
//! checked: well-formed frames in sequence, `Hello` first, `Complete` last.
use accel_user::app::config::{ByteSize, DirtySource, WorkloadKind};
use accel_user::app::session;
use accel_user::wire::frame::{FrameKind, Header, HEADER_LEN};
use migaccel_tests::{config, record_migration};

/// The frame kinds of a plain recording, checking headers and sequence numbers.
fn kinds(rec: &[u8]) -> Vec<FrameKind> {
    let (mut at, mut out) = (0usize, Vec::new());
    while at < rec.len() {
        let h: [u8; HEADER_LEN] = rec[at..at + HEADER_LEN].try_into().unwrap();
        let h = Header::decode(&h).unwrap_or_else(|e| panic!("frame {} at byte {at}: {e}", out.len()));
        assert_eq!(h.seq, out.len() as u64, "frame sequence");
        out.push(h.kind);
        at += HEADER_LEN + h.len as usize;
    }
    assert_eq!(at, rec.len(), "the recording ends at a frame boundary");
    out
}

#[test]
fn record_fuzz_seeds() {
    for vcpus in [1, 2] {
        let mut c = config(WorkloadKind::Idle, DirtySource::Bitmap);
        c.auth.insecure = true;
        c.auth.key = None;
        c.guest.ram = ByteSize(64 << 20);
        c.guest.vcpus = vcpus;
        c.migration.streams = 1;
        c.migration.min_rounds = 2;
        let src = session::boot_source(&c).unwrap();
        let rec = record_migration(&c, &src);
        let k = kinds(&rec);
        assert_eq!(k.first(), Some(&FrameKind::Hello));
        assert_eq!(k.last(), Some(&FrameKind::Complete));
        assert_eq!(k.iter().filter(|&&k| k == FrameKind::State).count(), vcpus as usize);
        if let Some(dir) = std::env::var_os("MIGACCEL_FUZZ_SEEDS") {
            let d = std::path::Path::new(&dir).join("frames");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(format!("recorded-idle-{vcpus}vcpu")), &rec).unwrap();
        }
        eprintln!("recorded {} frames, {} bytes ({vcpus} vCPUs)", k.len(), rec.len());
    }
}
