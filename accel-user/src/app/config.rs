//! The config file (TOML). Every key is documented in `docs/config.md`; CLI flags override.
use std::path::{Path, PathBuf};
use std::time::Duration;

use embedded_vmm::vmm::{GuestSpec, Workload};
use kvm_hooks::vm::DirtyPreference;
use serde::{de, Deserialize, Deserializer, Serialize};

use crate::dest::RecvOptions;
use crate::policy::{AutoConverge, LimitAction, PolicyConfig, TimeLimit};
use crate::source::SendOptions;
use crate::wire::transport::TransportMode;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {}: {msg}", .path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("config key {key}: {msg}")]
    Invalid { key: &'static str, msg: String },
}

fn invalid(key: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, msg: msg.into() }
}

/// A byte size: an integer number of bytes or a string like "256MiB", "1GiB", "4096".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. \"512MiB\", \"2GiB\")"))?;
        let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            u => return Err(format!("unknown size unit {u:?} in {s:?} (use KiB, MiB, GiB or TiB)")),
        };
        n.checked_mul(mul).map(ByteSize).ok_or_else(|| format!("{s:?} overflows"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| de::Error::custom("expected a byte count or a size string like \"1GiB\""))?
        {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Ab,
    Hot,
    Idle,
    /// Half of each vCPU's range announced shared; canary values rewritten in a loop.
    Canary,
    /// Page-state requests in a loop: 16-page ranges of the first 4 MiB converted between
    /// shared and private, no page written (conversions in flight during a migration).
    Pagestate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DirtySource {
    /// KVM dirty ring; falls back to the bitmap if the kernel lacks it.
    Ring,
    /// KVM dirty bitmap with manual protect.
    Bitmap,
    /// BPF program on `kvm:kvm_dirty_ring_push` (the ring stays on so KVM reports pages).
    Ebpf,
}

/// Where a confidential migration learns which pages are shared and which private.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PageStateSource {
    /// The VMM's own record of the guest's page-state requests.
    Vmm,
    /// The eBPF page-state map (`kvm_hypercall` / `kvm_vmgexit_enter` programs), checked
    /// against the VMM's record: pages on which they disagree wait for a later round, and a
    /// disagreement at switchover stops the migration.
    Ebpf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// KVM device node.
    pub kvm_device: PathBuf,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig { kvm_device: "/dev/kvm".into() }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    pub ram: ByteSize,
    pub vcpus: u32,
    pub workload: WorkloadKind,
    pub hot_working_set: ByteSize,
    /// Pages per second the hot workload dirties (0 = as fast as it can).
    pub hot_rate: u64,
    /// How long the guest runs before migration starts.
    pub warmup_ms: u64,
    /// Write every data page before the guest starts (like-for-like with QEMU's test guests).
    pub prefill: bool,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            ram: ByteSize(256 << 20),
            vcpus: 2,
            workload: WorkloadKind::Ab,
            hot_working_set: ByteSize(64 << 20),
            hot_rate: 50_000,
            warmup_ms: 300,
            prefill: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    pub downtime_target_ms: u64,
    /// Precopy rounds (round 0 included) before a switchover for convergence.
    pub min_rounds: u32,
    pub max_rounds: u32,
    pub batch_pages: u32,
    pub zero_pages: bool,
    pub dirty_source: DirtySource,
    pub dirty_ring_entries: u32,
    pub connect_timeout_ms: u64,
    pub io_timeout_ms: u64,
    pub ack_timeout_ms: u64,
    /// After `Complete`, when `Resumed` never came: how long the source keeps asking the
    /// destination on new connections whether it runs the VM (0: never ask; the source
    /// then stays paused until an operator decides).
    pub handover_query_ms: u64,
    /// Longest a migration may run, connect to switchover (0: no limit), and what then.
    pub time_limit_ms: u64,
    pub time_limit_action: LimitAction,
    /// Most bytes per second precopy rounds send (0: no cap); the final round is not capped.
    pub max_bandwidth: ByteSize,
    /// How pages travel: blocking, copy (io_uring), zerocopy (io_uring) or auto.
    pub transport: TransportMode,
    /// Page streams: 1 sends pages on the control connection, N > 1 opens N data streams.
    pub streams: u32,
    /// Register guest RAM as io_uring fixed buffers for zero-copy sends.
    pub fixed_buffers: bool,
    pub auto_converge: bool,
    pub throttle_initial_pct: u8,
    pub throttle_increment_pct: u8,
    pub throttle_max_pct: u8,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            downtime_target_ms: 50,
            min_rounds: 1,
            max_rounds: 30,
            batch_pages: 1024,
            zero_pages: true,
            dirty_source: DirtySource::Bitmap,
            dirty_ring_entries: 4096,
            connect_timeout_ms: 5_000,
            io_timeout_ms: 10_000,
            ack_timeout_ms: 30_000,
            handover_query_ms: 60_000,
            time_limit_ms: 0,
            time_limit_action: LimitAction::Cancel,
            max_bandwidth: ByteSize(0),
            transport: TransportMode::Auto,
            streams: 2,
            fixed_buffers: false,
            auto_converge: true,
            throttle_initial_pct: 20,
            throttle_increment_pct: 10,
            throttle_max_pct: 99,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverConfig {
    pub listen: String,
    pub max_ram: ByteSize,
    pub max_vcpus: u32,
    /// After resuming, the longest wait for every vCPU to report progress (the check ends
    /// as soon as all of them did).
    pub liveness_timeout_ms: u64,
    /// Allocate and map all guest RAM at the handshake, before accepting pages.
    pub prefault: bool,
    /// Allocate and pre-fault this much guest RAM before listening, so a migration does not
    /// wait for it (0: allocate at the handshake). A source VM of another size is refused.
    pub prepare_ram: ByteSize,
    /// Most precopy rounds a source may send; it is refused when it starts one more.
    pub max_rounds: u32,
    /// How long to wait for a source to connect and say Hello (0: for ever).
    pub wait_ms: u64,
    /// Longest a migration may take from the source's first byte to the resume; a peer
    /// that sends too slowly to finish by then is cut off.
    pub deadline_ms: u64,
    /// When the source's control connection fails at the end of a migration (or the
    /// source's `Done` does not come after the resume): how long to keep answering its
    /// handover queries (0: do not wait for them).
    pub handover_window_ms: u64,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            listen: "127.0.0.1:47000".into(),
            max_ram: ByteSize(64 << 30),
            max_vcpus: 64,
            liveness_timeout_ms: 10_000,
            prefault: false,
            prepare_ram: ByteSize(0),
            max_rounds: 1000,
            wait_ms: 0,
            deadline_ms: 3_600_000,
            handover_window_ms: 90_000,
        }
    }
}

/// Confidential VMs (`[confidential]`): the in-guest Migration Handler path.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfidentialConfig {
    /// Private pages and vCPU state travel only as MH-encrypted blobs.
    pub enabled: bool,
    /// File holding the 32-byte AES-256-GCM transport key (raw, or 64 hex digits); must not
    /// be readable or writable by group or others (0600 or stricter).
    pub key_file: Option<PathBuf>,
    /// Private pages per MH doorbell (1..=256; 1..=128 when pipelined).
    pub mh_batch: u32,
    /// The MH exports the next batch while the host sends the last one (the two share the
    /// data slots, so a batch is at most half of them).
    pub mh_pipeline: bool,
    /// The MH sends a private page it finds all zero as a zero record (a tag instead of a
    /// page of ciphertext). This tells the hosts which private pages are zero; off, every
    /// private page travels as ciphertext.
    pub zero_records: bool,
    /// Handler vCPUs (lanes) the MH runs on, 1 to 4: each exports or imports the private
    /// pages of its own 128 KiB granules. A destination runs as many as its source.
    pub mh_vcpus: u32,
    /// Empty-ring polls the MH makes before blocking on a doorbell kick (0 = block at once).
    pub mh_spin: u64,
    /// Completion polls the host makes before sleeping on the MH's kick.
    pub host_spin: u32,
    /// How long the MH may take to answer a batch before the migration is aborted.
    pub mh_timeout_ms: u64,
    /// Guest SEV policy (as given to the platform at launch); a policy with NOSEND refuses
    /// migration. 0 = not a SEV guest.
    pub sev_policy: u32,
    /// Where page states come from: the VMM's record or the eBPF page-state map.
    pub page_state_source: PageStateSource,
}

impl Default for ConfidentialConfig {
    fn default() -> Self {
        ConfidentialConfig {
            enabled: false,
            key_file: None,
            mh_batch: mh_abi::NSLOTS / 2,
            mh_pipeline: true,
            zero_records: true,
            mh_vcpus: 1,
            mh_spin: 0,
            host_spin: 0,
            mh_timeout_ms: 5_000,
            sev_policy: 0,
            page_state_source: PageStateSource::Vmm,
        }
    }
}

/// Authentication (`[auth]`): both ends prove they hold the same pre-shared key before a
/// VM is created, and every frame is sealed (`docs/security.md`). On unless `insecure`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File holding the 32-byte pre-shared key (raw, or 64 hex digits), the same on both
    /// hosts, mode 0600 or stricter. `migaccel keygen FILE` writes one.
    pub key_file: Option<PathBuf>,
    /// Migrate without authentication or integrity: any process that reaches the
    /// receiver's port can make it run a VM of its choosing.
    pub insecure: bool,
    /// The destination host's identity, bound into the handshake: on `receive` this
    /// host's name, on `send` the name of the host the VM is meant for. When they differ the
    /// handshake fails (the destination's proof does not verify), so a migration meant
    /// for one host never runs on another holding the same key. Unset on both ends: no
    /// identity. 1 ..= 255 bytes.
    pub destination_id: Option<String>,
    /// A key handed over by a program that runs both ends itself (the demo, benches,
    /// tests); never read from a file.
    #[serde(skip)]
    pub key: Option<crate::wire::keys::TransportKey>,
}

/// A running QEMU VM to migrate instead of the embedded guest (`[qemu]`): `send` migrates
/// it, `receive` fills it (`docs/qemu.md`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// QEMU's process id (0: no QEMU; the embedded guest).
    pub pid: u32,
    /// QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    pub qmp: Option<PathBuf>,
    /// Destination: leave the VM paused after migration (QEMU started with `-S`).
    pub leave_paused: bool,
    /// Destination: allocate all of QEMU's guest RAM when attaching, before any source
    /// connects (QEMU's `-mem-prealloc`, done by migaccel). Default on.
    pub populate: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig { pid: 0, qmp: None, leave_paused: false, populate: true }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub host: HostConfig,
    pub guest: GuestConfig,
    pub migration: MigrationConfig,
    pub receiver: ReceiverConfig,
    pub confidential: ConfidentialConfig,
    pub auth: AuthConfig,
    pub qemu: QemuConfig,
    /// Not a setting: the flag an operator's signal sets to cancel the migrations run with
    /// this config (`docs/architecture.md`, "Cancel").
    #[serde(skip)]
    pub cancel: crate::cancel::Cancel,
}

impl Config {
    /// The pre-shared key migrations authenticate with; `None` only with `auth.insecure`.
    pub fn auth_key(&self) -> Result<Option<crate::wire::keys::TransportKey>, String> {
        let a = &self.auth;
        if a.insecure {
            return Ok(None);
        }
        let key = match (&a.key, &a.key_file) {
            (Some(k), _) => k.clone(),
            (None, Some(p)) => crate::wire::keys::load(p).map_err(|e| format!("auth.key_file: {e}"))?,
            (None, None) => {
                return Err("migrations are authenticated and auth.key_file is not set: give both hosts the same \
                     key file (`migaccel keygen FILE` writes one; --auth-key FILE or auth.key_file), or pass \
                     --insecure to migrate without authentication"
                    .into())
            }
        };
        match &a.destination_id {
            Some(id) => {
                crate::wire::auth::bind_destination(&key, id).map(Some).map_err(|e| format!("auth.destination_id: {e}"))
            }
            None => Ok(Some(key)),
        }
    }

    /// Read `auth.key_file` now, once, into the config: every later [`Config::auth_key`]
    /// uses that key (a file replaced mid-run cannot give two ends of one run two keys).
    pub fn resolve_key(&mut self) -> Result<(), String> {
        if let (false, None, Some(p)) = (self.auth.insecure, &self.auth.key, &self.auth.key_file) {
            self.auth.key = Some(crate::wire::keys::load(p).map_err(|e| format!("auth.key_file: {e}"))?);
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { msg, .. } => ConfigError::Parse { path: path.into(), msg },
            e => e,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            msg: e.to_string().lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join(" "),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Check every value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let q = &self.qemu;
        if q.pid != 0 && q.qmp.is_none() {
            return Err(invalid("qemu.qmp", "qemu.pid is set: give QEMU's QMP socket too (--qmp PATH)"));
        }
        if q.pid == 0 && q.qmp.is_some() {
            return Err(invalid("qemu.pid", "qemu.qmp is set: give QEMU's process id too (--qemu-pid PID)"));
        }
        if q.pid != 0 && self.confidential.enabled {
            return Err(invalid("confidential.enabled", "a QEMU VM migrates without an in-guest Migration Handler"));
        }
        let g = &self.guest;
        kvm_hooks::memory::validate_ram_size(g.ram.0).map_err(|e| invalid("guest.ram", e.to_string()))?;
        if g.vcpus == 0 || g.vcpus > embedded_vmm::vmm::MAX_VCPUS {
            return Err(invalid("guest.vcpus", format!("{} is not in 1..={}", g.vcpus, embedded_vmm::vmm::MAX_VCPUS)));
        }
        self.guest_spec().validate().map_err(|e| {
            invalid(if g.workload == WorkloadKind::Hot { "guest.hot_working_set" } else { "guest.ram" }, e.to_string())
        })?;
        let m = &self.migration;
        if m.downtime_target_ms == 0 {
            return Err(invalid("migration.downtime_target_ms", "must be at least 1"));
        }
        if m.max_rounds == 0 || m.max_rounds > 10_000 {
            return Err(invalid("migration.max_rounds", format!("{} is not in 1..=10000", m.max_rounds)));
        }
        if m.min_rounds == 0 || m.min_rounds > m.max_rounds {
            return Err(invalid(
                "migration.min_rounds",
                format!("{} is not in 1..=migration.max_rounds ({})", m.min_rounds, m.max_rounds),
            ));
        }
        if m.batch_pages == 0 || m.batch_pages > 4096 {
            return Err(invalid("migration.batch_pages", format!("{} is not in 1..=4096", m.batch_pages)));
        }
        if !m.dirty_ring_entries.is_power_of_two() || !(256..=65536).contains(&m.dirty_ring_entries) {
            return Err(invalid(
                "migration.dirty_ring_entries",
                format!(
                    "{} must be a power of two in 256..=65536 (KVM needs at least one 4 KiB page of ring)",
                    m.dirty_ring_entries
                ),
            ));
        }
        for (key, v) in [
            ("migration.connect_timeout_ms", m.connect_timeout_ms),
            ("migration.io_timeout_ms", m.io_timeout_ms),
            ("migration.ack_timeout_ms", m.ack_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if m.streams == 0 || m.streams > crate::wire::payload::MAX_STREAMS {
            return Err(invalid(
                "migration.streams",
                format!("{} is not in 1..={}", m.streams, crate::wire::payload::MAX_STREAMS),
            ));
        }
        for (key, v) in [
            ("migration.throttle_initial_pct", m.throttle_initial_pct),
            ("migration.throttle_increment_pct", m.throttle_increment_pct),
            ("migration.throttle_max_pct", m.throttle_max_pct),
        ] {
            if v == 0 || v > 99 {
                return Err(invalid(key, format!("{v} is not in 1..=99")));
            }
        }
        let cf = &self.confidential;
        if cf.mh_batch == 0 || cf.mh_batch > mh_abi::NSLOTS {
            return Err(invalid("confidential.mh_batch", format!("{} is not in 1..={}", cf.mh_batch, mh_abi::NSLOTS)));
        }
        if cf.mh_vcpus == 0 || cf.mh_vcpus > mh_abi::MAX_LANES {
            return Err(invalid(
                "confidential.mh_vcpus",
                format!("{} is not in 1..={}", cf.mh_vcpus, mh_abi::MAX_LANES),
            ));
        }
        if cf.mh_pipeline && cf.mh_batch > mh_abi::NSLOTS / 2 {
            return Err(invalid(
                "confidential.mh_batch",
                format!(
                    "{} pages: with mh_pipeline two batches share the {} data slots, so at most {}",
                    cf.mh_batch,
                    mh_abi::NSLOTS,
                    mh_abi::NSLOTS / 2
                ),
            ));
        }
        if cf.mh_timeout_ms == 0 {
            return Err(invalid("confidential.mh_timeout_ms", "must be at least 1"));
        }
        if cf.enabled && cf.key_file.is_none() {
            return Err(invalid("confidential.key_file", "confidential migration needs a transport key file"));
        }
        if let Some(id) = &self.auth.destination_id {
            if id.is_empty() || id.len() > 255 {
                return Err(invalid("auth.destination_id", "must be 1 ..= 255 bytes"));
            }
            if self.auth.insecure {
                return Err(invalid(
                    "auth.destination_id",
                    "needs authentication (it is bound into the handshake); drop --insecure",
                ));
            }
        }
        if self.auth.insecure && self.auth.key_file.is_some() {
            return Err(invalid("auth.insecure", "contradicts auth.key_file: choose one"));
        }
        if !cf.enabled && cf.page_state_source == PageStateSource::Ebpf {
            return Err(invalid(
                "confidential.page_state_source",
                "\"ebpf\" needs confidential.enabled = true (page states only decide the path of a confidential VM's pages)",
            ));
        }
        let r = &self.receiver;
        if r.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid("receiver.listen", format!("{:?} is not an IP:port address", r.listen)));
        }
        if r.liveness_timeout_ms == 0 {
            return Err(invalid("receiver.liveness_timeout_ms", "must be at least 1"));
        }
        if r.max_ram.0 == 0 {
            return Err(invalid("receiver.max_ram", "must be more than 0 (0 would refuse every VM)"));
        }
        if r.max_vcpus == 0 {
            return Err(invalid("receiver.max_vcpus", "must be at least 1"));
        }
        if r.max_rounds == 0 {
            return Err(invalid("receiver.max_rounds", "must be at least 1"));
        }
        if r.deadline_ms == 0 {
            return Err(invalid("receiver.deadline_ms", "must be at least 1"));
        }
        if r.prepare_ram.0 != 0 {
            kvm_hooks::memory::validate_ram_size(r.prepare_ram.0)
                .map_err(|e| invalid("receiver.prepare_ram", e.to_string()))?;
            if r.prepare_ram.0 > r.max_ram.0 {
                return Err(invalid(
                    "receiver.prepare_ram",
                    format!("{} bytes exceeds receiver.max_ram ({} bytes)", r.prepare_ram.0, r.max_ram.0),
                ));
            }
        }
        Ok(())
    }

    pub fn guest_spec(&self) -> GuestSpec {
        let g = &self.guest;
        let workload = match g.workload {
            WorkloadKind::Ab => Workload::Ab,
            WorkloadKind::Idle => Workload::Idle,
            WorkloadKind::Canary => Workload::Canary,
            WorkloadKind::Pagestate => Workload::PageState,
            WorkloadKind::Hot => Workload::Hot { working_set: g.hot_working_set.0, pages_per_sec: g.hot_rate },
        };
        GuestSpec { ram_bytes: g.ram.0, vcpus: g.vcpus, workload }
    }

    pub fn dirty_preference(&self) -> DirtyPreference {
        match self.migration.dirty_source {
            DirtySource::Ring => DirtyPreference::RingOrBitmap { bytes: self.migration.dirty_ring_entries * 16 },
            DirtySource::Bitmap => DirtyPreference::Bitmap,
            DirtySource::Ebpf => DirtyPreference::Ring { bytes: self.migration.dirty_ring_entries * 16 },
        }
    }

    pub fn send_options(&self) -> SendOptions {
        let m = &self.migration;
        SendOptions {
            policy: PolicyConfig {
                downtime_target: Duration::from_millis(m.downtime_target_ms),
                min_rounds: m.min_rounds,
                max_rounds: m.max_rounds,
                auto_converge: AutoConverge {
                    enabled: m.auto_converge,
                    initial: m.throttle_initial_pct,
                    increment: m.throttle_increment_pct,
                    max: m.throttle_max_pct,
                },
            },
            batch_pages: m.batch_pages,
            zero_detect: m.zero_pages,
            ack_timeout: Duration::from_millis(m.ack_timeout_ms),
            handover_query: Duration::from_millis(m.handover_query_ms),
            queries: !self.auth.insecure,
            time_limit: (m.time_limit_ms > 0)
                .then(|| TimeLimit { after: Duration::from_millis(m.time_limit_ms), action: m.time_limit_action }),
            max_bandwidth: m.max_bandwidth.0,
            cancel: self.cancel.clone(),
            io_timeout: Duration::from_millis(m.io_timeout_ms),
            streams: if m.streams > 1 { m.streams } else { 0 },
            confidential: self.confidential.enabled.then_some(crate::source::ConfidentialSend {
                mh_batch: self.confidential.mh_batch,
                pipeline: self.confidential.mh_pipeline,
            }),
        }
    }

    pub fn recv_options(&self, capture: bool) -> RecvOptions {
        RecvOptions {
            max_ram: self.receiver.max_ram.0,
            max_vcpus: self.receiver.max_vcpus,
            capture,
            io_timeout: Duration::from_millis(self.migration.io_timeout_ms),
            prefault: self.receiver.prefault,
            confidential: None,
            max_rounds: self.receiver.max_rounds,
            deadline: Duration::from_millis(self.receiver.deadline_ms),
            check_host_memory: true,
            cancel: self.cancel.clone(),
        }
    }

    pub fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.migration.io_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.migration.connect_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_file_is_read_once() {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("migaccel-config-key-{}", std::process::id()));
        std::fs::write(&p, "0123456789abcdef".repeat(4)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c = Config::default();
        c.auth.key_file = Some(p.clone());
        c.resolve_key().unwrap();
        std::fs::remove_file(&p).unwrap();
        let k = c.auth_key().expect("the key read at load time").expect("authenticated");
        assert_eq!(k.0[..2], [0x01, 0x23]);
        let mut missing = Config::default();
        missing.auth.key_file = Some(p);
        assert!(missing.resolve_key().unwrap_err().contains("auth.key_file"));
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::parse("").unwrap().guest.ram, ByteSize(256 << 20));
    }

    #[test]
    fn sizes() {
        assert_eq!("1GiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 30));
        assert_eq!("64 MiB".parse::<ByteSize>().unwrap(), ByteSize(64 << 20));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert!("12XB".parse::<ByteSize>().unwrap_err().contains("unit"));
        assert_eq!("1TiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 40));
        assert!("16777216TiB".parse::<ByteSize>().unwrap_err().contains("overflows"));
        assert!("lots".parse::<ByteSize>().is_err());
        let c = Config::parse("[guest]\nram = 134217728\n").unwrap();
        assert_eq!(c.guest.ram.0, 128 << 20);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("[guest]\nrma = \"1GiB\"\n").unwrap_err().to_string();
        assert!(e.contains("rma"), "{e}");
        let e = Config::parse("[guest]\nvcpus = \"two\"\n").unwrap_err().to_string();
        assert!(e.contains("vcpus"), "{e}");
        let e = Config::parse("[guest]\nram = \"10MiB\"\n").unwrap_err().to_string();
        assert!(e.contains("guest.ram") && e.contains("64 MiB"), "{e}");
        let e = Config::parse("[migration]\nmin_rounds = 31\n").unwrap_err().to_string();
        assert!(e.contains("migration.min_rounds") && e.contains("30"), "{e}");
        let e = Config::parse("[migration]\nmin_rounds = 0\n").unwrap_err().to_string();
        assert!(e.contains("migration.min_rounds"), "{e}");
        let e = Config::parse("[migration]\nbatch_pages = 0\n").unwrap_err().to_string();
        assert!(e.contains("migration.batch_pages"), "{e}");
        let e = Config::parse("[receiver]\nlisten = \"nowhere\"\n").unwrap_err().to_string();
        assert!(e.contains("receiver.listen"), "{e}");
        let e = Config::parse("[receiver]\nmax_rounds = 0\n").unwrap_err().to_string();
        assert!(e.contains("receiver.max_rounds"), "{e}");
        let e = Config::parse("[receiver]\ndeadline_ms = 0\n").unwrap_err().to_string();
        assert!(e.contains("receiver.deadline_ms"), "{e}");
        let e = Config::parse("[bogus]\n").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::parse("[guest]\nworkload = \"hot\"\nhot_working_set = \"1TiB\"\n").unwrap_err().to_string();
        assert!(e.contains("hot_working_set"), "{e}");
        let e = Config::parse("[receiver]\nprepare_ram = \"3MiB\"\n").unwrap_err().to_string();
        assert!(e.contains("receiver.prepare_ram"), "{e}");
        let e = Config::parse("[receiver]\nmax_ram = 0\n").unwrap_err().to_string();
        assert!(e.contains("receiver.max_ram") && e.contains("refuse every VM"), "{e}");
        let e = Config::parse("[receiver]\nprepare_ram = \"2GiB\"\nmax_ram = \"1GiB\"\n").unwrap_err().to_string();
        assert!(e.contains("receiver.prepare_ram") && e.contains("max_ram"), "{e}");
        let e = Config::parse("[confidential]\nmh_batch = 256\n").unwrap_err().to_string();
        assert!(e.contains("confidential.mh_batch") && e.contains("mh_pipeline") && e.contains("128"), "{e}");
        Config::parse("[confidential]\nmh_batch = 256\nmh_pipeline = false\n").unwrap();
        for bad in [0, 5] {
            let e = Config::parse(&format!("[confidential]\nmh_vcpus = {bad}\n")).unwrap_err().to_string();
            assert!(e.contains("confidential.mh_vcpus") && e.contains("1..=4"), "{e}");
        }
        assert_eq!(Config::parse("[confidential]\nmh_vcpus = 4\n").unwrap().confidential.mh_vcpus, 4);
        let e = Config::parse("[confidential]\nmh_batch = 257\nmh_pipeline = false\n").unwrap_err().to_string();
        assert!(e.contains("confidential.mh_batch") && e.contains("1..=256"), "{e}");
        let e = Config::parse("[confidential]\npage_state_source = \"ebpf\"\n").unwrap_err().to_string();
        assert!(e.contains("confidential.page_state_source") && e.contains("enabled"), "{e}");
        let e = Config::parse("[confidential]\npage_state_source = \"kernel\"\n").unwrap_err().to_string();
        assert!(e.contains("page_state_source") && e.contains("kernel"), "{e}");
        let c =
            Config::parse("[confidential]\nenabled = true\nkey_file = \"/k\"\npage_state_source = \"ebpf\"\n").unwrap();
        assert_eq!(c.confidential.page_state_source, PageStateSource::Ebpf);
        let c = Config::parse("[receiver]\nprepare_ram = \"1GiB\"\n").unwrap();
        assert_eq!(c.receiver.prepare_ram, ByteSize(1 << 30));
    }
}
