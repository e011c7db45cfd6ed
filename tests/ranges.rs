//! Mappings as page ranges: munmap, mremap, mprotect and MAP_FIXED of any part of a mapping
//! trim, split or remove exactly the pages they touch; PROT_NONE address space is not counted.
mod common;
use std::collections::BTreeMap;

use common::*;

const P: u64 = 4096;

/// The allocs fixture under memleak, with -c (its commands pass through memleak's stdin) or -p.
enum Driven {
    C(Proc),
    P { fixture: Proc, memleak: Proc },
}

impl Driven {
    fn start(args: &[&str], under_p: bool) -> Driven {
        if under_p {
            let fixture = allocs_fixture(&[]);
            let pid = fixture.pid().to_string();
            let mut all = args.to_vec();
            all.extend(["-o", "0", "-p", &pid, "600"]);
            Driven::P { fixture, memleak: memleak_attached(&all) }
        } else {
            let exe = fixture("allocs");
            let mut all = args.to_vec();
            all.extend(["-c", exe.to_str().expect("utf-8 path")]);
            let mut m = memleak_attached(&all);
            m.expect("the fixture's ready line", |l| l.starts_with("ready "));
            Driven::C(m)
        }
    }

    /// Runs a fixture command; returns the lines it printed.
    fn cmd(&mut self, c: &str) -> Vec<String> {
        match self {
            Driven::C(m) => m.command(c),
            Driven::P { fixture, .. } => fixture.command(c),
        }
    }

    /// The address a command printed ("addr HEX SIZE" or "scratch HEX").
    fn addr(&mut self, c: &str) -> u64 {
        let lines = self.cmd(c);
        let a = lines
            .iter()
            .find_map(|l| l.strip_prefix("addr ").or(l.strip_prefix("scratch ")))
            .unwrap_or_else(|| panic!("{c}: no address in {lines:?}"));
        u64::from_str_radix(a.split(' ').next().unwrap_or(""), 16).expect("hex address")
    }

    /// The report of everything outstanding: the final one (-c), or the one Ctrl-C prints (-p).
    fn finish(self) -> Report {
        match self {
            Driven::C(mut m) => {
                m.send("exit 0");
                let out = m.finish();
                assert_eq!(out.code(), Some(0), "{}", out.stderr);
                final_report(&out.stdout)
            }
            Driven::P { fixture, memleak } => {
                memleak.signal(libc::SIGINT);
                let out = memleak.finish();
                assert_eq!(out.code(), Some(0), "{}", out.stderr);
                drop(fixture);
                parse_reports(&out.stdout).pop().expect("a report")
            }
        }
    }
}

/// The blocks a report lists (-a) by the function of their first frame: (address, size), sorted.
fn blocks_by_function(r: &Report) -> BTreeMap<String, Vec<(u64, u64)>> {
    let mut by: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for s in &r.stacks {
        assert_eq!(s.addrs.len() as u64, s.count, "{s:?}");
        assert_eq!(s.addrs.iter().map(|a| a.1).sum::<u64>(), s.bytes, "{s:?}");
        by.entry(s.func(0).to_string()).or_default().extend(&s.addrs);
    }
    by.values_mut().for_each(|v| v.sort());
    by
}

fn pieces(v: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// Every kind of partial unmap, remap and protection change, on mappings made with MAP_FIXED at
/// known places inside an area reserved by a raw syscall (so memleak never saw it), and on a
/// PROT_NONE reservation made through mmap. Returns what must stay outstanding, by function.
fn range_script(d: &mut Driven) -> BTreeMap<String, Vec<(u64, u64)>> {
    let s = d.addr(&format!("scratch {}", 128 * P));
    let at = |pages: u64| s + pages * P;
    let mmap_at = |d: &mut Driven, pages: u64, n: u64, prot: u32| {
        assert_eq!(d.addr(&format!("mmap_at {:#x} {} {prot}", at(pages), n * P)), at(pages));
    };
    let munmap = |d: &mut Driven, pages: u64, n: u64| {
        d.cmd(&format!("munmap {:#x} {}", at(pages), n * P));
    };
    let (mut mapped, mut remapped, mut protected) = (vec![], vec![], vec![]);

    // One mapping: head, tail, then a hole in the middle.
    mmap_at(d, 0, 16, 3);
    munmap(d, 0, 2);
    munmap(d, 14, 2);
    munmap(d, 6, 2);
    mapped.extend([(at(2), 4 * P), (at(8), 6 * P)]);
    // Whole.
    mmap_at(d, 20, 4, 3);
    munmap(d, 20, 4);
    // One munmap across three mappings and the gaps between them.
    mmap_at(d, 30, 2, 3);
    mmap_at(d, 33, 3, 3);
    mmap_at(d, 37, 2, 3);
    munmap(d, 31, 7);
    mapped.extend([(at(30), P), (at(38), P)]);

    // mremap of part of a mapping: shrunk in place (the rest of the old pages stay, the new
    // size is the mremap's).
    mmap_at(d, 40, 4, 3);
    let r = d.addr(&format!("mremap_at {:#x} {} {} 0", at(42), 2 * P, P));
    assert_eq!(r, at(42));
    mapped.push((at(40), 2 * P));
    remapped.push((at(42), P));
    // Grown in place, into pages freed first.
    mmap_at(d, 45, 1, 3);
    munmap(d, 46, 2);
    let r = d.addr(&format!("mremap_at {:#x} {} {} 0", at(45), P, 3 * P));
    assert_eq!(r, at(45));
    remapped.push((at(45), 3 * P));
    // Its middle page moved elsewhere (MREMAP_MAYMOVE | MREMAP_FIXED) and grown.
    mmap_at(d, 50, 3, 3);
    let r = d.addr(&format!("mremap_at {:#x} {} {} 3 {:#x}", at(51), P, 2 * P, at(60)));
    assert_eq!(r, at(60));
    mapped.extend([(at(50), P), (at(52), P)]);
    remapped.push((at(60), 2 * P));
    // Grown with nowhere to grow: the kernel moves it.
    mmap_at(d, 55, 2, 3);
    let moved = d.addr(&format!("mremap_at {:#x} {} {} 1", at(55), 2 * P, 8 * P));
    assert!(moved < s || moved >= at(128), "moved inside the scratch area: {moved:#x}");
    remapped.push((moved, 8 * P));

    // PROT_NONE over part of a mapping: those pages stop counting.
    mmap_at(d, 70, 4, 3);
    mmap_at(d, 71, 1, 0);
    mapped.extend([(at(70), P), (at(72), 2 * P)]);

    // A reservation: address space, never counted, until made accessible.
    let res = d.addr(&format!("reserve {}", 16 * P));
    let rat = |pages: u64| res + pages * P;
    d.cmd(&format!("mprotect {:#x} {} 3", rat(4), 2 * P));
    d.cmd(&format!("mprotect {:#x} {} 0", rat(5), P));
    protected.push((rat(4), P));
    assert_eq!(d.addr(&format!("mmap_at {:#x} {} 3", rat(10), 2 * P)), rat(10));
    mapped.push((rat(10), 2 * P));
    d.cmd(&format!("munmap {:#x} {}", rat(12), 4 * P));
    // Pages that are accessible already do not count twice.
    d.cmd(&format!("mprotect {:#x} {} 1", rat(4), P));

    // As glibc maps an arena: twice the size, then head and tail trimmed to an aligned block.
    let mut aligned = vec![];
    for _ in 0..4 {
        let a = d.addr(&format!("aligned {}", 1024 * P));
        assert_eq!(a % (1024 * P), 0);
        aligned.push((a, 1024 * P));
    }

    let mut want = BTreeMap::new();
    want.insert("do_mmap".to_string(), pieces(&aligned));
    want.insert("do_mmap_at".to_string(), pieces(&mapped));
    want.insert("do_mremap_at".to_string(), pieces(&remapped));
    want.insert("do_mprotect".to_string(), pieces(&protected));
    want
}

fn ranges_exact(under_p: bool, attach: &str) {
    let mut d = Driven::start(&["-a", "-T", "100", "--attach", attach], under_p);
    let want = range_script(&mut d);
    let r = d.finish();
    let got = blocks_by_function(&r);
    assert_eq!(got, want, "under {} --attach {attach}:\n{r:#?}", if under_p { "-p" } else { "-c" });
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn partial_unmaps_remaps_and_protections_exact_under_c() {
    ranges_exact(false, "auto");
}

/// mmap and mremap results come from their return probes: the same in every attach mode.
#[test]
fn partial_unmaps_exact_in_every_attach_mode() {
    ranges_exact(false, "multi");
    ranges_exact(false, "classic");
}

#[test]
fn partial_unmaps_remaps_and_protections_exact_under_p() {
    ranges_exact(true, "auto");
}

/// --combined-only keeps totals in BPF, updated as mappings are split and trimmed: the same
/// bytes and counts.
#[test]
fn combined_totals_follow_the_pieces() {
    let mut d = Driven::start(&["--combined-only", "-T", "100"], false);
    let want = range_script(&mut d);
    let r = d.finish();
    let mut want: Vec<(String, u64, u64)> =
        want.iter().map(|(f, v)| (f.clone(), v.iter().map(|b| b.1).sum(), v.len() as u64)).collect();
    want.sort();
    assert_eq!(r.summary(), want, "{r:#?}");
}

/// A reservation made accessible by MAP_FIXED and released again leaves nothing; unmapping a
/// reservation that holds counted pages ends them.
#[test]
fn reservations_count_only_what_is_accessible() {
    let mut d = Driven::start(&["-a"], false);
    let res = d.addr(&format!("reserve {}", 1024 * P));
    d.cmd(&format!("mmap_at {:#x} {} 3", res + 8 * P, 4 * P));
    d.cmd(&format!("mprotect {:#x} {} 3", res + 100 * P, 10 * P));
    d.cmd(&format!("mmap_at {:#x} {} 0", res + 8 * P, 4 * P));
    d.cmd(&format!("mprotect {:#x} {} 3", res + 200 * P, P));
    d.cmd(&format!("munmap {:#x} {}", res, 1024 * P));
    d.cmd("mmap 8192 1");
    let r = d.finish();
    assert_eq!(r.summary(), expected(&[("do_mmap", 8192, 1)]), "{r:#?}");
}

/// glibc maps each thread's arena from inside malloc (twice the size, then trims head and tail):
/// part of the malloc call, never counted, whatever alignment the kernel gave. Every run gives
/// the same answer. Thread stacks (mapped PROT_NONE, then made accessible but for the guard
/// page) count their accessible pages; how many there are depends on glibc's stack cache (a
/// thread that has ended lends its stack to the next), so only their size is compared.
#[test]
fn thread_arenas_give_the_same_answer_every_run() {
    let mut answers = Vec::new();
    for _ in 0..3 {
        let out = run_under_c(&["-T", "100"], &["quiet", "threads 8 24 500"]);
        let r = final_report(&out.stdout);
        let text = out.stdout.join("\n");
        for s in &r.stacks {
            assert!(!s.names().iter().any(|n| n.contains("new_heap") || n == "sysmalloc"), "an arena counted: {s:?}");
        }
        let creating = |s: &&Stack| s.names().iter().any(|n| n == "pthread_create");
        let (thread_stacks, rest): (Vec<&Stack>, Vec<&Stack>) = r.stacks.iter().partition(creating);
        let mapped: Vec<&&Stack> = thread_stacks.iter().filter(|s| s.func(0) == "setup_stack_prot").collect();
        assert_eq!(mapped.len(), 1, "{text}");
        let per_thread = mapped[0].bytes / mapped[0].count;
        assert!((1..=8).contains(&mapped[0].count) && mapped[0].bytes.is_multiple_of(mapped[0].count), "{text}");
        assert_eq!(per_thread % P, 0, "{text}");
        // By first function: a walk that met another thread mapping (the mmap lock busy) ends
        // early and gives a shorter stack of the same site, said in a WARNING line.
        let mut by_site: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for s in &rest {
            let e = by_site.entry(s.func(0).to_string()).or_default();
            (e.0, e.1) = (e.0 + s.bytes, e.1 + s.count);
        }
        let rest: Vec<(String, u64, u64)> = by_site.into_iter().map(|(f, (b, n))| (f, b, n)).collect();
        assert_eq!(rest, expected(&[("do_thread_malloc", 8 * 500 * 24, 8 * 500)]), "{text}");
        assert!(r.warnings.iter().all(|w| w.contains(" end early: ")), "{:?}", r.warnings);
        answers.push((rest, per_thread));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
}

/// Threads mapping and trimming at once: every record and slot kept apart, the total exact.
#[test]
fn threads_trimming_at_once() {
    let out = run_under_c(&["-T", "100"], &["map_threads 8 300"]);
    let r = final_report(&out.stdout);
    let mine: Vec<(u64, u64)> = r.stacks_in("do_mmap").iter().map(|s| (s.bytes, s.count)).collect();
    assert_eq!(mine.iter().fold((0, 0), |a, s| (a.0 + s.0, a.1 + s.1)), (8 * 300 * 2 * P, 8 * 300), "{r:#?}");
    assert!(r.warnings.iter().all(|w| w.contains(" end early: ")), "{:?}", r.warnings);
}

/// An exec ends the old image's mappings, reservations included.
#[test]
fn exec_ends_mappings() {
    let exe = fixture("allocs");
    let cmd = exe.to_str().expect("utf-8 path").to_string();
    let mut m = memleak_attached(&["-c", &cmd]);
    m.expect("the fixture's ready line", |l| l.starts_with("ready "));
    m.command("mmap 8192 3");
    m.command(&format!("reserve {}", 64 * P));
    m.send("exec");
    m.expect("the new image's ready line", |l| l.starts_with("ready "));
    m.command("mmap 4096 1");
    m.send("exit 0");
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(final_report(&out.stdout).summary(), expected(&[("do_mmap", 4096, 1)]));
}
