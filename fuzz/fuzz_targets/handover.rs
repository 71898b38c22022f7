//! The destination's answer to a handover query (`handover::answer`), fed the plaintext of a
//! query connection (as behind its seal) for a VM that already runs here or does not yet
//! (the input's first byte). Whatever arrives: no panic; a VM that runs is only ever
//! answered "runs" and stays running; one that does not is answered "never runs" and is
//! then fenced for good; an attempt is answered once. Seed: a valid query.
#![no_main]
use accel_user::dest::handover::{answer, Handover, Outcome};
use accel_user::wire::frame::FrameKind;
use accel_user::wire::payload::{self, Answer, Ask};
use libfuzzer_sys::fuzz_target;

const SESSION: u64 = 0x5e55_1011;

fuzz_target!(
    init: migaccel_fuzz::seed("handover", "query", || {
        let mut v = vec![0u8];
        v.extend(migaccel_fuzz::plain(&[(FrameKind::Query, payload::Query { session: SESSION, ask: Ask::Runs }.encode())]));
        v
    }),
    |data: &[u8]| {
        let Some((&first, rest)) = data.split_first() else { return };
        let h = Handover::default();
        h.open(SESSION);
        let runs = first & 1 == 1;
        if runs {
            assert_eq!(h.resume(|| Ok::<(), ()>(())), Ok(true));
        }
        let attempt = u32::from(first >> 1);
        let got = answer(&h, &mut migaccel_fuzz::Bytes::new(rest), SESSION, attempt);
        match (runs, &got) {
            (true, Ok(a)) => assert_eq!(*a, Answer::Runs),
            (false, Ok(a)) => {
                assert_eq!(*a, Answer::NeverRuns);
                assert_eq!(h.resume(|| Ok::<(), ()>(())), Ok(false), "a fenced VM never resumes");
            }
            (_, Err(_)) => {}
        }
        assert_eq!(h.outcome() == Outcome::Runs, runs, "the answer never changes where the VM runs");
        if got.is_ok() {
            let again = answer(&h, &mut migaccel_fuzz::Bytes::new(rest), SESSION, attempt);
            assert!(again.is_err(), "an attempt is answered once");
        }
    }
);
