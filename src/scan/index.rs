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
    /// For each bucket, the first block whose end lies above the bucket's start.
    table: Vec<u32>,
}

pub struct Index {
    /// Sorted, non-overlapping: a block's look-up end never passes the next block's start.
    pub start: Vec<u64>,
    /// The end looked up: start + size, at least start + 1 (a zero-sized block is found by a
    /// pointer to its start), at most the next block's start.
    end: Vec<u64>,
    clusters: Vec<Cluster>,
    lo: u64,
    hi: u64,
}

impl Index {
    /// `blocks`: (address, size), sorted by address, addresses distinct.
    pub fn new(blocks: &[(u64, u64)]) -> Index {
        let n = blocks.len();
        let start: Vec<u64> = blocks.iter().map(|b| b.0).collect();
        let mut end: Vec<u64> = blocks.iter().map(|&(a, s)| a.saturating_add(s.max(1))).collect();
        for i in 0..n.saturating_sub(1) {
            end[i] = end[i].min(start[i + 1]);
        }
        let mut clusters = Vec::new();
        let mut first = 0;
        for i in 0..n {
            let last = i + 1 == n || start[i + 1] - end[i] > CLUSTER_GAP;
            if last {
                clusters.push(Self::cluster(&start, &end, first, i + 1));
                first = i + 1;
            }
        }
        let (lo, hi) = if n == 0 { (1, 0) } else { (start[0], end[n - 1]) };
        Index { start, end, clusters, lo, hi }
    }

    fn cluster(start: &[u64], end: &[u64], first: usize, last: usize) -> Cluster {
        let (lo, hi) = (start[first], end[last - 1]);
        let count = (last - first) as u64;
        // About two buckets per block, at least 16 bytes each.
        let span = hi - lo;
        let want = (span / (2 * count)).max(16);
        let shift = 63 - want.leading_zeros();
        let buckets = (span >> shift) as usize + 1;
        let mut table = Vec::with_capacity(buckets);
        let mut i = first;
        for b in 0..buckets {
            let bucket_lo = lo + ((b as u64) << shift);
            while i < last && end[i] <= bucket_lo {
                i += 1;
            }
            table.push(i as u32);
        }
        Cluster { lo, hi, shift, table }
    }

    pub fn len(&self) -> usize {
        self.start.len()
    }

    /// The block `p` points into (its start included, its end excluded).
    #[inline]
    pub fn find(&self, p: u64) -> Option<usize> {
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
        if p >= c.hi {
            return None;
        }
        let mut i = c.table[((p - c.lo) >> c.shift) as usize] as usize;
        let n = self.end.len();
        while i < n && self.end[i] <= p {
            i += 1;
        }
        (i < n && self.start[i] <= p).then_some(i)
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
