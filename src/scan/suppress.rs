//! Suppressions in LeakSanitizer's format: `leak:PATTERN` lines, `#` comments. A stack is
//! suppressed when a pattern matches any of its frames' function (inlined ones included),
//! module path or source file. A pattern matches when its text occurs in the string; `*`
//! stands for any text, `^` at its start anchors it to the string's start, `$` at its end to
//! the string's end.
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::symbolizer::Frame;

#[derive(Debug, Clone, Default)]
pub struct Suppressions {
    pub patterns: Vec<String>,
}

impl Suppressions {
    pub fn load(path: &Path) -> Result<Suppressions> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("--suppressions: cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("--suppressions {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Suppressions> {
        let mut patterns = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(':') {
                Some(("leak", p)) if !p.trim().is_empty() => patterns.push(p.trim().to_string()),
                _ => bail!("line {}: {line:?} is not a leak:PATTERN suppression", n + 1),
            }
        }
        Ok(Suppressions { patterns })
    }

    /// The first pattern that matches a frame of the stack.
    pub fn matching(&self, frames: &[Frame]) -> Option<usize> {
        self.patterns.iter().position(|p| {
            frames.iter().any(|f| {
                f.symbol.as_ref().is_some_and(|(name, _)| matches(p, name))
                    || f.module.as_deref().is_some_and(|m| matches(p, m))
                    || file(&f.line).is_some_and(|s| matches(p, s))
                    || f.inlined
                        .iter()
                        .any(|(name, line)| matches(p, name) || file(line).is_some_and(|s| matches(p, s)))
            })
        })
    }
}

/// The source file of a `file:line`.
fn file(line: &Option<String>) -> Option<&str> {
    line.as_deref().map(|l| l.rsplit_once(':').map_or(l, |(f, _)| f))
}

/// LeakSanitizer's pattern match (see the module's comment).
pub fn matches(pattern: &str, s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    let (start, p) = match pattern.strip_prefix('^') {
        Some(p) => (true, p),
        None => (false, pattern),
    };
    let (end, p) = match p.strip_suffix('$') {
        Some(p) => (true, p),
        None => (false, p),
    };
    let parts: Vec<&str> = p.split('*').collect();
    let mut pos = 0;
    for (k, part) in parts.iter().enumerate() {
        let last = k + 1 == parts.len();
        if part.is_empty() {
            continue;
        }
        let found = if k == 0 && start {
            s.starts_with(part).then_some(0)
        } else if last && end {
            // The last part at the very end, after what matched so far.
            (s.len() >= pos + part.len() && s.ends_with(part)).then(|| s.len() - part.len())
        } else {
            s[pos..].find(part).map(|i| pos + i)
        };
        let Some(at) = found else { return false };
        pos = at + part.len();
    }
    // An anchored end with nothing after the last '*' (or an empty pattern) matches anything
    // left; otherwise the last part was placed at the end above.
    !end || parts.last().is_none_or(|p| p.is_empty()) || pos == s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_leaksanitizer_matches_them() {
        assert!(matches("lost_direct", "lost_direct"));
        assert!(matches("lost", "make_lost_direct"));
        assert!(!matches("lost", ""));
        assert!(matches("^make", "make_lost"));
        assert!(!matches("^lost", "make_lost"));
        assert!(matches("lost$", "make_lost"));
        assert!(!matches("make$", "make_lost"));
        assert!(matches("*libfoo*", "/usr/lib/libfoo.so.1"));
        assert!(matches("^/usr/*/libfoo.so*", "/usr/lib/libfoo.so.1"));
        assert!(matches("a*c", "xxabyyczz"));
        assert!(!matches("a*c", "xxcyya"));
        assert!(matches("^a*c$", "abc"));
        assert!(!matches("^a*c$", "abcd"));
        assert!(matches("^abc$", "abc"));
        assert!(!matches("^abc$", "abcabc"));
        assert!(matches("ab*", "xaby"));
    }

    #[test]
    fn file_format_and_frames() {
        let s = Suppressions::parse("# comment\n\nleak:lost_direct\n  leak:*libfoo*  \nleak:reach.c\n").unwrap();
        assert_eq!(s.patterns, ["lost_direct", "*libfoo*", "reach.c"]);
        assert!(Suppressions::parse("race:foo\n").unwrap_err().to_string().contains("line 1"));
        assert!(Suppressions::parse("leak:\n").is_err());
        let f = |name: &str, module: &str, line: Option<&str>| Frame {
            addr: 1,
            symbol: Some((name.into(), 4)),
            module: Some(module.into()),
            line: line.map(String::from),
            ..Frame::default()
        };
        assert_eq!(s.matching(&[f("main", "/bin/x", None), f("lost_direct", "/bin/x", None)]), Some(0));
        assert_eq!(s.matching(&[f("g", "/usr/lib/libfoo.so", None)]), Some(1));
        assert_eq!(s.matching(&[f("g", "/bin/x", Some("/src/reach.c:12"))]), Some(2));
        assert_eq!(s.matching(&[f("g", "/bin/x", Some("/src/other.c:12"))]), None);
        let inl = Frame { inlined: vec![("lost_direct".into(), None)], ..f("g", "/bin/x", None) };
        assert_eq!(s.matching(&[inl]), Some(0));
    }
}
