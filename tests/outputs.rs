//! The outputs other tools read: pprof (checked with the real `go tool pprof`), folded stacks,
//! the SVG flame graph, JSON Lines, and growth between reports; each against leaks known
//! exactly, and in kernel mode.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// What the allocs fixture leaks, at three sites, what it allocates and frees (churn), and
/// allocations that fail (they allocate nothing: counted nowhere).
const CMDS: [&str; 6] =
    ["malloc 100 3", "calloc 10 20 2", "aligned_alloc 64 256 4", "freed 64 10", "fail_malloc", "fail_posix_memalign"];
/// (leaf function, bytes, allocations) outstanding at the end.
const LEAKS: [(&str, u64, u64); 3] = [("do_malloc", 300, 3), ("do_calloc", 400, 2), ("do_aligned_alloc", 1024, 4)];

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("outputs").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs the allocs fixture under memleak with `args` (-c added), sends CMDS, then exits it.
/// Does not wait for the "Attaching" line: with --format json it is on stderr.
fn run_cmds(args: &[&str]) -> Finished {
    let exe = fixture("allocs");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-c", s(&exe)]);
    let mut m = memleak(&all);
    m.expect("the fixture's ready line", |l| l.starts_with("ready "));
    for c in CMDS {
        m.command(c);
    }
    m.send("exit 0");
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "memleak's exit status; stderr: {}", out.stderr);
    out
}

/// Runs `go tool pprof ARGS FILE` and returns its output.
fn pprof(file: &Path, args: &[&str]) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof", "-symbolize=none", "-nodecount=100000"])
        .args(args)
        .arg(file)
        .env("PPROF_TMPDIR", file.parent().expect("dir"))
        .output()
        .expect("go tool pprof runs (golang-go, installed by scripts/setup)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "go tool pprof {args:?}: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    text
}

/// The flat value of each function in `go tool pprof -top` output (a `B` suffix dropped).
fn top_flat(top: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let mut rows = false;
    for line in top.lines() {
        if line.trim_start().starts_with("flat ") {
            rows = true;
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        if !rows || w.len() < 6 {
            continue;
        }
        let flat = w[0].trim_end_matches('B').parse().unwrap_or_else(|_| panic!("flat value in {line:?}"));
        if flat > 0 {
            out.insert(w[5..].join(" "), flat);
        }
    }
    out
}

/// The total of `go tool pprof -top`: N of "Showing nodes accounting for X, P% of N total".
fn top_total(top: &str) -> u64 {
    let line = top.lines().find(|l| l.starts_with("Showing nodes accounting for")).expect("a Showing line");
    let total = line.rsplit(" of ").next().and_then(|t| t.strip_suffix(" total")).expect("N total");
    total.trim_end_matches('B').parse().unwrap_or_else(|_| panic!("total in {line:?}"))
}

/// Folded lines: bytes per leaf (the last frame), and the total.
fn folded_by_leaf(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let (stack, bytes) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad folded line {line:?}"));
        let bytes: u64 = bytes.parse().unwrap_or_else(|_| panic!("bad bytes in {line:?}"));
        let leaf = stack.rsplit(';').next().expect("a leaf");
        assert!(!stack.is_empty() && stack.split(';').all(|f| !f.is_empty()), "empty frame in {line:?}");
        *out.entry(leaf.to_string()).or_default() += bytes;
    }
    out
}

fn expected_leaks() -> BTreeMap<String, u64> {
    LEAKS.iter().map(|(f, b, _)| (f.to_string(), *b)).collect()
}

#[test]
fn pprof_folded_and_flame_graph_hold_each_leak_exactly() {
    let dir = scratch("files");
    let (pb, folded, svg) = (dir.join("heap.pb.gz"), dir.join("stacks.folded"), dir.join("leaks.svg"));
    let out = run_cmds(&["--pprof", s(&pb), "--folded", s(&folded), "--flamegraph", s(&svg)]);
    // The text report on stdout is unchanged: the same leaks.
    let text = final_report(&out.stdout);
    assert_eq!(text.summary(), expected(&LEAKS));

    // pprof, read by the real go tool pprof: each site's exact bytes and counts.
    let flat = |index: &str| top_flat(&pprof(&pb, &["-top", "-unit=B", &format!("-sample_index={index}")]));
    let space = flat("inuse_space");
    let objects = flat("inuse_objects");
    for (f, bytes, count) in LEAKS {
        assert_eq!(space.get(f), Some(&bytes), "inuse_space of {f}: {space:?}");
        assert_eq!(objects.get(f), Some(&count), "inuse_objects of {f}: {objects:?}");
    }
    assert_eq!(space.len(), 3, "only the three leaks hold memory: {space:?}");
    // alloc_space: the leaks, and the churn the leak view cannot show (10 blocks of 64, freed).
    let alloc = flat("alloc_space");
    for (f, bytes, _) in LEAKS {
        assert_eq!(alloc.get(f), Some(&bytes), "alloc_space of {f}: {alloc:?}");
    }
    assert_eq!(alloc.get("do_malloc_and_free"), Some(&640), "alloc_space of the freed blocks: {alloc:?}");
    let alloc_objects = flat("alloc_objects");
    assert_eq!(alloc_objects.get("do_malloc_and_free"), Some(&10));
    // A failed malloc (do_malloc's fourth call) and posix_memalign are not allocations.
    assert_eq!(alloc_objects.get("do_malloc"), Some(&3), "{alloc_objects:?}");
    assert_eq!(alloc_objects.get("do_posix_memalign"), None, "{alloc_objects:?}");
    assert_eq!(alloc_objects.len(), 4, "{alloc_objects:?}");
    // Lines and mappings with build ids: pprof lists the source line and the object.
    let raw = pprof(&pb, &["-raw"]);
    assert!(raw.contains("do_malloc ") && raw.contains("allocs.c:"), "{raw}");
    let exe = std::fs::canonicalize(fixture("allocs")).unwrap();
    let mapping =
        raw.lines().find(|l| l.contains(s(&exe))).unwrap_or_else(|| panic!("no mapping of the fixture: {raw}"));
    assert!(mapping.split_whitespace().nth(3).is_some_and(|id| id.len() == 40), "build id: {mapping}");

    // Folded: each leaf's lines sum to its bytes.
    let folded_text = std::fs::read_to_string(&folded).unwrap();
    assert_eq!(folded_by_leaf(&folded_text), expected_leaks(), "{folded_text}");
    // Root first, after the class the final report's scan gave (every block still reachable).
    assert!(folded_text.lines().all(|l| l.starts_with("[still reachable];_start;")), "root first: {folded_text}");

    // The flame graph parses as XML and names each leaking function.
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&svg_text).expect("the SVG is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let titles: Vec<&str> = doc.descendants().filter(|n| n.has_tag_name("title")).filter_map(|n| n.text()).collect();
    for (f, bytes, _) in LEAKS {
        assert!(titles.iter().any(|t| t.starts_with(&format!("{f} ({bytes} bytes"))), "{f} not in {titles:?}");
    }
    // Written by rename: nothing else is left in the directory.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
}

#[test]
fn json_lines_parse_and_the_last_holds_the_final_report() {
    let out = run_cmds(&["--format", "json"]);
    let docs: Vec<serde_json::Value> = out
        .stdout
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {e}: {l}")))
        .collect();
    assert!(!docs.is_empty(), "no JSON line in {:?}", out.stdout);
    // Nothing but the command's own lines and JSON on stdout.
    assert!(
        out.stdout.iter().all(|l| ["{", "ready ", "done ", "addr "].iter().any(|p| l.starts_with(p))),
        "{:?}",
        out.stdout
    );
    assert!(out.stderr.contains("Attaching to pid"), "{}", out.stderr);
    let last = docs.last().unwrap();
    assert_eq!(last["version"], 1);
    assert_eq!(last["final"], true);
    let p = &last["processes"][0];
    assert_eq!(p["exit"]["code"], 0);
    assert_eq!(p["comm"], "allocs");
    let held: Vec<(String, u64, u64)> = p["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["allocations"].as_u64() > Some(0))
        .map(|st| {
            let leaf = st["frames"][0]["function"].as_str().unwrap_or("").to_string();
            (leaf, st["bytes"].as_u64().unwrap(), st["allocations"].as_u64().unwrap())
        })
        .collect();
    let mut held = held;
    held.sort();
    // The same stacks as the text report of a run without --format json.
    let text = final_report(&run_under_c(&[], &CMDS).stdout);
    assert_eq!(held, text.summary());
    assert_eq!(held, expected(&LEAKS));
    assert_eq!(p["bytes"], 1724);
    // The freed blocks' stack: nothing held, everything it allocated counted.
    let churn: Vec<&serde_json::Value> = p["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["frames"][0]["function"] == "do_malloc_and_free")
        .collect();
    assert_eq!(churn.len(), 1);
    assert_eq!((churn[0]["bytes"].as_u64(), churn[0]["alloc_bytes"].as_u64()), (Some(0), Some(640)));
    let f = &p["stacks"][0]["frames"][0];
    for key in ["function", "offset", "module", "address", "file", "line", "inlined", "file_offset"] {
        assert!(!f[key].is_null(), "frame field {key} missing: {f}");
    }
    let module = f["module"].as_str().unwrap();
    assert_eq!(last["modules"][module]["build_id"].as_str().map(str::len), Some(40), "{}", last["modules"]);
}

/// A `\tN bytes in M allocations from stack (+G bytes since the last report)[ growing]` line.
fn growth_line(line: &str) -> Option<(u64, i64, bool)> {
    let rest = line.strip_prefix('\t')?;
    let (bytes, rest) = rest.split_once(" bytes in ")?;
    let (_, rest) = rest.split_once(" allocations from stack (")?;
    let (growth, rest) = rest.split_once(" bytes since the last report)")?;
    Some((bytes.parse().ok()?, growth.parse().ok()?, rest == " growing"))
}

#[test]
fn sort_by_growth_puts_the_leak_before_a_larger_stable_block() {
    let exe = fixture("grower");
    let mut m = memleak(&["--sort", "growth", "--growth", "-T", "1", "-o", "0", "-c", s(&exe), "1"]);
    m.expect("ready", |l| l.starts_with("ready "));
    // (function of the one stack shown, bytes, growth, growing) of each report.
    let mut shown = Vec::new();
    while shown.len() < 4 {
        m.expect("a report", is_header);
        let stack = m.expect("its stack line", |l| l.starts_with('\t'));
        let frame = m.expect("its first frame", |l| l.starts_with("\t\t"));
        let (bytes, growth, growing) = growth_line(&stack).unwrap_or_else(|| panic!("no growth in {stack:?}"));
        shown.push((frame_function(frame.trim_start()).to_string(), bytes, growth, growing));
    }
    m.close_stdin();
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    eprintln!("{shown:?}");
    // First report: both are new; the stable block grew by all of its 100000 bytes.
    assert_eq!(shown[0], ("stable_block".to_string(), 100000, 100000, false));
    // Then the leak, smaller, comes first every time; from the third report on it is marked.
    for (i, (f, bytes, growth, growing)) in shown.iter().enumerate().skip(1) {
        assert_eq!(f, "grow_leak", "report {i}: {shown:?}");
        assert!(*bytes < 100000 && *growth > 0 && *growth as u64 <= *bytes, "report {i}: {shown:?}");
        assert_eq!(*growing, i >= 2, "report {i}: {shown:?}");
    }
}

#[test]
fn an_output_file_that_cannot_be_written_fails_at_start() {
    let dir = scratch("unwritable");
    for (flag, path) in [
        ("--pprof", dir.join("no/such/dir/p.pb.gz")),
        ("--folded", dir.clone()),
        ("--flamegraph", PathBuf::from("/proc/self/nope.svg")),
    ] {
        let out = memleak_output(&[flag, s(&path), "-c", "true"]);
        assert_eq!(out.code(), Some(1), "{flag}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "nothing traced: {:?}", out.stdout);
        let line = out.stderr.trim_end();
        assert!(line.starts_with(&format!("memleak: cannot write {flag} {}: ", path.display())), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }
}

#[test]
fn kernel_mode_has_every_output() {
    let dir = scratch("kernel");
    let (pb, folded, svg) = (dir.join("k.pb.gz"), dir.join("k.folded"), dir.join("k.svg"));
    let out = memleak_output(&[
        "--format",
        "json",
        "--pprof",
        s(&pb),
        "--folded",
        s(&folded),
        "--flamegraph",
        s(&svg),
        "-o",
        "0",
        "1",
        "2",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.len(), 2, "two JSON lines: {:?}", out.stdout);
    let last: serde_json::Value = serde_json::from_str(&out.stdout[1]).expect("JSON");
    assert_eq!((last["mode"].as_str(), last["final"].as_bool()), (Some("kernel"), Some(true)));
    let p = &last["processes"][0];
    assert_eq!((p["pid"].as_u64(), p["comm"].as_str()), (Some(0), Some("kernel")));
    let bytes = p["bytes"].as_u64().unwrap();
    assert!(bytes > 0, "the kernel holds memory");
    // The files hold the same (final) report: the same total everywhere.
    let folded_total: u64 = folded_by_leaf(&std::fs::read_to_string(&folded).unwrap()).values().sum();
    assert_eq!(folded_total, bytes);
    let top = pprof(&pb, &["-top", "-unit=B", "-sample_index=inuse_space"]);
    assert_eq!(top_total(&top), bytes, "{top}");
    let raw = pprof(&pb, &["-raw"]);
    assert!(raw.contains("[kernel.kallsyms]"), "kernel mapping: {raw}");
    roxmltree::Document::parse(&std::fs::read_to_string(&svg).unwrap()).expect("the SVG is well-formed XML");
}
