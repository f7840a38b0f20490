//! The dense all-action InfoNCE loss on the GPU (SPEC §4.2; kernels/infonce.cu): the batch's layout, built
//! on the host from its lengths and target ids, and the launcher of its passes.
//!
//! The layout numbers queries and columns user by user as src/cpu/infonce.rs does, and gives every user a
//! bitmask over the columns that are its false negatives (other users' targets whose item id is among its
//! own): `ceil(columns / 32)` words per user, 5 MB at B = 1024, T = 40, and nothing when false negatives are
//! kept. Building it costs the host one sort of the column ids and one pass over the banned pairs.
//!
//! A layout may be padded ([`InfoNceLayout::pad`]) to the query, column and row counts of a training step's
//! shape bucket: the padding entries change no result, and the launches then repeat from one batch of the
//! bucket to the next, as a CUDA graph replays them. The loss's two weights (1/P and S/P) are read from
//! device memory for the same reason.

use super::gpu::{Arg, Gpu};
use super::memory::{Dev, Layout};
use super::ops::{covers, int};
use crate::cpu::infonce::LossPositions;
use anyhow::{Result, anyhow, bail, ensure};
use half::f16;

/// Embedding widths (d_out) the kernels are instantiated for.
pub const INFONCE_WIDTHS: [usize; 2] = [32, 64];

/// Most targets one user may have (NCE_MAX_TARGETS in infonce.cu).
pub const INFONCE_MAX_TARGETS: usize = 256;

/// Queries and columns per tile (NCE_TILE), threads per block (NCE_THREADS).
const TILE: usize = 64;
const THREADS: u32 = 256;

/// Queries, columns and false negatives of one batch, as the kernels read them.
#[derive(Clone, Debug, Default)]
pub struct InfoNceLayout {
    /// Per query: its row of the `[B·H, d]` users, its user.
    pub q_row: Vec<i32>,
    pub q_user: Vec<i32>,
    /// Per column: its row of the `[B·T, d]` items, its user.
    pub c_row: Vec<i32>,
    pub c_user: Vec<i32>,
    /// User i's queries are `q_start[i] .. q_start[i+1]`, its columns `c_start[i] .. c_start[i+1]`.
    pub q_start: Vec<i32>,
    pub c_start: Vec<i32>,
    /// `[B, words]` bits: bit c of user i is set when column c is one of i's false negatives. Empty when
    /// false negatives are kept.
    pub ban: Vec<u32>,
    pub words: usize,
    /// Valid (i, j, k) triples: the loss is their mean.
    pub pairs: usize,
    /// Rows of the users and items arrays the layout indexes (B·H and B·T when padded): the gradients are
    /// written over all of them, zero where no query or column is.
    pub user_rows: usize,
    pub item_rows: usize,
}

/// How the rows of the users `[·, d]` and items `[·, d]` arrays are numbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Padded: user i's position j is row i·H + j, its target k row i·T + k (the CPU reference's layout).
    Padded,
    /// Packed: only the valid positions, user by user, as the GPU tower's forward returns them.
    Packed,
}

impl InfoNceLayout {
    /// The layout of a batch of `hist_len.len()` users padded to `h` history and `t` target positions, with
    /// `target_ids` `[B, t]` (padded whatever `rows` says). Lengths must be 1 ..= h and 1 ..= t, as for the
    /// CPU reference.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        hist_len: &[usize],
        tgt_len: &[usize],
        target_ids: &[u32],
        h: usize,
        t: usize,
        positions: LossPositions,
        keep_false_negatives: bool,
        rows: Rows,
    ) -> Result<Self> {
        let n = hist_len.len();
        ensure!(tgt_len.len() == n, "infonce: {n} history lengths but {} target lengths", tgt_len.len());
        ensure!(target_ids.len() == n * t, "infonce: {} target ids, expected [{n}, {t}]", target_ids.len());
        ensure!(
            t <= INFONCE_MAX_TARGETS,
            "infonce: {t} targets per user; the GPU kernel takes at most {INFONCE_MAX_TARGETS}"
        );
        int(n * h.max(t), "infonce rows")?;
        let mut lay = InfoNceLayout { q_start: vec![0], c_start: vec![0], ..Default::default() };
        // Where user i's rows start in the users and items arrays, and, padded, in target_ids.
        let (mut u_at, mut c_at) = (0, 0);
        let mut c_rows = Vec::with_capacity(n * t);
        for (i, (&hi, &ti)) in hist_len.iter().zip(tgt_len).enumerate() {
            ensure!((1..=h).contains(&hi), "infonce: user {i} has history length {hi}, expected 1..={h}");
            ensure!((1..=t).contains(&ti), "infonce: user {i} has {ti} targets, expected 1..={t}");
            let first = match positions {
                LossPositions::All => 0,
                LossPositions::Last => hi - 1,
            };
            for j in first..hi {
                lay.q_row.push((u_at + j) as i32);
                lay.q_user.push(i as i32);
            }
            for k in 0..ti {
                lay.c_row.push((c_at + k) as i32);
                lay.c_user.push(i as i32);
                c_rows.push(i * t + k);
            }
            let (du, dc) = match rows {
                Rows::Padded => (h, t),
                Rows::Packed => (hi, ti),
            };
            (u_at, c_at) = (u_at + du, c_at + dc);
            lay.q_start.push(lay.q_row.len() as i32);
            lay.c_start.push(lay.c_row.len() as i32);
            lay.pairs += (hi - first) * ti;
        }
        (lay.user_rows, lay.item_rows) = (u_at, c_at);
        let nc = lay.c_row.len();
        lay.words = nc.div_ceil(32);
        if !keep_false_negatives {
            lay.ban = vec![0; n * lay.words];
            let id = |c: usize| target_ids[c_rows[c]];
            let mut by_id: Vec<usize> = (0..nc).collect();
            by_id.sort_unstable_by_key(|&c| (id(c), c));
            for i in 0..n {
                let own = lay.c_start[i] as usize..lay.c_start[i + 1] as usize;
                let mut ids: Vec<u32> = own.map(id).collect();
                ids.sort_unstable();
                ids.dedup();
                let bits = &mut lay.ban[i * lay.words..(i + 1) * lay.words];
                for x in ids {
                    let run = by_id.partition_point(|&c| id(c) < x)..by_id.partition_point(|&c| id(c) <= x);
                    for &c in &by_id[run] {
                        if lay.c_user[c] != i as i32 {
                            bits[c / 32] |= 1 << (c % 32);
                        }
                    }
                }
            }
        }
        Ok(lay)
    }

    pub fn users(&self) -> usize {
        self.q_start.len() - 1
    }

    /// Pads the layout to `queries` queries and `columns` columns, numbered past the real ones with row and
    /// user −1 (the kernels skip them as they skip what lies past the last), over arrays of `user_rows` and
    /// `item_rows` rows (whose extra rows get zero gradients). Nothing it computes changes.
    pub fn pad(&mut self, queries: usize, columns: usize, user_rows: usize, item_rows: usize) -> Result<()> {
        let (nq, nc) = (self.q_row.len(), self.c_row.len());
        ensure!(
            queries >= nq && columns >= nc && user_rows >= self.user_rows && item_rows >= self.item_rows,
            "infonce: padding {nq} queries, {nc} columns, {} × {} rows to fewer ({queries}, {columns}, {user_rows} ×              {item_rows})",
            self.user_rows,
            self.item_rows
        );
        int(queries.max(columns).max(user_rows).max(item_rows), "infonce padded rows")?;
        for array in [&mut self.q_row, &mut self.q_user] {
            array.resize(queries, -1);
        }
        for array in [&mut self.c_row, &mut self.c_user] {
            array.resize(columns, -1);
        }
        let words = columns.div_ceil(32);
        if !self.ban.is_empty() {
            let mut ban = vec![0; self.users() * words];
            for (new, old) in ban.chunks_exact_mut(words).zip(self.ban.chunks_exact(self.words)) {
                new[..self.words].copy_from_slice(old);
            }
            self.ban = ban;
        }
        (self.words, self.user_rows, self.item_rows) = (words, user_rows, item_rows);
        Ok(())
    }

    /// Byte offsets of the arrays in the device copy, and its size.
    fn plan(&self) -> ([usize; 7], usize) {
        let mut plan = Layout::default();
        let offsets = [
            plan.take::<i32>(self.q_row.len()),
            plan.take::<i32>(self.q_user.len()),
            plan.take::<i32>(self.c_row.len()),
            plan.take::<i32>(self.c_user.len()),
            plan.take::<i32>(self.q_start.len()),
            plan.take::<i32>(self.c_start.len()),
            plan.take::<u32>(self.ban.len()),
        ];
        (offsets, plan.bytes())
    }

    /// Bytes of device memory [`Gpu::upload_infonce_layout`] needs.
    pub fn device_bytes(&self) -> usize {
        self.plan().1
    }

    /// The device copy's bytes, written into the start of `out` (at least [`Self::device_bytes`] long):
    /// what a staging buffer holds for [`Self::on_device`].
    pub fn write(&self, out: &mut [u8]) -> Result<()> {
        let (offsets, bytes) = self.plan();
        ensure!(out.len() >= bytes, "infonce layout: {bytes} bytes into {}", out.len());
        let arrays = [&self.q_row, &self.q_user, &self.c_row, &self.c_user, &self.q_start, &self.c_start];
        for (array, &at) in arrays.iter().zip(&offsets) {
            let src: &[u8] = bytemuck::cast_slice(array);
            out[at..at + src.len()].copy_from_slice(src);
        }
        let ban: &[u8] = bytemuck::cast_slice(&self.ban);
        out[offsets[6]..offsets[6] + ban.len()].copy_from_slice(ban);
        Ok(())
    }

    /// The views of the layout's device copy in `region` (256-byte aligned, as [`Self::write`] laid it out),
    /// which the caller keeps alive and filled.
    pub fn on_device(&self, region: Dev<u8>) -> Result<InfoNceDev> {
        let (offsets, bytes) = self.plan();
        covers(&region, bytes, "infonce layout")?;
        let view = |i: usize, len: usize| region.slice(offsets[i], len * 4).cast::<i32>();
        Ok(InfoNceDev {
            q_row: view(0, self.q_row.len()),
            q_user: view(1, self.q_user.len()),
            c_row: view(2, self.c_row.len()),
            c_user: view(3, self.c_user.len()),
            q_start: view(4, self.q_start.len()),
            c_start: view(5, self.c_start.len()),
            ban: (!self.ban.is_empty()).then(|| view(6, self.ban.len()).cast::<u32>()),
            users: self.users(),
            words: self.words,
            user_rows: self.user_rows,
            item_rows: self.item_rows,
        })
    }
}

/// The weights the loss's pairs carry, {1/P, S/P} for P pairs and gradients scaled by S (the loss scale
/// of mixed-precision training; 1 for the gradients themselves, exact for powers of two), as
/// [`Gpu::infonce`] reads them from device memory.
pub fn infonce_weights(pairs: usize, grad_scale: f64) -> Result<[f32; 2]> {
    ensure!(pairs > 0, "infonce: a batch without pairs");
    ensure!(grad_scale > 0.0 && grad_scale.is_finite(), "infonce: gradient scale {grad_scale}");
    Ok([(1.0 / pairs as f64) as f32, (grad_scale / pairs as f64) as f32])
}

/// A layout on the device: views into memory the caller keeps alive.
#[derive(Clone, Copy, Debug)]
pub struct InfoNceDev {
    q_row: Dev<i32>,
    q_user: Dev<i32>,
    c_row: Dev<i32>,
    c_user: Dev<i32>,
    q_start: Dev<i32>,
    c_start: Dev<i32>,
    ban: Option<Dev<u32>>,
    users: usize,
    words: usize,
    user_rows: usize,
    item_rows: usize,
}

impl InfoNceDev {
    pub fn queries(&self) -> usize {
        self.q_row.len()
    }

    pub fn columns(&self) -> usize {
        self.c_row.len()
    }

    /// Floats of scratch [`Gpu::infonce`] needs at width `d`: see [`infonce_scratch_len`].
    pub fn scratch_len(&self, d: usize) -> usize {
        infonce_scratch_len(self.queries(), self.columns(), self.users, d)
    }
}

/// Floats of scratch [`Gpu::infonce`] needs for `queries` queries and `columns` columns of `users` users at
/// width `d`: g per query and a partial loss per user, then (from a 256-byte boundary) the hi and lo halves
/// of the queries' and the columns' embeddings, each padded to whole tiles, then O (d per query).
pub fn infonce_scratch_len(queries: usize, columns: usize, users: usize, d: usize) -> usize {
    o_offset(queries, columns, users, d) + d * queries
}

/// Where O, the negatives' weighted mean of the columns per query, starts in the scratch, in floats.
fn o_offset(queries: usize, columns: usize, users: usize, d: usize) -> usize {
    split_offset(queries, users) + d * (queries.next_multiple_of(TILE) + columns.next_multiple_of(TILE))
}

/// Where the split halves start in the scratch, in floats.
fn split_offset(queries: usize, users: usize) -> usize {
    (queries + users).next_multiple_of(64)
}

/// The tiled passes at width d and the dynamic shared memory each takes.
fn tiled_passes(d: usize) -> Option<[(&'static str, usize); 2]> {
    let names = match d {
        32 => ["infonce_lse_dq_d32", "infonce_dc_d32"],
        64 => ["infonce_lse_dq_d64", "infonce_dc_d64"],
        _ => return None,
    };
    Some([(names[0], shared_bytes(d) + o_rows_bytes(d)), (names[1], shared_bytes(d))])
}

/// Dynamic shared memory of a tiled pass at width d (NceShared in infonce.cu): the hi and lo halves of a
/// query and a column tile (rows of d + 8 halves), and one region for the fp32 score tile (rows of 80), the
/// fp16 probability tile (rows of 72 halves) or the block's fp32 gradient rows (rows of d + 4).
fn shared_bytes(d: usize) -> usize {
    let tiles = 4 * TILE * (d + 8) * 2;
    let region = [TILE * 80 * 4, TILE * (TILE + 8) * 2, o_rows_bytes(d)].into_iter().max().unwrap_or(0);
    tiles + region
}

/// A tile of fp32 rows of d + 4: the block's gradient rows, and infonce_lse_dq's O beside them.
fn o_rows_bytes(d: usize) -> usize {
    TILE * (d + 4) * 4
}

impl Gpu {
    /// Copies `layout` into `region` (at least [`InfoNceLayout::device_bytes`] bytes, 256-byte aligned),
    /// ordered on the compute stream, and returns the views the launcher takes.
    pub fn upload_infonce_layout(&self, layout: &InfoNceLayout, region: Dev<u8>) -> Result<InfoNceDev> {
        let mut bytes = vec![0u8; layout.device_bytes()];
        layout.write(&mut bytes)?;
        let views = layout.on_device(region)?;
        self.upload(region, &bytes)?;
        Ok(views)
    }

    /// Raises the tiled passes' dynamic shared-memory limit where they need more than the default 48 KB
    /// and this GPU has it (otherwise [`Self::infonce`] refuses that width), once, when the GPU opens: not
    /// while a training step is being captured into a graph.
    pub(crate) fn configure_infonce(&self) -> Result<()> {
        use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SHARED;
        self.ctx.bind_to_thread()?;
        for (name, shared) in INFONCE_WIDTHS.into_iter().filter_map(tiled_passes).flatten() {
            if shared > 48 * 1024 && shared <= self.max_shared_per_block {
                self.kernels.get(name)?.set_attribute(MAX_SHARED, shared as i32)?;
            }
        }
        Ok(())
    }

    /// The InfoNCE loss of the batch into `loss[0]`, N_q of every query into `lse`, and the gradients
    /// with respect to `users` (`[B, H, d]` fp32) and `items` (`[B, T, d]`) written (not accumulated) to
    /// `d_users` and `d_items`, zero at padded and unused rows, as `cpu::infonce::infonce` does, times the
    /// loss scale S that `weights` carries ([`infonce_weights`] on the device). `log_q` (one value per items
    /// row) shifts every score when given. `scratch` holds [`InfoNceDev::scratch_len`] floats from a 16-byte
    /// boundary. The products run on tensor cores from embeddings split into pairs of halves, so every
    /// value must lie within fp16's range (±65504), as unit-norm embeddings do by far.
    #[allow(clippy::too_many_arguments)]
    pub fn infonce(
        &self,
        batch: &InfoNceDev,
        users: Dev<f32>,
        items: Dev<f32>,
        log_q: Option<Dev<f32>>,
        d: usize,
        tau: f32,
        weights: Dev<f32>,
        loss: Dev<f32>,
        lse: Dev<f32>,
        d_users: Dev<f32>,
        d_items: Dev<f32>,
        scratch: Dev<f32>,
    ) -> Result<()> {
        let Some([(lse_dq_kernel, lse_dq_shared), (dc_kernel, dc_shared)]) = tiled_passes(d) else {
            bail!("infonce: embedding width {d} has no GPU kernel (they take {INFONCE_WIDTHS:?})");
        };
        ensure!(tau > 0.0 && tau.is_finite(), "infonce: tau must be positive, got {tau}");
        covers(&weights, 2, "infonce weights")?;
        let (b, nq, nc) = (batch.users, batch.queries(), batch.columns());
        let (nu, ni) = (batch.user_rows, batch.item_rows);
        covers(&users, nu * d, "infonce users")?;
        covers(&d_users, nu * d, "infonce d_users")?;
        covers(&items, ni * d, "infonce items")?;
        covers(&d_items, ni * d, "infonce d_items")?;
        if let Some(log_q) = &log_q {
            covers(log_q, ni, "infonce log q")?;
        }
        covers(&loss, 1, "infonce loss")?;
        covers(&lse, nq, "infonce lse")?;
        covers(&scratch, batch.scratch_len(d), "infonce scratch")?;
        ensure!(scratch.ptr().is_multiple_of(16), "infonce scratch: {scratch:?} does not start on a 16-byte boundary");
        self.fill_bytes(d_users.slice(0, nu * d), 0)?;
        self.fill_bytes(d_items.slice(0, ni * d), 0)?;
        if b == 0 {
            return self.fill_bytes(loss.slice(0, 1), 0);
        }
        // Above the default 48 KB at d = 64: the opt-in configure_infonce made, which every GPU from the V100
        // on grants.
        if lse_dq_shared > self.max_shared_per_block {
            bail!(
                "cuda:{}: infonce needs {lse_dq_shared} bytes of shared memory per block; this GPU allows {}",
                self.ordinal,
                self.max_shared_per_block
            );
        }
        let (nq_pad, nc_pad) = (nq.next_multiple_of(TILE), nc.next_multiple_of(TILE));
        let (g, loss_part) = (scratch.slice(0, nq), scratch.slice(nq, b));
        let halves = scratch.slice(split_offset(nq, b), d * (nq_pad + nc_pad)).cast::<f16>();
        let (q_hi, q_lo) = (halves.slice(0, nq_pad * d), halves.slice(nq_pad * d, nq_pad * d));
        let (c_hi, c_lo) =
            (halves.slice(2 * nq_pad * d, nc_pad * d), halves.slice((2 * nq_pad + nc_pad) * d, nc_pad * d));
        let o = Arg::Ptr(scratch.slice(o_offset(nq, nc, b, d), nq * d).ptr());
        for (hi, lo, src, idx, n, n_pad) in
            [(q_hi, q_lo, users, batch.q_row, nq, nq_pad), (c_hi, c_lo, items, batch.c_row, nc, nc_pad)]
        {
            let args = [
                Arg::Ptr(hi.ptr()),
                Arg::Ptr(lo.ptr()),
                Arg::Ptr(src.ptr()),
                Arg::Ptr(idx.ptr()),
                Arg::I32(int(n, "infonce entries")?),
                Arg::I32(int(n_pad, "infonce padded entries")?),
                Arg::I32(d as i32),
            ];
            // SAFETY: hi and lo hold n_pad·d halves; every idx[r < n] is a row of src (covered above) or −1.
            unsafe { self.launch("infonce_split", (self.grid_for(n_pad * d), 1), 256, 0, &args)? };
        }
        let inv_tau = 1.0 / tau;
        let ptr = |x: Option<u64>| Arg::Ptr(x.unwrap_or(0));
        let log_q_arg = ptr(log_q.map(|l| l.ptr()));
        let ban_arg = ptr(batch.ban.map(|b| b.ptr()));
        let (nq_arg, nc_arg, words_arg) =
            (Arg::I32(int(nq, "queries")?), Arg::I32(int(nc, "columns")?), Arg::I32(int(batch.words, "words")?));
        let (row_tiles, col_tiles) = (u32::try_from(nq_pad / TILE)?, u32::try_from(nc_pad / TILE)?);
        let split = [Arg::Ptr(q_hi.ptr()), Arg::Ptr(q_lo.ptr()), Arg::Ptr(c_hi.ptr()), Arg::Ptr(c_lo.ptr()), log_q_arg];
        let (q_row, q_user) = (Arg::Ptr(batch.q_row.ptr()), Arg::Ptr(batch.q_user.ptr()));
        let columns = [Arg::Ptr(batch.c_row.ptr()), Arg::Ptr(batch.c_user.ptr()), ban_arg];
        let sizes = [nq_arg, nc_arg, words_arg, Arg::F32(inv_tau)];
        let (lse_arg, g_arg, weights_arg) = (Arg::Ptr(lse.ptr()), Arg::Ptr(g.ptr()), Arg::Ptr(weights.ptr()));
        let lse_dq_args: Vec<Arg> = [&[lse_arg, o][..], &split, &[q_user], &columns, &sizes].concat();
        // SAFETY (all three passes): the layout was built from this batch's lengths (rows below B·H and B·T or
        // −1, users below B or −1, `words` words of bitmask per user), every buffer covers what it indexes
        // (checked above; O nq·d floats of the scratch), the split halves cover whole tiles, and the dynamic
        // shared memory is what the kernels' tiles take (they trap on less).
        unsafe { self.launch(lse_dq_kernel, (row_tiles, 1), THREADS, lse_dq_shared as u32, &lse_dq_args)? };
        let args = [
            Arg::Ptr(d_users.ptr()),
            Arg::Ptr(d_items.ptr()),
            g_arg,
            Arg::Ptr(loss_part.ptr()),
            Arg::Ptr(users.ptr()),
            Arg::Ptr(items.ptr()),
            log_q_arg,
            q_row,
            Arg::Ptr(batch.c_row.ptr()),
            Arg::Ptr(batch.q_start.ptr()),
            Arg::Ptr(batch.c_start.ptr()),
            lse_arg,
            o,
            weights_arg,
            Arg::I32(d as i32),
            Arg::F32(inv_tau),
        ];
        unsafe { self.launch("infonce_pos", (u32::try_from(b)?, 1), THREADS, 0, &args)? };
        let tail = [lse_arg, g_arg, weights_arg];
        let dc_args: Vec<Arg> = [&[Arg::Ptr(d_items.ptr())][..], &split, &[q_user], &columns, &tail, &sizes].concat();
        unsafe { self.launch(dc_kernel, (col_tiles, 1), THREADS, dc_shared as u32, &dc_args)? };
        self.column_sums(loss, loss_part, b, 1).map_err(|e| anyhow!("infonce loss: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_numbers_queries_and_columns_and_bans_exactly_the_false_negatives() {
        // Three users padded to h = 3, t = 3; ids 7 and 9 are shared.
        let (hist, tgt) = ([2usize, 3, 1], [3usize, 1, 2]);
        let ids = [7u32, 8, 9, /* user 1 */ 9, 0, 0, /* user 2 */ 7, 7, 0];
        let lay = InfoNceLayout::new(&hist, &tgt, &ids, 3, 3, LossPositions::All, false, Rows::Padded).unwrap();
        assert_eq!(lay.q_row, [0, 1, 3, 4, 5, 6]);
        assert_eq!(lay.q_user, [0, 0, 1, 1, 1, 2]);
        assert_eq!(lay.c_row, [0, 1, 2, 3, 6, 7]);
        assert_eq!(lay.c_user, [0, 0, 0, 1, 2, 2]);
        assert_eq!((lay.q_start.as_slice(), lay.c_start.as_slice()), (&[0, 2, 5, 6][..], &[0, 3, 4, 6][..]));
        assert_eq!(lay.pairs, 2 * 3 + 3 + 2);
        assert_eq!(lay.words, 1);
        // User 0 (7, 8, 9) bans user 1's 9 (column 3) and user 2's 7s (4, 5); user 1 (9) bans user 0's 9
        // (column 2); user 2 (7) bans user 0's 7 (column 0). Own columns are never in the mask.
        assert_eq!(lay.ban, [0b111000, 0b000100, 0b000001]);

        let last = InfoNceLayout::new(&hist, &tgt, &ids, 3, 3, LossPositions::Last, true, Rows::Padded).unwrap();
        assert_eq!(last.q_row, [1, 5, 6]);
        assert_eq!(last.pairs, 3 + 1 + 2);
        assert!(last.ban.is_empty());

        assert!(InfoNceLayout::new(&[0], &[1], &[1, 2], 1, 2, LossPositions::All, false, Rows::Padded).is_err());
        assert!(InfoNceLayout::new(&[1], &[3], &[1, 2], 1, 2, LossPositions::All, false, Rows::Padded).is_err());
    }

    #[test]
    fn a_padded_layout_keeps_every_entry_and_marks_the_rest() {
        let (hist, tgt) = ([2usize, 3, 1], [3usize, 1, 2]);
        let ids = [7u32, 8, 9, 9, 0, 0, 7, 7, 0];
        let lay = InfoNceLayout::new(&hist, &tgt, &ids, 3, 3, LossPositions::All, false, Rows::Packed).unwrap();
        let mut padded = lay.clone();
        padded.pad(64, 128, 70, 64).unwrap();
        assert_eq!(padded.q_row[..6], lay.q_row[..]);
        assert!(padded.q_row[6..].iter().chain(&padded.q_user[6..]).all(|&x| x == -1) && padded.q_row.len() == 64);
        assert_eq!((padded.c_user[..6].to_vec(), padded.c_row[6..].to_vec()), (lay.c_user.clone(), vec![-1; 122]));
        assert_eq!(
            (padded.q_start.clone(), padded.c_start.clone(), padded.pairs),
            (lay.q_start.clone(), lay.c_start.clone(), 11)
        );
        // Four words per user now, the old word first.
        assert_eq!(padded.words, 4);
        assert_eq!(padded.ban, [0b111000, 0, 0, 0, 0b000100, 0, 0, 0, 0b000001, 0, 0, 0]);
        assert_eq!((padded.user_rows, padded.item_rows), (70, 64));
        // The device copy holds each array at its planned offset.
        let mut bytes = vec![0xffu8; padded.device_bytes()];
        padded.write(&mut bytes).unwrap();
        let (offsets, _) = padded.plan();
        let words = |at: usize, n: usize| -> Vec<i32> {
            bytes[at..at + 4 * n].chunks_exact(4).map(bytemuck::pod_read_unaligned).collect()
        };
        assert_eq!(words(offsets[3], 128), padded.c_user);
        assert_eq!(words(offsets[6], 12).iter().map(|&w| w as u32).collect::<Vec<_>>(), padded.ban);
        assert!(padded.write(&mut [0; 16]).is_err());
        assert!(lay.clone().pad(5, 128, 70, 64).is_err(), "fewer queries than the batch has");
        assert!(lay.clone().pad(64, 128, 5, 64).is_err(), "fewer user rows than the batch has");
    }

    #[test]
    fn the_loss_weights_are_the_pair_mean_and_the_scaled_one() {
        assert_eq!(infonce_weights(3, 1024.0).unwrap(), [(1.0f64 / 3.0) as f32, (1024.0f64 / 3.0) as f32]);
        assert!(infonce_weights(0, 1.0).is_err() && infonce_weights(3, f64::INFINITY).is_err());
    }

    #[test]
    fn bitmask_words_cover_every_column() {
        // 40 users × 5 targets = 200 columns = 7 words, the last one partial; everyone shares id 1.
        let ids: Vec<u32> = (0..200).map(|c| if c % 5 == 0 { 1 } else { 100 + c }).collect();
        let lay = InfoNceLayout::new(&[1; 40], &[5; 40], &ids, 1, 5, LossPositions::All, false, Rows::Padded).unwrap();
        assert_eq!(lay.words, 7);
        for i in 0..40 {
            let bits = &lay.ban[i * 7..(i + 1) * 7];
            for c in 0..200 {
                let banned = bits[c / 32] >> (c % 32) & 1 == 1;
                assert_eq!(banned, c % 5 == 0 && c / 5 != i, "user {i} column {c}");
            }
        }
    }
}
