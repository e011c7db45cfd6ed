//! Demangling of symbol names, as `c++filt` prints them. Only mangled names are touched: C++'s
//! and legacy Rust's `_Z...`, Rust v0's `_R...`; a plain name such as `f`, `i` or `v` (a C
//! function) prints as written, never as the type it would encode.
//!
//! C++: GNU's demangler, which c++filt is built on, through libstdc++'s `abi::__cxa_demangle`
//! (linked dynamically; the same code and the same answers, tests/symbols.rs and the test
//! below compare them). One difference is undone here: c++filt asks for the verbose form of the
//! four standard abbreviations (`Ss`, `Si`, `So`, `Sd`), e.g.
//! `std::basic_ostream<char, std::char_traits<char> >` where __cxa_demangle says `std::ostream`.
//! Rust: rustc-demangle, without the legacy scheme's `::h<hash>` suffix (as Rust's own
//! backtraces print names; c++filt keeps it).
use std::borrow::Cow;
use std::ffi::{CStr, CString, c_char, c_int};

/// Longer names print as they are: GNU's demangler keeps per-character state on the stack.
const MAX_NAME: usize = 64 * 1024;

#[link(name = "stdc++")]
unsafe extern "C" {
    fn __cxa_demangle(mangled: *const c_char, out: *mut c_char, len: *mut usize, status: *mut c_int) -> *mut c_char;
}

/// `name` demangled if it is a mangled C++ or Rust name that demangles, else as it is.
pub fn demangle(name: &str) -> Cow<'_, str> {
    if name.len() > MAX_NAME {
        return Cow::Borrowed(name);
    }
    if (name.starts_with("_R") || (name.starts_with("_ZN") && is_legacy_rust(name)))
        && let Ok(d) = rustc_demangle::try_demangle(name)
    {
        return Cow::Owned(format!("{d:#}"));
    }
    if name.starts_with("_Z")
        && let Some(d) = cxa_demangle(name)
    {
        return Cow::Owned(verbose_std(&d));
    }
    Cow::Borrowed(name)
}

/// A legacy Rust name: `_ZN...17h<16 hex digits>E`, maybe with a `.llvm.N`-like suffix.
fn is_legacy_rust(name: &str) -> bool {
    let base = name.split_once('.').map_or(name, |(b, _)| b);
    let Some(head) = base.strip_suffix('E') else { return false };
    head.len() > 20 && {
        let (rest, hash) = head.split_at(head.len() - 16);
        rest.ends_with("17h") && hash.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

fn cxa_demangle(name: &str) -> Option<String> {
    let c = CString::new(name).ok()?;
    let mut status: c_int = 0;
    // SAFETY: a NUL-terminated input; a null output buffer asks for a malloc'd result, which
    // is copied and then freed here.
    unsafe {
        let out = __cxa_demangle(c.as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), &mut status);
        if out.is_null() {
            return None;
        }
        let s = (status == 0).then(|| CStr::from_ptr(out).to_string_lossy().into_owned());
        libc::free(out.cast());
        s
    }
}

/// The verbose forms c++filt prints for the standard abbreviations (ctors and dtors already
/// get them from __cxa_demangle).
const VERBOSE: [(&str, &str); 4] = [
    ("std::string", "std::basic_string<char, std::char_traits<char>, std::allocator<char> >"),
    ("std::istream", "std::basic_istream<char, std::char_traits<char> >"),
    ("std::ostream", "std::basic_ostream<char, std::char_traits<char> >"),
    ("std::iostream", "std::basic_iostream<char, std::char_traits<char> >"),
];

/// Rewrites each abbreviation that stands as a whole name (not `x::std::string`, not
/// `std::string_view`) into its verbose form; the demangler puts a space between two closing
/// angle brackets, so one follows before a `>`.
fn verbose_std(s: &str) -> String {
    if !s.contains("std::") {
        return s.to_string();
    }
    let b = s.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    'scan: while i < s.len() {
        if b[i] == b's' && (i == 0 || !(ident(b[i - 1]) || b[i - 1] == b':')) {
            for (short, long) in VERBOSE {
                let end = i + short.len();
                if s[i..].starts_with(short) && !b.get(end).is_some_and(|&c| ident(c)) {
                    out.push_str(long);
                    if b.get(end) == Some(&b'>') {
                        out.push(' ');
                    }
                    i = end;
                    continue 'scan;
                }
            }
        }
        let c = s[i..].chars().next().expect("in bounds");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mangled_names_are_demangled() {
        for plain in ["f", "i", "v", "main", "_start", "Ss", "_GLOBAL__sub_I_main", "_Z", "_Zjunk"] {
            assert_eq!(demangle(plain), plain);
        }
        assert_eq!(
            demangle(
                "_ZSt11make_sharedIiJiEESt10shared_ptrINSt9enable_ifIXntsrSt8is_arrayIT_E5valueES3_E4typeEEDpOT0_"
            ),
            "std::shared_ptr<std::enable_if<!std::is_array<int>::value, int>::type> std::make_shared<int, int>(int&&)"
        );
        assert_eq!(demangle("_ZNSolsEi"), "std::basic_ostream<char, std::char_traits<char> >::operator<<(int)");
        assert_eq!(
            demangle("_ZNSt3mapISsiSt4lessISsESaISt4pairIKSsiEEEixERS3_"),
            "std::map<std::basic_string<char, std::char_traits<char>, std::allocator<char> >, int, \
             std::less<std::basic_string<char, std::char_traits<char>, std::allocator<char> > >, \
             std::allocator<std::pair<std::basic_string<char, std::char_traits<char>, std::allocator<char> > const, \
             int> > >::operator[](std::basic_string<char, std::char_traits<char>, std::allocator<char> > const&)"
        );
        assert_eq!(demangle("_ZN4core3ptr13drop_in_place17h0123456789abcdefE"), "core::ptr::drop_in_place");
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
        assert_eq!(demangle("_ZN3foo3barE"), "foo::bar");
        assert_eq!(
            verbose_std("x::std::string std::string_view mystd::ostream"),
            "x::std::string std::string_view mystd::ostream"
        );
        // Hostile input: long or deeply nested names come back as they are, without a crash.
        let deep = format!("_Z1fI{}i{}Ev", "St6vectorI".repeat(3000), "E".repeat(3000));
        assert_eq!(demangle(&deep), deep);
        let long = format!("_Z1f{}", "i".repeat(MAX_NAME + 1));
        assert_eq!(demangle(&long), long);
    }

    /// Every C++ name libstdc++ exports, demangled here and by c++filt: the same text.
    #[test]
    fn names_equal_cxxfilt_on_every_libstdcxx_symbol() {
        use object::{Object, ObjectSymbol};
        use std::io::Write;
        let Ok(path) = std::fs::canonicalize("/usr/lib/x86_64-linux-gnu/libstdc++.so.6") else {
            panic!("libstdc++ not found");
        };
        let data = std::fs::read(path).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let names: Vec<String> = file
            .dynamic_symbols()
            .filter_map(|s| s.name().ok().map(String::from))
            .filter(|n| n.starts_with("_Z"))
            .collect();
        assert!(names.len() > 3000, "{}", names.len());
        let mut child = std::process::Command::new("c++filt")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("c++filt (binutils) runs");
        let input = names.join("\n") + "\n";
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        let expected: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
        assert_eq!(expected.len(), names.len());
        let verbose = names.iter().filter(|n| demangle(n).contains("std::basic_string<char, std::char_traits")).count();
        assert!(verbose > 100, "the verbose forms are exercised: {verbose}");
        for (n, e) in names.iter().zip(expected) {
            assert_eq!(demangle(n), e, "{n}");
        }
    }
}
