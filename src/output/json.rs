//! JSON Lines: one document per report, on one line. The schema (docs/output-formats.md) is
//! versioned by `version`: fields may be added within a version, never renamed or removed.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::collector::Losses;
use crate::snapshot::{Exit, Snapshot, frame_lines};

/// The schema's version.
pub const VERSION: u32 = 1;

pub struct Json {
    /// --max-allocs, which the warnings name.
    pub max_allocs: u32,
}

impl super::Format for Json {
    fn name(&self) -> &'static str {
        "json"
    }

    fn render(&mut self, snap: &Snapshot) -> anyhow::Result<Vec<u8>> {
        let mut out = serde_json::to_vec(&document(snap, self.max_allocs))?;
        out.push(b'\n');
        Ok(out)
    }
}

#[derive(Serialize)]
struct Document<'a> {
    version: u32,
    /// RFC 3339, UTC, milliseconds.
    time: String,
    unix_ms: u64,
    /// Since tracing began.
    elapsed_ms: u64,
    #[serde(rename = "final")]
    is_final: bool,
    mode: &'static str,
    sample_rate: u32,
    /// --sample-bytes (0: off): bytes and counts are then estimates.
    sample_bytes: u64,
    losses: BTreeMap<&'static str, u64>,
    warnings: Vec<String>,
    /// Each module the frames name, once: its build-id.
    modules: BTreeMap<&'a str, Module<'a>>,
    processes: Vec<Process<'a>>,
}

#[derive(Serialize)]
struct Module<'a> {
    build_id: Option<&'a str>,
}

#[derive(Serialize)]
struct Process<'a> {
    pid: u32,
    comm: &'a str,
    /// null while it runs.
    exit: Option<ExitDoc>,
    bytes: u64,
    allocations: u64,
    alloc_bytes: u64,
    alloc_allocations: u64,
    /// How many stacks hold memory (all are listed below).
    stack_count: u64,
    /// Reachability summary (issue 11): null unless the report is classified.
    summary: Option<Vec<SummaryClass<'a>>>,
    /// What a reachability scan could not do, or why the report is not classified.
    warnings: Vec<&'a str>,
    /// With --suppressions: what they left out of `stacks` (and of the totals above).
    suppressed: Option<Young>,
    /// Blocks younger than -o, left out of `stacks` (not in the totals above).
    young: Young,
    stacks: Vec<Stack<'a>>,
}

#[derive(Serialize)]
struct Young {
    allocations: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct ExitDoc {
    /// The exit status (128+N if killed by signal N), null if not known (-p).
    code: Option<i32>,
}

#[derive(Serialize)]
struct SummaryClass<'a> {
    class: &'a str,
    bytes: u64,
    allocations: u64,
}

#[derive(Serialize)]
struct Stack<'a> {
    /// The stack's id (hex): the same stack in every report.
    id: String,
    bytes: u64,
    allocations: u64,
    alloc_bytes: u64,
    alloc_allocations: u64,
    /// bytes - bytes at the previous report.
    growth: i64,
    prev_bytes: u64,
    growing: bool,
    class: Option<&'a str>,
    /// With -a only.
    #[serde(skip_serializing_if = "Option::is_none")]
    blocks: Option<Vec<Block>>,
    frames: Vec<Frame<'a>>,
}

#[derive(Serialize)]
struct Block {
    address: String,
    size: u64,
}

#[derive(Serialize)]
struct Frame<'a> {
    function: Option<&'a str>,
    offset: Option<u64>,
    module: Option<&'a str>,
    /// Hex, as in the text report (a kernel address does not fit a JSON number exactly).
    address: String,
    file: Option<&'a str>,
    line: Option<u32>,
    inlined: bool,
    /// Hex offset of the address in the module's file, when known.
    file_offset: Option<String>,
    /// Why the module could not be read: only then.
    #[serde(skip_serializing_if = "Option::is_none")]
    unreadable: Option<&'a str>,
}

fn document(snap: &Snapshot, max_allocs: u32) -> Document<'_> {
    let processes = snap
        .processes
        .iter()
        .map(|p| Process {
            pid: p.pid,
            comm: &p.comm,
            exit: p.exit.map(|e| ExitDoc {
                code: match e {
                    Exit::Code(c) => Some(c),
                    Exit::Exited => None,
                },
            }),
            bytes: p.totals.bytes,
            allocations: p.totals.count,
            alloc_bytes: p.totals.alloc_bytes,
            alloc_allocations: p.totals.alloc_count,
            stack_count: p.totals.stacks,
            summary: p.summary.as_ref().map(|s| {
                s.classes.iter().map(|(c, b, n)| SummaryClass { class: c, bytes: *b, allocations: *n }).collect()
            }),
            warnings: p.warnings.iter().map(String::as_str).collect(),
            suppressed: p.suppressed.map(|(bytes, n)| Young { allocations: n, bytes }),
            young: Young { allocations: p.young.0, bytes: p.young.1 },
            stacks: p
                .stacks
                .iter()
                .map(|s| Stack {
                    id: format!("{:x}", s.stack_id),
                    bytes: s.bytes,
                    allocations: s.count,
                    alloc_bytes: s.alloc_bytes,
                    alloc_allocations: s.alloc_count,
                    growth: s.growth.delta,
                    prev_bytes: s.growth.prev_bytes,
                    growing: s.growth.growing,
                    class: s.class.as_deref(),
                    blocks: (!s.blocks.is_empty()).then(|| {
                        let mut b: Vec<_> = s.blocks.clone();
                        b.sort();
                        b.into_iter().map(|(a, size)| Block { address: format!("{a:x}"), size }).collect()
                    }),
                    frames: frame_lines(&s.frames)
                        .map(|l| Frame {
                            function: l.function,
                            offset: l.offset,
                            module: l.module,
                            address: format!("{:x}", l.address),
                            file: l.file,
                            line: l.line,
                            inlined: l.inlined,
                            file_offset: l.frame.file_offset.map(|o| format!("{o:x}")),
                            unreadable: l.frame.unreadable.as_deref(),
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    let mut modules = BTreeMap::new();
    for f in snap.processes.iter().flat_map(|p| &p.stacks).flat_map(|s| s.frames.iter()) {
        if let Some(m) = f.module.as_deref() {
            let e = modules.entry(m).or_insert(Module { build_id: None });
            e.build_id = e.build_id.or(f.build_id.as_deref());
        }
    }
    let unix = snap.time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Document {
        version: VERSION,
        time: rfc3339(unix),
        unix_ms: unix.as_millis() as u64,
        elapsed_ms: snap.elapsed.as_millis() as u64,
        is_final: snap.is_final,
        mode: if snap.kernel { "kernel" } else { "process" },
        sample_rate: snap.sample_rate,
        sample_bytes: snap.sample_bytes,
        losses: losses(&snap.losses),
        warnings: super::text::loss_lines(&snap.losses, max_allocs)
            .into_iter()
            .chain(snap.warnings.iter().cloned())
            .collect(),
        modules,
        processes,
    }
}

/// Every loss counter by name (docs/output-formats.md).
fn losses(l: &Losses) -> BTreeMap<&'static str, u64> {
    let s = &l.unwind_stops;
    BTreeMap::from([
        ("allocs_map_full", l.allocs_map_full),
        ("stacks_map_full", l.stacks_map_full),
        ("no_thread_state", l.no_thread_state),
        ("trace_events_lost", l.trace_events_lost),
        ("combined_map_full", l.combined_map_full),
        ("truncated_stacks", l.truncated_stacks),
        ("frees_failed", l.frees_failed),
        ("allocs_missed", l.allocs_missed),
        ("frees_missed", l.frees_missed),
        ("calls_missed", l.calls_missed),
        ("unwinds", l.unwinds),
        ("unwind_stops", s.total()),
        ("unwind_stop_not_mapped", s.not_mapped),
        ("unwind_stop_no_table", s.no_table),
        ("unwind_stop_no_cfi", s.no_cfi),
        ("unwind_stop_unsupported", s.unsupported),
        ("unwind_stop_bad_cfa", s.bad_cfa),
        ("unwind_stop_unreadable", s.unreadable),
        ("unwind_stop_vma_busy", s.vma_busy),
    ])
}

/// `2026-01-02T03:04:05.678Z` of a time since the epoch.
fn rfc3339(t: std::time::Duration) -> String {
    let secs = t.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar), by 400-year eras.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        t.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::Format;
    use crate::snapshot::tests::sample;
    use std::time::Duration;

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(Duration::from_millis(1_700_000_000_123)), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(Duration::from_secs(4_107_542_399)), "2100-02-28T23:59:59.000Z");
    }

    #[test]
    fn one_line_per_report_with_every_field() {
        let s = sample(&[(1, 100, 2, &["leaf", "main"])]);
        let out = Json { max_allocs: 1 }.render(&s).unwrap();
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(out.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["time"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["mode"], "process");
        assert_eq!(v["losses"]["allocs_map_full"], 0);
        let p = &v["processes"][0];
        assert_eq!((p["pid"].as_u64(), p["comm"].as_str(), p["bytes"].as_u64()), (Some(42), Some("prog"), Some(100)));
        assert!(p["exit"].is_null() && p["summary"].is_null());
        let st = &p["stacks"][0];
        assert_eq!(
            (st["id"].as_str(), st["bytes"].as_u64(), st["allocations"].as_u64()),
            (Some("1"), Some(100), Some(2))
        );
        assert_eq!((st["alloc_bytes"].as_u64(), st["growth"].as_i64()), (Some(200), Some(100)));
        assert!(st["class"].is_null() && st.get("blocks").is_none());
        let f = &st["frames"][0];
        assert_eq!(f["function"], "leaf");
        assert_eq!(f["offset"], 16);
        assert_eq!(f["module"], "/bin/prog");
        assert_eq!(f["address"], "402000");
        assert_eq!((f["file"].as_str(), f["line"].as_u64()), (Some("/src/prog.c"), Some(10)));
        assert_eq!(f["inlined"].as_bool(), Some(false));
        assert!(f.get("unreadable").is_none());
        assert_eq!(v["modules"]["/bin/prog"]["build_id"], "abcd");
        assert_eq!(st["frames"][1]["function"], "main");
    }
}
