//! A QMP client: one Unix-socket connection to a QEMU process's monitor, commands in
//! turn, asynchronous events skipped.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::QemuError;

/// Longest wait for one QMP answer: QEMU answers in milliseconds, so only a hung QEMU (or a
/// socket that is not a QMP monitor) reaches it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// QEMU's own migration, as `query-migrate` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Migration {
    None,
    /// Under way; the whole report.
    Active(String),
    Completed,
    /// Failed or cancelled, and why.
    Failed(String),
}

pub struct Qmp {
    path: PathBuf,
    conn: BufReader<UnixStream>,
    /// A read or write failed: a late answer would be taken for the next command's, so
    /// the connection is not used again.
    broken: bool,
}

impl Qmp {
    /// Connect to the QMP socket at `path`, check that process `pid` serves it, and leave
    /// capabilities negotiation mode.
    pub fn connect(path: &Path, pid: u32) -> Result<Qmp, QemuError> {
        let bad = |msg: String| QemuError::Qmp { path: path.to_path_buf(), msg };
        let s = UnixStream::connect(path).map_err(|e| {
            bad(format!("cannot connect ({e}); start QEMU with -qmp unix:{},server=on,wait=off", path.display()))
        })?;
        let peer = kvm_hooks::process::peer_pid(&s).map_err(|e| bad(format!("SO_PEERCRED: {e}")))?;
        if peer != pid {
            return Err(bad(format!("the socket is served by process {peer}, not by QEMU process {pid}")));
        }
        s.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(|e| bad(e.to_string()))?;
        let mut q = Qmp { path: path.to_path_buf(), conn: BufReader::new(s), broken: false };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(bad(format!("not a QMP monitor: it greeted with {greeting}")));
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        let n = match self.conn.read_line(&mut line) {
            Ok(n) => n,
            Err(e) => {
                self.broken = true;
                return Err(self.err(format!("read: {e}")));
            }
        };
        if n == 0 {
            return Err(self.err("QEMU closed the QMP connection (did it exit?)".into()));
        }
        serde_json::from_str(&line).map_err(|e| self.err(format!("not JSON ({e}): {}", line.trim())))
    }

    fn err(&self, msg: String) -> QemuError {
        QemuError::Qmp { path: self.path.clone(), msg }
    }

    /// Run `name` with `args`; its `return` value, or QEMU's error as [`QemuError::Command`].
    pub fn cmd(&mut self, name: &str, args: Value) -> Result<Value, QemuError> {
        if self.broken {
            return Err(self.err(format!("{name}: the connection failed earlier")));
        }
        let line = json!({ "execute": name, "arguments": args }).to_string();
        if let Err(e) = writeln!(self.conn.get_mut(), "{line}") {
            self.broken = true;
            return Err(self.err(format!("write {name}: {e}")));
        }
        loop {
            let v = self.read_message()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("no description");
                return Err(QemuError::Command { command: name.to_string(), msg: desc.to_string() });
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// A human monitor command's text output.
    pub fn hmp(&mut self, command: &str) -> Result<String, QemuError> {
        let v = self.cmd("human-monitor-command", json!({ "command-line": command }))?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`, …).
    pub fn status(&mut self) -> Result<String, QemuError> {
        let v = self.cmd("query-status", json!({}))?;
        Ok(v.get("status").and_then(Value::as_str).unwrap_or("unknown").to_string())
    }

    /// Where QEMU's own migration stands (`query-migrate`).
    pub fn migration(&mut self) -> Result<Migration, QemuError> {
        let m = self.cmd("query-migrate", json!({}))?;
        let why = || m.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given").to_string();
        Ok(match m.get("status").and_then(Value::as_str).unwrap_or("none") {
            "completed" => Migration::Completed,
            "failed" | "cancelled" => Migration::Failed(why()),
            "none" => Migration::None,
            _ => Migration::Active(m.to_string()),
        })
    }

    /// Set migration capabilities (`name` → on/off).
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QemuError> {
        let list: Vec<Value> = caps.iter().map(|(c, on)| json!({ "capability": c, "state": on })).collect();
        self.cmd("migrate-set-capabilities", json!({ "capabilities": list })).map(|_| ())
    }

    /// The state of migration capability `name`.
    pub fn capability(&mut self, name: &str) -> Result<bool, QemuError> {
        let v = self.cmd("query-migrate-capabilities", json!({}))?;
        let found = v.as_array().into_iter().flatten().find(|c| c["capability"] == name);
        Ok(found.and_then(|c| c["state"].as_bool()).unwrap_or(false))
    }
}
