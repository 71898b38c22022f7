//! The wire: everything between two migaccel processes.
//!
//! - [`frame`]: the fixed, versioned frame header, frame kinds and their size caps;
//! - [`payload`]: one type per frame payload, each with its checks;
//! - [`framer`]: sequence numbers, header checks and the send fence of one connection;
//! - [`transport`] and [`uring`]: frames over TCP (blocking `writev`/`readv`, io_uring
//!   copy or zero-copy); [`connect`] opens them, [`error`] says what failed;
//! - [`auth`], [`keys`], [`seal`]: the handshake, its keys, and sealed frames after it;
//! - [`accept`], [`lobby`]: a destination's listener, handing each connection to its
//!   session (control, data stream, handover query).
pub mod accept;
pub mod auth;
pub mod connect;
pub mod error;
pub mod frame;
pub mod framer;
pub mod keys;
pub mod lobby;
pub mod payload;
pub mod seal;
pub mod transport;
pub mod uring;
