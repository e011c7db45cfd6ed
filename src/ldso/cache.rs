//! /etc/ld.so.cache in the format ldconfig writes since glibc 2.32 ("glibc-ld.so.cache1.1"),
//! looked up as glibc 2.36's ld.so does on x86-64: among the entries of a name, only 64-bit
//! libc6 ones (flags 0x303) count; glibc-hwcaps entries (x86-64-v2/v3/v4 subdirectories) come
//! first and the CPU's most preferred usable one wins; otherwise the first plain entry.
//!
//! Layout (little-endian): a 48-byte header (magic and version, 20 bytes; number of entries;
//! string table size; flags; 3 bytes padding; offset of the extension directory; 12 bytes
//! unused), then 24-byte entries (flags i32, key and value string offsets u32, OS version u32,
//! hwcap u64), then the strings. String offsets count from the start of the file. The
//! extension directory (magic 0xeaa42174, count, then {tag, flags, offset, size} sections)
//! holds, under tag 1, the glibc-hwcaps subdirectory names that entries with hwcap bit 62 set
//! index by their low 32 bits. The older "ld.so-1.7.0" format is not read (ldconfig has not
//! written it by default since glibc 2.32): such a cache is reported and ignored.
use anyhow::{Result, bail};

use super::cpu::{Cpu, HWCAP_X86_64, HWCAP_X86_AVX512_1};

pub const PATH: &str = "/etc/ld.so.cache";
/// Caches are tens of KiB; a larger file than this is refused.
pub const MAX_SIZE: u64 = 64 << 20;

const MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
const HEADER: usize = 48;
const ENTRY: usize = 24;
const EXTENSION_MAGIC: u32 = 0xeaa4_2174;
const TAG_GLIBC_HWCAPS: u32 = 1;
/// Flags of an x86-64 libc6 library: FLAG_X8664_LIB64 | FLAG_ELF_LIBC6.
const FLAGS_X86_64_LIBC6: i32 = 0x0303;
const HWCAP_EXTENSION: u64 = 1 << 62;
const HWCAP_TLS: u64 = 1 << 63;
const PLATFORM_MASK: u64 = 0xf << 48;

#[derive(Debug, Clone)]
pub struct Entry {
    pub flags: i32,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub hwcap: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Cache {
    pub entries: Vec<Entry>,
    /// The glibc-hwcaps subdirectory names entries with HWCAP_EXTENSION refer to.
    pub hwcaps: Vec<Vec<u8>>,
}

fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(d: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(off..off.checked_add(8)?)?.try_into().ok()?))
}

/// The NUL-terminated string at `off`.
fn str_at(d: &[u8], off: u32) -> Option<Vec<u8>> {
    let rest = d.get(off as usize..)?;
    Some(rest[..rest.iter().position(|&b| b == 0)?].to_vec())
}

impl Cache {
    pub fn parse(d: &[u8]) -> Result<Cache> {
        if d.starts_with(b"ld.so-1.7.0") {
            bail!("the old ld.so-1.7.0 format, which memleak does not read");
        }
        if d.len() < HEADER || !d.starts_with(MAGIC) {
            bail!("not a glibc-ld.so.cache1.1 file");
        }
        let nlibs = u32_at(d, 20).unwrap_or(0) as usize;
        // Bits 0-1 of the flags: 0 unset, 2 little-endian; 1 invalid, 3 big-endian.
        if matches!(d[28] & 3, 1 | 3) {
            bail!("not little-endian");
        }
        if (d.len() - HEADER) / ENTRY < nlibs {
            bail!("truncated: {nlibs} entries do not fit in {} bytes", d.len());
        }
        let mut entries = Vec::with_capacity(nlibs);
        for i in 0..nlibs {
            let e = HEADER + i * ENTRY;
            let bad = || anyhow::anyhow!("entry {i} points outside the file");
            let flags = u32_at(d, e).ok_or_else(bad)? as i32;
            let key = str_at(d, u32_at(d, e + 4).ok_or_else(bad)?).ok_or_else(bad)?;
            let value = str_at(d, u32_at(d, e + 8).ok_or_else(bad)?).ok_or_else(bad)?;
            let hwcap = u64_at(d, e + 16).ok_or_else(bad)?;
            entries.push(Entry { flags, key, value, hwcap });
        }
        let hwcaps = Self::hwcaps_names(d, u32_at(d, 32).unwrap_or(0) as usize);
        Ok(Cache { entries, hwcaps })
    }

    /// The names of the glibc-hwcaps extension section, if the file has one.
    fn hwcaps_names(d: &[u8], ext: usize) -> Vec<Vec<u8>> {
        if ext == 0 || u32_at(d, ext) != Some(EXTENSION_MAGIC) {
            return vec![];
        }
        let count = u32_at(d, ext + 4).unwrap_or(0) as usize;
        for s in 0..count.min(64) {
            let sec = ext + 8 + s * 16;
            if u32_at(d, sec) != Some(TAG_GLIBC_HWCAPS) {
                continue;
            }
            let (Some(off), Some(size)) = (u32_at(d, sec + 8), u32_at(d, sec + 12)) else { return vec![] };
            return (0..size as usize / 4)
                .map_while(|i| u32_at(d, off as usize + i * 4))
                .map(|s| str_at(d, s).unwrap_or_default())
                .collect();
        }
        vec![]
    }

    /// The path the cache gives for `name` on this CPU, as ld.so chooses it.
    pub fn lookup(&self, name: &[u8], cpu: &Cpu) -> Option<&[u8]> {
        let subdirs = cpu.hwcaps_subdirs();
        // Lower is better; None: not usable on this CPU.
        let priority = |e: &Entry| -> Option<usize> {
            let n = self.hwcaps.get((e.hwcap & 0xffff_ffff) as usize)?;
            subdirs.iter().position(|s| s.as_bytes() == n.as_slice()).map(|p| p + 1)
        };
        // Plain entries with legacy hwcap bits the CPU lacks, or another platform's, are skipped.
        let exclude = !((cpu.hwcap & (HWCAP_X86_64 | HWCAP_X86_AVX512_1)) | PLATFORM_MASK | HWCAP_TLS);
        let platform = cpu.platform_bit();
        let mut best: Option<(&Entry, usize)> = None;
        // ldconfig sorts the entries, those of one name together, glibc-hwcaps ones first;
        // ld.so binary-searches the name then walks its entries in file order, as this does.
        for e in self.entries.iter().filter(|e| e.key == name) {
            if e.flags != FLAGS_X86_64_LIBC6 {
                continue;
            }
            let named = e.hwcap & HWCAP_EXTENSION != 0;
            if named {
                let level = 1u32.checked_shl(((e.hwcap >> 32) & 0x3ff) as u32).unwrap_or(0);
                if level & cpu.isa != level {
                    continue;
                }
            } else if best.is_some() {
                break;
            }
            if !named && e.hwcap & exclude != 0 {
                continue;
            }
            if e.hwcap & PLATFORM_MASK != 0 && Some(e.hwcap & PLATFORM_MASK) != platform {
                continue;
            }
            if named {
                let Some(p) = priority(e) else { continue };
                if best.is_some_and(|(_, bp)| p >= bp) {
                    continue;
                }
                best = Some((e, p));
            } else {
                return Some(&e.value);
            }
        }
        best.map(|(e, _)| e.value.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu::{ISA_BASELINE, ISA_V2, ISA_V3};
    use super::*;

    /// Builds a cache file: entries (flags, key, value, hwcap) and glibc-hwcaps names.
    pub fn build(entries: &[(i32, &str, &str, u64)], hwcaps: &[&str]) -> Vec<u8> {
        let mut strings: Vec<u8> = Vec::new();
        let base = HEADER + entries.len() * ENTRY;
        let mut add = |s: &str| {
            let off = base + strings.len();
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off as u32
        };
        let mut body = Vec::new();
        for &(flags, k, v, hwcap) in entries {
            let (k, v) = (add(k), add(v));
            body.extend_from_slice(&flags.to_le_bytes());
            body.extend_from_slice(&k.to_le_bytes());
            body.extend_from_slice(&v.to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
            body.extend_from_slice(&hwcap.to_le_bytes());
        }
        let name_offs: Vec<u32> = hwcaps.iter().map(|h| add(h)).collect();
        let mut d = Vec::new();
        d.extend_from_slice(MAGIC);
        d.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        d.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        d.push(2);
        d.extend_from_slice(&[0; 3]);
        let ext_pos = d.len();
        d.extend_from_slice(&[0; 4 + 12]);
        d.extend_from_slice(&body);
        d.extend_from_slice(&strings);
        while d.len() % 4 != 0 {
            d.push(0);
        }
        let ext = d.len() as u32;
        d[ext_pos..ext_pos + 4].copy_from_slice(&ext.to_le_bytes());
        let names_at = ext + 8 + 16;
        for w in [EXTENSION_MAGIC, 1, TAG_GLIBC_HWCAPS, 0, names_at, 4 * name_offs.len() as u32] {
            d.extend_from_slice(&w.to_le_bytes());
        }
        for o in name_offs {
            d.extend_from_slice(&o.to_le_bytes());
        }
        d
    }

    fn cpu(isa: u32) -> Cpu {
        Cpu { isa, hwcap: HWCAP_X86_64, platform: "x86_64".into() }
    }

    #[test]
    fn prefers_64_bit_libc6_entries_and_usable_hwcaps_subdirectories() {
        let ext = |i: u64, level: u64| HWCAP_EXTENSION | (level << 32) | i;
        let d = build(
            &[
                (0x303, "libz.so.1", "/lib/x86_64-linux-gnu/glibc-hwcaps/x86-64-v3/libz.so.1", ext(1, 2)),
                (0x303, "libz.so.1", "/lib/x86_64-linux-gnu/glibc-hwcaps/x86-64-v2/libz.so.1", ext(0, 1)),
                (0x303, "libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1", 0),
                (3, "libstdc++.so.6", "/lib32/libstdc++.so.6", 0),
                (0x303, "libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6", 0),
                (1, "ld-linux.so.2", "/lib/ld-linux.so.2", 0),
            ],
            &["x86-64-v2", "x86-64-v3"],
        );
        let c = Cache::parse(&d).expect("parses");
        assert_eq!(c.entries.len(), 6);
        assert_eq!(c.hwcaps, vec![b"x86-64-v2".to_vec(), b"x86-64-v3".to_vec()]);
        let look =
            |name: &str, isa| c.lookup(name.as_bytes(), &cpu(isa)).map(|v| String::from_utf8_lossy(v).into_owned());
        let all = ISA_BASELINE | ISA_V2 | ISA_V3;
        assert_eq!(look("libz.so.1", all).as_deref(), Some("/lib/x86_64-linux-gnu/glibc-hwcaps/x86-64-v3/libz.so.1"));
        assert_eq!(
            look("libz.so.1", ISA_BASELINE | ISA_V2).as_deref(),
            Some("/lib/x86_64-linux-gnu/glibc-hwcaps/x86-64-v2/libz.so.1")
        );
        assert_eq!(look("libz.so.1", ISA_BASELINE).as_deref(), Some("/lib/x86_64-linux-gnu/libz.so.1"));
        assert_eq!(look("libstdc++.so.6", all).as_deref(), Some("/lib/x86_64-linux-gnu/libstdc++.so.6"));
        // Only a 32-bit entry: not for an x86-64 program.
        assert_eq!(look("ld-linux.so.2", all), None);
        assert_eq!(look("libnone.so", all), None);
    }

    #[test]
    fn legacy_hwcap_entries_need_the_cpu_bits_and_platform() {
        let haswell = 1u64 << 50;
        let d = build(
            &[
                (0x303, "libm.so.6", "/lib/avx512_1/libm.so.6", HWCAP_X86_AVX512_1),
                (0x303, "libm.so.6", "/lib/haswell/libm.so.6", haswell),
                (0x303, "libm.so.6", "/lib/libm.so.6", 0),
            ],
            &[],
        );
        let c = Cache::parse(&d).unwrap();
        let plain = cpu(ISA_BASELINE);
        assert_eq!(c.lookup(b"libm.so.6", &plain), Some(&b"/lib/libm.so.6"[..]));
        let intel = Cpu { isa: ISA_BASELINE, hwcap: HWCAP_X86_64, platform: "haswell".into() };
        assert_eq!(c.lookup(b"libm.so.6", &intel), Some(&b"/lib/haswell/libm.so.6"[..]));
        let avx = Cpu { hwcap: HWCAP_X86_64 | HWCAP_X86_AVX512_1, ..intel };
        assert_eq!(c.lookup(b"libm.so.6", &avx), Some(&b"/lib/avx512_1/libm.so.6"[..]));
    }

    #[test]
    fn bad_files_are_refused_not_trusted() {
        assert!(Cache::parse(b"ld.so-1.7.0\0\0\0\0\0").is_err());
        assert!(Cache::parse(b"garbage").is_err());
        let mut d = build(&[(0x303, "libc.so.6", "/lib/libc.so.6", 0)], &[]);
        // An entry count larger than the file.
        d[20..24].copy_from_slice(&1000u32.to_le_bytes());
        assert!(Cache::parse(&d).is_err());
        // A string offset past the end.
        let mut d = build(&[(0x303, "libc.so.6", "/lib/libc.so.6", 0)], &[]);
        d[HEADER + 4..HEADER + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Cache::parse(&d).is_err());
    }

    #[test]
    fn reads_this_machines_cache() {
        let Ok(d) = std::fs::read(PATH) else { return };
        let c = Cache::parse(&d).expect("the system's cache parses");
        let libc = c.lookup(b"libc.so.6", &Cpu::detect()).expect("libc.so.6 is in the cache");
        assert!(libc.ends_with(b"/libc.so.6"), "{}", String::from_utf8_lossy(libc));
    }
}
