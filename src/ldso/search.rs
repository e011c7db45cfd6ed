//! glibc 2.36's search (elf/rtld.c, dl-deps.c, dl-load.c), replayed on the files: the link
//! map is built in load order, names matched against it before any search, files identified
//! by device and inode so that one file is loaded once.
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::cache::{self, Cache};
use super::cpu::Cpu;
use super::elf::{self, DF_1_NODEFLIB, Dynamic, Reject};
use super::launch::{Launch, Program};
use super::paths::{self, SYSTEM_DIRS, count_dsts, dirname};
use super::{Found, LoadOrder, Missing, Object};
use crate::objfile;

/// Objects every program preloads, read by ld.so even in secure mode.
pub const PRELOAD_FILE: &str = "/etc/ld.so.preload";
/// glibc's own soname for its x86-64 dynamic linker.
pub const GLIBC_LD_SO: &str = "ld-linux-x86-64.so.2";
/// LD_PRELOAD entries at least this long are ignored (PATH_MAX); in secure mode, at least
/// NAME_MAX long.
const PATH_MAX: usize = 4096;
const NAME_MAX: usize = 255;

struct Node {
    obj: Object,
    dynamic: Dynamic,
    /// The names a request matches: the path it was loaded by and the names asked for.
    match_names: Vec<Vec<u8>>,
    /// The object whose needs loaded it (the executable for preloads).
    loader: Option<usize>,
    /// $ORIGIN: the directory of its path (of the canonical path for the executable).
    origin: Option<Vec<u8>>,
    /// Device and inode; None for the executable and the interpreter, which ld.so records
    /// none for (a library found under another name is not matched against them).
    id: Option<(u64, u64)>,
}

enum Attempt {
    Opened(File, Dynamic),
    /// Another class or machine: skipped.
    Skipped,
    /// The open failed with this errno.
    Absent(i32),
    Fatal(String),
}

struct Search<'a> {
    launch: &'a Launch,
    cpu: Cpu,
    subdirs: Vec<String>,
    secure: bool,
    cache: Option<Option<Cache>>,
    nodes: Vec<Node>,
    library_path: Vec<Vec<u8>>,
    dir_exists: HashMap<Vec<u8>, bool>,
    missing: Vec<Missing>,
    notes: Vec<String>,
}

fn bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

fn path_of(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

/// The errno of an error from objfile::open_regular: None when the file opened but is not a
/// regular file (a directory, a FIFO, a device).
fn errno_of(e: &anyhow::Error) -> Option<i32> {
    e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()).map(|io| io.raw_os_error().unwrap_or(libc::EIO))
}

impl Search<'_> {
    fn try_open(&self, path: &[u8]) -> Attempt {
        let p = self.launch.absolute(&path_of(path));
        match objfile::open_regular(&p) {
            Err(e) => match errno_of(&e) {
                Some(errno) => Attempt::Absent(errno),
                None => Attempt::Fatal(format!("{e:#}")),
            },
            Ok(f) => match elf::read(&f) {
                Ok(d) => Attempt::Opened(f, d),
                Err(Reject::Skip(_)) => Attempt::Skipped,
                Err(Reject::Fatal(m)) => Attempt::Fatal(format!("{}: {m}", p.display())),
            },
        }
    }

    fn is_dir(&mut self, dir: &[u8]) -> bool {
        if let Some(&e) = self.dir_exists.get(dir) {
            return e;
        }
        let e = std::fs::metadata(self.launch.absolute(&path_of(dir))).is_ok_and(|m| m.is_dir());
        self.dir_exists.insert(dir.to_vec(), e);
        e
    }

    /// `input` with its tokens substituted for object `l` (paths::substitute).
    fn expand(&self, l: usize, input: &[u8]) -> Option<Vec<u8>> {
        let origin = self.nodes[l].origin.as_deref();
        paths::substitute(input, origin, &self.cpu.platform, self.secure, l == 0)
    }

    fn path_list(&self, list: &[u8], seps: &[u8], l: usize) -> Vec<Vec<u8>> {
        paths::split_list(list, seps, |el| self.expand(l, el))
    }

    fn rpath(&self, l: usize) -> Vec<Vec<u8>> {
        let d = &self.nodes[l].dynamic;
        // The executable's DT_RPATH is ignored when it has a DT_RUNPATH.
        if l == 0 && d.runpath.is_some() {
            return vec![];
        }
        d.rpath.as_ref().map(|r| self.path_list(r.as_bytes(), b":", l)).unwrap_or_default()
    }

    fn runpath(&self, l: usize) -> Vec<Vec<u8>> {
        let d = &self.nodes[l].dynamic;
        d.runpath.as_ref().map(|r| self.path_list(r.as_bytes(), b":", l)).unwrap_or_default()
    }

    /// Looks for `name` in each directory (and its hwcaps subdirectories) of `dirs`.
    fn open_path(
        &mut self,
        name: &[u8],
        dirs: &[Vec<u8>],
        preload: bool,
        other_class: &mut bool,
    ) -> Result<Option<(Vec<u8>, File, Dynamic)>, String> {
        for dir in dirs {
            let mut here_any = false;
            let mut errno = libc::ENOENT;
            for si in 0..self.subdirs.len() {
                let d = [dir.as_slice(), self.subdirs[si].as_bytes()].concat();
                if self.dir_exists.get(&d) == Some(&false) {
                    continue;
                }
                let path = [d.as_slice(), name].concat();
                match self.try_open(&path) {
                    Attempt::Opened(f, dy) => {
                        // Secure mode preloads only set-user-ID objects from search paths.
                        if preload && self.secure && f.metadata().map_or(0, |m| m.mode()) & libc::S_ISUID == 0 {
                            errno = libc::ENOENT;
                            here_any = true;
                            continue;
                        }
                        return Ok(Some((path, f, dy)));
                    }
                    Attempt::Skipped => {
                        *other_class = true;
                        errno = libc::ENOENT;
                    }
                    Attempt::Fatal(m) => return Err(m),
                    Attempt::Absent(e) => errno = e,
                }
                if self.is_dir(&d) {
                    here_any = true;
                } else {
                    errno = libc::ENOENT;
                }
            }
            // A file that exists but cannot be opened for another reason ends this list.
            if here_any && errno != libc::ENOENT && errno != libc::EACCES {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// The index of a loaded object `name` matches: by a path or name it was loaded by, or
    /// its DT_SONAME.
    fn match_name(&self, name: &[u8]) -> Option<usize> {
        self.nodes.iter().position(|n| {
            n.match_names.iter().any(|m| m == name) || n.obj.soname.as_ref().is_some_and(|s| s.as_bytes() == name)
        })
    }

    /// Finds `name` needed by object `loader` (the executable for preloads) as _dl_map_object
    /// does: the index of the object, loaded now or before, or why it cannot be.
    fn map_object(&mut self, loader: usize, name: &[u8], preload: bool) -> Result<usize, String> {
        if let Some(i) = self.match_name(name) {
            return Ok(i);
        }
        let mut other_class = false;
        let found = if name.contains(&b'/') {
            // A token without a value leaves no path: nothing to open.
            let (attempt, path) = match self.expand(loader, name) {
                Some(path) => (self.try_open(&path), path),
                None => (Attempt::Absent(libc::ENOENT), vec![]),
            };
            match attempt {
                Attempt::Opened(f, d) => Some((path, f, d, Found::Path)),
                Attempt::Skipped => {
                    other_class = true;
                    None
                }
                Attempt::Absent(_) => None,
                Attempt::Fatal(m) => return Err(m),
            }
        } else {
            self.search(loader, name, preload, &mut other_class)?
        };
        let Some((path, file, dynamic, how)) = found else {
            return Err(if other_class {
                "wrong ELF class or machine".into()
            } else {
                "cannot open shared object file: No such file or directory".into()
            });
        };
        let id = file.metadata().map(|m| (m.dev(), m.ino())).ok();
        if let Some(i) = self.nodes.iter().position(|n| n.id.is_some() && n.id == id) {
            self.nodes[i].obj.names.push(OsStr::from_bytes(name).to_os_string());
            self.nodes[i].match_names.push(name.to_vec());
            return Ok(i);
        }
        let abs = self.launch.absolute(&path_of(&path));
        self.nodes.push(Node {
            obj: Object {
                path: abs.clone(),
                file,
                found: how,
                preload,
                names: vec![OsStr::from_bytes(name).to_os_string()],
                soname: dynamic.soname.clone(),
                needed: dynamic.needed.clone(),
            },
            origin: Some(dirname(bytes(&abs))),
            dynamic,
            match_names: vec![path, name.to_vec()],
            loader: Some(loader),
            id,
        });
        Ok(self.nodes.len() - 1)
    }

    /// The search of a name without '/': DT_RPATH of the loaders, LD_LIBRARY_PATH,
    /// DT_RUNPATH of the loader, ld.so.cache, the default directories.
    #[allow(clippy::type_complexity)]
    fn search(
        &mut self,
        loader: usize,
        name: &[u8],
        preload: bool,
        other_class: &mut bool,
    ) -> Result<Option<(Vec<u8>, File, Dynamic, Found)>, String> {
        let with = |how: Found| move |(p, f, d): (Vec<u8>, File, Dynamic)| (p, f, d, how);
        // DT_RPATH counts only when the loading object has no DT_RUNPATH.
        if self.nodes[loader].dynamic.runpath.is_none() {
            let mut did_main = false;
            let mut cur = Some(loader);
            while let Some(l) = cur {
                let dirs = self.rpath(l);
                if !dirs.is_empty() {
                    if let Some(r) = self.open_path(name, &dirs, preload, other_class)? {
                        return Ok(Some(with(Found::Rpath)(r)));
                    }
                    did_main |= l == 0;
                }
                cur = self.nodes[l].loader;
            }
            let dirs = self.rpath(0);
            if !did_main
                && !dirs.is_empty()
                && let Some(r) = self.open_path(name, &dirs, preload, other_class)?
            {
                return Ok(Some(with(Found::Rpath)(r)));
            }
        }
        let lib_path = self.library_path.clone();
        if let Some(r) = self.open_path(name, &lib_path, preload, other_class)? {
            return Ok(Some(with(Found::LdLibraryPath)(r)));
        }
        let dirs = self.runpath(loader);
        if let Some(r) = self.open_path(name, &dirs, preload, other_class)? {
            return Ok(Some(with(Found::Runpath)(r)));
        }
        let nodeflib = self.nodes[loader].dynamic.flags_1 & DF_1_NODEFLIB != 0;
        if !(preload && self.secure) {
            self.load_cache();
        }
        if !(preload && self.secure)
            && let Some(cached) =
                self.cache.as_ref().and_then(Option::as_ref).and_then(|c| c.lookup(name, &self.cpu)).map(<[u8]>::to_vec)
            && !(nodeflib && SYSTEM_DIRS.iter().any(|d| cached.starts_with(d.as_bytes())))
        {
            match self.try_open(&cached) {
                Attempt::Opened(f, d) => return Ok(Some((cached, f, d, Found::Cache))),
                Attempt::Skipped => *other_class = true,
                Attempt::Absent(_) => {}
                Attempt::Fatal(m) => return Err(m),
            }
        }
        if !nodeflib {
            let dirs: Vec<Vec<u8>> = SYSTEM_DIRS.iter().map(|d| d.as_bytes().to_vec()).collect();
            if let Some(r) = self.open_path(name, &dirs, preload, other_class)? {
                return Ok(Some(with(Found::DefaultDirs)(r)));
            }
        }
        Ok(None)
    }

    /// /etc/ld.so.cache, read once (as ld.so, on the first name not found before it).
    fn load_cache(&mut self) {
        if self.cache.is_none() {
            let path = Path::new(cache::PATH);
            let c = match objfile::open_regular(path) {
                Err(e) if errno_of(&e) == Some(libc::ENOENT) => None,
                Err(e) => {
                    self.notes.push(format!("{e:#}: libraries are looked for without it"));
                    None
                }
                Ok(f) => match objfile::read_bounded(&f, cache::MAX_SIZE, path).and_then(|d| Cache::parse(&d)) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        self.notes.push(format!("{}: {e:#}: libraries are looked for without it", cache::PATH));
                        None
                    }
                },
            };
            self.cache = Some(c);
        }
    }

    fn preload(&mut self, name: &[u8], source: &str, preloads: &mut Vec<usize>) {
        let before = self.nodes.len();
        match self.map_object(0, name, true) {
            // A name that matched an object already loaded adds nothing.
            Ok(i) if i >= before => preloads.push(i),
            Ok(_) => {}
            Err(why) => self.missing.push(Missing {
                name: OsStr::from_bytes(name).to_os_string(),
                needed_by: PathBuf::from(source),
                preload: true,
                why,
            }),
        }
    }

    /// LD_PRELOAD: names separated by spaces or colons; in secure mode only names without '/'.
    fn env_preloads(&mut self, preloads: &mut Vec<usize>) {
        let Some(list) = self.launch.ld_var("LD_PRELOAD").map(|v| v.as_bytes().to_vec()) else { return };
        for name in list.split(|&b| b == b' ' || b == b':') {
            if name.is_empty() || name.len() >= PATH_MAX {
                continue;
            }
            if self.secure && (name.contains(&b'/') || name.len() >= NAME_MAX) {
                let n = String::from_utf8_lossy(name);
                self.notes.push(format!("LD_PRELOAD entry {n} is ignored: the program runs in secure mode"));
                continue;
            }
            self.preload(name, "LD_PRELOAD", preloads);
        }
    }

    /// /etc/ld.so.preload: names separated by white space or colons, `#` comments.
    fn file_preloads(&mut self, preloads: &mut Vec<usize>) {
        let path = Path::new(PRELOAD_FILE);
        let text = match objfile::open_regular(path) {
            Err(e) if errno_of(&e) == Some(libc::ENOENT) => return,
            Err(e) => {
                self.notes.push(format!("{e:#}: its preloads are not known"));
                return;
            }
            Ok(f) => match objfile::read_bounded(&f, 1 << 20, path) {
                Ok(t) => t,
                Err(e) => {
                    self.notes.push(format!("{e:#}: its preloads are not known"));
                    return;
                }
            },
        };
        for line in text.split(|&b| b == b'\n') {
            let line = line.split(|&b| b == b'#').next().unwrap_or_default();
            for name in line.split(|&b| matches!(b, b' ' | b'\t' | b':')).filter(|n| !n.is_empty()) {
                self.preload(name, PRELOAD_FILE, preloads);
            }
        }
    }
}

/// The load order of `program`: see the module's documentation.
pub fn run(program: Program, launch: &Launch) -> Result<LoadOrder> {
    let exe = launch.absolute(&program.path);
    let mut head = [0u8; 64];
    let n = program.file.read_at(&mut head, 0).with_context(|| format!("cannot read {}", exe.display()))?;
    objfile::check_elf(&head[..n], &exe).with_context(|| format!("cannot run {}", exe.display()))?;
    let dynamic = match elf::read_mapped(&program.file) {
        Ok(d) => d,
        Err(Reject::Skip(what)) => bail!("cannot run {}: {what}", exe.display()),
        Err(Reject::Fatal(m)) => bail!("cannot run {}: {m}", exe.display()),
    };
    let secure = launch.secure_for(&program.file);
    // $ORIGIN of the executable: the directory of its canonical path (/proc/self/exe).
    let canonical = std::fs::read_link(objfile::fd_path(&program.file)).unwrap_or_else(|_| exe.clone());
    let interp = dynamic.interp.clone();
    let cpu = Cpu::detect();
    let mut s = Search {
        launch,
        subdirs: cpu.search_subdirs(),
        cpu,
        secure,
        cache: None,
        nodes: vec![Node {
            obj: Object {
                path: exe.clone(),
                file: program.file,
                found: Found::Executable,
                preload: false,
                names: vec![],
                soname: dynamic.soname.clone(),
                needed: dynamic.needed.clone(),
            },
            dynamic,
            match_names: vec![],
            loader: None,
            origin: Some(dirname(bytes(&canonical))),
            id: None,
        }],
        library_path: vec![],
        dir_exists: HashMap::new(),
        missing: vec![],
        notes: vec![],
    };
    let Some(interp) = interp else {
        // A static executable: the kernel starts it directly, nothing else is loaded.
        let objects = s.nodes.into_iter().map(|n| n.obj).collect();
        return Ok(LoadOrder {
            scripts: program.scripts,
            objects,
            interpreter: None,
            missing: vec![],
            secure,
            notes: vec![],
        });
    };

    let interp_path = launch.absolute(&PathBuf::from(&interp));
    let context = || format!("cannot run {}: its ELF interpreter", exe.display());
    let file = objfile::open_regular(&interp_path).with_context(context)?;
    let n = file.read_at(&mut head, 0).with_context(context)?;
    objfile::check_elf(&head[..n], &interp_path).with_context(context)?;
    let idyn =
        elf::read_mapped(&file).map_err(|r| anyhow::anyhow!("{}: {r}", interp_path.display())).with_context(context)?;
    if idyn.soname.as_deref() != Some(OsStr::new(GLIBC_LD_SO)) {
        s.notes.push(format!(
            "{} is not glibc's dynamic linker: its libraries were looked for with glibc's rules",
            interp_path.display()
        ));
    }
    let ib = interp.as_bytes().to_vec();
    let mut match_names = vec![ib.clone()];
    if !idyn.dynamic {
        // A dynamic linker linked statically is also known by its file name.
        match_names.push(ib.rsplit(|&b| b == b'/').next().unwrap_or_default().to_vec());
    }
    s.nodes.push(Node {
        obj: Object {
            path: interp_path,
            file,
            found: Found::Interpreter,
            preload: false,
            names: vec![interp.clone()],
            soname: idyn.soname.clone(),
            needed: vec![],
        },
        dynamic: Dynamic { needed: vec![], ..idyn },
        match_names,
        loader: None,
        origin: None,
        id: None,
    });
    let rtld = 1;

    if !secure && let Some(llp) = launch.ld_var("LD_LIBRARY_PATH") {
        s.library_path = s.path_list(llp.as_bytes(), b":;", 0);
    }
    let mut known = vec![0];
    s.env_preloads(&mut known);
    s.file_preloads(&mut known);
    // Breadth-first over DT_NEEDED: each object's needs, in order, appended once.
    let mut k = 0;
    while k < known.len() {
        let l = known[k];
        k += 1;
        if s.nodes[l].dynamic.filters {
            s.notes.push(format!(
                "{} is a filter (DT_FILTER/DT_AUXILIARY): the objects it names are not followed",
                s.nodes[l].obj.path.display()
            ));
        }
        for needed in s.nodes[l].dynamic.needed.clone() {
            let nb = needed.as_bytes();
            let fail = |s: &mut Search, why: &str| {
                s.missing.push(Missing {
                    name: needed.clone(),
                    needed_by: s.nodes[l].obj.path.clone(),
                    preload: false,
                    why: why.to_string(),
                })
            };
            let name = if count_dsts(nb) == 0 {
                nb.to_vec()
            } else if s.secure {
                fail(&mut s, "DST not allowed in SUID/SGID programs");
                continue;
            } else {
                match s.expand(l, nb) {
                    Some(e) => e,
                    None => {
                        fail(&mut s, "empty dynamic string token substitution");
                        continue;
                    }
                }
            };
            match s.map_object(l, &name, false) {
                Ok(d) if !known.contains(&d) => known.push(d),
                Ok(_) => {}
                Err(why) => fail(&mut s, &why),
            }
        }
    }

    let rtld_in_scope = known.contains(&rtld);
    let mut nodes: Vec<Option<Node>> = s.nodes.into_iter().map(Some).collect();
    let objects: Vec<Object> = known.iter().filter_map(|&i| nodes[i].take()).map(|n| n.obj).collect();
    let interpreter = if rtld_in_scope {
        objects.iter().find(|o| o.found == Found::Interpreter).map(Object::try_clone).transpose()?
    } else {
        nodes[rtld].take().map(|n| n.obj)
    };
    Ok(LoadOrder { scripts: program.scripts, objects, interpreter, missing: s.missing, secure, notes: s.notes })
}
