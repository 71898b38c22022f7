//! embedded-vmm: a minimal VMM on `kvm-hooks` that boots the project's test guests, runs
//! one thread per vCPU (plus one for the Migration Handler), pauses and resumes them, and
//! stands behind the engine's VM boundary ([`kvm_hooks::migratable`]) as a source
//! ([`vmm::Machine`]) and as a destination factory ([`EmbeddedVms`]).
//!
//! It is the lab the engine is tested in; the engine itself never names it.
#![deny(clippy::undocumented_unsafe_blocks)]

mod boundary;
pub mod guest;
pub mod vmm;

pub use boundary::EmbeddedVms;
