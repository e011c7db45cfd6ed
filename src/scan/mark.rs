//! Marking: which blocks the roots reach, through which kind of pointer, and which lost blocks
//! hang off which. The rules are valgrind memcheck's (docs/reachability.md):
//! - a root word pointing to a block's start makes it reachable, into its interior possibly
//!   lost (unless a heuristic says the interior pointer is a known idiom);
//! - a reachable block passes on what it holds as a root would; a possibly lost block passes
//!   on at most "possibly lost";
//! - then every block still unreached, in address order, leads a clique: what it reaches (by
//!   any pointer) and is still unreached becomes indirectly lost; the leader stays definitely
//!   lost, unless a later leader reaches it.
//!   A block's pointer to itself reaches nothing new.
use super::index::{BATCH, Index};
use super::{Class, Heuristic};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum State {
    Unreached,
    Indirect,
    Possible,
    Reachable,
}

/// What the marker needs to know about the process besides the blocks.
pub trait Lookups {
    /// The words of block `i`, from its first 8-byte aligned address to its last whole word.
    fn words(&self, i: usize) -> &[u64];
    /// Whether the word at `addr` points at a table of function pointers (a C++ vtable).
    fn is_vtable(&self, addr: u64) -> bool;
    /// A hint: block `i`'s words are wanted soon.
    fn prefetch(&self, _i: usize) {}
}

pub struct Marker {
    idx: Index,
    /// Block sizes, for the heuristics and the glibc rule.
    size: Vec<u64>,
    state: Vec<State>,
    heuristic: Vec<Option<Heuristic>>,
    pending: Vec<bool>,
    stack: Vec<u32>,
    /// glibc's allocator keeps pointers to the next chunk's header, which can fall in the last
    /// 8 bytes of a block (see [`Marker::points_to`]).
    glibc: bool,
    /// Blocks that are thread stacks (mappings right above a guard page): any pointer into one
    /// keeps it, as valgrind, which does not count them as blocks, never reports them.
    stacks: Vec<bool>,
    /// Root words looked at, for the statistics.
    pub root_words: u64,
}

impl Marker {
    pub fn new(idx: Index, size: Vec<u64>, glibc: bool) -> Self {
        let n = idx.len();
        Marker {
            idx,
            size,
            state: vec![State::Unreached; n],
            heuristic: vec![None; n],
            pending: vec![false; n],
            stack: Vec::new(),
            glibc,
            stacks: Vec::new(),
            root_words: 0,
        }
    }

    /// Marks the blocks that are thread stacks.
    pub fn set_thread_stacks(&mut self, stacks: Vec<bool>) {
        self.stacks = stacks;
    }

    /// The block a word points into, if any. With glibc, a pointer to a 16-byte aligned
    /// address in a block's last 8 bytes is not counted: that is where the header of the next
    /// chunk begins when the block fills its chunk, and glibc's bins, top and free chunks
    /// point there.
    #[inline]
    fn points_to(&self, w: u64) -> Option<usize> {
        self.idx.find(w).filter(|&i| !self.next_chunk_header(i, w))
    }

    #[inline(always)]
    fn next_chunk_header(&self, i: usize, w: u64) -> bool {
        self.glibc && w.is_multiple_of(16) && w != self.idx.start(i) && w + 8 >= self.idx.end(i)
    }

    /// Every word of `words` that points into a block reaches it. Words outside the blocks'
    /// whole range (most data) are dropped first; the others are looked up in batches.
    fn scan(&mut self, words: &[u64], definite: bool, look: &dyn Lookups) {
        let (lo, hi) = self.idx.range();
        let width = hi.wrapping_sub(lo);
        let mut batch = [0u64; BATCH];
        let mut n = 0;
        for &w in words {
            if w.wrapping_sub(lo) < width {
                batch[n] = w;
                n += 1;
                if n == BATCH {
                    self.reach_batch(&batch, definite, look);
                    n = 0;
                }
            }
        }
        self.reach_batch(&batch[..n], definite, look);
    }

    fn reach_batch(&mut self, words: &[u64], definite: bool, look: &dyn Lookups) {
        let mut out = [None; BATCH];
        self.idx.find_batch(words, &mut out);
        for (k, &w) in words.iter().enumerate() {
            if let Some(i) = out[k]
                && !self.next_chunk_header(i, w)
            {
                self.reach(i, w, definite, look);
            }
        }
    }

    fn push(&mut self, i: usize) {
        if !self.pending[i] {
            self.pending[i] = true;
            self.stack.push(i as u32);
        }
    }

    /// A word of a root (memory outside every block, or a register).
    #[inline]
    pub fn root_word(&mut self, w: u64, look: &dyn Lookups) {
        self.root_words += 1;
        if let Some(i) = self.points_to(w) {
            self.reach(i, w, true, look);
        }
    }

    /// Root words in bulk.
    pub fn root_words(&mut self, words: &[u64], look: &dyn Lookups) {
        self.root_words += words.len() as u64;
        self.scan(words, true, look);
    }

    /// Block `i` is pointed at by `w` from something reachable (`definite`) or only possibly so.
    fn reach(&mut self, i: usize, w: u64, definite: bool, look: &dyn Lookups) {
        let start = self.idx.start(i);
        if self.state[i] == State::Reachable {
            // Reached by its start after a heuristic: the heuristic was not needed.
            if w == start {
                self.heuristic[i] = None;
            }
            return;
        }
        let via_start = if w == start {
            true
        } else {
            self.heuristic[i] = if self.stacks.get(i).copied().unwrap_or(false) {
                Some(Heuristic::ThreadStack)
            } else {
                self.heuristic_for(i, w, look)
            };
            self.heuristic[i].is_some()
        };
        if via_start && definite {
            self.state[i] = State::Reachable;
            self.push(i);
        } else if self.state[i] == State::Unreached {
            self.state[i] = State::Possible;
            self.push(i);
        }
    }

    /// valgrind's heuristics for interior pointers that are idioms, all on as in its default.
    fn heuristic_for(&self, i: usize, w: u64, look: &dyn Lookups) -> Option<Heuristic> {
        let start = self.idx.start(i);
        let size = self.size[i];
        let words = look.words(i);
        // The words are only those of an 8-byte aligned block (every allocator's).
        let word = |k: usize| if start.is_multiple_of(8) { words.get(k).copied() } else { None };
        // std::string (old ABI): length, capacity, refcount, then the characters.
        if w == start + 24
            && let (Some(len), Some(cap)) = (word(0), word(1))
            && cap.checked_add(25) == Some(size)
            && len <= cap
        {
            return Some(Heuristic::StdString);
        }
        if w == start + 8
            && let Some(n) = word(0)
        {
            // A 64-bit length of what follows (sqlite).
            if n > 0 && size.checked_sub(8) == Some(n) {
                return Some(Heuristic::Length64);
            }
            // new[] of objects with a destructor: the count, then the elements.
            if n > 0 && size >= 8 && (size - 8).is_multiple_of(n) {
                return Some(Heuristic::NewArray);
            }
        }
        // A pointer to a base class inside an object of multiple inheritance: both the object
        // and the inner part start with a vtable pointer.
        if w.is_multiple_of(8) && start.is_multiple_of(8) {
            let inner = word(((w - start) / 8) as usize)?;
            let first = word(0)?;
            let plausible = |v: u64| v.is_multiple_of(8) && v >= 4096;
            if plausible(inner) && plausible(first) && look.is_vtable(inner) && look.is_vtable(first) {
                return Some(Heuristic::MultipleInheritance);
            }
        }
        None
    }

    /// Follows the blocks reached from the roots, then groups the rest into cliques.
    pub fn finish(mut self, look: &dyn Lookups) -> (Vec<Class>, Vec<Option<Heuristic>>) {
        while let Some(i) = self.stack.pop() {
            let i = i as usize;
            // While this block is scanned, the next one's words come into the cache.
            if let Some(&next) = self.stack.last() {
                look.prefetch(next as usize);
            }
            self.pending[i] = false;
            let definite = self.state[i] != State::Possible;
            self.scan(look.words(i), definite, look);
        }
        for leader in 0..self.idx.len() {
            if self.state[leader] != State::Unreached {
                continue;
            }
            self.push(leader);
            while let Some(i) = self.stack.pop() {
                let i = i as usize;
                self.pending[i] = false;
                for &w in look.words(i) {
                    if let Some(j) = self.points_to(w)
                        && j != leader
                        && self.state[j] == State::Unreached
                    {
                        self.state[j] = State::Indirect;
                        self.push(j);
                    }
                }
            }
        }
        let class = self
            .state
            .iter()
            .map(|s| match s {
                State::Unreached => Class::DefinitelyLost,
                State::Indirect => Class::IndirectlyLost,
                State::Possible => Class::PossiblyLost,
                State::Reachable => Class::StillReachable,
            })
            .collect();
        (class, self.heuristic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks at 0x1000 * (k + 1), their words given.
    struct Fake {
        words: Vec<Vec<u64>>,
        vtables: Vec<u64>,
    }

    impl Lookups for Fake {
        fn words(&self, i: usize) -> &[u64] {
            &self.words[i]
        }
        fn is_vtable(&self, addr: u64) -> bool {
            self.vtables.contains(&addr)
        }
    }

    const fn at(k: u64) -> u64 {
        0x1000 * (k + 1)
    }

    /// Classifies blocks of `words` (size = 8 bytes per word) from `roots`.
    fn classify(words: Vec<Vec<u64>>, roots: &[u64]) -> Vec<Class> {
        classify_sized(words.iter().map(|w| w.len() as u64 * 8).collect(), words, roots, false).0
    }

    fn classify_sized(
        sizes: Vec<u64>,
        words: Vec<Vec<u64>>,
        roots: &[u64],
        glibc: bool,
    ) -> (Vec<Class>, Vec<Option<Heuristic>>) {
        let blocks: Vec<(u64, u64)> = sizes.iter().enumerate().map(|(k, &s)| (at(k as u64), s)).collect();
        let idx = Index::new(&blocks);
        let fake = Fake { words, vtables: vec![0x40_0000, 0x40_0100] };
        let mut m = Marker::new(idx, sizes, glibc);
        m.root_words(roots, &fake);
        m.finish(&fake)
    }

    use Class::*;

    #[test]
    fn valgrinds_nine_cases() {
        // The cases of valgrind's manual, RRR = a root, AAA and BBB blocks:
        // 1 RRR -> AAA; 2 RRR -> AAA -> BBB; 3 RRR  BBB; 4 RRR  AAA -> BBB;
        // 5 RRR -> interior of AAA; 6 RRR -> AAA -> interior of BBB;
        // 7 RRR -> interior of AAA -> BBB; 8 RRR -> interior of AAA -> interior of BBB;
        // 9 RRR  AAA -> interior of BBB.
        let blk = |_k: u64| vec![0u64; 4];
        let with = |p: u64| vec![p, 0, 0, 0];
        let words = vec![
            blk(0),           // 0: case 1 AAA
            with(at(2)),      // 1: case 2 AAA
            blk(2),           // 2: case 2 BBB
            blk(3),           // 3: case 3 BBB
            with(at(5)),      // 4: case 4 AAA
            blk(5),           // 5: case 4 BBB
            blk(6),           // 6: case 5 AAA
            with(at(8) + 16), // 7: case 6 AAA
            blk(8),           // 8: case 6 BBB
            with(at(10)),     // 9: case 7 AAA
            blk(10),          // 10: case 7 BBB
            with(at(12) + 8), // 11: case 8 AAA (8 bytes in, a count of 0: no heuristic)
            blk(12),          // 12: case 8 BBB
            with(at(14) + 8), // 13: case 9 AAA
            blk(14),          // 14: case 9 BBB
        ];
        let roots = [at(0), at(1), at(6) + 24, at(7), at(9) + 8, at(11) + 16, 0, 42];
        let c = classify(words, &roots);
        assert_eq!(
            c,
            [
                StillReachable,
                StillReachable,
                StillReachable,
                DefinitelyLost,
                DefinitelyLost,
                IndirectlyLost,
                PossiblyLost,
                StillReachable,
                PossiblyLost,
                PossiblyLost,
                PossiblyLost,
                PossiblyLost,
                PossiblyLost,
                DefinitelyLost,
                IndirectlyLost,
            ]
        );
    }

    #[test]
    fn cycles_and_self_pointers() {
        // 0 <-> 1 unreferenced: the first in address order leads; 2 points at itself only;
        // 3 -> 4 -> 3 with a root at 4: both reachable; 5 points at itself and is reachable.
        let words = vec![vec![at(1)], vec![at(0)], vec![at(2)], vec![at(4)], vec![at(3)], vec![at(5)]];
        let c = classify(words, &[at(4), at(5)]);
        assert_eq!(c, [DefinitelyLost, IndirectlyLost, DefinitelyLost, StillReachable, StillReachable, StillReachable]);
    }

    #[test]
    fn a_later_leader_takes_an_earlier_one_in() {
        // 1 -> 0: block 0 leads first (lower address), then 1's clique takes it in.
        let c = classify(vec![vec![0], vec![at(0)]], &[]);
        assert_eq!(c, [IndirectlyLost, DefinitelyLost]);
        // Interior pointers count for cliques too.
        let c = classify(vec![vec![at(1) + 8], vec![0, 0]], &[]);
        assert_eq!(c, [DefinitelyLost, IndirectlyLost]);
    }

    #[test]
    fn possible_upgrades_to_reachable() {
        // A root reaches 1 through its interior first, then by its start through block 0,
        // which is scanned later: 1 ends reachable and so does what it holds.
        let words = vec![vec![at(1)], vec![at(2), 0], vec![0]];
        let c = classify(words, &[at(1) + 8, at(0)]);
        assert_eq!(c, [StillReachable, StillReachable, StillReachable]);
    }

    #[test]
    fn heuristics_as_valgrind_has_them_by_default() {
        let sizes = vec![56, 48, 57, 40, 56];
        let words = vec![
            vec![3, 1, 1, 1, 1, 1, 1],           // newarray: 3 elements of 16 bytes after a count
            vec![40, 1, 1, 1, 1, 1],             // length64: 40 bytes follow
            vec![5, 32, 0, 1, 1, 1, 1],          // stdstring: length 5, capacity 32, refcount
            vec![0x40_0000, 0, 0x40_0100, 0, 0], // multiple inheritance: a vtable at 0 and 16
            vec![0, 1, 1, 1, 1, 1, 1],           // a count of 0: none
        ];
        let roots = [at(0) + 8, at(1) + 8, at(2) + 24, at(3) + 16, at(4) + 8];
        let (c, h) = classify_sized(sizes, words, &roots, false);
        assert_eq!(c, [StillReachable, StillReachable, StillReachable, StillReachable, PossiblyLost]);
        assert_eq!(
            h,
            [
                Some(Heuristic::NewArray),
                Some(Heuristic::Length64),
                Some(Heuristic::StdString),
                Some(Heuristic::MultipleInheritance),
                None
            ]
        );
        // A thread stack: glibc's list of cached stacks points into it.
        let idx = Index::new(&[(at(0), 64), (at(1), 64)]);
        let fake = Fake { words: vec![vec![0; 8], vec![0; 8]], vtables: vec![] };
        let mut m = Marker::new(idx, vec![64, 64], false);
        m.set_thread_stacks(vec![true, false]);
        m.root_words(&[at(0) + 40, at(1) + 40], &fake);
        let (c, h) = m.finish(&fake);
        assert_eq!(c, [StillReachable, PossiblyLost]);
        assert_eq!(h, [Some(Heuristic::ThreadStack), None]);
        // Reached by its start as well: the heuristic was not needed.
        let (c, h) = classify_sized(vec![56], vec![vec![3, 1, 1, 1, 1, 1, 1]], &[at(0) + 8, at(0)], false);
        assert_eq!((c, h), (vec![StillReachable], vec![None]));
    }

    #[test]
    fn glibc_next_chunk_header_is_not_a_pointer_into_the_block() {
        // A 40-byte block fills a 48-byte chunk: the next chunk's header is at +32.
        let (c, _) = classify_sized(vec![40, 40], vec![vec![0; 5], vec![0; 5]], &[at(0) + 32, at(1) + 16], true);
        assert_eq!(c, [DefinitelyLost, PossiblyLost]);
        let (c, _) = classify_sized(vec![40], vec![vec![0; 5]], &[at(0) + 32], false);
        assert_eq!(c, [PossiblyLost]);
    }
}
