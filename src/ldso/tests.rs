//! The search rules on small objects built here: which directory wins, what secure mode
//! changes, the breadth-first order, objects skipped or refused.
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// A scratch directory of objects built with gcc; removed when dropped.
struct Fx {
    dir: PathBuf,
}

impl Fx {
    fn new(name: &str) -> Fx {
        let dir = std::env::temp_dir().join(format!("memleak-ldso-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Fx { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn gcc(&self, out: &str, src: &str, args: &[&str]) -> PathBuf {
        let out = self.path(out);
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let c = out.with_extension("c");
        std::fs::write(&c, src).unwrap();
        let st = Command::new("gcc")
            .arg("-o")
            .arg(&out)
            .arg(&c)
            .args(["-Wl,--no-as-needed", "-L"])
            .arg(&self.dir)
            .args(args)
            .status()
            .expect("gcc runs");
        assert!(st.success(), "gcc {args:?}");
        out
    }

    /// lib/`rel` with soname `name`: a shared object defining `f_<tag>`, needing `needs`.
    fn lib(&self, rel: &str, tag: &str, args: &[&str]) -> PathBuf {
        let name = Path::new(rel).file_name().unwrap().to_str().unwrap().to_string();
        let mut a = vec!["-shared", "-fPIC"];
        let soname = format!("-Wl,-soname,{name}");
        a.push(&soname);
        a.extend_from_slice(args);
        self.gcc(rel, &format!("int f_{tag}(void) {{ return 1; }}\n"), &a)
    }

    fn exe(&self, rel: &str, args: &[&str]) -> PathBuf {
        self.gcc(rel, "int main(void) { return 0; }\n", args)
    }

    fn launch(&self, env: &[(&str, &Path)]) -> Launch {
        let env = env
            .iter()
            .map(|(k, v)| {
                let mut e = OsString::from(format!("{k}="));
                e.push(v.as_os_str());
                e
            })
            .collect();
        Launch { env, cwd: self.dir.clone(), creds: None, secure: Some(false) }
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn order(exe: &Path, launch: &Launch) -> LoadOrder {
    load_order(exe, launch).unwrap_or_else(|e| panic!("{}: {e:#}", exe.display()))
}

/// The path an object named `name` was found at.
fn found(o: &LoadOrder, name: &str) -> Option<(PathBuf, Found)> {
    o.objects.iter().find(|x| x.names.iter().any(|n| n == name)).map(|x| (x.path.clone(), x.found))
}

#[test]
fn rpath_then_ld_library_path_then_runpath() {
    let fx = Fx::new("order");
    for d in ["rp", "llp", "run"] {
        fx.lib(&format!("{d}/libx.so"), d, &[]);
    }
    let with_rpath = fx.exe("a", &["-l:rp/libx.so", "-Wl,--disable-new-dtags", "-Wl,-rpath,$ORIGIN/rp"]);
    let with_runpath = fx.exe("b", &["-l:rp/libx.so", "-Wl,--enable-new-dtags", "-Wl,-rpath,$ORIGIN/run"]);
    let llp = fx.path("llp");
    let env = fx.launch(&[("LD_LIBRARY_PATH", &llp)]);
    assert_eq!(found(&order(&with_rpath, &env), "libx.so"), Some((fx.path("rp/libx.so"), Found::Rpath)));
    assert_eq!(found(&order(&with_runpath, &env), "libx.so"), Some((fx.path("llp/libx.so"), Found::LdLibraryPath)));
    assert_eq!(
        found(&order(&with_runpath, &fx.launch(&[])), "libx.so"),
        Some((fx.path("run/libx.so"), Found::Runpath))
    );
    // The last LD_LIBRARY_PATH of the environment is the one ld.so reads.
    let two = fx.launch(&[("LD_LIBRARY_PATH", &llp), ("LD_LIBRARY_PATH", Path::new("/nonexistent"))]);
    assert_eq!(found(&order(&with_runpath, &two), "libx.so"), Some((fx.path("run/libx.so"), Found::Runpath)));
}

#[test]
fn runpath_serves_direct_needs_only_rpath_serves_the_whole_chain() {
    let fx = Fx::new("chain");
    fx.lib("d/libc2.so", "c2", &[]);
    fx.lib("d/libb2.so", "b2", &["-l:d/libc2.so"]);
    let run = fx.exe("run", &["-l:d/libb2.so", "-Wl,--enable-new-dtags", "-Wl,-rpath,$ORIGIN/d"]);
    let rpath = fx.exe("rpath", &["-l:d/libb2.so", "-Wl,--disable-new-dtags", "-Wl,-rpath,$ORIGIN/d"]);
    let o = order(&run, &fx.launch(&[]));
    assert_eq!(found(&o, "libb2.so"), Some((fx.path("d/libb2.so"), Found::Runpath)));
    assert_eq!(found(&o, "libc2.so"), None);
    assert_eq!(o.missing.len(), 1, "{:?}", o.missing);
    assert_eq!(o.missing[0].name, "libc2.so");
    assert_eq!(o.missing[0].needed_by, fx.path("d/libb2.so"));
    let o = order(&rpath, &fx.launch(&[]));
    assert_eq!(found(&o, "libc2.so"), Some((fx.path("d/libc2.so"), Found::Rpath)));
    assert!(o.missing.is_empty());
}

#[test]
fn breadth_first_preloads_after_the_executable_each_object_once() {
    let fx = Fx::new("bfs");
    fx.lib("libd.so", "d", &[]);
    fx.lib("libc1.so", "c1", &["-l:libd.so"]);
    fx.lib("liba.so", "a", &["-l:libc1.so"]);
    fx.lib("libb.so", "b", &["-l:libd.so"]);
    fx.lib("libq.so", "q", &[]);
    let p = fx.lib("libp.so", "p", &["-l:libq.so"]);
    let exe = fx.exe("main", &["-l:liba.so", "-l:libb.so"]);
    let dir = fx.dir.clone();
    let o = order(&exe, &fx.launch(&[("LD_LIBRARY_PATH", &dir), ("LD_PRELOAD", &p)]));
    let names: Vec<String> =
        o.objects.iter().map(|x| x.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        [
            "main",
            "libp.so",
            "liba.so",
            "libb.so",
            "libc.so.6",
            "libq.so",
            "libc1.so",
            "libd.so",
            "ld-linux-x86-64.so.2"
        ]
    );
    assert!(o.objects[1].preload && o.objects[1].found == Found::Path);
    assert_eq!(o.objects.last().unwrap().found, Found::Interpreter);
    assert_eq!(o.interpreter.as_ref().map(|i| i.path.clone()), Some(PathBuf::from("/lib64/ld-linux-x86-64.so.2")));
    assert_eq!(o.startup_objects().count(), o.objects.len(), "the interpreter is in the scope once");
    // The same file under a second name (a symlink, put in place after linking) is one object.
    fx.lib("libd-alias.so", "d", &[]);
    let e2 = fx.exe("main2", &["-l:libd.so", "-l:libb.so", "-l:libd-alias.so"]);
    std::fs::remove_file(fx.path("libd-alias.so")).unwrap();
    std::os::unix::fs::symlink(fx.path("libd.so"), fx.path("libd-alias.so")).unwrap();
    let o = order(&e2, &fx.launch(&[("LD_LIBRARY_PATH", &dir)]));
    let d: Vec<&Object> = o.objects.iter().filter(|x| x.names.iter().any(|n| n == "libd.so")).collect();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].names, ["libd.so", "libd-alias.so"]);
}

#[test]
fn other_classes_are_skipped_broken_objects_refused() {
    let fx = Fx::new("class");
    let good = fx.lib("good/liby.so", "y", &[]);
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[4] = 1; // ELFCLASS32
    std::fs::create_dir_all(fx.path("c32")).unwrap();
    std::fs::write(fx.path("c32/liby.so"), &bytes).unwrap();
    std::fs::create_dir_all(fx.path("text")).unwrap();
    std::fs::write(fx.path("text/liby.so"), "/* GNU ld script */\nGROUP ( /usr/lib/x86_64-linux-gnu/liby.so.1 )\n")
        .unwrap();
    std::fs::create_dir_all(fx.path("dir/liby.so")).unwrap();
    let exe = fx.exe("main", &["-l:good/liby.so"]);
    let lp = |s: &str| std::env::join_paths(s.split(':').map(|d| fx.path(d))).unwrap();
    let o = order(&exe, &fx.launch(&[("LD_LIBRARY_PATH", Path::new(&lp("c32:good")))]));
    assert_eq!(found(&o, "liby.so"), Some((fx.path("good/liby.so"), Found::LdLibraryPath)));
    for bad in ["text", "dir"] {
        let o = order(&exe, &fx.launch(&[("LD_LIBRARY_PATH", Path::new(&lp(&format!("{bad}:good"))))]));
        assert_eq!(found(&o, "liby.so"), None, "{bad}");
        assert_eq!(o.missing.len(), 1);
        let why = &o.missing[0].why;
        assert!(why.contains("invalid ELF header") || why.contains("a directory"), "{bad}: {why}");
    }
}

#[test]
fn secure_mode_drops_ld_library_path_and_restricts_preloads_and_origin() {
    let fx = Fx::new("secure");
    fx.lib("llp/libz.so.1", "z", &[]);
    fx.lib("mine/libm2.so", "m2", &[]);
    let exe = fx.exe("main", &["-lz", "-l:mine/libm2.so", "-Wl,--enable-new-dtags", "-Wl,-rpath,$ORIGIN/mine"]);
    let llp = fx.path("llp");
    let pre = fx.path("mine/libm2.so");
    let mut l = fx.launch(&[("LD_LIBRARY_PATH", &llp), ("LD_PRELOAD", &pre)]);
    let o = order(&exe, &l);
    assert_eq!(found(&o, "libz.so.1").map(|f| f.1), Some(Found::LdLibraryPath));
    assert!(o.objects[1].preload);
    l.secure = Some(true);
    let o = order(&exe, &l);
    assert!(o.secure);
    // LD_LIBRARY_PATH ignored: the system's libz.
    assert_eq!(found(&o, "libz.so.1").map(|f| f.1), Some(Found::Cache));
    // A preload with a '/' is ignored, and said.
    assert!(!o.objects.iter().any(|x| x.preload));
    assert!(o.notes.iter().any(|n| n.contains("LD_PRELOAD entry") && n.contains("secure mode")), "{:?}", o.notes);
    // $ORIGIN outside the trusted directories: the RUNPATH entry is dropped.
    assert_eq!(found(&o, "libm2.so"), None);
    assert_eq!(o.missing[0].name, "libm2.so");
}

#[test]
fn nodefaultlib_skips_the_cache_and_default_directories() {
    let fx = Fx::new("nodeflib");
    let plain = fx.exe("plain", &["-lz"]);
    let nodef = fx.exe("nodef", &["-lz", "-Wl,-z,nodefaultlib"]);
    assert_eq!(found(&order(&plain, &fx.launch(&[])), "libz.so.1").map(|f| f.1), Some(Found::Cache));
    let o = order(&nodef, &fx.launch(&[]));
    assert_eq!(found(&o, "libz.so.1"), None);
    assert!(o.missing.iter().any(|m| m.name == "libz.so.1"));
}

#[test]
fn glibc_hwcaps_subdirectories_come_first() {
    let cpu = cpu::Cpu::detect();
    let Some(best) = cpu.hwcaps_subdirs().first().copied() else { return };
    let fx = Fx::new("hwcaps");
    fx.lib("d/libh.so", "h", &[]);
    fx.lib(&format!("d/glibc-hwcaps/{best}/libh.so"), "h", &[]);
    let exe = fx.exe("main", &["-l:d/libh.so"]);
    let d = fx.path("d");
    let o = order(&exe, &fx.launch(&[("LD_LIBRARY_PATH", &d)]));
    assert_eq!(found(&o, "libh.so").map(|f| f.0), Some(fx.path(&format!("d/glibc-hwcaps/{best}/libh.so"))));
}

#[test]
fn static_executables_load_nothing() {
    let fx = Fx::new("static");
    let exe = fx.exe("main", &["-static"]);
    let p = fx.path("nothing.so");
    let o = order(&exe, &fx.launch(&[("LD_PRELOAD", &p)]));
    assert_eq!(o.objects.len(), 1);
    assert!(o.interpreter.is_none() && o.missing.is_empty());
}

#[test]
fn scripts_are_followed_to_the_elf_the_kernel_runs() {
    let fx = Fx::new("scripts");
    let exe = fx.exe("main", &[]);
    let mut prev = exe.clone();
    for i in 0..=launch::MAX_SCRIPTS {
        let s = fx.path(&format!("s{i}"));
        std::fs::write(&s, format!("#!{} -x\n", prev.display())).unwrap();
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
        prev = s;
    }
    let o = order(&fx.path(&format!("s{}", launch::MAX_SCRIPTS - 1)), &fx.launch(&[]));
    assert_eq!(o.scripts.len(), launch::MAX_SCRIPTS);
    assert_eq!(o.executable().path, exe);
    let e = load_order(&prev, &fx.launch(&[])).expect_err("one script too many");
    assert!(format!("{e:#}").contains("levels of #! interpreters"), "{e:#}");
}

#[test]
fn files_are_opened_as_the_user() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return;
    }
    let fx = Fx::new("user");
    fx.lib("private/libs.so", "s", &[]);
    let exe = fx.exe("main", &["-l:private/libs.so", "-Wl,-rpath,$ORIGIN/private"]);
    std::fs::set_permissions(fx.path("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&fx.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut l = fx.launch(&[]);
    assert!(found(&order(&exe, &l), "libs.so").is_some(), "root reads it");
    l.creds = Some(Credentials { uid: 65534, gid: 65534, groups: vec![] });
    let o = order(&exe, &l);
    assert_eq!(found(&o, "libs.so"), None, "the user may not read the directory");
    assert!(o.missing.iter().any(|m| m.name == "libs.so"));
    // The executable itself, in a directory the user cannot search: not opened.
    std::fs::copy(&exe, fx.path("private/main")).unwrap();
    let e = load_order(&fx.path("private/main"), &l).expect_err("not for the user");
    assert!(format!("{e:#}").contains("Permission denied"), "{e:#}");
}
