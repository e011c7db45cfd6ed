//! An SVG flame graph of the outstanding bytes: the folded stacks (folded.rs) merged into a
//! tree, the root at the bottom, each frame as wide as the bytes held below it, in a memory
//! palette (greens). Static SVG: each frame's tooltip (`<title>`) gives its bytes and share.
//! Written here rather than with inferno, whose licence (CDDL-1.0) does not fit memleak's.
use std::collections::BTreeMap;
use std::fmt::Write;

use crate::snapshot::Snapshot;

pub struct FlameGraph;

impl super::Format for FlameGraph {
    fn name(&self) -> &'static str {
        "flamegraph"
    }

    fn render(&mut self, snap: &Snapshot) -> anyhow::Result<Vec<u8>> {
        Ok(svg(snap).into_bytes())
    }
}

#[derive(Default)]
struct Node {
    bytes: u64,
    children: BTreeMap<String, Node>,
}

impl Node {
    fn add(&mut self, frames: &[String], bytes: u64) {
        self.bytes = self.bytes.saturating_add(bytes);
        if let Some((first, rest)) = frames.split_first() {
            self.children.entry(first.clone()).or_default().add(rest, bytes);
        }
    }

    fn depth(&self) -> usize {
        1 + self.children.values().map(Node::depth).max().unwrap_or(0)
    }
}

const WIDTH: f64 = 1200.0;
const MARGIN: f64 = 10.0;
const FRAME: f64 = 16.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 10.0;
const FONT: f64 = 12.0;
/// Average glyph width of the font at FONT px, for fitting labels.
const GLYPH: f64 = FONT * 0.59;

pub fn svg(snap: &Snapshot) -> String {
    let mut root = Node::default();
    let mut count = 0u64;
    for p in snap.whole_job() {
        for s in p.stacks.iter().filter(|s| s.count > 0) {
            root.add(&super::folded_frames(snap, p, s), s.bytes);
            count += s.count;
        }
    }
    let depth = root.depth();
    let height = TOP + depth as f64 * FRAME + BOTTOM;
    let mut out = String::new();
    let _ = writeln!(out, r#"<?xml version="1.0" standalone="no"?>"#);
    let _ = writeln!(
        out,
        r#"<svg version="1.1" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" xmlns="http://www.w3.org/2000/svg">"#
    );
    let _ = writeln!(out, r##"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#f8fcf4"/>"##);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" font-family="Verdana, sans-serif" font-size="17" text-anchor="middle">Outstanding memory</text>"#,
        WIDTH / 2.0
    );
    let job: Vec<&crate::snapshot::ProcessSnapshot> = snap.whole_job().collect();
    let who = match job.as_slice() {
        [_] if snap.kernel => "the kernel".to_string(),
        [p] => format!("{} (pid {})", p.comm, p.pid),
        ps => format!("{} processes", ps.len()),
    };
    let _ = writeln!(
        out,
        r##"<text x="{}" y="40" font-family="Verdana, sans-serif" font-size="{FONT}" text-anchor="middle" fill="#555">{} bytes in {} allocations, {}, {}</text>"##,
        WIDTH / 2.0,
        root.bytes,
        count,
        escape(&who),
        super::hms(snap.time)
    );
    let _ = writeln!(out, r#"<g font-family="Verdana, sans-serif" font-size="{FONT}">"#);
    let scale = if root.bytes == 0 { 0.0 } else { (WIDTH - 2.0 * MARGIN) / root.bytes as f64 };
    draw(&mut out, "all", &root, MARGIN, height - BOTTOM - FRAME, scale, root.bytes);
    let _ = writeln!(out, "</g>\n</svg>");
    out
}

/// Draws `node` at (x, y) and its children above it.
fn draw(out: &mut String, name: &str, node: &Node, x: f64, y: f64, scale: f64, total: u64) {
    let w = node.bytes as f64 * scale;
    let w = if total == 0 { WIDTH - 2.0 * MARGIN } else { w };
    if w < 0.1 {
        return;
    }
    let share = if total == 0 { 0.0 } else { node.bytes as f64 * 100.0 / total as f64 };
    let name_x = escape(name);
    let _ = writeln!(out, "<g><title>{name_x} ({} bytes, {share:.2}%)</title>", node.bytes);
    let _ = writeln!(
        out,
        r#"<rect x="{x:.2}" y="{y:.1}" width="{w:.2}" height="{:.1}" fill="{}" rx="2" ry="2"/>"#,
        FRAME - 1.0,
        color(name)
    );
    let fits = ((w - 6.0) / GLYPH).floor() as usize;
    if fits >= 3 {
        let label: String = if name.chars().count() <= fits {
            name.to_string()
        } else {
            name.chars().take(fits - 2).chain("..".chars()).collect()
        };
        let _ = writeln!(out, r#"<text x="{:.2}" y="{:.1}">{}</text>"#, x + 3.0, y + FRAME - 4.5, escape(&label));
    }
    let _ = writeln!(out, "</g>");
    let mut cx = x;
    for (child, n) in &node.children {
        draw(out, child, n, cx, y - FRAME, scale, total);
        cx += n.bytes as f64 * scale;
    }
}

/// A green of the memory palette, varied by the name's hash so that neighbours differ.
fn color(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let v = |shift: u32| ((h >> shift) & 0xff) as f64 / 255.0;
    format!("rgb({},{},{})", (40.0 + 90.0 * v(8)) as u8, (170.0 + 70.0 * v(16)) as u8, (40.0 + 80.0 * v(24)) as u8)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::sample;

    #[test]
    fn parses_as_xml_and_names_each_function() {
        let s = sample(&[(1, 300, 3, &["leak_a", "main"]), (2, 100, 1, &["std::vector<int>::push", "main"])]);
        let svg = svg(&s);
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        let titles: Vec<String> =
            doc.descendants().filter(|n| n.has_tag_name("title")).map(|n| n.text().unwrap_or("").to_string()).collect();
        assert!(titles.contains(&"all (400 bytes, 100.00%)".to_string()), "{titles:?}");
        assert!(titles.contains(&"main (400 bytes, 100.00%)".to_string()), "{titles:?}");
        assert!(titles.contains(&"leak_a (300 bytes, 75.00%)".to_string()), "{titles:?}");
        assert!(titles.contains(&"std::vector<int>::push (100 bytes, 25.00%)".to_string()), "{titles:?}");
        // Nothing held: still a valid picture.
        roxmltree::Document::parse(&super::svg(&sample(&[]))).expect("empty graph");
    }
}
