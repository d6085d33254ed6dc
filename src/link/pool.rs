//! A pool of GPU document caches: K/V rows of many documents side by side in a few large
//! per-layer buffers ("slabs"), so that assembling a request reads every resident
//! document of a slab with one gather-and-rotate dispatch per layer
//! ([`crate::ops::assemble_kv`]) instead of one copy per document and layer plus a
//! rotation pass.
//!
//! Slabs are made on demand, each twice the size of the last (from 4,096 rows up to
//! 256 MiB), within the pool's byte budget and the device's buffer limits. A document
//! takes a contiguous run of rows in one slab (first fit) for as long as its
//! [`DocCache`](super::DocCache) lives; dropping it frees the rows. A document that does
//! not fit stays in buffers of its own, which assembly copies as before.

use crate::error::Result;
use crate::gpu::{DType, Gpu, Step, Tensor};
use std::sync::{Arc, Mutex};

/// Rows of the first slab; later slabs double.
const FIRST_SLAB_ROWS: usize = 4096;
/// Largest slab (all layers, K and V).
const MAX_SLAB_BYTES: u64 = 256 << 20;

/// Free row ranges of one slab, `(start, len)` sorted by start, adjacent ranges merged.
#[derive(Debug, Clone)]
pub(crate) struct FreeList {
    rows: usize,
    free: Vec<(usize, usize)>,
}

impl FreeList {
    pub(crate) fn new(rows: usize) -> FreeList {
        FreeList {
            rows,
            free: if rows > 0 {
                vec![(0, rows)]
            } else {
                Vec::new()
            },
        }
    }

    /// First fit: the start of `n` free rows, now taken.
    pub(crate) fn alloc(&mut self, n: usize) -> Option<usize> {
        if n == 0 {
            return None;
        }
        let i = self.free.iter().position(|&(_, len)| len >= n)?;
        let (start, len) = self.free[i];
        if len == n {
            self.free.remove(i);
        } else {
            self.free[i] = (start + n, len - n);
        }
        Some(start)
    }

    /// Give rows `start .. start + n` back.
    pub(crate) fn release(&mut self, start: usize, n: usize) {
        debug_assert!(start + n <= self.rows);
        let i = self.free.partition_point(|&(s, _)| s < start);
        debug_assert!(i == 0 || self.free[i - 1].0 + self.free[i - 1].1 <= start);
        debug_assert!(i == self.free.len() || start + n <= self.free[i].0);
        self.free.insert(i, (start, n));
        // merge with the next, then with the previous
        if i + 1 < self.free.len() && start + n == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == start {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.free == [(0, self.rows)]
    }

    #[cfg(test)]
    fn free_rows(&self) -> usize {
        self.free.iter().map(|r| r.1).sum()
    }
}

/// One slab: per layer f16 K and V `[rows, kv_dim]`.
pub struct Slab {
    id: u64,
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    rows: usize,
    free: Mutex<FreeList>,
}

impl Slab {
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|t| t.byte_len()).sum()
    }
    fn free(&self) -> std::sync::MutexGuard<'_, FreeList> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Rows `start .. start + len` of a slab, held by one document cache; freed on drop.
pub struct Lease {
    pub(crate) slab: Arc<Slab>,
    pub(crate) start: usize,
    len: usize,
}

impl Lease {
    /// The slab's per-layer K and V tensors and the first row held.
    pub fn rows(&self) -> (&[Tensor], &[Tensor], usize) {
        (&self.slab.k, &self.slab.v, self.start)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slab.free().release(self.start, self.len);
    }
}

struct Inner {
    slabs: Vec<Arc<Slab>>,
    budget: u64,
    next_id: u64,
}

/// The pool (see the module docs). Shared by reference; all methods take `&self`.
pub struct DocPool {
    gpu: Arc<Gpu>,
    layers: usize,
    kv_dim: usize,
    first_rows: usize,
    inner: Mutex<Inner>,
}

impl DocPool {
    /// A pool for a model of `layers` layers and `kv_dim` K/V width, holding at most
    /// `budget` bytes of slabs. Allocates nothing until the first document.
    pub fn new(gpu: Arc<Gpu>, layers: usize, kv_dim: usize, budget: u64) -> DocPool {
        DocPool {
            gpu,
            layers,
            kv_dim,
            first_rows: FIRST_SLAB_ROWS,
            inner: Mutex::new(Inner {
                slabs: Vec::new(),
                budget,
                next_id: 0,
            }),
        }
    }

    /// Start with slabs of `rows` rows (tests: documents spread over several slabs).
    #[doc(hidden)]
    pub fn with_first_slab_rows(mut self, rows: usize) -> DocPool {
        self.first_rows = rows.max(1);
        self
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of one row (one token, all layers, K and V).
    fn row_bytes(&self) -> u64 {
        (self.layers * 2 * self.kv_dim * 2) as u64
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Free the slabs no document holds rows of.
    pub fn trim(&self) {
        self.inner().slabs.retain(|s| {
            debug_assert!(Arc::strong_count(s) > 1 || s.free().is_empty());
            Arc::strong_count(s) > 1
        });
    }

    /// Change the byte budget. Slabs already made stay until they are empty.
    pub fn set_budget(&self, budget: u64) {
        self.inner().budget = budget;
    }

    /// Bytes of GPU memory the slabs take now.
    pub fn bytes(&self) -> u64 {
        self.inner().slabs.iter().map(|s| s.bytes()).sum()
    }

    /// Slabs now (the number of gather dispatches per layer when a request's documents
    /// span all of them).
    pub fn slabs(&self) -> usize {
        self.inner().slabs.len()
    }

    /// Rows for `n` tokens, from an existing slab or a new one; `None` when the budget
    /// or the device's limits leave no room.
    pub fn lease(&self, n: usize) -> Result<Option<Lease>> {
        if n == 0 || self.layers == 0 || self.kv_dim == 0 {
            return Ok(None);
        }
        let mut inner = self.inner();
        for slab in &inner.slabs {
            let start = slab.free().alloc(n);
            if let Some(start) = start {
                return Ok(Some(Lease {
                    slab: slab.clone(),
                    start,
                    len: n,
                }));
            }
        }
        // Empty slabs make room for a bigger one.
        inner.slabs.retain(|s| Arc::strong_count(s) > 1);
        let used: u64 = inner.slabs.iter().map(|s| s.bytes()).sum();
        let room = inner.budget.saturating_sub(used);
        let row = self.row_bytes();
        let tensor_row = (self.kv_dim * 2) as u64;
        let limits = &self.gpu.limits;
        let max_rows = [
            room / row,
            MAX_SLAB_BYTES.max(n as u64 * row) / row,
            limits.max_storage_buffer_binding_size / tensor_row,
            limits.max_buffer_size / tensor_row,
        ]
        .into_iter()
        .min()
        .unwrap_or(0) as usize;
        let want = self.first_rows << inner.slabs.len().min(16);
        let rows = want.max(n).min(max_rows);
        if rows < n {
            return Ok(None);
        }
        let mut k = Vec::with_capacity(self.layers);
        let mut v = Vec::with_capacity(self.layers);
        for _ in 0..self.layers {
            k.push(Tensor::zeros(
                &self.gpu,
                &[rows, self.kv_dim],
                DType::F16,
                "pool k",
            )?);
            v.push(Tensor::zeros(
                &self.gpu,
                &[rows, self.kv_dim],
                DType::F16,
                "pool v",
            )?);
        }
        let mut free = FreeList::new(rows);
        let start = free.alloc(n).expect("a new slab fits its first document");
        let slab = Arc::new(Slab {
            id: inner.next_id,
            k,
            v,
            rows,
            free: Mutex::new(free),
        });
        inner.next_id += 1;
        inner.slabs.push(slab.clone());
        Ok(Some(Lease {
            slab,
            start,
            len: n,
        }))
    }

    /// Rows for `src`'s tokens, filled from `src` by copies recorded into `st`; `None`
    /// (nothing recorded) when the pool has no room.
    pub(crate) fn copy_in(
        &self,
        st: &mut Step,
        src_k: &[Tensor],
        src_v: &[Tensor],
        src_row: usize,
        n: usize,
    ) -> Result<Option<Lease>> {
        let Some(lease) = self.lease(n)? else {
            return Ok(None);
        };
        let rb = (self.kv_dim * 2) as u64;
        let (from, to, bytes) = (src_row as u64 * rb, lease.start as u64 * rb, n as u64 * rb);
        for l in 0..self.layers {
            st.copy(&src_k[l], from, &lease.slab.k[l], to, bytes);
            st.copy(&src_v[l], from, &lease.slab.v[l], to, bytes);
        }
        Ok(Some(lease))
    }
}

#[cfg(test)]
mod tests {
    use super::FreeList;

    #[test]
    fn free_list_first_fit_and_merging() {
        let mut f = FreeList::new(10);
        assert_eq!(f.alloc(3), Some(0));
        assert_eq!(f.alloc(3), Some(3));
        assert_eq!(f.alloc(3), Some(6));
        assert_eq!(f.alloc(2), None);
        assert_eq!(f.alloc(1), Some(9));
        assert_eq!(f.free_rows(), 0);
        f.release(3, 3);
        assert_eq!(f.alloc(4), None, "3 free rows cannot hold 4");
        f.release(0, 3);
        assert_eq!(f.free, vec![(0, 6)], "neighbours merge");
        f.release(9, 1);
        f.release(6, 3);
        assert!(f.is_empty());
        assert_eq!(f.alloc(0), None);
        assert_eq!(FreeList::new(0).alloc(1), None);
    }

    #[test]
    fn free_list_random_against_a_bitmap() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rnd = |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        let rows = 200;
        let mut f = FreeList::new(rows);
        let mut used = vec![false; rows];
        let mut held: Vec<(usize, usize)> = Vec::new();
        for _ in 0..5000 {
            if held.is_empty() || rnd(2) == 0 {
                let n = 1 + rnd(30);
                // first fit, as the bitmap sees it
                let want = (0..=rows - n.min(rows)).find(|&s| used[s..s + n].iter().all(|u| !u));
                let got = f.alloc(n);
                assert_eq!(got, want.filter(|_| n <= rows));
                if let Some(s) = got {
                    used[s..s + n].fill(true);
                    held.push((s, n));
                }
            } else {
                let (s, n) = held.swap_remove(rnd(held.len()));
                used[s..s + n].fill(false);
                f.release(s, n);
            }
            assert_eq!(f.free_rows(), used.iter().filter(|u| !**u).count());
            for w in f.free.windows(2) {
                assert!(w[0].0 + w[0].1 < w[1].0, "unmerged or overlapping: {w:?}");
            }
        }
    }
}
