//! What this host can hold, read where the kernel reports it.

/// Bytes available for new allocations without swapping (`MemAvailable` in
/// `/proc/meminfo`); `None` where the kernel does not report it.
pub fn mem_available() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// Raise this process's open-file limit to its hard limit: a receiver keeps one
/// descriptor per waiting connection, and the default soft limit (1,024) is what a flood
/// of connections reaches first. Returns the limit in force.
pub fn raise_open_files() -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        setrlimit(Resource::Nofile, l).map_err(std::io::Error::from)?;
    }
    Ok(l.current.unwrap_or(u64::MAX))
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut f = line.split_whitespace().skip(1);
    let kib: u64 = f.next()?.parse().ok()?;
    (f.next() == Some("kB")).then(|| kib.checked_mul(1024)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available() {
        let m = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(m), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: 5 MB\n"), None);
        assert!(mem_available().is_some_and(|a| a > 0), "this host reports MemAvailable");
    }
}
