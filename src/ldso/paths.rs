//! Paths in ld.so's terms: dynamic string tokens ($ORIGIN, $PLATFORM, $LIB), the trusted
//! directories secure mode restricts $ORIGIN to, and search path lists.

/// The default directories of Debian's x86-64 ld.so, also its trusted directories.
pub const SYSTEM_DIRS: [&str; 4] = ["/lib/x86_64-linux-gnu/", "/usr/lib/x86_64-linux-gnu/", "/lib/", "/usr/lib/"];
/// What $LIB expands to in Debian's ld.so.
pub const DST_LIB: &str = "lib/x86_64-linux-gnu";

/// The directory of a path, as ld.so computes an object's origin.
pub fn dirname(p: &[u8]) -> Vec<u8> {
    match p.iter().rposition(|&b| b == b'/') {
        Some(0) => b"/".to_vec(),
        Some(i) => p[..i].to_vec(),
        None => b".".to_vec(),
    }
}

/// The length of a dynamic string token `name` at the start of `s` (just after its '$'),
/// braces included: `$ORIGIN` or `${ORIGIN}`, not `$ORIGINAL`.
fn is_dst(s: &[u8], name: &str) -> Option<usize> {
    let (curly, body) = match s.first() {
        Some(b'{') => (true, &s[1..]),
        _ => (false, s),
    };
    let rest = body.strip_prefix(name.as_bytes())?;
    match (curly, rest.first()) {
        (true, Some(b'}')) => Some(name.len() + 2),
        (true, _) => None,
        (false, Some(c)) if c.is_ascii_alphanumeric() || *c == b'_' => None,
        (false, _) => Some(name.len()),
    }
}

pub fn count_dsts(s: &[u8]) -> usize {
    (0..s.len())
        .filter(|&i| s[i] == b'$' && ["ORIGIN", "PLATFORM", "LIB"].iter().any(|n| is_dst(&s[i + 1..], n).is_some()))
        .count()
}

/// Whether a path lies in a trusted (system) directory once `.`, `..` and `//` are removed.
fn is_trusted(path: &[u8]) -> bool {
    if path.is_empty() {
        return false;
    }
    let mut out: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'/' {
            let at = |k: usize| path.get(i + k).copied();
            if at(1) == Some(b'.') {
                if at(2) == Some(b'.') && matches!(at(3), Some(b'/') | None) {
                    while let Some(c) = out.pop() {
                        if c == b'/' {
                            break;
                        }
                    }
                    i += 3;
                    continue;
                } else if matches!(at(2), Some(b'/') | None) {
                    i += 2;
                    continue;
                }
            }
            if out.last() == Some(&b'/') {
                i += 1;
                continue;
            }
        }
        out.push(path[i]);
        i += 1;
    }
    if out.last() != Some(&b'/') {
        out.push(b'/');
    }
    SYSTEM_DIRS.iter().any(|d| out.starts_with(d.as_bytes()))
}

/// Substitutes $ORIGIN (`origin`), $PLATFORM and $LIB in `input`; None when the result cannot
/// be used: an unknown origin, or in secure mode $ORIGIN anywhere but at the start or, in the
/// executable's paths (`exe`), leading outside the trusted directories.
pub fn substitute(input: &[u8], origin: Option<&[u8]>, platform: &str, secure: bool, exe: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut check_trusted = false;
    let mut i = 0;
    while i < input.len() {
        if input[i] != b'$' {
            out.push(input[i]);
            i += 1;
            continue;
        }
        let rest = &input[i + 1..];
        if let Some(n) = is_dst(rest, "ORIGIN") {
            if secure && !(i == 0 && matches!(rest.get(n), None | Some(b'/'))) {
                return None;
            }
            out.extend_from_slice(origin?);
            check_trusted = secure && exe;
            i += 1 + n;
        } else if let Some(n) = is_dst(rest, "PLATFORM") {
            out.extend_from_slice(platform.as_bytes());
            i += 1 + n;
        } else if let Some(n) = is_dst(rest, "LIB") {
            out.extend_from_slice(DST_LIB.as_bytes());
            i += 1 + n;
        } else {
            out.push(b'$');
            i += 1;
        }
    }
    if out.is_empty() || (check_trusted && !is_trusted(&out)) {
        return None;
    }
    Some(out)
}

/// A search path (DT_RPATH, DT_RUNPATH: ':'; LD_LIBRARY_PATH: ':' or ';') as directories
/// ending in '/', each once, elements passed through `expand` (None drops one); an empty
/// element is the current directory.
pub fn split_list(list: &[u8], seps: &[u8], expand: impl Fn(&[u8]) -> Option<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    if list.is_empty() {
        return out;
    }
    for el in list.split(|b| seps.contains(b)) {
        let mut d = Vec::new();
        if !el.is_empty() {
            let Some(e) = expand(el) else { continue };
            d = e;
            while d.len() > 1 && d.last() == Some(&b'/') {
                d.pop();
            }
            if d.last() != Some(&b'/') {
                d.push(b'/');
            }
        }
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_string_tokens() {
        assert_eq!(is_dst(b"ORIGIN/lib", "ORIGIN"), Some(6));
        assert_eq!(is_dst(b"{ORIGIN}/lib", "ORIGIN"), Some(8));
        assert_eq!(is_dst(b"ORIGINAL", "ORIGIN"), None);
        assert_eq!(is_dst(b"ORIGIN_", "ORIGIN"), None);
        assert_eq!(is_dst(b"{ORIGIN", "ORIGIN"), None);
        assert_eq!(is_dst(b"LIB", "LIB"), Some(3));
        assert_eq!(count_dsts(b"$ORIGIN/../$LIB:$FOO/${PLATFORM}"), 3);
        assert_eq!(count_dsts(b"libfoo.so"), 0);
    }

    #[test]
    fn trusted_paths_are_normalized_first() {
        assert!(is_trusted(b"/usr/lib/x86_64-linux-gnu/foo"));
        assert!(is_trusted(b"/lib"));
        assert!(is_trusted(b"/opt/../usr/lib//./x"));
        assert!(!is_trusted(b"/home/u/lib"));
        assert!(!is_trusted(b"/usr/lib/../../home"));
        assert!(!is_trusted(b"/usr/libexec"));
        assert!(!is_trusted(b""));
    }

    #[test]
    fn substitution_and_lists() {
        let sub = |s: &str, secure, exe| {
            substitute(s.as_bytes(), Some(b"/opt/app"), "haswell", secure, exe).map(|v| String::from_utf8(v).unwrap())
        };
        assert_eq!(
            sub("$ORIGIN/../$LIB/${PLATFORM}", false, true).as_deref(),
            Some("/opt/app/../lib/x86_64-linux-gnu/haswell")
        );
        assert_eq!(sub("$FOO/x", false, false).as_deref(), Some("$FOO/x"));
        // Secure mode: $ORIGIN first only, and for the executable into trusted directories only.
        assert_eq!(sub("/x/$ORIGIN", true, false), None);
        assert_eq!(sub("$ORIGIN/lib", true, false).as_deref(), Some("/opt/app/lib"));
        assert_eq!(sub("$ORIGIN/lib", true, true), None);
        let trusted = substitute(b"$ORIGIN/../lib/x", Some(b"/usr/bin"), "x86_64", true, true);
        assert_eq!(trusted.as_deref(), Some(&b"/usr/bin/../lib/x"[..]));
        assert_eq!(substitute(b"$ORIGIN", None, "x86_64", false, false), None, "unknown origin");
        let list = split_list(b"/a//:/b;:/a/:", b":", |e| Some(e.to_vec()));
        assert_eq!(list, [b"/a/".to_vec(), b"/b;/".to_vec(), Vec::new()], "';' splits LD_LIBRARY_PATH only, not RPATH");
        let list = split_list(b"/a:/b;/c", b":;", |e| Some(e.to_vec()));
        assert_eq!(list, [b"/a/".to_vec(), b"/b/".to_vec(), b"/c/".to_vec()]);
        assert!(split_list(b"", b":", |e| Some(e.to_vec())).is_empty());
    }

    #[test]
    fn origins_are_directories() {
        assert_eq!(dirname(b"/usr/lib/libc.so.6"), b"/usr/lib");
        assert_eq!(dirname(b"/ls"), b"/");
    }
}
