//! accel-user: the migaccel engine, its wire and the application around it. The folders
//! follow the data flow:
//!
//! - [`wire`]: frames, payloads, the framer, transports, the handshake and sealing, the
//!   destination's listener;
//! - [`source`]: precopy rounds, page routing (direct, private through the Migration
//!   Handler, deferred), switchover, recovery and the handover query, the data-stream
//!   workers; it reaches a VM only through [`kvm_hooks::migratable::Migratable`];
//! - [`dest`]: the receiving state machine, the data-stream readers, the confidential
//!   import, the resume serialised with the source's handover queries;
//! - [`policy`], [`report`], [`cancel`]: convergence as a pure function over round
//!   metrics, what a migration reports, the operator's cancel, shared by both sides;
//! - [`host`]: what this host can hold (memory, open files);
//! - [`app`]: the config, sessions shared by the CLI, tests and benches, progress, plots,
//!   verification and the eBPF watch.
#![deny(clippy::undocumented_unsafe_blocks)]
#![forbid(unsafe_code)]

pub mod app;
pub mod cancel;
pub mod dest;
#[cfg(test)]
mod engine_tests;
#[cfg(any(test, feature = "fake-vm"))]
pub mod fake_vm;
pub mod host;
pub mod policy;
pub mod report;
pub mod source;
pub mod wire;
