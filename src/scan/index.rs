//! Which block, if any, an address points into: blocks sorted by address, grouped into clusters
//! of nearby blocks, each with a table of fixed-size buckets giving the first block that can
//! hold an address of the bucket. A look-up is a range check, a short search among the
//! clusters, a table read and, almost always, one or two comparisons.

/// Blocks farther apart than this start a new cluster (so that a table never spans the gap
/// between, say, the brk heap and a mapping near the stack).
const CLUSTER_GAP: u64 = 1 << 20;

struct Cluster {
    lo: u64,
    hi: u64,
    shift: u32,
    /// Where its buckets begin in the shared table.
    base: usize,
}

pub struct Index {
    /// (start, end) of each block, sorted, non-overlapping: the end looked up is start + size,
    /// at least start + 1 (a zero-sized block is found by a pointer to its start), at most the
    /// next block's start. Start and end side by side: one cache line per look-up.
    spans: Vec<(u64, u64)>,
    /// For each bucket of each cluster, the first block whose end lies above the bucket's start.
    table: Vec<u32>,
    clusters: Vec<Cluster>,
    lo: u64,
    hi: u64,
}

/// Words looked up together: their table slots are fetched from memory in parallel.
pub const BATCH: usize = 16;

#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and changes no state, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
}

impl Index {
    /// `blocks`: (address, size), sorted by address, addresses distinct.
    pub fn new(blocks: &[(u64, u64)]) -> Index {
        let n = blocks.len();
        let mut spans: Vec<(u64, u64)> = blocks.iter().map(|&(a, s)| (a, a.saturating_add(s.max(1)))).collect();
        for i in 0..n.saturating_sub(1) {
            spans[i].1 = spans[i].1.min(spans[i + 1].0);
        }
        let mut clusters = Vec::new();
        let mut table = Vec::new();
        let mut first = 0;
        for i in 0..n {
            let last = i + 1 == n || spans[i + 1].0 - spans[i].1 > CLUSTER_GAP;
            if last {
                clusters.push(Self::cluster(&spans, first, i + 1, &mut table));
                first = i + 1;
            }
        }
        let (lo, hi) = if n == 0 { (1, 0) } else { (spans[0].0, spans[n - 1].1) };
        Index { spans, table, clusters, lo, hi }
    }

    fn cluster(spans: &[(u64, u64)], first: usize, last: usize, table: &mut Vec<u32>) -> Cluster {
        let (lo, hi) = (spans[first].0, spans[last - 1].1);
        let count = (last - first) as u64;
        // About one bucket per block, at least 16 bytes each.
        let span = hi - lo;
        let want = (span / count).max(16);
        let shift = 63 - want.leading_zeros();
        let buckets = (span >> shift) as usize + 1;
        let base = table.len();
        table.reserve(buckets);
        let mut i = first;
        for b in 0..buckets {
            let bucket_lo = lo + ((b as u64) << shift);
            while i < last && spans[i].1 <= bucket_lo {
                i += 1;
            }
            table.push(i as u32);
        }
        Cluster { lo, hi, shift, base }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// From the first block's start to the last one's end (empty: lo > hi).
    pub fn range(&self) -> (u64, u64) {
        (self.lo, self.hi)
    }

    pub fn start(&self, i: usize) -> u64 {
        self.spans[i].0
    }

    /// The end looked up (see `spans`).
    pub fn end(&self, i: usize) -> u64 {
        self.spans[i].1
    }

    /// The table slot of the bucket `p` falls in, if `p` is inside some cluster.
    #[inline(always)]
    fn slot(&self, p: u64) -> Option<usize> {
        if p < self.lo || p >= self.hi {
            return None;
        }
        let c = match self.clusters.len() {
            1 => &self.clusters[0],
            _ => {
                let k = self.clusters.partition_point(|c| c.lo <= p);
                &self.clusters[k.checked_sub(1)?]
            }
        };
        (p < c.hi).then(|| c.base + ((p - c.lo) >> c.shift) as usize)
    }

    /// From a bucket's first candidate, the block holding `p`.
    #[inline(always)]
    fn resolve(&self, mut i: usize, p: u64) -> Option<usize> {
        let n = self.spans.len();
        while i < n && self.spans[i].1 <= p {
            i += 1;
        }
        (i < n && self.spans[i].0 <= p).then_some(i)
    }

    /// The block `p` points into (its start included, its end excluded).
    #[inline]
    pub fn find(&self, p: u64) -> Option<usize> {
        let s = self.slot(p)?;
        self.resolve(self.table[s] as usize, p)
    }

    /// Looks up to [`BATCH`] words at once: `out[k]` is the block `words[k]` points into. The
    /// memory the look-ups read is requested for all of them before any is used, so that their
    /// cache misses overlap.
    #[inline]
    pub fn find_batch(&self, words: &[u64], out: &mut [Option<usize>; BATCH]) {
        let mut slots = [usize::MAX; BATCH];
        for (k, &w) in words.iter().enumerate().take(BATCH) {
            if let Some(s) = self.slot(w) {
                slots[k] = s;
                prefetch(&self.table[s]);
            }
        }
        let mut first = [0usize; BATCH];
        for k in 0..words.len().min(BATCH) {
            if slots[k] != usize::MAX {
                let i = self.table[slots[k]] as usize;
                first[k] = i;
                if let Some(sp) = self.spans.get(i) {
                    prefetch(sp);
                }
            }
        }
        for k in 0..words.len().min(BATCH) {
            out[k] = if slots[k] == usize::MAX { None } else { self.resolve(first[k], words[k]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(blocks: &[(u64, u64)], p: u64) -> Option<usize> {
        blocks.iter().position(|&(a, s)| p >= a && p < a + s.max(1))
    }

    #[test]
    fn finds_what_a_linear_search_finds() {
        // Mixed sizes, a zero-sized block, touching blocks, a far cluster.
        let blocks = vec![
            (0x1000, 16),
            (0x1010, 0),
            (0x1020, 40),
            (0x1048, 8),
            (0x2000, 4096),
            (0x3010, 24),
            (0x7f00_0000_0000, 1 << 20),
            (0x7f00_0010_0000, 16),
        ];
        let idx = Index::new(&blocks);
        for &(a, s) in &blocks {
            for p in [a.wrapping_sub(1), a, a + 1, a + s.max(1) - 1, a + s.max(1), a + s + 7] {
                assert_eq!(idx.find(p), naive(&blocks, p), "{p:#x}");
            }
        }
        for p in [0, 0x999, 0x1050, 0x2fff, 0x3000, 0x3028, u64::MAX, 0x7f00_0010_0010] {
            assert_eq!(idx.find(p), naive(&blocks, p), "{p:#x}");
        }
        assert_eq!(Index::new(&[]).find(0x1000), None);
        // In batches, the same answers.
        let probes: Vec<u64> = (0x0ff0..0x3040).step_by(8).chain([0x7f00_0000_0008, u64::MAX]).collect();
        for chunk in probes.chunks(BATCH) {
            let mut out = [None; BATCH];
            idx.find_batch(chunk, &mut out);
            for (k, &p) in chunk.iter().enumerate() {
                assert_eq!(out[k], naive(&blocks, p), "{p:#x}");
            }
        }
    }

    #[test]
    fn random_blocks_agree_with_a_linear_search() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut blocks = Vec::new();
        let mut a = 0x5555_0000_0000u64;
        for _ in 0..2000 {
            a += 16 + (next() % 64) * 16;
            if next() % 50 == 0 {
                a += 1 << 21;
            }
            let s = next() % 200;
            blocks.push((a, s));
            a += s;
        }
        let idx = Index::new(&blocks);
        for _ in 0..20000 {
            let (ba, bs) = blocks[(next() % blocks.len() as u64) as usize];
            let p = ba.wrapping_add(next() % (bs + 64)).wrapping_sub(32);
            assert_eq!(idx.find(p), naive(&blocks, p), "{p:#x}");
        }
    }
}
