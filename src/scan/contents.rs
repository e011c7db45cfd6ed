//! The blocks' contents, copied out of the process in few calls: runs of nearby blocks are
//! read as one range (the allocator's few header bytes between them cost less than another
//! iovec), never-touched pages of large anonymous runs are not read at all (they are zeros).
use anyhow::{Result, bail};

use super::memory::{self, PAGE, Reader, Region};

/// Where each block's words are in the copy, and what could not be copied.
pub struct Contents {
    pub buf: Buffer,
    /// Per block: (first word in `buf`, number of words).
    pub words: Vec<(usize, usize)>,
    /// Bytes of blocks in memory without access rights (guard pages of thread stacks, memory
    /// the program protected): the program cannot read them either.
    pub noaccess: u64,
    /// Bytes of blocks in no mapping (a record whose memory is gone), and in how many blocks.
    pub unmapped: (u64, u64),
}

/// A run of memory read in one piece into the copy.
struct Run {
    start: u64,
    end: u64,
    /// Its first word in the copy.
    word: usize,
    /// The region it lies in.
    region: usize,
}

pub fn copy(reader: &mut Reader, regions: &[Region], spans: &[(u64, u64)]) -> Result<Contents> {
    let mut words = Vec::with_capacity(spans.len());
    let mut runs: Vec<Run> = Vec::new();
    let mut parts: Vec<(u64, u64, usize)> = Vec::new();
    let mut total = 0usize;
    let mut noaccess = 0;
    let mut unmapped = (0, 0);
    for &(addr, size) in spans {
        // Only whole aligned words can hold a pointer.
        let (s, e) = (addr.next_multiple_of(8), addr.saturating_add(size) & !7);
        if s >= e {
            words.push((total, 0));
            continue;
        }
        let n = ((e - s) / 8) as usize;
        let ri = regions.partition_point(|r| r.start <= s).checked_sub(1);
        let inside = ri.filter(|&i| e <= regions[i].end && regions[i].read && !regions[i].is_device());
        if let Some(ri) = inside {
            // Within one readable region: joins the last run if near it.
            match runs.last_mut() {
                Some(run) if run.region == ri && s >= run.end && s - run.end <= PAGE => {
                    let w = run.word + ((s - run.start) / 8) as usize;
                    words.push((w, n));
                    total = w + n;
                    run.end = e;
                }
                _ => {
                    runs.push(Run { start: s, end: e, word: total, region: ri });
                    words.push((total, n));
                    total += n;
                }
            }
            continue;
        }
        // Across regions, or partly unreadable: its own place, its readable parts read.
        words.push((total, n));
        let mut a = s;
        while a < e {
            match memory::find(regions, a) {
                Some(r) => {
                    let end = r.end.min(e);
                    if r.read && !r.is_device() {
                        parts.push((a, end - a, total + ((a - s) / 8) as usize));
                    } else {
                        noaccess += end - a;
                    }
                    a = end;
                }
                None => {
                    let next = regions.iter().map(|r| r.start).find(|&st| st > a).unwrap_or(e).min(e);
                    unmapped.0 += next - a;
                    unmapped.1 += 1;
                    a = next;
                }
            }
        }
        total += n;
    }
    for run in &runs {
        parts.push((run.start, run.end - run.start, run.word));
    }
    parts.sort_unstable_by_key(|p| p.2);

    // Large anonymous parts: only their pages that hold anything.
    let mut reads: Vec<(u64, u64, usize)> = Vec::with_capacity(parts.len());
    for (a, len, w) in parts {
        let anon = memory::find(regions, a).is_some_and(|r| r.is_anonymous());
        if anon && len >= 16 * PAGE {
            for (ps, pe) in reader.populated(a, a + len) {
                reads.push((ps, pe - ps, w + ((ps - a) / 8) as usize));
            }
        } else {
            reads.push((a, len, w));
        }
    }
    // Pages allocated up front when most will be written; left to fault in (or stay the
    // shared zero page, for never-touched memory) otherwise.
    let bytes: u64 = reads.iter().map(|r| r.1).sum();
    let mut buf = Buffer::new(total, bytes >= total as u64 * 4)?;
    read_into(reader, &reads, &mut buf);
    Ok(Contents { buf, words, noaccess, unmapped })
}

/// Zeroed words in memory of their own, its pages allocated at once (MAP_POPULATE) if asked:
/// a page fault per 4 KiB while copying a GiB cost about a fifth of the copy.
pub struct Buffer {
    ptr: *mut u64,
    len: usize,
}

impl Buffer {
    fn new(len: usize, populate: bool) -> Result<Buffer> {
        if len == 0 {
            return Ok(Buffer { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0 });
        }
        // SAFETY: a fresh anonymous mapping, owned by the Buffer until dropped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if populate { libc::MAP_POPULATE } else { 0 },
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("cannot map {} bytes to copy the blocks into: {}", len * 8, std::io::Error::last_os_error());
        }
        Ok(Buffer { ptr: p.cast(), len })
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        // SAFETY: `len` words mapped readable and writable (zeros at first) while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as above, and borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping the mapping made in new(), no longer borrowed.
            unsafe { libc::munmap(self.ptr.cast(), self.len * 8) };
        }
    }
}

/// Reads each (address, length, word in `buf`), one call for up to 1024 of them when they
/// follow each other in `buf`.
fn read_into(reader: &mut Reader, reads: &[(u64, u64, usize)], buf: &mut [u64]) {
    // SAFETY: the u64 buffer viewed as bytes: same memory, same lifetime, u8 has no alignment.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), buf.len() * 8) };
    let mut i = 0;
    while i < reads.len() {
        let first = reads[i].2 * 8;
        let mut end = first;
        let mut j = i;
        while j < reads.len() && j - i < 1024 && reads[j].2 * 8 == end {
            end += reads[j].1 as usize;
            j += 1;
        }
        let ranges: Vec<(u64, u64)> = reads[i..j].iter().map(|r| (r.0, r.1)).collect();
        reader.read(&ranges, &mut bytes[first..end]);
        i = j;
    }
}
