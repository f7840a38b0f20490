//! Gallery top-K on the GPU (SPEC §5), the launchers of kernels/topk.cu: for every user, the K gallery rows
//! of highest fp32 dot product, best first, leaving out the user's excluded rows, in the ranking order of
//! [`crate::eval::topk`]: higher score first, equal scores by lower row, NaN after every number.
//!
//! One pass over the gallery per block of 128 users: each block scores a 128 × 64 tile per gallery chunk in
//! registers (fp32 FMAs in column order) and keeps each user's running top-K, filtering nearly every score
//! with one comparison against the user's current K-th. When there are too few user blocks to fill the GPU,
//! the gallery is split into parts that run side by side and a second kernel merges the parts' lists.
//!
//! Scores are fp32 dot products summed in column order with fused multiply-adds. The CPU reference sums in
//! another order (SIMD lanes), so two scores within a few ulps of each other may compare differently there;
//! ties of exactly equal scores are broken by the lower row on both.

use super::gpu::{Arg, Gpu};
use super::memory::{Dev, DeviceBuffer, Layout};
use super::ops::{covers, int};
use crate::bail_input;
use crate::eval::topk::Hit;
use anyhow::{Result, bail, ensure};

/// Largest K the kernel keeps per user (TOPK_KMAX in topk.cu).
pub const TOPK_MAX_K: usize = 256;
/// Users per block (TOPK_USERS), gallery rows per chunk (TOPK_ITEMS), columns per slab (TOPK_DK), candidates
/// buffered per user (TOPK_CAP), threads per block (TOPK_THREADS).
const USERS: usize = 128;
const ITEMS: usize = 64;
const DK: usize = 64;
const CAP: usize = 16;
const THREADS: u32 = 256;
/// Smallest gallery part worth a block of its own: a part's first chunks fill the lists (every score is a
/// candidate there), and that warm-up must stay a small share of the part.
const MIN_PART: usize = 8192;

/// Dynamic shared memory of `topk_select` (TOPK_SHARED_BYTES in topk.cu).
pub const fn topk_shared_bytes() -> usize {
    (USERS + ITEMS) * (DK + 4) * 4 + USERS * CAP * 8 + USERS * (8 + 4 + 4)
}

/// The kernel's 64-bit ranking key of (score, row): larger ranks first. The high word is the score's bits
/// made order-preserving (NaN lowest, −0 as +0), the low word `u32::MAX − row`. Key 0 is no entry.
pub fn rank_key(score: f32, row: u32) -> u64 {
    let hi = if score.is_nan() {
        0
    } else {
        let bits = if score == 0.0 { 0 } else { score.to_bits() };
        if bits & 0x8000_0000 != 0 { !bits } else { bits | 0x8000_0000 }
    };
    ((hi as u64) << 32) | (u32::MAX - row) as u64
}

/// The hit a key stands for, `None` for key 0 (a list shorter than K). A NaN score decodes as NaN and −0 as +0.
pub fn key_hit(key: u64) -> Option<Hit<f32>> {
    if key == 0 {
        return None;
    }
    let hi = (key >> 32) as u32;
    let score = match hi {
        0 => f32::NAN,
        _ if hi & 0x8000_0000 != 0 => f32::from_bits(hi & 0x7fff_ffff),
        _ => f32::from_bits(!hi),
    };
    Some(Hit { row: (u32::MAX - key as u32) as usize, score })
}

/// Per user, the hits of its `k` keys (best first), stopping at the first empty entry.
pub fn decode(keys: &[u64], k: usize) -> Vec<Vec<Hit<f32>>> {
    if k == 0 {
        return Vec::new();
    }
    keys.chunks(k).map(|list| list.iter().map_while(|&key| key_hit(key)).collect()).collect()
}

/// The refusal of a K the kernel cannot keep, naming the flag that set it.
pub fn check_k(k: usize) -> Result<()> {
    if k > TOPK_MAX_K {
        bail_input!(
            "--k {k}: the GPU top-K keeps at most {TOPK_MAX_K} rows per user; rank on the CPU (--device cpu) for more"
        );
    }
    Ok(())
}

/// How a ranking is laid out over the GPU: gallery parts and their length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopkPlan {
    pub splits: usize,
    pub span: usize,
}

/// Parts enough for `n_users` to give every multiprocessor two blocks, none shorter than `MIN_PART`.
pub fn plan(multiprocessors: usize, n_users: usize, n_gallery: usize) -> TopkPlan {
    let blocks = n_users.div_ceil(USERS).max(1);
    let want = (2 * multiprocessors.max(1)).div_ceil(blocks);
    let splits = want.clamp(1, (n_gallery / MIN_PART).max(1));
    let span = n_gallery.div_ceil(splits).next_multiple_of(ITEMS).max(ITEMS);
    TopkPlan { splits: n_gallery.div_ceil(span).max(1), span }
}

/// A user's excluded rows, sorted, deduplicated, and within a gallery of `m` rows, as the kernel's `int`.
fn exclusion_list(rows: &[usize], m: usize) -> Vec<i32> {
    let mut list: Vec<i32> = rows.iter().filter(|&&r| r < m).map(|&r| r as i32).collect();
    list.sort_unstable();
    list.dedup();
    list
}

impl Gpu {
    /// `out[n_users, k]` ← each user's `k` best keys over `gallery` (best first, zeros after the last hit).
    /// `parts` (`[plan.splits, n_users, k]`) is needed when the plan splits the gallery. The exclusion
    /// offsets and rows must be as [`GpuTopK`] builds them (offsets non-decreasing within `rows`, each
    /// user's rows ascending): crate-private for that reason.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn topk(
        &self,
        out: Dev<u64>,
        parts: Option<Dev<u64>>,
        users: Dev<f32>,
        gallery: Dev<f32>,
        exclude: Option<(Dev<i32>, Dev<i32>)>,
        (n_users, n_gallery, d, k): (usize, usize, usize, usize),
        plan: TopkPlan,
    ) -> Result<()> {
        check_k(k)?;
        ensure!(k > 0 && d > 0 && d.is_multiple_of(4), "top-K: k {k}, width {d} (a positive multiple of 4)");
        covers(&out, n_users * k, "top-K output")?;
        covers(&users, n_users * d, "top-K users")?;
        covers(&gallery, n_gallery * d, "top-K gallery")?;
        ensure!(n_gallery < i32::MAX as usize, "top-K: {n_gallery} gallery rows exceed the kernel's int rows");
        ensure!(plan.splits >= 1 && plan.span >= 1 && (plan.splits - 1) * plan.span < n_gallery.max(1));
        if let Some((offsets, rows)) = &exclude {
            covers(offsets, n_users + 1, "top-K exclusion offsets")?;
            int(rows.len(), "excluded rows")?;
        }
        if n_users == 0 {
            return Ok(());
        }
        let lists = if plan.splits > 1 {
            let Some(parts) = parts else { bail!("top-K: a gallery in {} parts needs a parts buffer", plan.splits) };
            covers(&parts, plan.splits * n_users * k, "top-K parts")?;
            parts
        } else {
            out
        };
        let shared = topk_shared_bytes();
        if shared > self.max_shared_per_block {
            bail!(
                "cuda:{}: the top-K kernel needs {shared} bytes of shared memory per block; this GPU allows {}",
                self.ordinal,
                self.max_shared_per_block
            );
        }
        {
            use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SHARED;
            self.ctx.bind_to_thread()?;
            self.kernels.get("topk_select")?.set_attribute(MAX_SHARED, shared as i32)?;
        }
        let (offsets, rows) = exclude.map_or((0, 0), |(o, r)| (o.ptr(), r.ptr()));
        let args = [
            Arg::Ptr(lists.ptr()),
            Arg::Ptr(users.ptr()),
            Arg::Ptr(gallery.ptr()),
            Arg::Ptr(offsets),
            Arg::Ptr(rows),
            Arg::I32(int(n_users, "users")?),
            Arg::I32(int(n_gallery, "gallery rows")?),
            Arg::I32(int(d, "width")?),
            Arg::I32(int(k, "k")?),
            Arg::I32(int(plan.span, "gallery part")?),
        ];
        let grid = (u32::try_from(n_users.div_ceil(USERS))?, u32::try_from(plan.splits)?);
        ensure!(grid.1 <= 65535, "top-K: {} gallery parts exceed the grid", plan.splits);
        // SAFETY: every block reads users < n_users and gallery rows < n_gallery of width d (covered, checked),
        // writes lists[y][user][0 .. k) within splits·n_users·k (covered), and reads the exclusion rows the
        // offsets name (built by GpuTopK within `rows`); d % 4 == 0 keeps the 16-byte reads aligned; the
        // shared memory is what the kernel's layout needs, its limit raised above.
        unsafe { self.launch("topk_select", grid, THREADS, shared as u32, &args) }?;
        if plan.splits > 1 {
            let args = [
                Arg::Ptr(out.ptr()),
                Arg::Ptr(lists.ptr()),
                Arg::I32(int(n_users, "users")?),
                Arg::I32(int(k, "k")?),
                Arg::I32(int(plan.splits, "parts")?),
            ];
            let warps = (THREADS / 32) as usize;
            // SAFETY: one warp per user < n_users reads its k keys of each part and writes its k of out (covered).
            unsafe { self.launch("topk_merge", (u32::try_from(n_users.div_ceil(warps))?, 1), THREADS, 0, &args) }?;
        }
        Ok(())
    }
}

/// Ranks blocks of users against a gallery that stays on the device, reusing its buffers (grown when a
/// larger block comes).
#[derive(Default)]
pub struct GpuTopK {
    buffer: Option<DeviceBuffer>,
}

impl GpuTopK {
    pub fn new() -> Self {
        Self::default()
    }

    /// For each user of `users` (`[n, d]`, host), the `k` best rows of `gallery` (`[m, d]` on the device) by
    /// dot product, best first, leaving out that user's `exclude` rows (any order; rows ≥ m are ignored).
    /// The result matches [`crate::eval::topk::top_k_block`] up to the summation order of the scores.
    pub fn top_k(
        &mut self,
        gpu: &Gpu,
        users: &[f32],
        gallery: Dev<f32>,
        d: usize,
        k: usize,
        exclude: &[&[usize]],
    ) -> Result<Vec<Vec<Hit<f32>>>> {
        check_k(k)?;
        ensure!(d > 0 && d.is_multiple_of(4), "top-K: embeddings of width {d}; the GPU kernel needs a multiple of 4");
        ensure!(users.len().is_multiple_of(d) && gallery.len().is_multiple_of(d), "top-K: rows are not {d} wide");
        let (n, m) = (users.len() / d, gallery.len() / d);
        ensure!(exclude.len() == n, "top-K: {n} users but {} exclusion lists", exclude.len());
        if k == 0 || n == 0 {
            return Ok(vec![Vec::new(); n]);
        }
        let lists: Vec<Vec<i32>> = exclude.iter().map(|e| exclusion_list(e, m)).collect();
        let total: usize = lists.iter().map(Vec::len).sum();
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0i32);
        for list in &lists {
            offsets.push(int(*offsets.last().unwrap_or(&0) as usize + list.len(), "excluded rows")?);
        }
        let plan = plan(gpu.multiprocessors, n, m);
        let mut layout = Layout::default();
        let at_users = layout.take::<f32>(n * d);
        let at_offsets = layout.take::<i32>(n + 1);
        let at_rows = layout.take::<i32>(total.max(1));
        let at_out = layout.take::<u64>(n * k);
        let parts_len = if plan.splits > 1 { plan.splits * n * k } else { 0 };
        let at_parts = layout.take::<u64>(parts_len);
        if self.buffer.as_ref().is_none_or(|b| b.bytes() < layout.bytes()) {
            self.buffer = None;
            self.buffer = Some(gpu.alloc(layout.bytes(), "the top-K buffers")?);
        }
        let Some(buffer) = &self.buffer else { unreachable!("allocated above") };
        let dev_users = buffer.view::<f32>(at_users, n * d);
        let dev_offsets = buffer.view::<i32>(at_offsets, n + 1);
        let dev_rows = buffer.view::<i32>(at_rows, total.max(1));
        let out = buffer.view::<u64>(at_out, n * k);
        let parts = (parts_len > 0).then(|| buffer.view::<u64>(at_parts, parts_len));
        gpu.upload(dev_users, users)?;
        let exclusions = if total > 0 {
            gpu.upload(dev_offsets, &offsets)?;
            gpu.upload(dev_rows, &lists.concat())?;
            Some((dev_offsets, dev_rows))
        } else {
            None
        };
        // Poison: the kernels must write every key (a stale or unwritten key would decode as a bogus hit).
        gpu.fill_bytes(out, 0xff)?;
        if let Some(parts) = parts {
            gpu.fill_bytes(parts, 0xff)?;
        }
        gpu.topk(out, parts, dev_users, gallery, exclusions, (n, m, d, k), plan)?;
        Ok(decode(&gpu.download(out)?, k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::topk::top_k;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn shared_memory_matches_the_kernel_layout() {
        // (128 + 64) rows of 68 floats, 128 × 16 candidate keys, 128 thresholds (key and score) and counts:
        // above the 48 KB default, within the V100's 96 KB opt-in.
        assert_eq!(topk_shared_bytes(), 70656);
        assert!(topk_shared_bytes() <= 96 * 1024);
    }

    #[test]
    fn keys_rank_as_the_cpu_top_k_and_decode_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let specials = [f32::NAN, -f32::NAN, 0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE, -1e-40];
        for _ in 0..50 {
            let n = rng.random_range(1..200);
            let scores: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..4) {
                    0 => specials[rng.random_range(0..specials.len())],
                    1 => rng.random_range(-3..4) as f32 * 0.5,
                    _ => rng.random_range(-2.0..2.0),
                })
                .collect();
            let k = rng.random_range(1..n + 2);
            let mut keys: Vec<u64> = scores.iter().enumerate().map(|(r, &s)| rank_key(s, r as u32)).collect();
            keys.sort_unstable_by(|a, b| b.cmp(a));
            keys.resize(n.max(k), 0);
            let got = decode(&keys[..k], k).pop().unwrap();
            let want = top_k(&scores, k, &[]);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.row, w.row, "scores {scores:?}");
                assert!(g.score == w.score || (g.score.is_nan() && w.score.is_nan()), "{g:?} vs {w:?}");
            }
        }
        assert_eq!(key_hit(rank_key(-0.0, 7)).unwrap().score.to_bits(), 0.0f32.to_bits());
        assert_eq!(key_hit(0), None);
    }

    #[test]
    fn plans_split_the_gallery_only_when_users_are_few() {
        // 100k users are 782 blocks: enough for 132 multiprocessors, one pass each.
        assert_eq!(plan(132, 100_000, 1_000_000), TopkPlan { splits: 1, span: 1_000_000 });
        // 1,000 users are 8 blocks: the gallery in 33 parts (264 blocks), each a multiple of 64 rows.
        let p = plan(132, 1000, 1_000_000);
        assert_eq!(p.splits, 33);
        assert!(p.span.is_multiple_of(64) && p.splits * p.span >= 1_000_000 && (p.splits - 1) * p.span < 1_000_000);
        // Small galleries are never split below MIN_PART rows a part.
        assert_eq!(plan(132, 10, 5000).splits, 1);
        assert_eq!(plan(132, 10, 0), TopkPlan { splits: 1, span: 64 });
    }

    #[test]
    fn k_above_the_kernel_limit_is_refused_naming_the_flag() {
        let err = check_k(257).unwrap_err();
        assert!(crate::error::is_input_error(&err) && err.to_string().contains("--k 257"), "{err}");
        assert!(check_k(256).is_ok());
    }
}
