//! Folded stacks: one line per stack, `root;...;leaf BYTES`, the outstanding bytes: what
//! FlameGraph's flamegraph.pl, inferno and speedscope read. Frames are named as in the text
//! report (functions inlined at an address are frames of their own); with several processes
//! each stack starts with `comm (pid N)`, and with a reachability class, `[class]` next.
use std::fmt::Write;

use crate::snapshot::Snapshot;

pub struct Folded;

impl super::Format for Folded {
    fn name(&self) -> &'static str {
        "folded"
    }

    fn render(&mut self, snap: &Snapshot) -> anyhow::Result<Vec<u8>> {
        Ok(folded(snap).into_bytes())
    }
}

pub fn folded(snap: &Snapshot) -> String {
    let mut out = String::new();
    for p in snap.whole_job() {
        for s in p.stacks.iter().filter(|s| s.count > 0) {
            let _ = writeln!(out, "{} {}", super::folded_frames(snap, p, s).join(";"), s.bytes);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::sample;

    #[test]
    fn root_first_bytes_last() {
        let mut s = sample(&[(1, 100, 2, &["leaf", "mid", "main"]), (2, 8, 1, &[])]);
        s.processes[0].stacks[1].stack_id = 0;
        assert_eq!(folded(&s), "main;mid;leaf 100\n[stack not stored] 8\n");
        let mut two = s.clone();
        let mut other = s.processes[0].clone();
        other.pid = 7;
        other.comm = "a;b".into();
        other.stacks.truncate(1);
        other.stacks[0].class = Some("definitely lost".into());
        two.processes.push(other);
        assert_eq!(
            folded(&two),
            "prog (pid 42);main;mid;leaf 100\nprog (pid 42);[stack not stored] 8\na:b (pid 7);[definitely lost];main;mid;leaf 100\n"
        );
    }
}
