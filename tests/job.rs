//! The whole job (issue 9): the processes a command starts, the images they exec (a static
//! one too), several -p processes, a cgroup's members, and the processes memleak must not
//! trace. Each process's final report is exact.
mod common;
use std::collections::BTreeMap;
use std::path::PathBuf;

use common::*;

fn job_fixture(name: &str, extra: &[&str]) -> PathBuf {
    fixture_in("job", name, extra)
}

/// memleak's final reports, by the pid that exited: the summary of each.
fn finals(out: &Finished) -> BTreeMap<i32, Vec<(String, u64, u64)>> {
    final_reports(&out.stdout).into_iter().map(|(pid, r)| (pid, r.summary())).collect()
}

fn text(out: &Finished) -> String {
    format!("stdout:\n{}\nstderr:\n{}", out.stdout.join("\n"), out.stderr)
}

/// Workers each free their copies of the parent's blocks and leak their own: every process's
/// final report holds what it, and only it, never freed.
#[test]
fn every_process_of_a_forking_command_has_its_own_exact_report() {
    let exe = job_fixture("forker", &[]);
    let out = memleak_output(&["--no-scan", "-c", &format!("{} 3", exe.display())]);
    assert_eq!(out.code(), Some(0), "{}", text(&out));
    let f = finals(&out);
    assert_eq!(f.len(), 4, "the command and its 3 workers: {}", text(&out));
    let command = *f.keys().next().expect("the command, the lowest pid");
    let mut workers: Vec<Vec<(String, u64, u64)>> =
        f.iter().filter(|(p, _)| **p != command).map(|(_, s)| s.clone()).collect();
    workers.sort();
    assert_eq!(
        workers,
        [
            expected(&[("worker_leak", 2002, 2)]),
            expected(&[("worker_leak", 2004, 2)]),
            expected(&[("worker_leak", 2006, 2)])
        ],
        "{}",
        text(&out)
    );
    // The parent's blocks were freed only in the workers' copies: still its own.
    assert_eq!(f[&command], expected(&[("keep", 300, 3), ("late", 50, 1)]), "{}", text(&out));
    // The command's exit comes last: its report, and memleak's exit status, are the run's end.
    let last = out.stdout.iter().rev().find(|l| is_exit_line(l)).expect("an exit line");
    assert_eq!(exit_line_pid(last), Some(command), "{}", text(&out));
}

/// --no-follow: memleak(8)'s way, the command alone.
#[test]
fn no_follow_traces_the_command_only() {
    let exe = job_fixture("forker", &[]);
    let out = memleak_output(&["--no-scan", "--no-follow", "-c", &format!("{} 2", exe.display())]);
    assert_eq!(out.code(), Some(0), "{}", text(&out));
    let f = finals(&out);
    assert_eq!(f.len(), 1, "{}", text(&out));
    assert_eq!(f.values().next().unwrap(), &expected(&[("keep", 300, 3), ("late", 50, 1)]));
}

/// A shell running the program: the program's report is exact, the shell's is there too, and
/// memleak exits with the shell's status.
#[test]
fn a_program_run_by_a_shell_is_traced() {
    let exe = job_fixture("leak_dyn", &[]);
    let out = memleak_output(&["--no-scan", "-c", &format!("sh -c '{}; exit 3'", exe.display())]);
    assert_eq!(out.code(), Some(3), "{}", text(&out));
    let f = finals(&out);
    assert_eq!(f.len(), 2, "sh and the program: {}", text(&out));
    assert!(f.values().any(|s| *s == expected(&[("dyn_leak", 128, 4)])), "{}", text(&out));
}

/// exec into a static program: the old image's block goes, the static allocator is found and
/// probed before the new image runs.
#[test]
fn an_exec_into_a_static_binary_is_traced() {
    let target = job_fixture("leak_static", &["-static"]);
    let exe = job_fixture("exec_into", &[]);
    let out = memleak_output(&["--no-scan", "-c", &format!("{} {}", exe.display(), target.display())]);
    assert_eq!(out.code(), Some(0), "{}", text(&out));
    let f = final_reports(&out.stdout);
    assert_eq!(f.len(), 1, "{}", text(&out));
    let r = &f[0].1;
    let sums = |name: &str| r.stacks_in(name).iter().fold((0, 0), |a, s| (a.0 + s.bytes, a.1 + s.count));
    assert_eq!(sums("static_leak"), (192, 3), "{}", text(&out));
    assert_eq!(sums("before_exec"), (0, 0), "the old image's block went with it: {}", text(&out));
    // The rest is static glibc's own start-up (its _dl_non_dynamic_init), before main.
    for s in r.stacks.iter().filter(|s| s.func(0) != "static_leak") {
        assert!(!s.names().iter().any(|n| n == "main"), "{s:?}");
        assert!(s.names().iter().any(|n| n == "__libc_start_main"), "{s:?}");
    }
}

/// Several -p pids: each process under its own line in a report; each one's blocks exact.
#[test]
fn several_pids_are_reported_each_under_its_name() {
    let mut a = allocs_fixture(&[]);
    let mut b = allocs_fixture(&[]);
    let pids = format!("{},{}", a.pid(), b.pid());
    let m = memleak_attached(&["-o", "0", "-p", &pids, "60"]);
    a.command("malloc 10 2");
    b.command("calloc 3 8 1");
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", text(&out));
    let r = parse_reports(&out.stdout).pop().expect("a report");
    let of = |pid: i32| {
        let mut v: Vec<(String, u64, u64)> =
            r.stacks.iter().filter(|s| s.pid == Some(pid)).map(|s| (s.func(0).to_string(), s.bytes, s.count)).collect();
        v.sort();
        v
    };
    assert_eq!(of(a.pid()), expected(&[("do_malloc", 20, 2)]), "{}", text(&out));
    assert_eq!(of(b.pid()), expected(&[("do_calloc", 24, 1)]), "{}", text(&out));
    a.command("malloc 1 1");
    b.command("malloc 1 1");
}

/// The -p processes exit: each gets its final report when it exits; memleak ends after the
/// last one.
#[test]
fn several_pids_each_get_a_final_report_at_exit() {
    let mut a = allocs_fixture(&[]);
    let mut b = allocs_fixture(&[]);
    let (pa, pb) = (a.pid(), b.pid());
    let pids = format!("{pa},{pb}");
    let m = memleak_attached(&["-p", &pids, "60"]);
    a.command("malloc 40 1");
    b.command("malloc 60 2");
    a.send("exit 0");
    assert_eq!(a.finish().code(), Some(0));
    b.send("exit 0");
    assert_eq!(b.finish().code(), Some(0));
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", text(&out));
    let f = finals(&out);
    assert_eq!(f.len(), 2, "{}", text(&out));
    assert_eq!(f[&pa], expected(&[("do_malloc", 40, 1)]), "{}", text(&out));
    assert_eq!(f[&pb], expected(&[("do_malloc", 120, 2)]), "{}", text(&out));
}

/// A cgroup the test makes: its member is traced, and so is the process it starts later.
#[test]
fn a_cgroups_members_and_their_children_are_traced() {
    let root = cgroup_root();
    let cg = root.join(format!("memleak-test-{}", std::process::id()));
    std::fs::create_dir_all(&cg).expect("mkdir a cgroup (root)");
    let _cleanup = RemoveDir(cg.clone());
    let mut f = allocs_fixture(&[]);
    let fpid = f.pid();
    std::fs::write(cg.join("cgroup.procs"), fpid.to_string()).expect("move the fixture in");
    let mut m = memleak(&["-o", "0", "--no-scan", "--cgroup", cg.to_str().unwrap(), "60"]);
    m.expect("Attaching to cgroup", |l| l.starts_with("Attaching to cgroup ") && l.contains(&f.pid().to_string()));
    f.command("malloc 24 3");
    // A child it forks: followed, its own blocks its own.
    let lines = f.command("fork_leak 77 2");
    let child: i32 = lines
        .iter()
        .find_map(|l| l.strip_prefix("child "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the fixture names its child: {lines:?}"));
    f.send("exit 0");
    assert_eq!(f.finish().code(), Some(0));
    m.signal(libc::SIGINT);
    let out = m.finish();
    let fin = finals(&out);
    assert_eq!(fin.get(&child), Some(&expected(&[("do_fork_leak", 154, 2)])), "{}", text(&out));
    assert_eq!(fin.get(&fpid), Some(&expected(&[("do_malloc", 72, 3)])), "{}", text(&out));
}

/// Under sudo, a set-user-ID program the command runs is not traced (the invoking user could
/// not trace it): said in a WARNING line, never silently.
#[test]
fn a_set_user_id_child_under_sudo_is_named_not_traced() {
    let mut cmd = memleak_command(&["--no-scan", "-c", "sh -c '/usr/bin/mount --version >/dev/null; true'"]);
    cmd.env("SUDO_UID", "65534").env("SUDO_GID", "65534");
    let out = Proc::spawn("memleak", cmd).finish();
    assert_eq!(out.code(), Some(0), "{}", text(&out));
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("WARNING: pid ") && l.contains("(mount) is not traced") && l.contains("uid 0")),
        "{}",
        text(&out)
    );
}

fn cgroup_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })
        .expect("a cgroup v2 hierarchy is mounted")
}

/// Removes a cgroup (once empty) when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
