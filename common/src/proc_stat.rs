//! A process's or a thread's `/proc/.../stat` line, read the one way that survives any
//! command name: the name sits in parentheses and may hold spaces and parentheses itself, so
//! it ends at the line's last `)`.

use std::path::Path;

/// One `stat` line: the name, and the fields after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    name: String,
    /// Everything after the name: the state (field 3) onwards.
    rest: String,
}

impl ProcStat {
    /// Reads `path` (`/proc/PID/stat`, `/proc/PID/task/TID/stat`, `/proc/self/stat`).
    pub fn read(path: impl AsRef<Path>) -> std::io::Result<ProcStat> {
        let text = std::fs::read_to_string(path)?;
        ProcStat::parse(&text).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not a /proc stat line")
        })
    }

    pub fn parse(text: &str) -> Option<ProcStat> {
        let (head, rest) = text.rsplit_once(')')?;
        let (_, name) = head.split_once('(')?;
        Some(ProcStat {
            name: name.to_owned(),
            rest: rest.trim().to_owned(),
        })
    }

    /// The command name, as the kernel keeps it (15 bytes at most).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Field `number` as proc(5) numbers them: 3 is the state, 4 the parent's pid, 14 and 15
    /// the user and system CPU time in clock ticks. Fields 1 and 2 (pid, name) are not here.
    pub fn field(&self, number: usize) -> Option<&str> {
        self.rest.split_whitespace().nth(number.checked_sub(3)?)
    }

    fn number(&self, number: usize) -> Option<u64> {
        self.field(number)?.parse().ok()
    }

    /// Still running: not a zombie, nor dead (`Z`, `X`), whether or not anyone reaped it.
    pub fn running(&self) -> bool {
        !matches!(self.field(3), Some("Z" | "X"))
    }

    pub fn parent(&self) -> Option<u32> {
        self.field(4)?.parse().ok()
    }

    /// User and system CPU time, in clock ticks (`USER_HZ`, 100 on Linux).
    pub fn cpu_ticks(&self) -> Option<u64> {
        Some(self.number(14)? + self.number(15)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_with_spaces_and_parentheses_ends_at_the_last_one() {
        let line = "4242 (a b) (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 \
                    1234 5000 300\n";
        let stat = ProcStat::parse(line).unwrap();
        assert_eq!(stat.name(), "a b) (c)");
        assert_eq!(stat.field(3), Some("S"));
        assert_eq!(stat.parent(), Some(1));
        assert_eq!(stat.cpu_ticks(), Some(300));
        assert_eq!(stat.field(22), Some("1234"));
        assert_eq!(stat.field(2), None);
        assert!(stat.running());
        let zombie = ProcStat::parse("7 (x) Z 1 7").unwrap();
        assert!(!zombie.running());
        assert_eq!(zombie.cpu_ticks(), None);
        assert_eq!(ProcStat::parse("no parentheses"), None);
    }

    /// This test's own process, as the kernel writes it.
    #[test]
    fn the_running_process_reads_as_running_with_a_parent() {
        let stat = ProcStat::read("/proc/self/stat").unwrap();
        assert!(stat.running());
        assert_eq!(stat.parent(), Some(std::os::unix::process::parent_id()));
        assert!(stat.cpu_ticks().is_some());
    }
}
