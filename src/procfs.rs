//! /proc/PID/status, the one parser of it: a process's ids, credentials, capabilities, signal
//! masks and tracer, as every part of memleak that asks about a process reads them. (Its maps
//! are procmaps.rs's.) A dozen fields of a text file: not worth a dependency.

/// The fields of /proc/PID/status memleak uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Status {
    /// Its process (thread group) and parent.
    pub tgid: Option<i32>,
    pub ppid: Option<i32>,
    /// The pid tracing it (ptrace), 0 if none.
    pub tracer: i32,
    /// Real, effective, saved and filesystem ids.
    pub uid: Option<[u32; 4]>,
    pub gid: Option<[u32; 4]>,
    /// Effective capabilities.
    pub cap_eff: u64,
    /// Signals pending for the thread (SigPnd) or the process (ShdPnd); blocked, ignored and
    /// caught ones.
    pub sig_pending: u64,
    pub sig_blocked: u64,
    pub sig_ignored: u64,
    pub sig_caught: u64,
    /// Peak resident memory (VmHWM), as written there ("22528 kB").
    pub vm_hwm: Option<String>,
}

impl Status {
    /// Process (or thread) `pid`'s status; None when it is gone.
    pub fn of(pid: i32) -> Option<Status> {
        Some(Status::parse(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?))
    }

    /// Thread `tid` of process `pid`.
    pub fn of_thread(pid: i32, tid: i32) -> Option<Status> {
        Some(Status::parse(&std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?))
    }

    /// memleak's own.
    pub fn own() -> Status {
        Status::parse(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
    }

    pub fn parse(text: &str) -> Status {
        let mut s = Status::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            let hex = || u64::from_str_radix(value, 16).unwrap_or(0);
            let ids = || -> Option<[u32; 4]> {
                value.split_whitespace().map(|x| x.parse().ok()).collect::<Option<Vec<u32>>>()?.try_into().ok()
            };
            match key {
                "Tgid" => s.tgid = value.parse().ok(),
                "PPid" => s.ppid = value.parse().ok(),
                "TracerPid" => s.tracer = value.parse().unwrap_or(0),
                "Uid" => s.uid = ids(),
                "Gid" => s.gid = ids(),
                "CapEff" => s.cap_eff = hex(),
                "SigPnd" | "ShdPnd" => s.sig_pending |= hex(),
                "SigBlk" => s.sig_blocked = hex(),
                "SigIgn" => s.sig_ignored = hex(),
                "SigCgt" => s.sig_caught = hex(),
                "VmHWM" => s.vm_hwm = Some(value.to_string()),
                _ => {}
            }
        }
        s
    }

    /// Whether it has capability `cap` (CAP_* number) in its effective set.
    pub fn has_cap(&self, cap: u32) -> bool {
        self.cap_eff & (1u64 << cap) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fields_used() {
        let s = Status::parse(
            "Name:\tx\nTgid:\t12\nPPid:\t1\nTracerPid:\t7\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\n\
             SigPnd:\t0000000000000001\nShdPnd:\t0000000000000002\nSigBlk:\t0000000000000004\n\
             SigIgn:\t0000000000000008\nSigCgt:\t0000000000000010\nCapEff:\t000001ffffffffff\nVmHWM:\t  2048 kB\n",
        );
        assert_eq!((s.tgid, s.ppid, s.tracer), (Some(12), Some(1), 7));
        assert_eq!((s.uid, s.gid), (Some([1, 2, 3, 4]), Some([5, 6, 7, 8])));
        assert_eq!((s.sig_pending, s.sig_blocked, s.sig_ignored, s.sig_caught), (3, 4, 8, 16));
        assert!(s.has_cap(19) && !s.has_cap(41));
        assert_eq!(s.vm_hwm.as_deref(), Some("2048 kB"));
        let me = Status::of(std::process::id() as i32).unwrap();
        assert_eq!(me.tgid, Some(std::process::id() as i32));
        assert_eq!(me.uid.map(|u| u[0]), Some(unsafe { libc::getuid() }));
    }
}
