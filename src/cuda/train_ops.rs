//! Typed launchers of the PCH training kernels (`kernels/{layernorm,gelu,l2norm,adam,reduce}.cu`), in the
//! manner of ops.rs: each checks what its kernels rely on (vector widths, row lengths, every buffer covering
//! what the grid reaches, sizes within the kernels' int arithmetic), then launches on the compute stream.
//!
//! Reductions over rows (parameter and bias gradients) run in two passes with no floating-point atomics:
//! the kernel writes one partial sum per block of rows into a caller's scratch buffer
//! ([`Gpu::partials_len`] floats), and `column_sums` adds them in block order and writes the sum as the
//! gradient (`=`): a backward writes each gradient once, so nothing zeroes the buffer before it (the CPU
//! reference's functions accumulate instead, `+=`). A step therefore repeats bit for bit on one GPU; the
//! blocks depend on the GPU's multiprocessor count, so another GPU model may round differently.
//! They depend on the row count only through its shape bucket ([`padded_rows`]), so that rows a bucket
//! appends (with zero gradients) only add zeros at the end of the last blocks. The training step runs both
//! towers as one set of rows, each padded on its own: a [`RowSplit`] sums each tower's rows in blocks of
//! their own, so padding the first tower moves no row of the second into another block either.

use super::bucket::padded_rows;
use super::gpu::{Arg, Gpu};
use super::memory::Dev;
use super::ops::{covers, int, row_threads};
use crate::train::optim::AdamConfig;
use anyhow::{Result, anyhow, ensure};
use half::f16;

/// Widest row the LayerNorm kernels hold in registers: 1024 threads of 8 columns.
pub const LAYERNORM_MAX_DIM: usize = 8192;

/// Widest row of the L2 normalisation: a warp of 32 lanes, L2_MAX_PER_LANE (l2norm.cu) columns each.
pub const L2NORM_MAX_DIM: usize = 256;
const L2NORM_WARPS: usize = 8;

/// Threads of the gradient-norm reduction blocks (ADAM_NORM_THREADS in adam.cu).
const NORM_THREADS: u32 = 256;

/// The optimiser's figures for one step, as `grad_norm_finish` leaves them on the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStats {
    /// Global L2 norm of the unscaled gradients, before clipping; not finite on overflow.
    pub grad_norm: f32,
    /// The clipping factor applied (1 without clipping).
    pub clip: f32,
    /// The gradients overflowed: nothing was updated.
    pub skipped: bool,
}

impl AdamStats {
    /// Floats of the device buffer that holds the stats.
    pub const LEN: usize = 3;

    /// Decodes the stats buffer as downloaded.
    pub fn from_device(stats: &[f32]) -> Result<Self> {
        ensure!(stats.len() >= Self::LEN, "adam stats: {} floats, expected {}", stats.len(), Self::LEN);
        Ok(AdamStats { grad_norm: stats[0], clip: stats[1], skipped: stats[2] != 0.0 })
    }
}

/// One optimiser update: the learning rate from the schedule, the update's number t ≥ 1 (the bias
/// corrections use it; a skipped step does not count) and the loss scale the gradients carry.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub t: u64,
    pub loss_scale: f64,
}

impl AdamStep {
    /// Floats of the scalars [`Self::scalars`] forms.
    pub const SCALARS: usize = 4;

    /// The scalars `adam_update` and `grad_norm_finish` read from device memory (STEP_* in adam.cu): the
    /// inverse loss scale, the decay 1 − lr·wd, −lr / (1 − β1^t) and √(1 − β2^t), formed as
    /// src/train/optim.rs forms them: in f64, rounded once to f32. The scale must be a power of two within
    /// fp32's range, so that its inverse is exact in fp32 (the norm multiplies by it in f64).
    pub fn scalars(&self, config: &AdamConfig) -> Result<[f32; Self::SCALARS]> {
        ensure!(self.t >= 1, "adam: update numbers start at 1");
        let scale = self.loss_scale;
        let power_of_two = scale.to_bits() & ((1u64 << 52) - 1) == 0;
        ensure!(
            power_of_two && (2f64.powi(-126)..=2f64.powi(126)).contains(&scale),
            "adam: loss scale {scale} is not a power of two within fp32's range"
        );
        let t = self.t as f64;
        Ok([
            (1.0 / scale) as f32,
            (1.0 - self.lr * config.weight_decay) as f32,
            (-(self.lr / (1.0 - config.beta1.powf(t)))) as f32,
            (1.0 - config.beta2.powf(t)).sqrt() as f32,
        ])
    }
}

/// The rows of a reduction: `rows` in all, the first `split` of them summed in blocks apart from the rest
/// (the user tower's rows of a training pass, before the item tower's). A plain row count is one part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowSplit {
    pub rows: usize,
    pub split: usize,
}

impl From<usize> for RowSplit {
    fn from(rows: usize) -> Self {
        RowSplit { rows, split: rows }
    }
}

/// How a reduction's blocks take the rows of a [`RowSplit`]: `per_a` rows a block before the split, `per_b`
/// after it, `count` blocks in all (reduction_rows in common.cuh).
struct Blocks {
    per_a: usize,
    per_b: usize,
    count: usize,
}

impl Blocks {
    /// The block count and the kernels' arguments: the rows, the split and the rows per block of each part.
    fn launch(&self, rows: RowSplit) -> Result<(usize, [Arg; 4])> {
        ensure!(rows.split <= rows.rows, "reduction: a split at row {} of {}", rows.split, rows.rows);
        let args = [
            Arg::I32(int(rows.rows, "rows")?),
            Arg::I32(int(rows.split, "split")?),
            Arg::I32(int(self.per_a, "rows per block")?),
            Arg::I32(int(self.per_b, "rows per block")?),
        ];
        Ok((self.count, args))
    }
}

impl Gpu {
    /// Rows each block of a two-pass reduction takes: at least 16 (the partials stay small next to the
    /// rows), and few enough blocks (≤ 4 per multiprocessor) that the second pass is short. The same for
    /// every row count of a shape bucket: a padded batch sums its real rows in the same blocks.
    pub fn rows_per_block(&self, rows: usize) -> usize {
        padded_rows(rows).div_ceil(4 * self.multiprocessors.max(1)).max(16)
    }

    /// The blocks of a reduction over `rows`: each part in blocks of [`Self::rows_per_block`] of its own rows
    /// (a split beyond the rows is refused by [`Blocks::launch`]).
    fn blocks(&self, rows: RowSplit) -> Blocks {
        let (a, b) = (rows.split.min(rows.rows), rows.rows.saturating_sub(rows.split));
        let (per_a, per_b) = (self.rows_per_block(a), self.rows_per_block(b));
        Blocks { per_a, per_b, count: a.div_ceil(per_a) + b.div_ceil(per_b) }
    }

    /// Floats of scratch a reduction over `rows` rows of `cols` columns needs for `arrays` sums at once.
    pub fn partials_len(&self, rows: impl Into<RowSplit>, cols: usize, arrays: usize) -> usize {
        self.blocks(rows.into()).count * cols * arrays
    }

    /// The most blocks a reduction over at most `max_rows` rows takes, split or not: what its scratch is
    /// sized for. Each part takes at most the most blocks of one part (not monotone in the rows).
    pub fn max_reduction_blocks(&self, max_rows: usize) -> usize {
        let one = (1..=max_rows).map(|n| n.div_ceil(self.rows_per_block(n))).max().unwrap_or(0);
        2 * one
    }

    /// `out[j] = Σ_b partials[b, j]` over `blocks` partial rows of `n`, in block order; zeros when
    /// `blocks` is 0 (a backward over no rows still writes its gradients).
    pub(super) fn column_sums(&self, out: Dev<f32>, partials: Dev<f32>, blocks: usize, n: usize) -> Result<()> {
        self.column_sums_of(&[out], partials, blocks, n)
    }

    /// [`Self::column_sums`] for up to three partial arrays of `blocks · n` laid one after the other in
    /// `partials`, the k-th into `outs[k]`, in one launch.
    pub(super) fn column_sums_of(&self, outs: &[Dev<f32>], partials: Dev<f32>, blocks: usize, n: usize) -> Result<()> {
        ensure!((1..=3).contains(&outs.len()), "column sums of {} arrays (1 to 3)", outs.len());
        for out in outs {
            covers(out, n, "gradient sum")?;
        }
        covers(&partials, outs.len() * blocks * n, "partial sums")?;
        let out = |k: usize| Arg::Ptr(outs.get(k).map_or(0, |o| o.ptr()));
        let args = [
            out(0),
            out(1),
            out(2),
            Arg::Ptr(partials.ptr()),
            Arg::I32(outs.len() as i32),
            Arg::I32(int(blocks, "blocks")?),
            Arg::I32(int(n, "columns")?),
        ];
        // SAFETY: each of the `parts` outputs covers n floats and partials parts·blocks·n (checked).
        unsafe { self.launch("column_sums", (self.grid_for(outs.len() * n), 1), 256, 0, &args) }
    }

    /// `y = layernorm(x + delta + delta_bias) · w + b` per row (fp16 in and out, fp32 statistics), keeping
    /// `xhat` (fp16) and `rstd` for [`Self::layernorm_bwd`]. `delta` and `delta_bias` are optional.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_fwd(
        &self,
        y: Dev<f16>,
        xhat: Dev<f16>,
        rstd: Dev<f32>,
        x: Dev<f16>,
        delta: Option<Dev<f16>>,
        delta_bias: Option<Dev<f32>>,
        w: Dev<f32>,
        b: Dev<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        check_layernorm_dim(dim)?;
        for (buf, what) in [(&y, "layernorm output"), (&xhat, "layernorm xhat"), (&x, "layernorm input")] {
            covers(buf, rows * dim, what)?;
        }
        if let Some(delta) = &delta {
            covers(delta, rows * dim, "layernorm residual")?;
        }
        if let Some(bias) = &delta_bias {
            covers(bias, dim, "layernorm residual bias")?;
        }
        covers(&rstd, rows, "layernorm rstd")?;
        covers(&w, dim, "layernorm weight")?;
        covers(&b, dim, "layernorm bias")?;
        if rows == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(y.ptr()),
            Arg::Ptr(xhat.ptr()),
            Arg::Ptr(rstd.ptr()),
            Arg::Ptr(x.ptr()),
            Arg::Ptr(delta.map_or(0, |d| d.ptr())),
            Arg::Ptr(delta_bias.map_or(0, |d| d.ptr())),
            Arg::Ptr(w.ptr()),
            Arg::Ptr(b.ptr()),
            Arg::I32(int(dim, "width")?),
            Arg::F32(eps),
        ];
        let grid = u32::try_from(rows).map_err(|_| anyhow!("layernorm: {rows} rows"))?;
        // SAFETY: one block per row, each touching its row's dim elements of every [rows, dim] buffer, dim
        // parameters and one rstd; all covered (checked), 16-byte aligned for dim % 8 == 0; blockDim·8 ≥ dim.
        unsafe { self.launch("layernorm_fwd", (grid, 1), row_threads(dim, 1024), 0, &args) }
    }

    /// Gradients of [`Self::layernorm_fwd`] for `dy` (plus `dy2` when given): `dx` (fp16) is overwritten;
    /// `dw = Σ dy·xhat`, `db = Σ dy` and, when given, `d_delta_bias = Σ dx`. `scratch` holds
    /// [`Self::partials_len`]`(rows, dim, 3)` floats.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_bwd(
        &self,
        dx: Dev<f16>,
        dw: Dev<f32>,
        db: Dev<f32>,
        d_delta_bias: Option<Dev<f32>>,
        dy: Dev<f16>,
        dy2: Option<Dev<f16>>,
        xhat: Dev<f16>,
        rstd: Dev<f32>,
        w: Dev<f32>,
        scratch: Dev<f32>,
        rows: impl Into<RowSplit>,
        dim: usize,
    ) -> Result<()> {
        let split = rows.into();
        let rows = split.rows;
        check_layernorm_dim(dim)?;
        for (buf, what) in [(&dx, "layernorm dx"), (&dy, "layernorm dy"), (&xhat, "layernorm xhat")] {
            covers(buf, rows * dim, what)?;
        }
        if let Some(dy2) = &dy2 {
            covers(dy2, rows * dim, "layernorm second dy")?;
        }
        covers(&rstd, rows, "layernorm rstd")?;
        covers(&w, dim, "layernorm weight")?;
        let sums: Vec<Dev<f32>> = [Some(dw), Some(db), d_delta_bias].into_iter().flatten().collect();
        if rows == 0 {
            return self.column_sums_of(&sums, scratch, 0, dim);
        }
        let (blocks, [rows_arg, split_arg, per_a, per_b]) = self.blocks(split).launch(split)?;
        covers(&scratch, self.partials_len(split, dim, 3), "layernorm scratch")?;
        let part = |k: usize| scratch.slice(k * blocks * dim, blocks * dim);
        let args = [
            Arg::Ptr(dx.ptr()),
            Arg::Ptr(part(0).ptr()),
            Arg::Ptr(part(1).ptr()),
            Arg::Ptr(d_delta_bias.map_or(0, |_| part(2).ptr())),
            Arg::Ptr(dy.ptr()),
            Arg::Ptr(dy2.map_or(0, |d| d.ptr())),
            Arg::Ptr(xhat.ptr()),
            Arg::Ptr(rstd.ptr()),
            Arg::Ptr(w.ptr()),
            rows_arg,
            Arg::I32(int(dim, "width")?),
            split_arg,
            per_a,
            per_b,
        ];
        // SAFETY: block x reads and writes its rows (below `rows`, reduction_rows) of [rows, dim] buffers
        // and writes row x of each [blocks, dim] partial array; all covered (checked); blockDim·8 ≥ dim.
        unsafe { self.launch("layernorm_bwd", (u32::try_from(blocks)?, 1), row_threads(dim, 1024), 0, &args)? };
        self.column_sums_of(&sums, scratch, blocks, dim)
    }

    /// `act = fp16(gelu(fp16(pre + bias)))` (exact erf form) for `rows` rows; `pre` is left as it is (the
    /// backward adds the bias again).
    pub fn gelu_bias_fwd(&self, act: Dev<f16>, pre: Dev<f16>, bias: Dev<f32>, rows: usize, cols: usize) -> Result<()> {
        ensure!(cols > 0 && cols.is_multiple_of(8), "gelu: width {cols} is not a multiple of 8");
        covers(&act, rows * cols, "gelu output")?;
        covers(&pre, rows * cols, "gelu input")?;
        covers(&bias, cols, "gelu bias")?;
        let args = [
            Arg::Ptr(act.ptr()),
            Arg::Ptr(pre.ptr()),
            Arg::Ptr(bias.ptr()),
            Arg::I32(int(rows, "rows")?),
            Arg::I32(int(cols, "width")?),
        ];
        // SAFETY: both buffers cover the rows and the bias a row (checked), 16-byte aligned for cols % 8 == 0.
        unsafe { self.launch("gelu_bias_fwd", (self.grid_for(rows * cols / 8), 1), 256, 0, &args) }
    }

    /// `dpre = fp16(dact · gelu'(fp16(pre + bias)))` (`dpre` may be `dact`: in place) and `dbias = Σ dpre`,
    /// for the bias-free `pre` the forward read. `scratch` holds [`Self::partials_len`]`(rows, cols, 1)`
    /// floats.
    #[allow(clippy::too_many_arguments)]
    pub fn gelu_bias_bwd(
        &self,
        dpre: Dev<f16>,
        dbias: Dev<f32>,
        dact: Dev<f16>,
        pre: Dev<f16>,
        bias: Dev<f32>,
        scratch: Dev<f32>,
        rows: impl Into<RowSplit>,
        cols: usize,
    ) -> Result<()> {
        let split = rows.into();
        let rows = split.rows;
        ensure!(cols > 0 && cols.is_multiple_of(8), "gelu: width {cols} is not a multiple of 8");
        for (buf, what) in [(&dpre, "gelu dpre"), (&dact, "gelu dact"), (&pre, "gelu pre-activation")] {
            covers(buf, rows * cols, what)?;
        }
        covers(&bias, cols, "gelu bias")?;
        if rows == 0 {
            return self.column_sums(dbias, scratch, 0, cols);
        }
        let (blocks, [rows_arg, split_arg, per_a, per_b]) = self.blocks(split).launch(split)?;
        covers(&scratch, self.partials_len(split, cols, 1), "gelu scratch")?;
        let threads = row_threads(cols, 256);
        let col_blocks = (cols / 8).div_ceil(threads as usize);
        let args = [
            Arg::Ptr(dpre.ptr()),
            Arg::Ptr(scratch.ptr()),
            Arg::Ptr(dact.ptr()),
            Arg::Ptr(pre.ptr()),
            Arg::Ptr(bias.ptr()),
            rows_arg,
            Arg::I32(int(cols, "width")?),
            split_arg,
            per_a,
            per_b,
        ];
        let grid = (u32::try_from(blocks)?, u32::try_from(col_blocks)?);
        // SAFETY: block (x, y) touches its rows (below `rows`, reduction_rows) and columns below cols of
        // the [rows, cols] buffers, and row x of the [blocks, cols] partials; all covered (checked).
        unsafe { self.launch("gelu_bias_bwd", grid, threads, 0, &args)? };
        self.column_sums(dbias, scratch, blocks, cols)
    }

    /// `y = z' / max(‖z'‖, eps)` per row with `z' = z + bias` (fp32 out), keeping `norms = ‖z'‖`.
    #[allow(clippy::too_many_arguments)]
    pub fn l2norm_fwd(
        &self,
        y: Dev<f32>,
        norms: Dev<f32>,
        z: Dev<f16>,
        bias: Option<Dev<f32>>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        check_l2norm_dim(dim)?;
        covers(&y, rows * dim, "l2norm output")?;
        covers(&z, rows * dim, "l2norm input")?;
        covers(&norms, rows, "l2norm norms")?;
        if let Some(bias) = &bias {
            covers(bias, dim, "l2norm bias")?;
        }
        if rows == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(y.ptr()),
            Arg::Ptr(norms.ptr()),
            Arg::Ptr(z.ptr()),
            Arg::Ptr(bias.map_or(0, |b| b.ptr())),
            Arg::I32(int(rows, "rows")?),
            Arg::I32(int(dim, "width")?),
            Arg::F32(eps),
        ];
        let grid = u32::try_from(rows.div_ceil(L2NORM_WARPS))?;
        // SAFETY: one warp per row below rows, each touching its row of the [rows, dim] buffers, dim bias
        // values and one norm; all covered (checked).
        unsafe { self.launch("l2norm_fwd", (grid, 1), 32 * L2NORM_WARPS as u32, 0, &args) }
    }

    /// Gradient of [`Self::l2norm_fwd`]: `dz` (fp16) from `dy`, the outputs `y` and the `norms`; with
    /// `dbias`, also `dbias = Σ dz`. `scratch` holds [`Self::partials_len`]`(rows, dim, 1)` floats.
    #[allow(clippy::too_many_arguments)]
    pub fn l2norm_bwd(
        &self,
        dz: Dev<f16>,
        dbias: Option<Dev<f32>>,
        dy: Dev<f32>,
        y: Dev<f32>,
        norms: Dev<f32>,
        scratch: Dev<f32>,
        rows: impl Into<RowSplit>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let split = rows.into();
        let rows = split.rows;
        check_l2norm_dim(dim)?;
        covers(&dz, rows * dim, "l2norm dz")?;
        covers(&dy, rows * dim, "l2norm dy")?;
        covers(&y, rows * dim, "l2norm output")?;
        covers(&norms, rows, "l2norm norms")?;
        if rows == 0 {
            return dbias.map_or(Ok(()), |dbias| self.column_sums(dbias, scratch, 0, dim));
        }
        let (blocks, [rows_arg, split_arg, per_a, per_b]) = self.blocks(split).launch(split)?;
        if dbias.is_some() {
            covers(&scratch, self.partials_len(split, dim, 1), "l2norm scratch")?;
        }
        let args = [
            Arg::Ptr(dz.ptr()),
            Arg::Ptr(dbias.map_or(0, |_| scratch.ptr())),
            Arg::Ptr(dy.ptr()),
            Arg::Ptr(y.ptr()),
            Arg::Ptr(norms.ptr()),
            rows_arg,
            Arg::I32(int(dim, "width")?),
            split_arg,
            per_a,
            per_b,
            Arg::F32(eps),
        ];
        // SAFETY: block x touches its rows (below `rows`, reduction_rows) of the [rows, dim] buffers and
        // row x of the [blocks, dim] partials (when given); all covered (checked).
        unsafe { self.launch("l2norm_bwd", (u32::try_from(blocks)?, 1), 32 * L2NORM_WARPS as u32, 0, &args)? };
        match dbias {
            Some(dbias) => self.column_sums(dbias, scratch, blocks, dim),
            None => Ok(()),
        }
    }

    /// Doubles of scratch [`Self::adam_step`] needs: one partial sum of squares per block.
    pub fn adam_scratch_len(&self, n: usize) -> usize {
        self.grid_for(n) as usize
    }

    /// One Adam/AdamW update of `n = params.len()` parameters from `grads` (of the loss times the loss
    /// scale): the global gradient norm, the overflow check and the clipping factor (`--clip-grad-norm`
    /// `max_norm`) go to `stats` ([`AdamStats::LEN`] floats, read with [`AdamStats::from_device`]); unless the
    /// step overflowed, `params`, `m` and `v` are updated as src/train/optim.rs does and `p16 =
    /// fp16(params)`. `scalars` holds the update's [`AdamStep::scalars`] on the device, so that a captured
    /// step replays with the next update's learning rate and loss scale.
    #[allow(clippy::too_many_arguments)]
    pub fn adam_step(
        &self,
        params: Dev<f32>,
        m: Dev<f32>,
        v: Dev<f32>,
        p16: Dev<f16>,
        grads: Dev<f32>,
        stats: Dev<f32>,
        scratch: Dev<f64>,
        scalars: Dev<f32>,
        config: &AdamConfig,
        max_norm: Option<f64>,
    ) -> Result<()> {
        let n = params.len();
        for (buf, what) in [(&m, "adam m"), (&v, "adam v"), (&grads, "gradients")] {
            covers(buf, n, what)?;
        }
        covers(&p16, n, "fp16 weights")?;
        covers(&stats, AdamStats::LEN, "adam stats")?;
        covers(&scalars, AdamStep::SCALARS, "adam scalars")?;
        let blocks = self.grid_for(n);
        covers(&scratch, blocks as usize, "adam scratch")?;
        let args = [Arg::Ptr(scratch.ptr()), Arg::Ptr(grads.ptr()), Arg::I64(n as i64)];
        // SAFETY: grid-stride over the n gradients; one partial per block, covered (checked).
        unsafe { self.launch("grad_sumsq", (blocks, 1), NORM_THREADS, 0, &args)? };
        let args = [
            Arg::Ptr(stats.ptr()),
            Arg::Ptr(scratch.ptr()),
            Arg::I32(blocks as i32),
            Arg::Ptr(scalars.ptr()),
            Arg::F32(max_norm.unwrap_or(0.0) as f32),
        ];
        // SAFETY: one block reads the `blocks` partials written above and the scalars, and writes the 3 stats
        // (all covered).
        unsafe { self.launch("grad_norm_finish", (1, 1), NORM_THREADS, 0, &args)? };
        // The constant scalars as src/train/optim.rs forms them: in f64, rounded once to f32.
        let c = config;
        let args = [
            Arg::Ptr(params.ptr()),
            Arg::Ptr(m.ptr()),
            Arg::Ptr(v.ptr()),
            Arg::Ptr(p16.ptr()),
            Arg::Ptr(grads.ptr()),
            Arg::Ptr(stats.ptr()),
            Arg::Ptr(scalars.ptr()),
            Arg::I64(n as i64),
            Arg::F32((1.0 - c.beta1) as f32),
            Arg::F32(c.beta2 as f32),
            Arg::F32((1.0 - c.beta2) as f32),
            Arg::F32(c.eps as f32),
        ];
        // SAFETY: grid-stride over n elements of params, m, v, p16 and grads (covered), reading 3 stats and
        // the 4 scalars (covered).
        unsafe { self.launch("adam_update", (self.grid_for(n), 1), 256, 0, &args) }
    }
}

fn check_layernorm_dim(dim: usize) -> Result<()> {
    ensure!(
        dim > 0 && dim.is_multiple_of(8) && dim <= LAYERNORM_MAX_DIM,
        "layernorm: width {dim} must be a multiple of 8, at most {LAYERNORM_MAX_DIM}"
    );
    Ok(())
}

fn check_l2norm_dim(dim: usize) -> Result<()> {
    ensure!((1..=L2NORM_MAX_DIM).contains(&dim), "l2norm: width {dim} must be 1 ..= {L2NORM_MAX_DIM}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_scalars_are_the_cpu_optimizer_s_and_need_a_power_of_two_scale() {
        let config = AdamConfig { weight_decay: 0.1, ..AdamConfig::default() };
        let step = AdamStep { lr: 1e-3, t: 3, loss_scale: 65536.0 };
        let [inv_scale, decay, neg_step, bc2_sqrt] = step.scalars(&config).unwrap();
        assert_eq!(inv_scale, 1.0 / 65536.0);
        assert_eq!(decay, (1.0 - 1e-3 * 0.1) as f32);
        assert_eq!(neg_step, (-(1e-3 / (1.0 - 0.9f64.powf(3.0)))) as f32);
        assert_eq!(bc2_sqrt, (1.0 - 0.999f64.powf(3.0)).sqrt() as f32);
        for scale in [3.0, 0.0, -2.0, f64::INFINITY, f64::NAN, 2f64.powi(127)] {
            assert!(AdamStep { loss_scale: scale, ..step }.scalars(&config).is_err(), "scale {scale}");
        }
        assert!(AdamStep { t: 0, ..step }.scalars(&config).is_err());
        assert!(AdamStep { loss_scale: 0.5, ..step }.scalars(&config).is_ok());
    }
}
