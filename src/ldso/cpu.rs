//! What glibc 2.36's ld.so derives from the CPU on x86-64: the ISA levels (x86-64-v2, v3, v4)
//! that select glibc-hwcaps subdirectories and ld.so.cache entries, and the legacy hwcap
//! strings and platform that name the older subdirectories (haswell/, avx512_1/, tls/ ...).
//! The same CPU and kernel run memleak and the target, so memleak's own view is the target's
//! (GLIBC_TUNABLES=glibc.cpu.hwcaps, which can mask features in the target, is not read).

/// The ISA level bits, as GNU_PROPERTY_X86_ISA_1_*: baseline, v2, v3, v4.
pub const ISA_BASELINE: u32 = 1 << 0;
pub const ISA_V2: u32 = 1 << 1;
pub const ISA_V3: u32 = 1 << 2;
pub const ISA_V4: u32 = 1 << 3;

/// Legacy hwcap bits (glibc's HWCAP_X86_64, HWCAP_X86_AVX512_1) and their names.
pub const HWCAP_X86_64: u64 = 1 << 1;
pub const HWCAP_X86_AVX512_1: u64 = 1 << 2;
const HWCAP_NAMES: [&str; 3] = ["sse2", "x86_64", "avx512_1"];

/// The platforms ld.so.cache entries can be marked with, from bit 48 (glibc's x86 list).
pub const PLATFORMS: [&str; 4] = ["i586", "i686", "haswell", "xeon_phi"];
pub const FIRST_PLATFORM_BIT: u32 = 48;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    /// ISA_* bits the CPU (and the kernel, for AVX state) supports.
    pub isa: u32,
    /// Legacy hwcap bits, as ld.so sets them.
    pub hwcap: u64,
    /// ld.so's platform string: "haswell" or "xeon_phi" on Intel CPUs that qualify, else the
    /// kernel's AT_PLATFORM ("x86_64").
    pub platform: String,
}

impl Cpu {
    /// This machine's CPU, as ld.so sees it.
    pub fn detect() -> Cpu {
        use std::arch::is_x86_feature_detected as has;
        // Every x86-64 CPU has the baseline (CMOV, CX8, FPU, FXSR, MMX, SSE, SSE2).
        let baseline = has!("sse2") && has!("fxsr");
        let v2 = has!("cmpxchg16b")
            && lahf_sahf()
            && has!("popcnt")
            && has!("sse3")
            && has!("ssse3")
            && has!("sse4.1")
            && has!("sse4.2");
        let v3 = has!("avx")
            && has!("avx2")
            && has!("bmi1")
            && has!("bmi2")
            && has!("f16c")
            && has!("fma")
            && has!("lzcnt")
            && has!("movbe");
        let avx512_1 = has!("avx512bw") && has!("avx512dq") && has!("avx512vl");
        let v4 = has!("avx512f") && has!("avx512cd") && avx512_1;
        let mut isa = 0;
        if baseline {
            isa |= ISA_BASELINE;
            if v2 {
                isa |= ISA_V2;
                if v3 {
                    isa |= ISA_V3;
                    if v4 {
                        isa |= ISA_V4;
                    }
                }
            }
        }
        let (er, pf) = avx512_er_pf();
        let mut hwcap = HWCAP_X86_64;
        let mut platform = None;
        if is_intel() {
            if has!("avx512cd") {
                if er {
                    if pf {
                        platform = Some("xeon_phi");
                    }
                } else if avx512_1 {
                    hwcap |= HWCAP_X86_AVX512_1;
                }
            }
            if platform.is_none()
                && has!("avx2")
                && has!("fma")
                && has!("bmi1")
                && has!("bmi2")
                && has!("lzcnt")
                && has!("movbe")
                && has!("popcnt")
            {
                platform = Some("haswell");
            }
        }
        let platform = platform.map(str::to_string).unwrap_or_else(at_platform);
        Cpu { isa, hwcap, platform }
    }

    /// The glibc-hwcaps subdirectory names this CPU can use, most preferred first.
    pub fn hwcaps_subdirs(&self) -> Vec<&'static str> {
        [("x86-64-v4", ISA_V4), ("x86-64-v3", ISA_V3), ("x86-64-v2", ISA_V2)]
            .into_iter()
            .filter(|&(_, bit)| self.isa & bit != 0)
            .map(|(name, _)| name)
            .collect()
    }

    /// The subdirectories ld.so tries, in order, in every search directory: the glibc-hwcaps
    /// ones, then the power set of the legacy names (tls, the platform, the hwcap names from
    /// the highest bit down; all of them first, none of them last). Each ends in '/', but the
    /// last, which is the directory itself.
    pub fn search_subdirs(&self) -> Vec<String> {
        let mut out: Vec<String> = self.hwcaps_subdirs().iter().map(|s| format!("glibc-hwcaps/{s}/")).collect();
        let mut parts: Vec<&str> = vec!["tls", &self.platform];
        // ld.so keeps only the "important" bits: x86_64 and avx512_1.
        let important = self.hwcap & (HWCAP_X86_64 | HWCAP_X86_AVX512_1);
        for bit in (0..HWCAP_NAMES.len()).rev() {
            if important & (1 << bit) != 0 {
                parts.push(HWCAP_NAMES[bit]);
            }
        }
        let n = parts.len();
        for mask in (0..1u32 << n).rev() {
            let mut s = String::new();
            for (i, p) in parts.iter().enumerate() {
                if mask & (1 << (n - 1 - i)) != 0 {
                    s.push_str(p);
                    s.push('/');
                }
            }
            out.push(s);
        }
        out
    }

    /// The platform's bit in ld.so.cache's hwcap field, if it is one the cache knows.
    pub fn platform_bit(&self) -> Option<u64> {
        PLATFORMS.iter().position(|p| *p == self.platform).map(|i| 1u64 << (FIRST_PLATFORM_BIT + i as u32))
    }
}

fn cpuid(leaf: u32, sub: u32) -> std::arch::x86_64::CpuidResult {
    std::arch::x86_64::__cpuid_count(leaf, sub)
}

fn is_intel() -> bool {
    let r = cpuid(0, 0);
    let vendor: Vec<u8> = [r.ebx, r.edx, r.ecx].iter().flat_map(|w| w.to_le_bytes()).collect();
    vendor == b"GenuineIntel"
}

/// LAHF/SAHF in 64-bit mode (CPUID 0x80000001 ECX bit 0), which std does not name.
fn lahf_sahf() -> bool {
    cpuid(0x8000_0000, 0).eax >= 0x8000_0001 && cpuid(0x8000_0001, 0).ecx & 1 != 0
}

/// AVX512ER and AVX512PF (Xeon Phi only), usable when the OS enabled AVX-512 state.
fn avx512_er_pf() -> (bool, bool) {
    if !std::arch::is_x86_feature_detected!("avx512f") || cpuid(0, 0).eax < 7 {
        return (false, false);
    }
    let ebx = cpuid(7, 0).ebx;
    (ebx & (1 << 27) != 0, ebx & (1 << 26) != 0)
}

/// The kernel's AT_PLATFORM string ("x86_64"), the same for every process on this machine.
fn at_platform() -> String {
    // SAFETY: getauxval has no preconditions; a non-zero AT_PLATFORM value is the address of
    // a NUL-terminated string the kernel placed on this process's stack, valid for its life.
    let p = unsafe { libc::getauxval(libc::AT_PLATFORM) } as *const libc::c_char;
    if p.is_null() {
        return "x86_64".into();
    }
    // SAFETY: see above.
    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_subdirectories_are_the_power_set_in_ld_so_order() {
        // The order ld.so 2.36 prints with LD_DEBUG=libs on an Intel CPU with AVX-512.
        let cpu = Cpu { isa: 0xf, hwcap: HWCAP_X86_64 | HWCAP_X86_AVX512_1, platform: "haswell".into() };
        let want = [
            "glibc-hwcaps/x86-64-v4/",
            "glibc-hwcaps/x86-64-v3/",
            "glibc-hwcaps/x86-64-v2/",
            "tls/haswell/avx512_1/x86_64/",
            "tls/haswell/avx512_1/",
            "tls/haswell/x86_64/",
            "tls/haswell/",
            "tls/avx512_1/x86_64/",
            "tls/avx512_1/",
            "tls/x86_64/",
            "tls/",
            "haswell/avx512_1/x86_64/",
            "haswell/avx512_1/",
            "haswell/x86_64/",
            "haswell/",
            "avx512_1/x86_64/",
            "avx512_1/",
            "x86_64/",
            "",
        ];
        assert_eq!(cpu.search_subdirs(), want);
        assert_eq!(cpu.platform_bit(), Some(1 << 50));
        // A CPU without v3: only v2's directory, and AT_PLATFORM as the platform.
        let old = Cpu { isa: ISA_BASELINE | ISA_V2, hwcap: HWCAP_X86_64, platform: "x86_64".into() };
        let subs = old.search_subdirs();
        assert_eq!(subs[0], "glibc-hwcaps/x86-64-v2/");
        assert_eq!(subs[1], "tls/x86_64/x86_64/");
        assert_eq!(subs.last().map(String::as_str), Some(""));
        assert_eq!(old.platform_bit(), None);
    }

    #[test]
    fn this_cpu_is_at_least_baseline() {
        let cpu = Cpu::detect();
        assert!(cpu.isa & ISA_BASELINE != 0, "{cpu:?}");
        assert!(cpu.hwcap & HWCAP_X86_64 != 0);
        assert!(!cpu.platform.is_empty());
    }

    /// The subdirectories as this machine's ld.so lists them for an LD_LIBRARY_PATH directory
    /// (LD_DEBUG=libs, on the system's own /bin/true).
    #[test]
    fn subdirectories_are_those_this_machines_ld_so_searches() {
        let dir = "/nonexistent-memleak-hwcaps";
        let Ok(out) =
            std::process::Command::new("/bin/true").env("LD_DEBUG", "libs").env("LD_LIBRARY_PATH", dir).output()
        else {
            return;
        };
        let text = String::from_utf8_lossy(&out.stderr);
        let line = text.lines().find_map(|l| l.split_once("search path=")).map(|(_, p)| p).expect("a search path line");
        let listed: Vec<&str> = line.split_whitespace().next().unwrap_or("").split(':').collect();
        let ours: Vec<String> = Cpu::detect()
            .search_subdirs()
            .iter()
            .map(|s| format!("{dir}/{s}").trim_end_matches('/').to_string())
            .collect();
        assert_eq!(listed, ours);
    }
}
