//! Convergence policy: a pure function from round metrics to a decision.
use std::time::Duration;

use serde::Serialize;

use crate::wire::frame::PAGE;

/// Durations in round metrics and reports serialise as milliseconds.
pub fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// What happened in one precopy round.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RoundStats {
    pub round: u32,
    /// Pages sent (data + zero).
    pub pages: u64,
    /// Pages sent as zero records.
    pub zero_pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// vCPU throttle (percent) in force during the round.
    pub throttle_pct: u8,
    /// Wall time of the round.
    #[serde(serialize_with = "ser_ms")]
    pub elapsed: Duration,
    /// Pages found dirty when the round ended (sent by the next round).
    pub dirty_after: u64,
    /// Confidential mode: pages held back because the page-state records disagreed on them
    /// (a conversion in flight); they stay dirty.
    pub deferred: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct PolicyConfig {
    pub downtime_target: Duration,
    /// Precopy rounds (round 0 included) to run before a switchover for convergence; 1 lets
    /// a migration switch over after round 0.
    pub min_rounds: u32,
    /// Precopy rounds (round 0 included) after which switchover is forced.
    pub max_rounds: u32,
    pub auto_converge: AutoConverge,
}

/// Throttle vCPUs when the guest dirties memory faster than precopy can send it.
#[derive(Debug, Clone, Copy)]
pub struct AutoConverge {
    pub enabled: bool,
    /// First throttle step, percent.
    pub initial: u8,
    /// Added at each further step, percent.
    pub increment: u8,
    /// Never throttle more than this, percent.
    pub max: u8,
}

/// The throttle to apply for the next round. Like QEMU's auto-converge: when the pages
/// dirtied during each of the last two rounds exceed half of what the round sent, the
/// guest is outrunning the link, so step the throttle up.
pub fn next_throttle(cfg: &AutoConverge, rounds: &[RoundStats], current: u8) -> u8 {
    if !cfg.enabled || rounds.len() < 3 {
        return current;
    }
    let outrun = |r: &RoundStats| r.pages > 0 && r.dirty_after * 2 > r.pages;
    let last_two = &rounds[rounds.len() - 2..];
    if last_two.iter().all(outrun) {
        let next = if current == 0 { cfg.initial } else { current.saturating_add(cfg.increment) };
        next.min(cfg.max)
    } else {
        current
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum SwitchReason {
    /// The remaining dirty pages fit the downtime target at the measured bandwidth.
    Converged { predicted_ms: f64 },
    /// The round limit was reached; downtime may exceed the target.
    RoundLimit { predicted_ms: f64 },
    /// The migration's time limit passed with `force` as its action; downtime may exceed
    /// the target.
    TimeLimit { predicted_ms: f64 },
}

/// What to do when a migration's time limit passes (`migration.time_limit_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LimitAction {
    /// Stop the migration as a cancel does: the source runs on.
    #[default]
    Cancel,
    /// Switch over now, whatever the downtime (reported as it was).
    Force,
}

/// A migration's time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeLimit {
    pub after: Duration,
    pub action: LimitAction,
}

/// What the time limit asks for once the migration has run for `elapsed` (`None`: nothing yet).
pub fn over_limit(limit: Option<TimeLimit>, elapsed: Duration) -> Option<LimitAction> {
    limit.filter(|l| elapsed >= l.after).map(|l| l.action)
}

/// The switchover a forced time limit makes, with its predicted downtime.
pub fn forced(rounds: &[RoundStats], pending: u64) -> SwitchReason {
    SwitchReason::TimeLimit { predicted_ms: millis(predict(rounds, pending)) }
}

/// A prediction in milliseconds (infinite when the bandwidth is unknown).
fn millis(p: Duration) -> f64 {
    if p == Duration::MAX {
        f64::INFINITY
    } else {
        p.as_secs_f64() * 1e3
    }
}

/// How long to wait before sending more, so that `sent` bytes since `elapsed` ago stay
/// within `rate` bytes per second (0: no cap).
pub fn pace(rate: u64, sent: u64, elapsed: Duration) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(sent as f64 / rate as f64).saturating_sub(elapsed)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Continue,
    Switchover(SwitchReason),
}

/// Bandwidth in bytes/s over the given rounds (data pages only count their bytes).
pub fn bandwidth(rounds: &[RoundStats]) -> Option<f64> {
    let last = rounds.last()?;
    let secs = last.elapsed.as_secs_f64();
    if secs > 0.0 && last.bytes > 0 {
        Some(last.bytes as f64 / secs)
    } else {
        None
    }
}

/// Predicted duration of a final round that sends `pending` pages.
pub fn predict(rounds: &[RoundStats], pending: u64) -> Duration {
    if pending == 0 {
        return Duration::ZERO;
    }
    match bandwidth(rounds) {
        Some(bw) => Duration::from_secs_f64(pending as f64 * PAGE as f64 / bw),
        None => Duration::MAX,
    }
}

/// Decide after a round whether to switch over, given `pending` dirty pages.
pub fn decide(cfg: &PolicyConfig, rounds: &[RoundStats], pending: u64) -> Decision {
    let p = predict(rounds, pending);
    let ms = millis(p);
    let done = rounds.len() as u32;
    if p <= cfg.downtime_target && done >= cfg.min_rounds.min(cfg.max_rounds) {
        Decision::Switchover(SwitchReason::Converged { predicted_ms: ms })
    } else if done >= cfg.max_rounds {
        Decision::Switchover(SwitchReason::RoundLimit { predicted_ms: ms })
    } else {
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(round: u32, bytes: u64, ms: u64) -> RoundStats {
        RoundStats { round, pages: bytes / PAGE, bytes, elapsed: Duration::from_millis(ms), ..Default::default() }
    }

    const AC: AutoConverge = AutoConverge { enabled: true, initial: 20, increment: 10, max: 99 };

    #[test]
    fn throttle_steps_only_when_outrun_twice() {
        let mut rs = vec![r(0, 4096 * 1000, 10)];
        assert_eq!(next_throttle(&AC, &rs, 0), 0);
        let mut x = r(1, 4096 * 1000, 10);
        x.dirty_after = 900;
        rs.push(x);
        assert_eq!(next_throttle(&AC, &rs, 0), 0, "needs round 0 plus two outrun rounds");
        rs.push(x);
        assert_eq!(next_throttle(&AC, &rs, 0), 20);
        assert_eq!(next_throttle(&AC, &rs, 20), 30);
        assert_eq!(next_throttle(&AC, &rs, 95), 99);
        assert_eq!(next_throttle(&AutoConverge { enabled: false, ..AC }, &rs, 0), 0);
        let mut calm = x;
        calm.dirty_after = 100;
        rs.push(calm);
        assert_eq!(next_throttle(&AC, &rs, 30), 30, "holds when the guest no longer outruns");
    }

    #[test]
    fn converges_when_final_round_fits() {
        let cfg = PolicyConfig {
            downtime_target: Duration::from_millis(50),
            min_rounds: 1,
            max_rounds: 10,
            auto_converge: AC,
        };
        // 1 GB/s: 100 pages take ~0.4 ms.
        let rounds = [r(0, 1_000_000_000, 1000)];
        assert!(matches!(decide(&cfg, &rounds, 100), Decision::Switchover(SwitchReason::Converged { .. })));
        // 100k pages = 410 MB = 410 ms > 50 ms.
        assert_eq!(decide(&cfg, &rounds, 100_000), Decision::Continue);
        assert!(matches!(decide(&cfg, &rounds, 0), Decision::Switchover(SwitchReason::Converged { .. })));
    }

    #[test]
    fn time_limit_and_pacing() {
        let l = Some(TimeLimit { after: Duration::from_secs(2), action: LimitAction::Force });
        assert_eq!(over_limit(l, Duration::from_secs(1)), None);
        assert_eq!(over_limit(l, Duration::from_secs(2)), Some(LimitAction::Force));
        assert_eq!(over_limit(None, Duration::from_secs(99)), None);
        assert!(matches!(forced(&[r(0, 1_000_000_000, 1000)], 100), SwitchReason::TimeLimit { .. }));
        // 1 MiB at 1 MiB/s: due at 1 s; 0.25 s in, 0.75 s to wait; 2 s in, none.
        assert_eq!(pace(1 << 20, 1 << 20, Duration::from_millis(250)), Duration::from_millis(750));
        assert_eq!(pace(1 << 20, 1 << 20, Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(pace(0, u64::MAX, Duration::ZERO), Duration::ZERO, "no cap");
    }

    #[test]
    fn round_limit_forces_switchover() {
        let cfg =
            PolicyConfig { downtime_target: Duration::from_millis(1), min_rounds: 1, max_rounds: 3, auto_converge: AC };
        let rounds = [r(0, 4096, 1000), r(1, 4096, 1000), r(2, 4096, 1000)];
        assert!(matches!(decide(&cfg, &rounds, 1_000_000), Decision::Switchover(SwitchReason::RoundLimit { .. })));
        assert_eq!(decide(&cfg, &rounds[..2], 1_000_000), Decision::Continue);
    }

    #[test]
    fn unknown_bandwidth_never_converges_early() {
        let cfg = PolicyConfig {
            downtime_target: Duration::from_millis(50),
            min_rounds: 1,
            max_rounds: 10,
            auto_converge: AC,
        };
        assert_eq!(decide(&cfg, &[r(0, 0, 0)], 10), Decision::Continue);
    }

    #[test]
    fn min_rounds_holds_a_converged_migration_in_precopy() {
        let cfg = PolicyConfig {
            downtime_target: Duration::from_millis(50),
            min_rounds: 3,
            max_rounds: 10,
            auto_converge: AC,
        };
        let rounds = [r(0, 1_000_000_000, 1000), r(1, 4096, 1), r(2, 4096, 1)];
        // Nothing pending: converged by the target, but fewer than 3 rounds ran.
        assert_eq!(decide(&cfg, &rounds[..1], 0), Decision::Continue);
        assert_eq!(decide(&cfg, &rounds[..2], 0), Decision::Continue);
        assert!(matches!(decide(&cfg, &rounds, 0), Decision::Switchover(SwitchReason::Converged { .. })));
        // max_rounds still forces the switchover when it is the smaller of the two.
        let capped = PolicyConfig { max_rounds: 2, min_rounds: 5, ..cfg };
        assert!(matches!(decide(&capped, &rounds[..2], 0), Decision::Switchover(SwitchReason::Converged { .. })));
    }
}
