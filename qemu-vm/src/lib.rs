//! qemu-vm: a running QEMU process's VM behind the engine's VM boundary.
//!
//! migaccel attaches to QEMU without patching it: a pidfd pins the process, `pidfd_getfd`
//! hands over its guest-RAM memfd ([`process`]), QMP ([`qmp`]) pauses, resumes and switches
//! QEMU's dirty logging, the eBPF probes follow the pages the guest and QEMU itself write
//! ([`dirty`]), and QEMU's own migration, told to leave shared RAM out
//! (`x-ignore-shared`), produces and consumes the device state, which migaccel carries over
//! its authenticated channel. [`QemuVm`] is a source, [`QemuVms`] creates the destination.
#![forbid(unsafe_code)]

pub mod attach;
pub mod dirty;
pub mod error;
pub mod incoming;
pub mod layout;
pub mod process;
pub mod qmp;
pub mod source;

pub use error::QemuError;
pub use incoming::{QemuIncoming, QemuVms};
pub use source::QemuVm;
