//! What an operator (or a tool driving migaccel) sees while a migration runs: one line per
//! event, as text or as one JSON object per line whose fields follow QMP's `query-migrate`
//! where they apply (`status`, `total-time`, `expected-downtime`, `ram.transferred`,
//! `ram.remaining`, `ram.mbps`, `ram.dirty-pages-rate`, `ram.duplicate`, `ram.normal`).
use std::time::{Duration, Instant};

use serde_json::json;

use crate::policy::{predict, SwitchReason};
use crate::source::Event;
use crate::wire::frame::PAGE;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Text,
    Json,
}

/// Turns a migration's events into progress lines.
pub struct Progress {
    style: Style,
    t0: Instant,
    ram_bytes: u64,
    transferred: u64,
    pages: u64,
    zero: u64,
    remaining: u64,
    mbps: f64,
}

impl Progress {
    /// Progress of a migration of a VM with `ram_bytes` of RAM, starting now.
    pub fn new(style: Style, ram_bytes: u64) -> Self {
        Progress {
            style,
            t0: Instant::now(),
            ram_bytes,
            transferred: 0,
            pages: 0,
            zero: 0,
            remaining: ram_bytes,
            mbps: 0.0,
        }
    }

    /// The line for `e`.
    pub fn line(&mut self, e: &Event) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (status, phase, round, expected, eta, rate) = match e {
            Event::Accepted => ("setup", "accepted", None, None, None, None),
            Event::Round(r) => {
                self.account(r.pages, r.zero_pages, r.bytes);
                self.remaining = r.dirty_after * PAGE;
                let secs = r.elapsed.as_secs_f64();
                self.mbps = if secs > 0.0 { r.bytes as f64 * 8.0 / 1e6 / secs } else { 0.0 };
                let rate = if secs > 0.0 { r.dirty_after as f64 / secs } else { 0.0 };
                let p = predict(std::slice::from_ref(r), r.dirty_after);
                let expected = (p != Duration::MAX).then(|| ms(p));
                let eta = (self.mbps > 0.0).then(|| self.remaining as f64 * 8.0 / 1e6 / self.mbps * 1e3);
                ("active", "precopy", Some(r.round), expected, eta, Some(rate))
            }
            Event::Switchover(s) => {
                let p = match s {
                    SwitchReason::Converged { predicted_ms }
                    | SwitchReason::RoundLimit { predicted_ms }
                    | SwitchReason::TimeLimit { predicted_ms } => *predicted_ms,
                };
                ("device", "switchover", None, p.is_finite().then_some(p), None, None)
            }
            Event::Final(r) => {
                self.account(r.pages, r.zero_pages, r.bytes);
                self.remaining = 0;
                ("device", "final-round", Some(r.round), None, None, None)
            }
            Event::Resumed { downtime } => ("completed", "resumed", None, Some(ms(*downtime)), None, None),
        };
        let total = ms(self.t0.elapsed());
        match self.style {
            Style::Json => json!({
                "status": status,
                "phase": phase,
                "round": round,
                "total-time": total,
                "expected-downtime": expected,
                "downtime": matches!(e, Event::Resumed { .. }).then_some(expected).flatten(),
                "eta": eta,
                "ram": {
                    "total": self.ram_bytes,
                    "transferred": self.transferred,
                    "remaining": self.remaining,
                    "mbps": self.mbps,
                    "dirty-pages-rate": rate,
                    "duplicate": self.zero,
                    "normal": self.pages - self.zero,
                },
            })
            .to_string(),
            Style::Text => {
                let mib = |b: u64| b as f64 / (1 << 20) as f64;
                let what = match e {
                    Event::Accepted => "destination accepted the VM",
                    Event::Round(_) => "precopy round",
                    Event::Switchover(_) => "switchover",
                    Event::Final(_) => "final round (vCPUs stopped)",
                    Event::Resumed { .. } => "destination resumed",
                };
                let mut s = format!("[{total:>8.1} ms] {what}");
                if let Some(r) = round {
                    s += &format!(" {r}");
                }
                s += &format!(
                    ": {:.1} of {:.0} MiB sent, {:.1} MiB left, {:.0} Mbit/s",
                    mib(self.transferred),
                    mib(self.ram_bytes),
                    mib(self.remaining),
                    self.mbps
                );
                if let Some(r) = rate {
                    s += &format!(", dirty {r:.0} pages/s");
                }
                match e {
                    Event::Resumed { .. } => s += &format!(", downtime {:.1} ms", expected.unwrap_or(0.0)),
                    _ => {
                        if let Some(x) = expected {
                            s += &format!(", predicted downtime {x:.1} ms");
                        }
                    }
                }
                if let Some(x) = eta {
                    s += &format!(", eta {x:.0} ms");
                }
                s
            }
        }
    }

    /// Bytes sent so far.
    pub fn transferred(&self) -> u64 {
        self.transferred
    }

    fn account(&mut self, pages: u64, zero: u64, bytes: u64) {
        self.pages += pages;
        self.zero += zero;
        self.transferred += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RoundStats;

    fn events() -> Vec<Event> {
        let r0 = RoundStats {
            round: 0,
            pages: 1000,
            zero_pages: 400,
            bytes: 600 * 4096,
            elapsed: Duration::from_millis(10),
            dirty_after: 50,
            ..Default::default()
        };
        let fin = RoundStats { round: 1, pages: 50, bytes: 50 * 4096, ..Default::default() };
        vec![
            Event::Accepted,
            Event::Round(r0),
            Event::Switchover(SwitchReason::Converged { predicted_ms: 0.8 }),
            Event::Final(fin),
            Event::Resumed { downtime: Duration::from_millis(12) },
        ]
    }

    #[test]
    fn json_lines_parse_and_carry_the_query_migrate_fields() {
        let mut p = Progress::new(Style::Json, 1000 * 4096);
        let lines: Vec<serde_json::Value> =
            events().iter().map(|e| serde_json::from_str(&p.line(e)).expect("one JSON object per line")).collect();
        let status: Vec<&str> = lines.iter().map(|l| l["status"].as_str().unwrap()).collect();
        assert_eq!(status, ["setup", "active", "device", "device", "completed"]);
        let r = &lines[1];
        assert_eq!(r["round"], 0);
        assert_eq!(r["ram"]["transferred"], 600 * 4096);
        assert_eq!(r["ram"]["remaining"], 50 * 4096);
        assert_eq!(r["ram"]["duplicate"], 400);
        assert_eq!(r["ram"]["normal"], 600);
        assert_eq!(r["ram"]["dirty-pages-rate"], 5000.0);
        assert!(r["expected-downtime"].as_f64().unwrap() > 0.0);
        assert!(r["eta"].as_f64().unwrap() > 0.0);
        assert_eq!(lines[4]["downtime"], 12.0);
        assert_eq!(lines[4]["ram"]["transferred"], 650 * 4096);
        assert!(lines.iter().all(|l| !l.to_string().contains('\n')));
    }

    #[test]
    fn text_lines_name_the_phase_and_what_is_left() {
        let mut p = Progress::new(Style::Text, 1000 * 4096);
        let lines: Vec<String> = events().iter().map(|e| p.line(e)).collect();
        assert!(lines[0].contains("destination accepted the VM"), "{}", lines[0]);
        assert!(lines[1].contains("precopy round 0") && lines[1].contains("0.2 MiB left"), "{}", lines[1]);
        assert!(lines[4].contains("downtime 12.0 ms"), "{}", lines[4]);
    }
}
