//! No allocation call skipped silently: Node.js's ArrayBuffer blocks (deep stacks through JIT
//! code and V8), and a call whose return is never seen (left by longjmp).
mod common;
use std::path::Path;
use std::process::Command;

use common::*;

const NODE: &str = "/usr/bin/node";
const FIRST_FRAME: &str = "node::NodeArrayBufferAllocator::AllocateUninitialized";

fn leak_js() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/leak.js").to_str().expect("utf-8 path").to_string()
}

/// The blocks of `size` bytes a report lists under stacks that start in Node's ArrayBuffer
/// allocator; and the warnings that say something was not tracked.
fn node_blocks(r: &Report, size: u64) -> (usize, Vec<&String>) {
    let n = r
        .stacks
        .iter()
        .filter(|s| s.func(0).starts_with(FIRST_FRAME))
        .flat_map(|s| &s.addrs)
        .filter(|a| a.1 == size)
        .count();
    // Stacks of JavaScript run deep: cut at 127 frames or ended early is said, and harmless here.
    let lost =
        r.warnings.iter().filter(|w| !w.contains(" stacks truncated at ") && !w.contains(" end early: ")).collect();
    (n, lost)
}

/// 100 Buffers of 100,000 bytes, each a malloc(100000) from Node's ArrayBuffer allocator: all
/// in the report of a -c run, with nothing said missing.
#[test]
fn node_buffers_all_reported_under_c() {
    assert!(Path::new(NODE).exists(), "{NODE} is missing: scripts/setup installs nodejs");
    let cmd = format!("{NODE} {}", leak_js());
    let mut m = memleak_attached(&["-a", "-T", "100000", "-c", &cmd]);
    m.expect("node's ready line", |l| l.starts_with("ready "));
    m.command("leak 100 100000");
    m.send("kill");
    let out = m.finish();
    assert_eq!(out.code(), Some(128 + libc::SIGKILL), "{}", out.stderr);
    // Not final_report(): its symbol check fails on a libc frame symbolized through
    // libc6-dbg (__pthread_once_slow+0x8e057), a symbolizer matter this test is not about.
    let r = parse_reports(&out.stdout).into_iter().find(|r| r.after_exit).expect("a final report");
    let (n, lost) = node_blocks(&r, 100000);
    assert_eq!(n, 100, "{}", out.stdout.join("\n"));
    assert!(lost.is_empty(), "{lost:?}");
}

/// The same with memleak attached to a running node with -p.
#[test]
fn node_buffers_all_reported_under_p() {
    assert!(Path::new(NODE).exists(), "{NODE} is missing: scripts/setup installs nodejs");
    let mut cmd = Command::new(NODE);
    cmd.arg(leak_js());
    let mut node = Proc::spawn("node", cmd);
    node.expect("node's ready line", |l| l.starts_with("ready "));
    let pid = node.pid().to_string();
    let m = memleak_attached(&["-a", "-o", "0", "-T", "100000", "-p", &pid, "600"]);
    node.command("leak 100 100000");
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let r = parse_reports(&out.stdout).pop().expect("a report");
    let (n, lost) = node_blocks(&r, 100000);
    assert_eq!(n, 100, "{}", out.stdout.join("\n"));
    assert!(lost.is_empty(), "{lost:?}");
}

/// A call that never returns as seen (pool_valloc leaves by longjmp) once made every later,
/// deeper call of its thread look nested inside it: all of them went missing, unsaid. Now the
/// in-flight call is checked (its return address slot must still hold the uprobe trampoline):
/// the later calls count, and the lost one is said.
#[test]
fn a_call_left_by_longjmp_hides_nothing() {
    let exe = fixture("allocs");
    let obj = exe.to_str().expect("utf-8 path");
    for attach in ["session", "classic"] {
        let out = run_under_c(
            &["--attach", attach, "-O", obj, "-S", "pool_"],
            &["escape", "pool_deep 20 48 5", "escape", "pool 16 2 3"],
        );
        let r = final_report(&out.stdout);
        // Two call sites of do_pool_malloc: pool_deep's and run's.
        assert_eq!(
            r.summary(),
            expected(&[("do_pool_malloc", 5 * 48, 5), ("do_pool_malloc", 2 * 16, 2)]),
            "{}",
            out.stdout.join("\n")
        );
        assert_eq!(
            r.warnings,
            [
                "2 allocation calls untracked: another allocation call began on their thread before their return was seen (a longjmp out of the allocator, or a signal handler that allocated)"
            ],
            "--attach {attach}"
        );
    }
}
