//! Who this process is, as other instances and the admin API see it: a random id, the host,
//! the pid, the address it serves on, the version and the start time.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Who this process is, as other instances and the admin API see it.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    /// Random per process (12 hex digits).
    pub id: String,
    /// The machine's host name.
    pub hostname: String,
    /// This process's id.
    pub pid: u32,
    /// The address it serves HTTP and WebSocket on.
    pub listen: String,
    /// The orderpush version.
    pub version: &'static str,
    /// When it started.
    pub started_at: SystemTime,
}

impl InstanceInfo {
    /// Describes this process, serving on `listen`.
    pub fn current(listen: SocketAddr) -> Self {
        let mut buf = [0u8; 6];
        // Without randomness, fall back to time and pid: unique enough for a process id.
        let id = if getrandom::fill(&mut buf).is_ok() {
            buf.iter().map(|b| format!("{b:02x}")).collect()
        } else {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            format!(
                "{:012x}",
                (nanos ^ u128::from(std::process::id())) & 0xffff_ffff_ffff
            )
        };
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Self {
            id,
            hostname,
            pid: std::process::id(),
            listen: listen.to_string(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: SystemTime::now(),
        }
    }

    /// This instance's heartbeat row, as the database stores it.
    pub(crate) fn as_row(&self) -> crate::db::presence::Instance<'_> {
        crate::db::presence::Instance {
            id: &self.id,
            hostname: &self.hostname,
            pid: self.pid,
            listen: &self.listen,
            version: self.version,
            started_at: self.started_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceInfo;

    #[test]
    fn each_process_description_gets_its_own_twelve_digit_id() {
        let a = InstanceInfo::current("127.0.0.1:9011".parse().unwrap());
        let b = InstanceInfo::current("127.0.0.1:9011".parse().unwrap());
        assert_eq!(a.id.len(), 12);
        assert!(a.id.bytes().all(|c| c.is_ascii_hexdigit()), "{}", a.id);
        assert_ne!(a.id, b.id);
        assert_eq!(a.listen, "127.0.0.1:9011");
        assert_eq!(a.pid, std::process::id());
    }
}
