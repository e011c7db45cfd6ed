//! pprof: a gzip'd profile.proto (the upstream schema, vendored in proto/, compiled by
//! build.rs) that `go tool pprof`, Pyroscope and Parca read. Sample types alloc_objects,
//! alloc_space (everything allocated from each stack since tracing began, counted in BPF),
//! inuse_objects and inuse_space (outstanding now, the default), scaled by N under -s N
//! (period N, period type allocations/count). Each sample carries labels: pid, comm, stack_id,
//! growth (bytes since the last report), growing, class. Mappings carry file offsets and build
//! ids, locations their addresses and lines (inlined functions first, as pprof orders them), so
//! a backend can also symbolize again from the build ids. docs/output-formats.md has the rest.
use std::collections::HashMap;
use std::io::Write;

use anyhow::{Result, bail};
use prost::Message;

use crate::snapshot::{Snapshot, frame_lines};

#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/perftools.profiles.rs"));
}
use proto::{Function, Label, Line, Location, Mapping, Profile, Sample, ValueType};

/// The pprof writer; keeps the kernel's build-id, read once.
#[derive(Default)]
pub struct Pprof {
    kernel_build_id: Option<Option<String>>,
}

impl super::Format for Pprof {
    fn name(&self) -> &'static str {
        "pprof"
    }

    fn render(&mut self, snap: &Snapshot) -> Result<Vec<u8>> {
        if snap.kernel && self.kernel_build_id.is_none() {
            self.kernel_build_id = Some(kernel_build_id());
        }
        let profile = profile(snap, self.kernel_build_id.clone().flatten());
        validate(&profile)?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&profile.encode_to_vec())?;
        Ok(gz.finish()?)
    }
}

/// The sample types, in the order of each sample's values.
pub const SAMPLE_TYPES: [(&str, &str); 4] =
    [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")];

#[derive(Default)]
struct Tables {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    mappings: Vec<Mapping>,
    /// (module, build-id, address - file offset) → index in `mappings`.
    mapping_ids: HashMap<(String, Option<String>, Option<u64>), usize>,
    locations: Vec<Location>,
    location_ids: HashMap<(u64, u64, String), u64>,
    functions: Vec<Function>,
    function_ids: HashMap<(String, String), u64>,
}

impl Tables {
    fn s(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.string_ids.get(s) {
            return i;
        }
        let i = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), i);
        i
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (name.to_string(), file.to_string());
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let (name, filename) = (self.s(name), self.s(file));
        self.functions.push(Function { id, name, system_name: name, filename, start_line: 0 });
        self.function_ids.insert(key, id);
        id
    }

    /// The mapping of an address of `module`, widened to hold it. File-backed mappings are
    /// told apart by their load bias (address - file offset): an object loaded twice at two
    /// places is two mappings, each with exact file offsets.
    fn mapping(
        &mut self,
        module: &str,
        build_id: Option<&str>,
        addr: u64,
        file_offset: Option<u64>,
        lines: bool,
    ) -> u64 {
        let bias = file_offset.map(|o| addr.wrapping_sub(o));
        let key = (module.to_string(), build_id.map(str::to_string), bias);
        let i = match self.mapping_ids.get(&key) {
            Some(&i) => i,
            None => {
                let m = Mapping {
                    id: self.mappings.len() as u64 + 1,
                    memory_start: addr,
                    memory_limit: addr + 1,
                    filename: self.s(module),
                    build_id: self.s(build_id.unwrap_or("")),
                    ..Mapping::default()
                };
                self.mappings.push(m);
                self.mapping_ids.insert(key, self.mappings.len() - 1);
                self.mappings.len() - 1
            }
        };
        let m = &mut self.mappings[i];
        m.memory_start = m.memory_start.min(addr);
        m.memory_limit = m.memory_limit.max(addr + 1);
        m.file_offset = bias.map_or(0, |b| m.memory_start.wrapping_sub(b));
        m.has_functions |= lines;
        m.has_filenames |= lines;
        m.has_line_numbers |= lines;
        m.has_inline_frames |= lines;
        m.id
    }
}

/// The profile of a snapshot.
pub fn profile(snap: &Snapshot, kernel_build_id: Option<String>) -> Profile {
    let mut t = Tables::default();
    t.s("");
    let sample_type: Vec<ValueType> =
        SAMPLE_TYPES.iter().map(|(ty, unit)| ValueType { r#type: t.s(ty), unit: t.s(unit) }).collect();
    let scale = i64::from(snap.sample_rate.max(1));
    let mut samples = Vec::new();
    let mut main_mapping = None;
    for p in snap.whole_job() {
        for s in &p.stacks {
            let mut location_id = Vec::with_capacity(s.frames.len());
            for f in s.frames.iter() {
                let lines: Vec<_> = frame_lines(std::slice::from_ref(f)).filter(|l| l.function.is_some()).collect();
                let module = if snap.kernel && f.module.as_deref() == Some("kernel") {
                    Some("[kernel.kallsyms]")
                } else {
                    f.module.as_deref()
                };
                let build_id = if snap.kernel { kernel_build_id.as_deref() } else { f.build_id.as_deref() };
                let mapping_id = module.map_or(0, |m| t.mapping(m, build_id, f.addr, f.file_offset, !lines.is_empty()));
                // One location per address of a mapping; an unnamed frame of no mapping keeps its
                // module's name apart.
                let key = (
                    mapping_id,
                    f.addr,
                    if mapping_id == 0 { f.module.clone().unwrap_or_default() } else { String::new() },
                );
                let id = match t.location_ids.get(&key) {
                    Some(&id) => id,
                    None => {
                        let line = lines
                            .iter()
                            .map(|l| Line {
                                function_id: t.function(l.function.unwrap_or(""), l.file.unwrap_or("")),
                                line: l.line.map_or(0, i64::from),
                                column: 0,
                            })
                            .collect();
                        let id = t.locations.len() as u64 + 1;
                        t.locations.push(Location { id, mapping_id, address: f.addr, line, is_folded: false });
                        t.location_ids.insert(key, id);
                        id
                    }
                };
                location_id.push(id);
            }
            if main_mapping.is_none() {
                // The outermost frame's object is most likely the program itself.
                main_mapping = location_id.last().map(|&l| t.locations[l as usize - 1].mapping_id).filter(|&m| m != 0);
            }
            if location_id.is_empty() {
                // A stack without frames still holds its bytes: one pseudo-frame says why.
                let name = if s.stack_id == 0 { "[stack not stored]" } else { "[no frames]" };
                let key = (0, 0, name.to_string());
                let id = match t.location_ids.get(&key) {
                    Some(&id) => id,
                    None => {
                        let function_id = t.function(name, "");
                        let id = t.locations.len() as u64 + 1;
                        t.locations.push(Location {
                            id,
                            line: vec![Line { function_id, line: 0, column: 0 }],
                            ..Location::default()
                        });
                        t.location_ids.insert(key, id);
                        id
                    }
                };
                location_id.push(id);
            }
            let mut label = vec![
                Label { key: t.s("pid"), num: i64::from(p.pid), ..Label::default() },
                Label { key: t.s("comm"), str: t.s(&p.comm), ..Label::default() },
                Label { key: t.s("stack_id"), str: t.s(&format!("{:x}", s.stack_id)), ..Label::default() },
                Label { key: t.s("growth"), num: s.growth.delta, num_unit: t.s("bytes"), ..Label::default() },
            ];
            if s.growth.growing {
                label.push(Label { key: t.s("growing"), str: t.s("true"), ..Label::default() });
            }
            if let Some(c) = &s.class {
                label.push(Label { key: t.s("class"), str: t.s(c), ..Label::default() });
            }
            let v = |n: u64| (n as i64).saturating_mul(scale);
            samples.push(Sample {
                location_id,
                value: vec![v(s.alloc_count), v(s.alloc_bytes), v(s.count), v(s.bytes)],
                label,
            });
        }
    }
    let mut mappings = std::mem::take(&mut t.mappings);
    if let Some(main) = main_mapping {
        mappings.sort_by_key(|m| m.id != main);
    }
    let unix = snap.time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let comment = vec![t.s(&format!(
        "memleak {}report: outstanding allocations (inuse_*) and all allocations since tracing began (alloc_*)",
        if snap.is_final { "final " } else { "" }
    ))];
    Profile {
        sample_type,
        sample: samples,
        mapping: mappings,
        location: std::mem::take(&mut t.locations),
        function: std::mem::take(&mut t.functions),
        time_nanos: unix.as_nanos() as i64,
        duration_nanos: snap.elapsed.as_nanos() as i64,
        period_type: Some(ValueType { r#type: t.s("allocations"), unit: t.s("count") }),
        period: scale,
        comment,
        default_sample_type: t.s("inuse_space"),
        string_table: std::mem::take(&mut t.strings),
        ..Profile::default()
    }
}

/// Checks what readers rely on: string 0 is "", every string index is in the table, ids are
/// non-zero and unique, every id referenced exists, every sample has one value per type.
pub fn validate(p: &Profile) -> Result<()> {
    if p.string_table.first().map(String::as_str) != Some("") {
        bail!("pprof: string table does not start with \"\"");
    }
    let n = p.string_table.len() as i64;
    let str_ok = |i: i64| (0..n).contains(&i);
    let mut strs: Vec<i64> = vec![p.drop_frames, p.keep_frames, p.default_sample_type];
    strs.extend(p.comment.iter());
    for vt in p.sample_type.iter().chain(p.period_type.iter()) {
        strs.extend([vt.r#type, vt.unit]);
    }
    for s in &p.sample {
        if s.value.len() != p.sample_type.len() {
            bail!("pprof: a sample has {} values for {} types", s.value.len(), p.sample_type.len());
        }
        for l in &s.label {
            strs.extend([l.key, l.str, l.num_unit]);
        }
    }
    for m in &p.mapping {
        strs.extend([m.filename, m.build_id]);
    }
    for f in &p.function {
        strs.extend([f.name, f.system_name, f.filename]);
    }
    if let Some(bad) = strs.iter().find(|&&i| !str_ok(i)) {
        bail!("pprof: string index {bad} outside the table ({n})");
    }
    fn ids<'a>(what: &str, it: impl Iterator<Item = &'a u64>) -> Result<std::collections::HashSet<u64>> {
        let mut seen = std::collections::HashSet::new();
        for &id in it {
            if id == 0 || !seen.insert(id) {
                bail!("pprof: {what} id {id} is zero or not unique");
            }
        }
        Ok(seen)
    }
    let mappings = ids("mapping", p.mapping.iter().map(|m| &m.id))?;
    let locations = ids("location", p.location.iter().map(|l| &l.id))?;
    let functions = ids("function", p.function.iter().map(|f| &f.id))?;
    for l in &p.location {
        if l.mapping_id != 0 && !mappings.contains(&l.mapping_id) {
            bail!("pprof: location {} names mapping {}, which does not exist", l.id, l.mapping_id);
        }
        if let Some(line) = l.line.iter().find(|line| !functions.contains(&line.function_id)) {
            bail!("pprof: location {} names function {}, which does not exist", l.id, line.function_id);
        }
    }
    for s in &p.sample {
        if let Some(id) = s.location_id.iter().find(|id| !locations.contains(id)) {
            bail!("pprof: a sample names location {id}, which does not exist");
        }
    }
    Ok(())
}

/// The running kernel's GNU build-id, from the ELF notes in /sys/kernel/notes.
fn kernel_build_id() -> Option<String> {
    let notes = std::fs::read("/sys/kernel/notes").ok()?;
    let u32_at = |i: usize| notes.get(i..i + 4).map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")) as usize);
    let pad = |n: usize| n.div_ceil(4) * 4;
    let mut i = 0;
    while i + 12 <= notes.len() {
        let (namesz, descsz, kind) = (u32_at(i)?, u32_at(i + 4)?, u32_at(i + 8)?);
        let name = notes.get(i + 12..i + 12 + namesz)?;
        let desc_at = i + 12 + pad(namesz);
        let desc = notes.get(desc_at..desc_at + descsz)?;
        if kind == 3 && name == b"GNU\0" {
            return Some(desc.iter().map(|b| format!("{b:02x}")).collect());
        }
        i = desc_at + pad(descsz);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::Format;
    use crate::snapshot::tests::sample;
    use std::io::Read;

    #[test]
    fn a_valid_profile_with_every_sample_type() {
        let mut s = sample(&[(1, 300, 3, &["leak_a", "main"]), (2, 100, 1, &["leak_b", "main"]), (3, 8, 1, &[])]);
        s.sample_rate = 2;
        s.processes[0].stacks[0].growth.growing = true;
        let mut gz = Vec::new();
        flate2::read::GzDecoder::new(&Pprof::default().render(&s).unwrap()[..]).read_to_end(&mut gz).unwrap();
        let p = Profile::decode(&gz[..]).unwrap();
        validate(&p).unwrap();
        let st = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<_> = p.sample_type.iter().map(|v| (st(v.r#type), st(v.unit))).collect();
        assert_eq!(types, SAMPLE_TYPES);
        assert_eq!(st(p.default_sample_type), "inuse_space");
        assert_eq!(p.period, 2);
        // Scaled by the sampling rate: 300 bytes in 3 recorded = 600 in 6.
        assert_eq!(p.sample[0].value, [12, 1200, 6, 600]);
        let leaf = &p.location[p.sample[0].location_id[0] as usize - 1];
        let f = &p.function[leaf.line[0].function_id as usize - 1];
        assert_eq!((st(f.name), st(f.filename), leaf.line[0].line), ("leak_a", "/src/prog.c", 10));
        let m = &p.mapping[0];
        assert_eq!((st(m.filename), st(m.build_id)), ("/bin/prog", "abcd"));
        // The location's file offset follows from its mapping.
        assert_eq!(leaf.address - m.memory_start + m.file_offset, 0x2000);
        let labels: Vec<_> = p.sample[0].label.iter().map(|l| (st(l.key), l.num, st(l.str))).collect();
        assert!(labels.contains(&("growth", 300, "")) && labels.contains(&("growing", 0, "true")), "{labels:?}");
        // The stack with no frames has one pseudo-frame.
        let empty = &p.location[p.sample[2].location_id[0] as usize - 1];
        assert_eq!(st(p.function[empty.line[0].function_id as usize - 1].name), "[no frames]");
    }

    #[test]
    fn invalid_profiles_are_refused() {
        let good = profile(&sample(&[(1, 8, 1, &["f"])]), None);
        validate(&good).unwrap();
        let mut p = good.clone();
        p.location[0].mapping_id = 99;
        assert!(validate(&p).is_err());
        let mut p = good.clone();
        p.function[0].id = 0;
        assert!(validate(&p).is_err());
        let mut p = good.clone();
        p.string_table[0] = "x".into();
        assert!(validate(&p).is_err());
        let mut p = good;
        p.sample[0].value.pop();
        assert!(validate(&p).is_err());
    }

    #[test]
    fn kernel_build_id_is_read() {
        // /sys/kernel/notes is readable by root; this kernel has a build-id.
        if let Some(id) = kernel_build_id() {
            assert!(id.len() >= 16 && id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
    }
}
