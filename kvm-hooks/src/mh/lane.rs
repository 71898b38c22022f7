//! The host's end of one MH lane: its request and completion rings, its doorbell and the
//! requests it has in flight. [`super::MhHost`] routes requests to lanes; this file drives
//! one lane's rings and checks every value the guest wrote into them.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use mh_abi::{self as abi, CompStatus, Completion, LaneAddrs, Request};

use super::{Bell, MhError, Result};
use crate::memory::GuestRam;

/// A request in flight and the submission (`MhHost::start` call) it belongs to.
#[derive(Debug, Clone, Copy)]
pub(super) struct InFlight {
    pub req: Request,
    pub ticket: u64,
}

#[derive(Debug)]
pub(super) struct Lane {
    pub index: u32,
    pub addrs: LaneAddrs,
    pub bell: Arc<Bell>,
    ram: Arc<GuestRam>,
    req_prod: u32,
    comp_cons: u32,
    next_id: u32,
    pub inflight: VecDeque<InFlight>,
    /// The oldest this many requests in flight were abandoned: their completions are
    /// still checked for ring integrity, then dropped.
    abandoned: usize,
}

impl Lane {
    pub fn new(index: u32, ram: Arc<GuestRam>, bell: Arc<Bell>) -> Lane {
        Lane {
            index,
            addrs: abi::lane_addrs(index),
            bell,
            ram,
            req_prod: 0,
            comp_cons: 0,
            next_id: 1,
            inflight: VecDeque::new(),
            abandoned: 0,
        }
    }

    fn atomic(&self, gpa: u64) -> Result<&AtomicU32> {
        let p = self.ram.host_addr(gpa)?;
        debug_assert!(gpa.is_multiple_of(4) && gpa + 4 <= self.ram.size());
        // SAFETY: `gpa` is one of the ring index fields (4-aligned, inside the MH region,
        // checked by host_addr); the mapping lives as long as `self.ram`, which outlives the
        // returned reference. The guest accesses the same word with 32-bit loads and stores.
        Ok(unsafe { &*(p as *const AtomicU32) })
    }

    /// Room left in the request ring.
    pub fn room(&self) -> usize {
        abi::RING_ENTRIES as usize - self.inflight.len()
    }

    /// Queue a request (the caller checked the room) as part of submission `ticket`.
    pub fn submit(&mut self, mut r: Request, ticket: u64) -> Result<()> {
        if self.room() == 0 {
            return Err(MhError::BadRequest(format!(
                "lane {}: {} requests already in flight",
                self.index,
                self.inflight.len()
            )));
        }
        r.id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let at = self.addrs.req + abi::RING_BASE + u64::from(self.req_prod % abi::RING_ENTRIES) * abi::REQ_SIZE;
        self.ram.write(at, &r.encode())?;
        self.req_prod = self.req_prod.wrapping_add(1);
        self.atomic(self.addrs.req + abi::RING_PROD)?.store(self.req_prod, Ordering::Release);
        self.inflight.push_back(InFlight { req: r, ticket });
        Ok(())
    }

    /// Ring this lane's host -> MH doorbell.
    pub fn doorbell(&self) {
        self.bell.lock().rung += 1;
        self.bell.notify();
    }

    pub fn check_fault(&self) -> Result<()> {
        match &self.bell.lock().fault {
            Some(f) => Err(MhError::Faulted(format!("lane {}: {f}", self.index))),
            None => Ok(()),
        }
    }

    pub fn abandon(&mut self) {
        self.abandoned = self.inflight.len();
    }

    /// Take the completions posted so far, in request order, each checked against its
    /// request; also returns how many were taken, abandoned ones included. Does not wait.
    pub fn take_completions(&mut self) -> Result<(usize, Vec<(Request, Completion)>)> {
        let comp = self.addrs.comp;
        let prod = self.atomic(comp + abi::RING_PROD)?.load(Ordering::Acquire);
        let avail = prod.wrapping_sub(self.comp_cons);
        if avail as usize > self.inflight.len() {
            return Err(MhError::BadCompletion(format!(
                "lane {}: producer index {prod} claims {avail} completions, only {} requests are in flight",
                self.index,
                self.inflight.len()
            )));
        }
        let mut out = Vec::with_capacity(avail as usize);
        for _ in 0..avail {
            let at = comp + abi::RING_BASE + u64::from(self.comp_cons % abi::RING_ENTRIES) * abi::COMP_SIZE;
            let mut raw = [0u8; abi::COMP_SIZE as usize];
            self.ram.read(at, &mut raw)?;
            let c = Completion::decode(&raw);
            let r = self.inflight.pop_front().expect("avail <= inflight").req;
            if c.id != r.id {
                return Err(MhError::BadCompletion(format!("completion for id {} where id {} was next", c.id, r.id)));
            }
            if CompStatus::from_u32(c.status) == CompStatus::Invalid {
                return Err(MhError::BadCompletion(format!("unknown status {} for request {}", c.status, r.id)));
            }
            if c.done > r.count {
                return Err(MhError::BadCompletion(format!("{} pages done of a {}-page request", c.done, r.count)));
            }
            self.comp_cons = self.comp_cons.wrapping_add(1);
            if self.abandoned > 0 {
                self.abandoned -= 1;
            } else {
                out.push((r, c));
            }
        }
        self.atomic(comp + abi::RING_CONS)?.store(self.comp_cons, Ordering::Release);
        Ok((avail as usize, out))
    }

    /// Whether a request of a submission older than `ticket` is still in flight.
    pub fn holds_older_than(&self, ticket: u64) -> bool {
        self.inflight.front().is_some_and(|f| f.ticket < ticket)
    }
}
