//! How a program is started, as far as the kernel and the dynamic linker care: its `#!`
//! interpreters, its environment and directory, the credentials it runs with, and whether it
//! runs in secure mode (AT_SECURE). Files are opened as the user the program runs as.
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::objfile;

/// The credentials a program runs with (file access is checked against them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// What the dynamic linker of a new program image sees.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// The environment, "NAME=value" entries as execve passes them.
    pub env: Vec<OsString>,
    /// The directory relative paths are taken from.
    pub cwd: PathBuf,
    /// Who it runs as, when not as memleak itself: the search opens files as this user.
    pub creds: Option<Credentials>,
    /// AT_SECURE when known (read from a process after exec); otherwise decided from the
    /// executable's set-user/group-ID bits and file capabilities against the runner.
    pub secure: Option<bool>,
}

/// Linux follows at most this many `#!` scripts before it fails with ELOOP (measured: a chain
/// of 5 scripts runs, 6 does not).
pub const MAX_SCRIPTS: usize = 5;
/// The bytes of a file the kernel reads to recognize `#!` (BINPRM_BUF_SIZE).
const BINPRM_BUF: usize = 256;
/// The largest /proc/PID/environ read.
const MAX_ENVIRON: u64 = 16 << 20;
const AT_SECURE: u64 = 23;

impl Launch {
    /// A -c command's: memleak's own environment and directory, run as `creds`.
    pub fn command(creds: Option<Credentials>) -> Result<Launch> {
        let env = std::env::vars_os()
            .map(|(k, v)| {
                let mut e = k;
                e.push("=");
                e.push(v);
                e
            })
            .collect();
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        Ok(Launch { env, cwd, creds, secure: None })
    }

    /// A process stopped right after an exec: its new environment, directory, AT_SECURE and
    /// file-access credentials, from /proc.
    pub fn of_process(pid: i32) -> Result<Launch> {
        let read = |what: &str, limit: u64| -> Result<Vec<u8>> {
            let p = PathBuf::from(format!("/proc/{pid}/{what}"));
            let f = objfile::open_regular(&p)?;
            objfile::read_bounded(&f, limit, &p)
        };
        let env = read("environ", MAX_ENVIRON)?
            .split(|&b| b == 0)
            .filter(|e| !e.is_empty())
            .map(|e| OsString::from_vec(e.to_vec()))
            .collect();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).context("cannot read the process's directory")?;
        let auxv = read("auxv", 1 << 16)?;
        let secure = auxv
            .chunks_exact(16)
            .map(|c| (u64::from_ne_bytes(c[..8].try_into().unwrap()), u64::from_ne_bytes(c[8..].try_into().unwrap())))
            .find(|&(k, _)| k == AT_SECURE)
            .map(|(_, v)| v != 0);
        let status = String::from_utf8_lossy(&read("status", 1 << 20)?).into_owned();
        // The fourth id of "Uid:" and "Gid:" is the one file access is checked against.
        let fs_id = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().nth(3)?.parse::<u32>().ok())
        };
        let (uid, gid) = (fs_id("Uid:").context("no Uid in status")?, fs_id("Gid:").context("no Gid in status")?);
        let groups = status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
            .unwrap_or_default();
        let creds = (uid != 0).then_some(Credentials { uid, gid, groups });
        Ok(Launch { env, cwd, creds, secure })
    }

    /// The value of the last `LD_name=` entry, the one ld.so uses.
    pub fn ld_var(&self, name: &str) -> Option<&OsStr> {
        let prefix = format!("{name}=");
        self.env.iter().rev().find_map(|e| e.as_bytes().strip_prefix(prefix.as_bytes())).map(OsStr::from_bytes)
    }

    /// `p` made absolute against the program's directory.
    pub fn absolute(&self, p: &Path) -> PathBuf {
        self.cwd.join(p)
    }

    /// The user and group the program starts with: its credentials, else memleak's real ids.
    fn runner(&self) -> (u32, u32) {
        match &self.creds {
            Some(c) => (c.uid, c.gid),
            // SAFETY: getuid and getgid have no preconditions.
            None => unsafe { (libc::getuid(), libc::getgid()) },
        }
    }

    /// Whether exec'ing `exe` puts the program in secure mode, as the kernel decides: its
    /// user or group changes (set-user/group-ID bits, honoured unless the file system is
    /// mounted nosuid), or file capabilities are granted to a user other than root.
    pub fn secure_for(&self, exe: &File) -> bool {
        if let Some(s) = self.secure {
            return s;
        }
        let Ok(md) = exe.metadata() else { return false };
        if nosuid(exe) {
            return false;
        }
        let (uid, gid) = self.runner();
        let mode = md.mode();
        let setuid = mode & libc::S_ISUID != 0 && md.uid() != uid;
        let setgid = mode & libc::S_ISGID != 0 && mode & libc::S_IXGRP != 0 && md.gid() != gid;
        setuid || setgid || (uid != 0 && has_file_caps(exe))
    }
}

fn nosuid(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatvfs writes into the zeroed struct for a descriptor we hold.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstatvfs(f.as_raw_fd(), &mut st) } == 0) && st.f_flag & libc::ST_NOSUID != 0
}

fn has_file_caps(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    let name = c"security.capability";
    // SAFETY: a size query (null buffer, size 0) on a descriptor we hold.
    let n = unsafe { libc::fgetxattr(f.as_raw_fd(), name.as_ptr(), std::ptr::null_mut(), 0) };
    n > 0
}

/// The program the kernel ends up running for `path`: the scripts it passes through (each
/// names the next in its `#!` line) and the ELF file, held open.
pub struct Program {
    pub scripts: Vec<PathBuf>,
    pub path: PathBuf,
    pub file: File,
}

/// Follows `#!` lines from `path` as Linux does (binfmt_script), without running anything.
pub fn follow_scripts(path: &Path, launch: &Launch) -> Result<Program> {
    let mut scripts = Vec::new();
    let mut path = path.to_path_buf();
    loop {
        let file = objfile::open_regular(&launch.absolute(&path))?;
        let mut buf = [0u8; BINPRM_BUF];
        let n = file.read_at(&mut buf, 0).with_context(|| format!("cannot read {}", path.display()))?;
        if n < 2 || &buf[..2] != b"#!" {
            return Ok(Program { scripts, path, file });
        }
        if scripts.len() == MAX_SCRIPTS {
            bail!(
                "cannot run {}: more than {MAX_SCRIPTS} levels of #! interpreters (the kernel's limit)",
                scripts[0].display()
            );
        }
        let interp = script_interpreter(&buf)
            .ok_or_else(|| anyhow!("cannot run {}: its #! line names no interpreter", path.display()))?;
        scripts.push(path);
        path = PathBuf::from(OsString::from_vec(interp));
    }
}

/// The interpreter a `#!` line names, parsed as binfmt_script parses the first 256 bytes
/// (zero-padded when the file is shorter): None when the kernel refuses it (ENOEXEC).
pub fn script_interpreter(buf: &[u8; BINPRM_BUF]) -> Option<Vec<u8>> {
    let spacetab = |c: u8| c == b' ' || c == b'\t';
    let end = match buf.iter().position(|&b| b == b'\n') {
        Some(e) => e,
        None => {
            // No newline: the name must end (space, tab or NUL) before the buffer does, or it
            // may be truncated.
            let first = (2..BINPRM_BUF).find(|&i| !spacetab(buf[i]))?;
            (first..BINPRM_BUF).find(|&i| spacetab(buf[i]) || buf[i] == 0)?;
            BINPRM_BUF - 1
        }
    };
    let mut end = end;
    while end > 2 && spacetab(buf[end - 1]) {
        end -= 1;
    }
    let start = (2..end).find(|&i| !spacetab(buf[i]))?;
    let stop = (start..end).find(|&i| spacetab(buf[i]) || buf[i] == 0).unwrap_or(end);
    Some(buf[start..stop].to_vec())
}

/// Runs `f` on a thread whose file-system credentials are `creds` (setfsuid, setfsgid,
/// setgroups: per thread when made as raw system calls), so that every file it opens is one
/// the user may open; memleak's other threads keep theirs. Without `creds`, runs `f` here.
pub fn as_user<T: Send>(creds: Option<&Credentials>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let Some(c) = creds else { return f() };
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: system calls on this thread's own credentials, with a live group list.
            unsafe {
                if libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error()).context("setgroups");
                }
                libc::syscall(libc::SYS_setfsgid, c.gid);
                libc::syscall(libc::SYS_setfsuid, c.uid);
                // Neither reports failure: asking with an invalid id returns the current one.
                let (uid, gid) =
                    (libc::syscall(libc::SYS_setfsuid, u32::MAX), libc::syscall(libc::SYS_setfsgid, u32::MAX));
                if uid != i64::from(c.uid) || gid != i64::from(c.gid) {
                    bail!("cannot take the credentials of uid {} gid {}", c.uid, c.gid);
                }
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow!("the library search failed unexpectedly")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> [u8; BINPRM_BUF] {
        let mut b = [0u8; BINPRM_BUF];
        b[..s.len()].copy_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn shebang_lines_parse_as_the_kernel_parses_them() {
        let name = |s: &str| script_interpreter(&line(s)).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(name("#!/bin/sh\necho\n").as_deref(), Some("/bin/sh"));
        assert_eq!(name("#! \t/usr/bin/env  python3 -u\n").as_deref(), Some("/usr/bin/env"));
        assert_eq!(name("#!/bin/sh   \n").as_deref(), Some("/bin/sh"));
        assert_eq!(name("#!relative/interp").as_deref(), Some("relative/interp"), "no newline, file ends");
        assert_eq!(name("#!\n"), None);
        assert_eq!(name("#!   \n"), None);
        // 256 bytes without a newline nor a terminator after the name: maybe truncated.
        let long = format!("#!/{}", "a".repeat(300));
        assert_eq!(name(&long[..BINPRM_BUF]), None);
        let long_arg = format!("#!/bin/sh {}", "a".repeat(300));
        assert_eq!(name(&long_arg[..BINPRM_BUF]).as_deref(), Some("/bin/sh"));
    }

    #[test]
    fn the_last_ld_variable_counts() {
        let l = Launch {
            env: ["LD_PRELOAD=a.so", "PATH=/bin", "LD_PRELOAD=b.so", "LD_LIBRARY_PATH"]
                .iter()
                .map(OsString::from)
                .collect(),
            ..Default::default()
        };
        assert_eq!(l.ld_var("LD_PRELOAD"), Some(OsStr::new("b.so")));
        assert_eq!(l.ld_var("LD_LIBRARY_PATH"), None, "an entry without '=' is no value");
        assert_eq!(l.ld_var("LD_AUDIT"), None);
    }

    #[test]
    fn secure_mode_follows_set_user_id_bits_against_the_runner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("memleak-ldso-secure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("prog");
        std::fs::copy("/bin/true", &p).unwrap();
        let f = File::open(&p).unwrap();
        let owner = f.metadata().unwrap().uid();
        let other =
            Launch { creds: Some(Credentials { uid: owner + 1, gid: 12345, groups: vec![] }), ..Default::default() };
        let same = Launch {
            creds: Some(Credentials { uid: owner, gid: f.metadata().unwrap().gid(), groups: vec![] }),
            ..Default::default()
        };
        assert!(!other.secure_for(&f), "no set-ID bit");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o4755)).unwrap();
        if !nosuid(&f) {
            assert!(other.secure_for(&f), "set-user-ID to another user");
            assert!(!same.secure_for(&f), "set-user-ID to oneself changes nothing");
        }
        let known = Launch { secure: Some(false), ..other };
        assert!(!known.secure_for(&f), "AT_SECURE read from the process wins");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_thread_with_the_users_credentials_opens_as_the_user() {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            return;
        }
        let nobody = Credentials { uid: 65534, gid: 65534, groups: vec![] };
        let (shadow, link) = as_user(Some(&nobody), || {
            let f = objfile::open_regular(Path::new("/bin/true"))?;
            // The descriptor's path resolves on this thread too (same process).
            let link = std::fs::read_link(objfile::fd_path(&f))?;
            Ok((objfile::open_regular(Path::new("/etc/shadow")).is_ok(), link))
        })
        .expect("as nobody");
        assert!(!shadow, "nobody cannot read /etc/shadow");
        assert_eq!(link, std::fs::canonicalize("/bin/true").unwrap());
        // The calling thread kept its own.
        assert!(objfile::open_regular(Path::new("/etc/shadow")).is_ok());
    }
}
