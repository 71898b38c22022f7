//! The io_uring transport: sends through `SENDMSG` (copy) or `SEND_ZC`/`SENDMSG_ZC`
//! (zero-copy, guest RAM as fixed buffers where allowed), receives through `RECV`.
use std::io;
use std::net::TcpStream;
use std::time::Duration;

use kvm_hooks::memory::GuestRam;

use super::error::TransportError;
use super::frame::Part;
use super::frame::{FrameKind, HEADER_LEN};
use super::framer::{Framer, SHUT_FOR_SENDING};
use super::transport::{stream_readable, Transport, TransportMode};

/// Notifications after which `auto` decides.
const AUTO_DECIDE_AFTER: u64 = 16;

/// io_uring transport over one TCP connection.
pub struct UringTransport {
    stream: TcpStream,
    tx: kvm_hooks::uring::UringSender,
    rx: kvm_hooks::uring::UringReceiver,
    mode: TransportMode,
    decided: bool,
    /// Sequence numbers and the send fence: once a send failed or timed out, the sender
    /// shut the write side (see `UringSender`'s timeout handling) and nothing more is sent.
    framer: Framer,
    timeout: Duration,
    sent: u64,
    /// How long a send may make no progress (receives have their own, changeable limit).
    send_timeout: Duration,
}

impl UringTransport {
    /// The sending ring for `mode`, not yet tied to a socket (see [`prepare`]).
    pub(crate) fn sender(
        mode: TransportMode,
        ram: Option<&GuestRam>,
        fixed: bool,
        timeout: Duration,
    ) -> Result<kvm_hooks::uring::UringSender, TransportError> {
        use kvm_hooks::uring::SendMode;
        let io = |op: &'static str| move |source| TransportError::Io { op, source };
        let mut send_mode = match mode {
            TransportMode::Zerocopy | TransportMode::Auto => SendMode::ZeroCopy,
            _ => SendMode::Copy,
        };
        if send_mode == SendMode::ZeroCopy {
            let sup = kvm_hooks::uring::probe().map_err(io("probe io_uring"))?;
            if !(sup.send_zc && sup.sendmsg_zc) {
                tracing::warn!("kernel lacks IORING_OP_SEND_ZC/SENDMSG_ZC: using io_uring copy sends");
                send_mode = SendMode::Copy;
            }
        }
        let (tx, note) =
            kvm_hooks::uring::UringSender::unbound(send_mode, ram, fixed, timeout).map_err(io("create io_uring"))?;
        if let Some(n) = note {
            tracing::warn!("{n}");
        }
        Ok(tx)
    }

    pub(crate) fn bind(
        stream: TcpStream,
        mode: TransportMode,
        mut tx: kvm_hooks::uring::UringSender,
        timeout: Duration,
        framer: Framer,
    ) -> Result<Self, TransportError> {
        use std::os::fd::AsRawFd;
        let io = |op: &'static str| move |source| TransportError::Io { op, source };
        stream.set_nodelay(true).map_err(io("configure socket"))?;
        let fd = stream.as_raw_fd();
        tx.bind(fd);
        let rx = kvm_hooks::uring::UringReceiver::new(fd, timeout).map_err(io("create io_uring"))?;
        Ok(UringTransport {
            stream,
            tx,
            rx,
            mode,
            decided: mode != TransportMode::Auto,
            framer,
            timeout,
            sent: 0,
            send_timeout: timeout,
        })
    }

    /// Send one frame's pieces; any failure leaves the connection broken for sending.
    fn send_pieces(
        &mut self,
        pieces: &[kvm_hooks::uring::Piece<'_>],
        ram: Option<&GuestRam>,
    ) -> Result<usize, TransportError> {
        self.framer.check_open()?;
        match self.tx.send(pieces, ram) {
            Ok(n) => Ok(n),
            Err(e) => {
                let e = TransportError::io("io_uring send", e, self.send_timeout);
                self.break_off(&e, self.framer.send_seq());
                Err(e)
            }
        }
    }

    /// Nothing is sent on this connection again; frames from `unsent` on do not count as
    /// sent. The sender already shut the socket after a timeout; any other failure shuts it
    /// here, so a later send cannot slip out either.
    fn break_off(&mut self, why: &TransportError, unsent: u64) {
        self.framer.close_at(why, unsent);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// A frame reached the kernel whole (it counts as sent), but what followed its send
    /// failed (waiting for zero-copy notifications): the frame stays sent, the connection
    /// sends nothing more.
    fn after_send(&mut self, r: Result<(), TransportError>) -> Result<(), TransportError> {
        if let Err(e) = r {
            let seq = self.framer.send_seq();
            tracing::warn!("{e} after frame {} was sent: the connection sends nothing more", seq - 1);
            self.break_off(&e, seq);
        }
        Ok(())
    }

    fn map(&self, op: &'static str, e: io::Error) -> TransportError {
        TransportError::io(op, e, self.timeout)
    }

    /// `auto`: once enough notifications came back, keep zero-copy only if the kernel
    /// really avoided the copy.
    fn decide(&mut self) -> Result<(), TransportError> {
        if !self.decided && self.tx.stats.notifs >= AUTO_DECIDE_AFTER {
            self.decided = true;
            let st = self.tx.stats;
            if st.zerocopy == 0 {
                tracing::info!(
                    copied = st.copied,
                    "auto: the kernel copied every zero-copy send (loopback/veth): switching to io_uring copy sends"
                );
                self.tx.flush().map_err(|e| TransportError::io("io_uring flush", e, self.send_timeout))?;
                self.tx.set_mode(kvm_hooks::uring::SendMode::Copy);
            } else {
                tracing::info!(
                    zerocopy = st.zerocopy,
                    copied = st.copied,
                    "auto: zero-copy works on this path: keeping it"
                );
            }
        }
        Ok(())
    }
}

impl Transport for UringTransport {
    fn send_frame(
        &mut self,
        kind: FrameKind,
        parts: &[Part<'_>],
        ram: Option<&GuestRam>,
    ) -> Result<(), TransportError> {
        use kvm_hooks::uring::Piece;
        let hdr = self.framer.header(kind, parts)?.encode();
        let mut pieces = Vec::with_capacity(parts.len() + 1);
        pieces.push(Piece::Host(&hdr));
        let mut seen_guest = false;
        for p in parts {
            match *p {
                Part::Buf(b) if seen_guest => {
                    return Err(TransportError::Guest(format!(
                        "{kind:?}: host bytes after guest bytes ({} bytes)",
                        b.len()
                    )))
                }
                Part::Buf(b) => pieces.push(Piece::Host(b)),
                Part::Guest { gpa, len } => {
                    seen_guest = true;
                    pieces.push(Piece::Guest { gpa, len });
                }
            }
        }
        let n = self.send_pieces(&pieces, ram)?;
        self.sent += n as u64;
        self.framer.sent();
        let r = self.decide();
        self.after_send(r)
    }

    fn send_raw(&mut self, hdr: Option<&[u8; HEADER_LEN]>, body: &[u8], last: bool) -> Result<(), TransportError> {
        use kvm_hooks::uring::Piece;
        self.framer.check_piece(hdr)?;
        let n = match hdr {
            Some(hdr) => self.send_pieces(&[Piece::Host(hdr), Piece::Bytes(body)], None)?,
            None => self.send_pieces(&[Piece::Bytes(body)], None)?,
        };
        self.sent += n as u64;
        self.framer.piece_sent(last);
        // A zero-copy send still reads `body` after it returns: the caller reuses it next.
        // If the notifications do not come, the frame is in the kernel all the same.
        let mut r = Ok(());
        if self.tx.mode() == kvm_hooks::uring::SendMode::ZeroCopy {
            r = self
                .tx
                .flush()
                .map_err(|e| TransportError::io("waiting for zero-copy completions", e, self.send_timeout));
        }
        let r = r.and_then(|()| self.decide());
        if last {
            return self.after_send(r);
        }
        // A frame cut short does not count as sent.
        r.inspect_err(|e| self.break_off(e, self.framer.send_seq()))
    }

    fn framer(&self) -> &Framer {
        &self.framer
    }

    fn framer_mut(&mut self) -> &mut Framer {
        &mut self.framer
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.rx.recv_exact(buf).map_err(|e| self.map("io_uring receive", e))
    }

    fn recv_into_guest(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> Result<(), TransportError> {
        ram.iovec(gpa, len).map_err(|e| TransportError::Guest(e.to_string()))?;
        self.rx.recv_into_guest(ram, gpa, len).map_err(|e| self.map("io_uring receive pages", e))
    }

    fn set_recv_timeout(&mut self, t: Duration) {
        self.timeout = t;
        self.rx.set_timeout(t);
    }

    fn shutdown(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn shutdown_write(&mut self) {
        self.framer.close(SHUT_FOR_SENDING);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    fn bytes_sent(&self) -> u64 {
        self.sent
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.tx.flush().map_err(|e| TransportError::io("waiting for zero-copy completions", e, self.send_timeout))
    }

    fn zc_stats(&self) -> Option<kvm_hooks::uring::ZcStats> {
        (self.mode != TransportMode::Copy).then_some(self.tx.stats)
    }

    fn shutdown_handle(&self) -> Option<TcpStream> {
        self.stream.try_clone().ok()
    }

    fn wait_readable(&self, timeout: Duration) -> Result<bool, TransportError> {
        stream_readable(&self.stream, timeout)
    }

    fn describe(&self) -> String {
        let m = match self.tx.mode() {
            kvm_hooks::uring::SendMode::Copy => "io_uring copy",
            kvm_hooks::uring::SendMode::ZeroCopy if self.tx.fixed_buffers() => "io_uring zero-copy, fixed buffers",
            kvm_hooks::uring::SendMode::ZeroCopy => "io_uring zero-copy",
        };
        format!("{m} ({:?} requested)", self.mode).to_lowercase()
    }
}
