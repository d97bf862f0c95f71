//! The HNSW graph (Malkov & Yashunin, 2016/2018) over unit vectors, with hnswlib's layout.
//!
//! Every node is a slot: its vector (one contiguous `f32` array for all slots), its level-0
//! neighbour list (`1 + 2M` words per slot, the first holding the count), its upper-level
//! lists (allocated once, when the node is inserted), its key and a deleted mark.
//!
//! Concurrency: searches never lock. Neighbour lists are atomics written with `Release` and read
//! with `Acquire` (plain moves on x86-64), so a walker sees a consistent-enough list while an
//! inserter rewrites it; a writer holds that node's mutex, and never two at once, so inserts
//! cannot deadlock. A slot's vector, key, level and upper lists are written once by the thread
//! that allocated the slot, before any neighbour list names the slot: the `Release` store of the
//! id publishes them to every walker that `Acquire`-loads it. Growing the arrays needs `&mut`
//! (the index's write lock), so every reference into them stays valid while shared.
//!
//! The walk is generic over the dot-product kernel and compiled once per kernel inside a
//! `#[target_feature]` function, so the AVX2 kernel inlines into it (see `kernels.rs`).

use std::cell::{RefCell, UnsafeCell};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};
use std::sync::{Mutex, OnceLock};

use crate::kernels::{self, Kernel};
use crate::precision::{self, HALF_ERROR};

/// The highest level a node may get (probability e^-(17·ln M) of more: never in practice).
pub(crate) const MAX_LEVEL: usize = 16;

/// A list that overflows is pruned to `max - max / PRUNE_HEADROOM` (a fifth left free).
const PRUNE_HEADROOM: usize = 5;

/// A node and its distance (`1 - a·b`) to the point being searched for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Near {
    pub d: f32,
    pub id: u32,
}

impl PartialEq for Near {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Near {}
impl PartialOrd for Near {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Near {
    fn cmp(&self, o: &Self) -> Ordering {
        self.d.total_cmp(&o.d).then(self.id.cmp(&o.id))
    }
}

/// A distance kernel: how stored vectors are read during a walk and how a query meets them.
/// Every distance has an `f32` side (the query, or a stored node's vector widened) and a stored
/// side.
pub(crate) trait Dot {
    type Elem;
    fn stored(g: &Graph, id: u32) -> &[Self::Elem];
    fn dot(q: &[f32], v: &[Self::Elem]) -> f32;
    /// The first `count` of four products in one pass over `q`.
    fn dot4(q: &[f32], v: [&[Self::Elem]; 4], count: usize) -> [f32; 4];
}

/// Any CPU: widens each half float in software.
pub(crate) struct PortableDot;
impl Dot for PortableDot {
    type Elem = u16;
    #[inline(always)]
    fn stored(g: &Graph, id: u32) -> &[u16] {
        g.half(id)
    }
    #[inline(always)]
    fn dot(q: &[f32], v: &[u16]) -> f32 {
        kernels::dot_f16_portable(q, v)
    }
    #[inline(always)]
    fn dot4(q: &[f32], v: [&[u16]; 4], count: usize) -> [f32; 4] {
        let mut out = [0f32; 4];
        for j in 0..count.min(4) {
            out[j] = kernels::dot_f16_portable(q, v[j]);
        }
        out
    }
}

/// Widens half floats with F16C, eight at a time. Only used by the `*_avx2` entry points, which
/// run when [`Kernel::detect`] found AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2Dot;
#[cfg(target_arch = "x86_64")]
impl Dot for Avx2Dot {
    type Elem = u16;
    #[inline(always)]
    fn stored(g: &Graph, id: u32) -> &[u16] {
        g.half(id)
    }
    #[inline(always)]
    fn dot(q: &[f32], v: &[u16]) -> f32 {
        // SAFETY: reached only through `Graph::*_avx2`, entered when the CPU has AVX2, FMA and F16C.
        unsafe { kernels::dot_f16_avx2(q, v) }
    }
    #[inline(always)]
    fn dot4(q: &[f32], v: [&[u16]; 4], count: usize) -> [f32; 4] {
        // SAFETY: as above.
        unsafe { kernels::dot4_f16_avx2(q, v, count) }
    }
}

/// Per-thread search state, reused across searches: visited marks by generation, the two
/// heaps, and a buffer of neighbour ids.
#[derive(Default)]
pub(crate) struct Scratch {
    marks: Vec<u16>,
    generation: u16,
    cand: BinaryHeap<Reverse<Near>>,
    top: BinaryHeap<Near>,
    ids: Vec<u32>,
}

impl Scratch {
    fn start(&mut self, cap: usize) {
        if self.marks.len() < cap {
            self.marks.resize(cap, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.marks.fill(0);
            self.generation = 1;
        }
        self.cand.clear();
        self.top.clear();
    }
    /// Marks `id` visited; whether it was new. Branch-free: whether a neighbour was seen is a
    /// coin toss the branch predictor loses.
    #[inline(always)]
    fn visit(&mut self, id: u32) -> bool {
        match self.marks.get_mut(id as usize) {
            Some(m) => {
                let new = *m != self.generation;
                *m = self.generation;
                new
            }
            None => false,
        }
    }

    /// Keeps the ids of `ids` not visited yet (marking them), in order, without branching on
    /// each.
    #[inline(always)]
    fn keep_new(&mut self, ids: &mut Vec<u32>) {
        let mut w = 0;
        for i in 0..ids.len() {
            let n = ids[i];
            let new = self.visit(n);
            ids[w] = n;
            w += new as usize;
        }
        ids.truncate(w);
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (a fresh one if it is already in use higher up the stack,
/// as when a search filter searches).
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

pub(crate) struct Graph {
    pub dim: usize,
    pub m: usize,
    pub m0: usize,
    pub ef_construction: usize,
    level_mult: f64,
    pub kernel: Kernel,
    /// Slots handed out (live, deleted, or being inserted).
    len: AtomicUsize,
    /// The vectors as IEEE half floats (bit patterns), what walks read (see `precision.rs`).
    halves: Vec<UnsafeCell<u16>>,
    /// What rounding to half floats lost, a byte per component: the final candidates are
    /// ranked with it.
    codes: Vec<UnsafeCell<i8>>,
    links0: Vec<AtomicU32>,
    upper: Vec<OnceLock<Box<[AtomicU32]>>>,
    levels: Vec<AtomicU8>,
    keys: Vec<AtomicU64>,
    deleted: Vec<AtomicBool>,
    locks: Vec<Mutex<()>>,
    /// 0 when empty, else `(max_level + 1) << 32 | entry_slot`.
    entry: AtomicU64,
    entry_lock: Mutex<()>,
    dead: AtomicUsize,
}

// SAFETY: the only non-Sync parts are `halves` and `codes`. A slot's vector is written once, by the
// thread that allocated the slot (`allocate` hands each slot out once), before the slot's id is
// published with a `Release` store into a neighbour list or the entry point; readers reach a slot
// only through an `Acquire` load of such a store, so the write happens-before every read.
// Resizing needs `&mut self`.
unsafe impl Sync for Graph {}

fn entry_word(id: u32, level: usize) -> u64 {
    ((level as u64 + 1) << 32) | id as u64
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Graph {
    pub fn new(dim: usize, m: usize, ef_construction: usize) -> Self {
        let m = m.max(2);
        let mut g = Self {
            dim,
            m,
            m0: 2 * m,
            ef_construction: ef_construction.max(1),
            level_mult: 1.0 / (m as f64).ln(),
            kernel: Kernel::detect(),
            len: AtomicUsize::new(0),
            halves: Vec::new(),
            codes: Vec::new(),
            links0: Vec::new(),
            upper: Vec::new(),
            levels: Vec::new(),
            keys: Vec::new(),
            deleted: Vec::new(),
            locks: Vec::new(),
            entry: AtomicU64::new(0),
            entry_lock: Mutex::new(()),
            dead: AtomicUsize::new(0),
        };
        g.grow(64);
        g
    }

    pub fn capacity(&self) -> usize {
        self.levels.len()
    }
    pub fn slots(&self) -> usize {
        self.len.load(Acquire).min(self.capacity())
    }
    pub fn dead(&self) -> usize {
        self.dead.load(Relaxed)
    }

    /// Room for `cap` slots.
    pub fn grow(&mut self, cap: usize) {
        if cap <= self.capacity() {
            return;
        }
        self.halves
            .resize_with(cap * self.dim, || UnsafeCell::new(0));
        self.codes
            .resize_with(cap * self.dim, || UnsafeCell::new(0));
        self.links0
            .resize_with(cap * (1 + self.m0), || AtomicU32::new(0));
        self.upper.resize_with(cap, OnceLock::new);
        self.levels.resize_with(cap, || AtomicU8::new(0));
        self.keys.resize_with(cap, || AtomicU64::new(0));
        self.deleted.resize_with(cap, || AtomicBool::new(false));
        self.locks.resize_with(cap, || Mutex::new(()));
    }

    /// A new slot, or `None` when the arrays are full (grow them, then try again).
    pub fn allocate(&self) -> Option<u32> {
        let cap = self.capacity().min(u32::MAX as usize);
        let mut n = self.len.load(Relaxed);
        loop {
            if n >= cap {
                return None;
            }
            match self.len.compare_exchange_weak(n, n + 1, AcqRel, Relaxed) {
                Ok(_) => return Some(n as u32),
                Err(now) => n = now,
            }
        }
    }

    /// The level a slot gets: hnswlib's `-ln(U)·mL`, from a hash of the slot so a graph built
    /// in one order is the same every time.
    pub fn level_for(&self, id: u32) -> usize {
        let u = ((splitmix64(id as u64 ^ 0xA7E1_1E5E_ED00_0001) >> 11) + 1) as f64
            / (1u64 << 53) as f64;
        ((-u.ln() * self.level_mult) as usize).min(MAX_LEVEL)
    }

    #[inline(always)]
    pub fn half(&self, id: u32) -> &[u16] {
        let start = id as usize * self.dim;
        let cells = &self.halves[start..start + self.dim];
        // SAFETY: UnsafeCell<u16> has u16's layout; the slot's vector was written before its id
        // could be read (see the Sync impl), and is never written again.
        unsafe { std::slice::from_raw_parts(cells.as_ptr().cast::<u16>(), self.dim) }
    }

    #[inline(always)]
    pub fn codes(&self, id: u32) -> &[i8] {
        let start = id as usize * self.dim;
        let cells = &self.codes[start..start + self.dim];
        // SAFETY: as in `half`.
        unsafe { std::slice::from_raw_parts(cells.as_ptr().cast::<i8>(), self.dim) }
    }

    /// `id`'s vector as stored (18 significant bits a component) into `out`.
    pub fn restore(&self, id: u32, out: &mut Vec<f32>) {
        out.clear();
        out.extend(
            self.half(id)
                .iter()
                .zip(self.codes(id))
                .map(|(&h, &c)| precision::join(h, c)),
        );
    }

    /// `id`'s vector widened from its half floats alone into `out` (for the build's heuristic).
    pub fn widen(&self, id: u32, out: &mut Vec<f32>) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        let h = self.half(id);
        out.resize(h.len(), 0.0);
        // F16C when the CPU has it (`half` looks at run time).
        h.reinterpret_cast::<half::f16>().convert_to_f32_slice(out);
    }

    /// Fills a freshly allocated slot. Only the thread `allocate` gave `id` to may call this,
    /// once, before publishing the slot with [`link`](Self::link).
    pub fn fill(&self, id: u32, key: u64, v: &[f32], level: usize, deleted: bool) {
        let start = id as usize * self.dim;
        let halves = &self.halves[start..start + self.dim];
        let codes = &self.codes[start..start + self.dim];
        for ((h, c), x) in halves.iter().zip(codes).zip(v) {
            let (half, code) = precision::split(*x);
            // SAFETY: this slot is unpublished and owned by the caller (see above).
            unsafe {
                *h.get() = half;
                *c.get() = code;
            }
        }
        self.keys[id as usize].store(key, Relaxed);
        self.levels[id as usize].store(level as u8, Relaxed);
        self.deleted[id as usize].store(deleted, Relaxed);
        if deleted {
            self.dead.fetch_add(1, Relaxed);
        }
        if level > 0 {
            let words = (0..level * (1 + self.m))
                .map(|_| AtomicU32::new(0))
                .collect();
            let _ = self.upper[id as usize].set(words);
        }
    }

    pub fn key(&self, id: u32) -> u64 {
        self.keys[id as usize].load(Relaxed)
    }
    pub fn level(&self, id: u32) -> usize {
        self.levels[id as usize].load(Relaxed) as usize
    }
    pub fn is_deleted(&self, id: u32) -> bool {
        self.deleted[id as usize].load(Relaxed)
    }
    pub fn mark_deleted(&self, id: u32) {
        if !self.deleted[id as usize].swap(true, Relaxed) {
            self.dead.fetch_add(1, Relaxed);
        }
    }

    /// The entry point and the top level, if the graph has a node.
    pub fn entry(&self) -> Option<(u32, usize)> {
        match self.entry.load(Acquire) {
            0 => None,
            e => Some((e as u32, ((e >> 32) - 1) as usize)),
        }
    }
    pub fn set_entry(&self, id: u32, level: usize) {
        self.entry.store(entry_word(id, level), Release);
    }

    /// `id`'s neighbour list on `level`: the count word, then room for the ids.
    #[inline(always)]
    fn list(&self, id: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            let w = 1 + self.m0;
            let start = id as usize * w;
            &self.links0[start..start + w]
        } else {
            let w = 1 + self.m;
            match self.upper[id as usize].get() {
                Some(words) if words.len() >= level * w => &words[(level - 1) * w..level * w],
                _ => &[],
            }
        }
    }

    /// Appends `id`'s neighbours on `level` to `out`.
    #[inline(always)]
    pub fn neighbours(&self, id: u32, level: usize, out: &mut Vec<u32>) {
        let list = self.list(id, level);
        if let Some((count, ids)) = list.split_first() {
            let n = (count.load(Acquire) as usize).min(ids.len());
            out.extend(ids[..n].iter().map(|x| x.load(Acquire)));
        }
    }

    /// Replaces `id`'s neighbours on `level` (the caller holds `id`'s lock, or owns the graph).
    pub fn set_neighbours(&self, id: u32, level: usize, ids: &[u32]) {
        let list = self.list(id, level);
        if let Some((count, slots)) = list.split_first() {
            let n = ids.len().min(slots.len());
            for (s, x) in slots.iter().zip(&ids[..n]) {
                s.store(*x, Release);
            }
            count.store(n as u32, Release);
        }
    }

    #[inline(always)]
    fn dist<D: Dot>(&self, q: &[f32], id: u32) -> f32 {
        1.0 - D::dot(q, D::stored(self, id))
    }

    /// Greedy descent on one upper level: the nearest node reachable by always improving.
    #[inline(always)]
    fn greedy<D: Dot>(&self, s: &mut Scratch, q: &[f32], mut at: Near, level: usize) -> Near {
        loop {
            s.ids.clear();
            self.neighbours(at.id, level, &mut s.ids);
            let mut moved = false;
            for &n in &s.ids {
                let d = self.dist::<D>(q, n);
                if d < at.d {
                    at = Near { d, id: n };
                    moved = true;
                }
            }
            if !moved {
                return at;
            }
        }
    }

    /// The `ef` best nodes that `accept` takes on `level`, reachable from `from`, left in
    /// `s.top` (a max-heap). Nodes `accept` refuses are walked through but not returned.
    #[inline(always)]
    fn search_layer<D: Dot>(
        &self,
        s: &mut Scratch,
        q: &[f32],
        from: Near,
        ef: usize,
        level: usize,
        accept: &impl Fn(u32) -> bool,
    ) {
        s.start(self.capacity());
        s.visit(from.id);
        let mut lower = f32::INFINITY;
        if accept(from.id) {
            s.top.push(from);
            lower = from.d;
        }
        s.cand.push(Reverse(from));
        // The first two lines of each vector; the hardware prefetcher follows the rest.
        let lines = (self.dim * std::mem::size_of::<D::Elem>())
            .div_ceil(64)
            .min(2);
        let mut ids = std::mem::take(&mut s.ids);
        while let Some(Reverse(c)) = s.cand.pop() {
            if c.d > lower && s.top.len() >= ef {
                break;
            }
            if let Some(Reverse(next)) = s.cand.peek() {
                // The next candidate's list, on its way while this one's distances run.
                if let Some(w) = self.list(next.id, level).first() {
                    kernels::prefetch((w as *const AtomicU32).cast(), 1);
                }
            }
            ids.clear();
            self.neighbours(c.id, level, &mut ids);
            s.keep_new(&mut ids);
            for &n in &ids {
                kernels::prefetch(D::stored(self, n).as_ptr().cast(), lines);
            }
            let mut dists = [0f32; 4];
            for (i, &n) in ids.iter().enumerate() {
                // Four distances at a time (the last group padded with its own first id).
                if i % 4 == 0 {
                    let g = &ids[i..];
                    let pick = |j: usize| D::stored(self, g.get(j).copied().unwrap_or(g[0]));
                    dists = D::dot4(q, [pick(0), pick(1), pick(2), pick(3)], g.len());
                }
                let d = 1.0 - dists[i % 4];
                if s.top.len() < ef || d < lower {
                    s.cand.push(Reverse(Near { d, id: n }));
                    if accept(n) {
                        s.top.push(Near { d, id: n });
                        if s.top.len() > ef {
                            s.top.pop();
                        }
                        lower = s.top.peek().map_or(f32::INFINITY, |t| t.d);
                    }
                }
            }
        }
        s.ids = ids;
    }

    /// The `k` nearest accepted nodes to `q`, nearest first.
    #[inline(always)]
    fn knn<D: Dot>(
        &self,
        s: &mut Scratch,
        q: &[f32],
        k: usize,
        ef: usize,
        accept: &impl Fn(u32) -> bool,
    ) -> Vec<Near> {
        let Some((ep, top_level)) = self.entry() else {
            return Vec::new();
        };
        let mut at = Near {
            d: self.dist::<D>(q, ep),
            id: ep,
        };
        for level in (1..=top_level).rev() {
            at = self.greedy::<D>(s, q, at, level);
        }
        self.search_layer::<D>(s, q, at, ef.max(k), 0, accept);
        let mut out = std::mem::take(&mut s.top).into_sorted_vec();
        if !out.is_empty() {
            // The walk's distances are the half floats': rank the candidates that can be among
            // the best k by the full stored vectors. The true k-th best is within HALF_ERROR of
            // the walk's k-th; a candidate more than twice that behind it cannot beat it.
            let limit = out[k.saturating_sub(1).min(out.len() - 1)].d + 2.0 * HALF_ERROR;
            out.truncate(out.partition_point(|c| c.d <= limit));
            for c in &mut out {
                c.d = 1.0 - precision::fine_dot(q, self.half(c.id), self.codes(c.id));
            }
            out.sort_unstable();
        }
        out.truncate(k);
        out
    }

    pub fn search(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        accept: &impl Fn(u32) -> bool,
    ) -> Vec<Near> {
        with_scratch(|s| match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `kernel` is Avx2 only when the CPU has AVX2, FMA and F16C.
            Kernel::Avx2 => unsafe { self.knn_avx2(s, q, k, ef, accept) },
            Kernel::Portable => self.knn::<PortableDot>(s, q, k, ef, accept),
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn knn_avx2(
        &self,
        s: &mut Scratch,
        q: &[f32],
        k: usize,
        ef: usize,
        accept: &impl Fn(u32) -> bool,
    ) -> Vec<Near> {
        self.knn::<Avx2Dot>(s, q, k, ef, accept)
    }

    /// hnswlib's neighbour heuristic: walking `cands` nearest first, keep a candidate only if it
    /// is nearer to the base point than to every one kept so far; at most `max`.
    #[inline(always)]
    fn select<D: Dot>(&self, cands: &[Near], max: usize) -> Vec<u32> {
        if cands.len() <= max {
            return cands.iter().map(|c| c.id).collect();
        }
        let mut kept: Vec<u32> = Vec::with_capacity(max);
        let mut v = Vec::with_capacity(self.dim);
        for c in cands {
            if kept.len() >= max {
                break;
            }
            self.widen(c.id, &mut v);
            // The first kept node nearer to `c` than the base rejects it — most often one of the
            // first kept (the nearest), so one at a time: no products past the rejecting one.
            let good = kept
                .iter()
                .all(|&k| 1.0 - D::dot(&v, D::stored(self, k)) >= c.d);
            if good {
                kept.push(c.id);
            }
        }
        kept
    }

    /// Adds `new` to `id`'s list on `level` under `id`'s lock, pruning with the heuristic when
    /// the list overflows.
    #[inline(always)]
    fn connect<D: Dot>(&self, id: u32, level: usize, new: &[u32]) {
        let max = if level == 0 { self.m0 } else { self.m };
        let _guard = match self.locks[id as usize].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut ids = Vec::with_capacity(max + new.len());
        self.neighbours(id, level, &mut ids);
        for &n in new {
            if n != id && !ids.contains(&n) {
                ids.push(n);
            }
        }
        if ids.len() > max {
            let mut base = Vec::with_capacity(self.dim);
            self.widen(id, &mut base);
            let mut cands: Vec<Near> = Vec::with_capacity(ids.len());
            for g in ids.chunks(4) {
                let pick = |j: usize| D::stored(self, g.get(j).copied().unwrap_or(g[0]));
                let dots = D::dot4(&base, [pick(0), pick(1), pick(2), pick(3)], g.len());
                cands.extend(g.iter().zip(dots).map(|(&n, dot)| Near {
                    d: 1.0 - dot,
                    id: n,
                }));
            }
            cands.sort_unstable();
            // Pruned below the full degree, as faiss does since 1.12 (`prune_headroom` 0.2):
            // the next few links append without another prune, which was most of the
            // build's work (a heuristic pass over 33 candidates at nearly every new link).
            ids = self.select::<D>(&cands, max - max / PRUNE_HEADROOM);
        }
        self.set_neighbours(id, level, &ids);
    }

    /// Links the filled slot `id` into the graph (hnswlib's `addPoint`).
    #[inline(always)]
    fn link_with<D: Dot>(&self, s: &mut Scratch, id: u32, q: &[f32]) {
        let level = self.level(id);
        let mut entry_guard = None;
        let (ep, top_level) = match self.entry() {
            Some((ep, top)) if level <= top => (ep, top),
            _ => {
                // A new top level (or the first node): hold the entry lock for the whole insert,
                // as hnswlib does, so the entry moves to a fully linked node.
                let g = match self.entry_lock.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                let Some((ep, top)) = self.entry() else {
                    self.set_entry(id, level);
                    return;
                };
                if level > top {
                    entry_guard = Some(g);
                }
                (ep, top)
            }
        };
        let mut at = Near {
            d: self.dist::<D>(q, ep),
            id: ep,
        };
        for l in ((level + 1)..=top_level).rev() {
            at = self.greedy::<D>(s, q, at, l);
        }
        let not_deleted = |n: u32| !self.is_deleted(n);
        for l in (0..=level.min(top_level)).rev() {
            self.search_layer::<D>(s, q, at, self.ef_construction, l, &not_deleted);
            let mut cands = std::mem::take(&mut s.top).into_sorted_vec();
            if cands.is_empty() {
                // Everything reachable is deleted: link to where the walk stands.
                cands.push(at);
            }
            // Up to the level's full degree, as faiss does (hnswlib keeps M on every level; the
            // denser bottom layer finds more of the true neighbours at the same efSearch).
            let max = if l == 0 { self.m0 } else { self.m };
            let chosen = self.select::<D>(&cands, max);
            self.connect::<D>(id, l, &chosen);
            for &n in &chosen {
                self.connect::<D>(n, l, &[id]);
            }
            at = cands[0];
            s.top = BinaryHeap::from(cands);
        }
        if entry_guard.is_some() && level > top_level {
            self.set_entry(id, level);
        }
    }

    /// Links the filled slot `id`, whose vector is `q`, into the graph.
    pub fn link(&self, id: u32, q: &[f32]) {
        with_scratch(|s| match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `kernel` is Avx2 only when the CPU has AVX2, FMA and F16C.
            Kernel::Avx2 => unsafe { self.link_avx2(s, id, q) },
            Kernel::Portable => self.link_with::<PortableDot>(s, id, q),
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn link_avx2(&self, s: &mut Scratch, id: u32, q: &[f32]) {
        self.link_with::<Avx2Dot>(s, id, q)
    }
}
