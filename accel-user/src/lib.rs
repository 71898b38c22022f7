//! accel-user: the migaccel engine.
//!
//! - [`config`]: the TOML config and its validation;
//! - [`protocol`]: the wire protocol (framing, payloads, caps);
//! - [`transport`]: the transport trait and blocking TCP;
//! - [`policy`]: convergence as a pure function over round metrics;
//! - [`source`]: precopy, switchover, recovery, reaching the VM only through
//!   [`kvm_hooks::migratable::Migratable`];
//! - [`dest`]: the receiving state machine;
//! - [`handover`]: the destination's resume, serialised with the source's handover queries;
//! - [`session`]: flows shared by the CLI, tests and benches.
#![deny(clippy::undocumented_unsafe_blocks)]
#![forbid(unsafe_code)]

pub mod accept;
pub mod auth;
pub mod cancel;
pub mod config;
pub mod dest;
#[cfg(test)]
mod engine_tests;
#[cfg(any(test, feature = "fake-vm"))]
pub mod fake_vm;
pub mod handover;
pub mod host;
pub mod keys;
pub mod lobby;
pub mod plot;
pub mod policy;
pub mod progress;
pub mod protocol;
pub mod report;
pub mod seal;
pub mod session;
pub mod source;
pub mod streams;
pub mod transport;
pub mod verify;
pub mod watch;
