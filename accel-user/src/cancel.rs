//! An operator's request to stop a migration (SIGINT, SIGTERM): set from anywhere, looked at
//! by the engine where stopping is clean. Before the commit point a cancelled source
//! resumes its VM with every dirty bit kept and a cancelled destination discards its copy;
//! after it the handover goes on (two copies must never run), and the reports say so.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Inner {
    set: AtomicBool,
    why: Mutex<Option<String>>,
}

/// A shared cancel flag with the reason it was set for (the first one given).
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<Inner>);

impl Cancel {
    pub fn new() -> Self {
        Cancel::default()
    }

    /// Ask the migration to stop, for `why` ("SIGTERM").
    pub fn cancel(&self, why: impl Into<String>) {
        self.0.why.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| why.into());
        self.0.set.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.set.load(Ordering::Acquire)
    }

    /// Why it was cancelled, once it was.
    pub fn reason(&self) -> Option<String> {
        self.is_cancelled().then(|| self.0.why.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_is_kept_and_seen_by_every_clone() {
        let c = Cancel::new();
        let seen = c.clone();
        assert!(!seen.is_cancelled());
        assert_eq!(seen.reason(), None);
        c.cancel("SIGTERM");
        c.cancel("SIGINT");
        assert!(seen.is_cancelled());
        assert_eq!(seen.reason().as_deref(), Some("SIGTERM"));
    }
}
