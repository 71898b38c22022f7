//! The application around the engine: the config file, the flows the CLI, tests and
//! benches share (a session: boot or attach, connect, migrate, verify), what runs beside a
//! migration (progress, the eBPF watch of a VM) and what it draws afterwards.
pub mod config;
pub mod plot;
pub mod progress;
pub mod session;
pub mod verify;
pub mod watch;
