//! The PCH training step on one GPU (SPEC §4 with §6's precision): the [`StepEngine`] that
//! `train --device cuda` drives.
//!
//! One update, all queued on the compute stream with a single host synchronisation at the end (to read the
//! loss and the optimiser's figures):
//! ```text
//! content rows (packed fp16, copied from pinned memory on the copy stream)
//!   → user tower over the histories (causal), item tower over the targets (causal or self-only)
//!   → InfoNCE over the packed outputs, gradients × loss scale
//!   → both towers' backward into one gradient buffer
//!   → global norm, overflow check, clipping, Adam on the fp32 masters, fresh fp16 copy
//! ```
//! While the GPU runs an update, the host gathers the next batch's content rows from the memory-mapped
//! store into the other of two pinned buffers and starts its copy, so neither waits for the other.
//!
//! An update whose scaled fp16 gradients overflow is skipped on the device (`adam_update` reads the flag
//! `grad_norm_finish` leaves), the scale halves (see [`LossScale`]) and Adam's update count does not move.

use super::Gpu;
use super::infonce::{INFONCE_MAX_TARGETS, INFONCE_WIDTHS, InfoNceLayout, Rows};
use super::memory::{Dev, DeviceBuffer, Layout, Pinned};
use super::pch::{Activations, GpuContent, GpuPch, check_config};
use super::train_ops::{AdamStats, AdamStep};
use crate::bail_input;
use crate::cpu::infonce::LossPositions;
use crate::cpu::masked_attention::MaskKind;
use crate::data::sequences::UserSequence;
use crate::embed::store::ContentStore;
use crate::pch::{PchBatchShape, PchConfig, PchParams};
use crate::train::engine::{OptimState, StepEngine, StepOutcome, StepSettings};
use crate::train::loss_scale::LossScale;
use anyhow::{Context, Result, ensure};
use cudarc::driver::{CudaEvent, CudaStream, sys};
use half::f16;
use rayon::prelude::*;
use std::sync::Arc;

/// Where the trainer reads content rows: the memory-mapped store, or the benchmark's table in memory.
pub trait ContentRows: Sync {
    /// Width of a row (d_content).
    fn dim(&self) -> usize;
    /// Row `row` as fp16 into `out` (length `dim`).
    fn read_row_f16(&self, row: usize, out: &mut [f16]);
}

impl ContentRows for ContentStore {
    fn dim(&self) -> usize {
        ContentStore::dim(self)
    }

    fn read_row_f16(&self, row: usize, out: &mut [f16]) {
        ContentStore::read_row_f16(self, row, out);
    }
}

/// Why the GPU cannot train this model, or `Ok` when it can.
pub fn check_trainable(model: &PchConfig, targets: usize) -> Result<()> {
    check_config(model)?;
    if !INFONCE_WIDTHS.contains(&model.d_out) {
        bail_input!("the GPU InfoNCE kernel takes d_out in {INFONCE_WIDTHS:?}, the model has {}", model.d_out);
    }
    if targets > INFONCE_MAX_TARGETS {
        bail_input!(
            "the GPU InfoNCE kernel takes at most {INFONCE_MAX_TARGETS} targets per user, --targets is {targets}"
        );
    }
    Ok(())
}

/// A batch gathered on the host and on its way to the device.
struct Prepared {
    /// Identity of the users it holds (their addresses), to check it is the batch the loop trains next.
    users: Vec<usize>,
    history: PchBatchShape,
    targets: PchBatchShape,
    /// Packed rows of each side.
    history_rows: usize,
    target_rows: usize,
    layout: InfoNceLayout,
    /// log q per packed target row, with `--logq-correction`.
    log_q: Option<Vec<f32>>,
}

impl Prepared {
    /// The host's plan of a batch: the store rows of the valid positions, packed (every history, then
    /// every target list, user by user), and what the device needs beside their content.
    fn plan(s: &StepSettings, users: &[&UserSequence]) -> Result<(Prepared, Vec<u32>)> {
        let histories: Vec<&[u32]> = users.iter().map(|u| u.recent_history(s.history)).collect();
        let targets: Vec<&[u32]> = users.iter().map(|u| u.first_targets(s.targets)).collect();
        let shape = |lists: &[&[u32]]| {
            let lengths: Vec<usize> = lists.iter().map(|l| l.len()).collect();
            PchBatchShape { batch: lists.len(), len: lengths.iter().copied().max().unwrap_or(0), lengths }
        };
        let (history, target_shape) = (shape(&histories), shape(&targets));
        let packed: Vec<u32> = histories.iter().chain(&targets).flat_map(|l| l.iter().copied()).collect();
        let history_rows: usize = history.lengths.iter().sum();
        let t = target_shape.len;
        let mut target_ids = vec![0u32; users.len() * t];
        for (b, list) in targets.iter().enumerate() {
            target_ids[b * t..b * t + list.len()].copy_from_slice(list);
        }
        let (h_len, t_len) = (&history.lengths, &target_shape.lengths);
        let (positions, keep) = (s.positions, s.keep_false_negatives);
        let layout = InfoNceLayout::new(h_len, t_len, &target_ids, history.len, t, positions, keep, Rows::Packed)?;
        let log_q =
            s.log_q.as_ref().map(|per_item| packed[history_rows..].iter().map(|&r| per_item[r as usize]).collect());
        let prepared = Prepared {
            users: users.iter().map(|u| *u as *const UserSequence as usize).collect(),
            history,
            targets: target_shape,
            history_rows,
            target_rows: packed.len() - history_rows,
            layout,
            log_q,
        };
        Ok((prepared, packed))
    }
}

/// One of the two content staging buffers.
struct Staging {
    pinned: Pinned<f16>,
    device: Dev<f16>,
    /// The copy into `device` is done (copy stream).
    uploaded: CudaEvent,
    /// The update that read `device` is done with it (compute stream): both buffers may be refilled.
    consumed: CudaEvent,
    batch: Option<Prepared>,
}

/// Optimiser and loss buffers, carved from one allocation.
struct Buffers {
    m: Dev<f32>,
    v: Dev<f32>,
    /// The loss, then the optimiser's stats ([`AdamStats::LEN`]): read back with one copy.
    figures: Dev<f32>,
    adam_scratch: Dev<f64>,
    lse: Dev<f32>,
    d_users: Dev<f32>,
    d_items: Dev<f32>,
    nce_scratch: Dev<f32>,
    log_q: Dev<f32>,
    layout: Dev<u8>,
    _buffer: DeviceBuffer,
}

/// Milliseconds of the last update's phases on the compute stream (from events), when timing is on.
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseTimes {
    /// Both towers' forward passes (from the moment the content has arrived).
    pub forward: f64,
    /// The InfoNCE loss, forward and backward.
    pub loss: f64,
    /// Both towers' backward passes.
    pub backward: f64,
    /// Norm, clipping and Adam.
    pub optimizer: f64,
}

/// Device memory of a [`GpuTrainer`] in bytes.
#[derive(Clone, Copy, Debug)]
pub struct TrainerMemory {
    /// Parameters (fp32 and fp16), gradients, Adam's moments, the loss's buffers.
    pub parameters: usize,
    /// The user and item towers' activation arenas.
    pub activations: usize,
    /// The two content staging buffers.
    pub staging: usize,
}

/// The GPU training engine.
pub struct GpuTrainer<'a> {
    settings: StepSettings,
    store: &'a dyn ContentRows,
    model: GpuPch,
    user: Activations,
    item: Activations,
    buffers: Buffers,
    staging: [Staging; 2],
    /// The staging buffer of the next update.
    next: usize,
    readback: Pinned<f32>,
    loss_scale: LossScale,
    /// The scale the last update's gradients carry (what [`Self::gradients`] divides out).
    last_scale: f64,
    adam_step: u64,
    dropout_word_pos: u128,
    copy: Arc<CudaStream>,
    /// Events at the phase boundaries of an update, when [`GpuTrainer::time_phases`] asked for them.
    phase_events: Option<[CudaEvent; 5]>,
    _contents: DeviceBuffer,
    gpu: Gpu,
}

impl Drop for GpuTrainer<'_> {
    fn drop(&mut self) {
        // No copy or kernel may still use the pinned and device buffers being freed.
        let _ = self.copy.synchronize();
        let _ = self.gpu.sync();
    }
}

impl<'a> GpuTrainer<'a> {
    /// Opens `cuda:ordinal`, uploads the state and sizes every buffer for batches of `max_users` users of at
    /// most `settings.history` and `settings.targets` items, so nothing is allocated per update.
    pub fn new(
        ordinal: usize,
        settings: StepSettings,
        store: &'a dyn ContentRows,
        state: OptimState,
        max_users: usize,
    ) -> Result<Self> {
        let cfg = state.params.config().clone();
        check_trainable(&cfg, settings.targets)?;
        ensure!(
            store.dim() == cfg.d_content,
            "the store's rows are {}-d, the model's d_content {}",
            store.dim(),
            cfg.d_content
        );
        let gpu = Gpu::open(ordinal)?;
        let (b, h, t) = (max_users, settings.history, settings.targets);
        let model = GpuPch::new(&gpu, &state.params)?;
        let user = model.activations(&gpu, b * h, b)?;
        let item = model.activations(&gpu, b * t, b)?;

        // The largest InfoNCE layout: every user full, every target id distinct (the most bitmask words).
        let ids: Vec<u32> = (0..(b * t) as u32).collect();
        let full = InfoNceLayout::new(
            &vec![h; b],
            &vec![t; b],
            &ids,
            h,
            t,
            LossPositions::All,
            settings.keep_false_negatives,
            Rows::Packed,
        )?;
        let n = state.params.flat().len();
        let o = cfg.d_out;
        let mut plan = Layout::default();
        let offsets = [
            plan.take::<f32>(n),
            plan.take::<f32>(n),
            plan.take::<f32>(1 + AdamStats::LEN),
            plan.take::<f64>(gpu.adam_scratch_len(n)),
            plan.take::<f32>(b * h),
            plan.take::<f32>(b * h * o),
            plan.take::<f32>(b * t * o),
            plan.take::<f32>(b * h + b),
            plan.take::<f32>(b * t),
            plan.take::<u8>(full.device_bytes()),
        ];
        let buffer = gpu.alloc(plan.bytes(), "the optimiser state and the loss buffers")?;
        let buffers = Buffers {
            m: buffer.view(offsets[0], n),
            v: buffer.view(offsets[1], n),
            figures: buffer.view(offsets[2], 1 + AdamStats::LEN),
            adam_scratch: buffer.view(offsets[3], gpu.adam_scratch_len(n)),
            lse: buffer.view(offsets[4], b * h),
            d_users: buffer.view(offsets[5], b * h * o),
            d_items: buffer.view(offsets[6], b * t * o),
            nce_scratch: buffer.view(offsets[7], b * h + b),
            log_q: buffer.view(offsets[8], b * t),
            layout: buffer.view(offsets[9], full.device_bytes()),
            _buffer: buffer,
        };
        gpu.upload(buffers.m, &state.m)?;
        gpu.upload(buffers.v, &state.v)?;

        let content = b * (h + t) * cfg.d_content;
        let contents = gpu.alloc(2 * content * 2, "the content staging buffers")?;
        let staging = |i: usize| -> Result<Staging> {
            Ok(Staging {
                pinned: Pinned::new(&gpu.ctx, content)?,
                device: contents.view(i * content * 2, content),
                uploaded: gpu.ctx.new_event(None)?,
                consumed: gpu.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))?,
                batch: None,
            })
        };
        let staging = [staging(0)?, staging(1)?];
        let copy = gpu.ctx.new_stream()?;
        let readback = Pinned::new(&gpu.ctx, 1 + AdamStats::LEN)?;
        gpu.sync()?;
        let trainer = GpuTrainer {
            settings,
            store,
            model,
            user,
            item,
            buffers,
            staging,
            next: 0,
            readback,
            loss_scale: state.loss_scale,
            last_scale: state.loss_scale.scale,
            adam_step: state.adam_step,
            dropout_word_pos: state.dropout_word_pos,
            copy,
            phase_events: None,
            _contents: contents,
            gpu,
        };
        Ok(trainer)
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Records events between the phases of every update from now on (for benchmarks; they cost a few
    /// microseconds), read with [`Self::phase_times`].
    pub fn time_phases(&mut self) -> Result<()> {
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = || self.gpu.ctx.new_event(timed);
        self.phase_events = Some([event()?, event()?, event()?, event()?, event()?]);
        Ok(())
    }

    /// The phases of the last update, after its step returned.
    pub fn phase_times(&self) -> Result<Option<PhaseTimes>> {
        let Some(e) = &self.phase_events else { return Ok(None) };
        let ms = |a: usize| -> Result<f64> { Ok(e[a].elapsed_ms(&e[a + 1])? as f64) };
        Ok(Some(PhaseTimes { forward: ms(0)?, loss: ms(1)?, backward: ms(2)?, optimizer: ms(3)? }))
    }

    fn mark(&self, phase: usize) -> Result<()> {
        if let Some(events) = &self.phase_events {
            events[phase].record(&self.gpu.stream)?;
        }
        Ok(())
    }

    /// Device memory the trainer holds, by use.
    pub fn memory(&self) -> TrainerMemory {
        TrainerMemory {
            parameters: self.model.bytes() + self.buffers._buffer.bytes(),
            activations: self.user.bytes() + self.item.bytes(),
            staging: self._contents.bytes(),
        }
    }

    /// The gradients of the last update's loss (divided by its loss scale; clipping not applied), in the
    /// parameters' layout: for tests against the CPU reference.
    pub fn gradients(&self) -> Result<PchParams<f32>> {
        let mut grads = self.model.download_grads(&self.gpu)?;
        let inv = (1.0 / self.last_scale) as f32;
        grads.flat_mut().iter_mut().for_each(|g| *g *= inv);
        Ok(grads)
    }

    /// Gathers `users` into staging buffer `slot` on the host and starts its copy to the device.
    fn prepare(&mut self, slot: usize, users: &[&UserSequence]) -> Result<()> {
        let dc = self.store.dim();
        let (batch, packed) = Prepared::plan(&self.settings, users)?;
        let stage = &mut self.staging[slot];
        // The update that last read this buffer (two updates ago) is done with it and with its copy.
        stage.consumed.synchronize().context("waiting for a content staging buffer")?;
        let store = self.store;
        let rows = &mut stage.pinned.as_mut_slice()[..packed.len() * dc];
        rows.par_chunks_mut(dc).zip(&packed).for_each(|(out, &row)| store.read_row_f16(row as usize, out));
        stage.pinned.copy_to_device(stage.device, packed.len() * dc, &self.copy)?;
        stage.uploaded.record(&self.copy)?;
        stage.batch = Some(batch);
        Ok(())
    }

    /// Queues one update on the prepared batch in staging buffer `slot`; returns its pair count.
    fn launch(&mut self, slot: usize, lr: f64) -> Result<usize> {
        let (gpu, buf, s) = (&self.gpu, &self.buffers, &self.settings);
        let stage = &self.staging[slot];
        let batch = stage.batch.as_ref().context("GPU trainer: no prepared batch")?;
        let (dc, o) = (self.store.dim(), self.model.config().d_out);
        gpu.stream.wait(&stage.uploaded)?;
        self.mark(0)?;
        let content = |first: usize, rows: usize| GpuContent::PackedF16(stage.device.slice(first * dc, rows * dc));
        let (hr, tr) = (batch.history_rows, batch.target_rows);
        let users = self.model.forward(gpu, &mut self.user, content(0, hr), &batch.history, MaskKind::Causal)?;
        let items = self.model.forward(gpu, &mut self.item, content(hr, tr), &batch.targets, s.item_mask())?;

        self.mark(1)?;
        let nce = gpu.upload_infonce_layout(&batch.layout, buf.layout)?;
        let log_q = match &batch.log_q {
            Some(values) => {
                gpu.upload(buf.log_q, values)?;
                Some(buf.log_q.slice(0, values.len()))
            }
            None => None,
        };
        let scale = self.loss_scale.scale;
        let (loss, stats) = (buf.figures.slice(0, 1), buf.figures.slice(1, AdamStats::LEN));
        let (d_users, d_items) = (buf.d_users.slice(0, hr * o), buf.d_items.slice(0, tr * o));
        gpu.infonce(
            &nce,
            users,
            items,
            log_q,
            o,
            s.tau,
            scale as f32,
            loss,
            buf.lse,
            d_users,
            d_items,
            buf.nce_scratch,
        )?;
        self.mark(2)?;
        self.model.zero_grads(gpu)?;
        self.model.backward(gpu, &self.user, d_users)?;
        self.model.backward(gpu, &self.item, d_items)?;
        self.mark(3)?;
        // The packed content was read for the last time by the adaptor's weight gradient.
        stage.consumed.record(&gpu.stream)?;

        let (params, params16, grads) = self.model.buffers();
        let step = AdamStep { lr, t: self.adam_step + 1, loss_scale: scale, max_norm: s.clip_grad_norm };
        gpu.adam_step(params, buf.m, buf.v, params16, grads, stats, buf.adam_scratch, &s.adam, step)?;
        self.mark(4)?;
        self.readback.copy_from_device(buf.figures, 1 + AdamStats::LEN, &gpu.stream)?;
        self.last_scale = scale;
        Ok(batch.layout.pairs)
    }
}

impl StepEngine for GpuTrainer<'_> {
    fn step(&mut self, users: &[&UserSequence], next: Option<&[&UserSequence]>, lr: f64) -> Result<StepOutcome> {
        let slot = self.next;
        let ids: Vec<usize> = users.iter().map(|u| *u as *const UserSequence as usize).collect();
        if self.staging[slot].batch.as_ref().map(|b| &b.users) != Some(&ids) {
            self.prepare(slot, users)?;
        }
        let pairs = self.launch(slot, lr)?;
        self.staging[slot].batch = None;
        self.next = 1 - slot;
        // The host's share of the next update, while the GPU computes this one.
        if let Some(next) = next {
            self.prepare(self.next, next)?;
        }
        self.gpu.sync()?;
        let figures = self.readback.as_slice();
        let stats = AdamStats::from_device(&figures[1..])?;
        self.loss_scale.update(stats.skipped);
        if !stats.skipped {
            self.adam_step += 1;
        }
        Ok(StepOutcome { loss: figures[0] as f64, pairs, grad_norm: stats.grad_norm as f64, skipped: stats.skipped })
    }

    fn state(&self) -> Result<OptimState> {
        Ok(OptimState {
            params: self.model.download_params(&self.gpu)?,
            adam_step: self.adam_step,
            m: self.gpu.download(self.buffers.m)?,
            v: self.gpu.download(self.buffers.v)?,
            loss_scale: self.loss_scale,
            dropout_word_pos: self.dropout_word_pos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pch::config::ItemTower;
    use crate::train::batch::Batch;
    use crate::train::optim::AdamConfig;

    fn user(history: &[u32], targets: &[u32]) -> UserSequence {
        UserSequence { user: "u".into(), line: 1, history: history.to_vec(), targets: targets.to_vec() }
    }

    #[test]
    fn a_planned_batch_is_the_cpu_batch_packed() {
        let users = [
            user(&[1, 2, 3, 4, 5, 6], &[7, 8, 9]),
            user(&[9], &[3, 1, 2, 5]),
            user(&[4, 4, 2], &[7]),
            user(&[11, 12, 13, 14], &[9, 2]),
        ];
        let refs: Vec<&UserSequence> = users.iter().collect();
        let settings = StepSettings {
            history: 4,
            targets: 3,
            tau: 0.05,
            keep_false_negatives: false,
            positions: LossPositions::All,
            item_tower: ItemTower::Causal,
            clip_grad_norm: None,
            adam: AdamConfig::default(),
            seed: 0,
            log_q: Some((0..16).map(|i| -(i as f32)).collect()),
        };
        let (plan, packed) = Prepared::plan(&settings, &refs).unwrap();
        let cpu = Batch::assemble(&refs, 4, 3, None);
        let valid =
            |side: &crate::train::batch::Side| -> Vec<u32> { side.shape.valid_rows().map(|r| side.rows[r]).collect() };
        assert_eq!(packed, [valid(&cpu.history), valid(&cpu.targets)].concat());
        assert_eq!(packed[..plan.history_rows], [3, 4, 5, 6, 9, 4, 4, 2, 11, 12, 13, 14]);
        assert_eq!(
            (plan.history.clone(), plan.targets.clone()),
            (cpu.history.shape.clone(), cpu.targets.shape.clone())
        );
        assert_eq!((plan.history_rows, plan.target_rows), (12, 9));
        assert_eq!(plan.log_q.as_deref(), Some(&[-7.0, -8.0, -9.0, -3.0, -1.0, -2.0, -7.0, -9.0, -2.0][..]));

        // The same queries, columns and false negatives as the CPU's padded layout, at packed rows.
        let (hs, ts) = (&cpu.history.shape, &cpu.targets.shape);
        let padded = InfoNceLayout::new(
            &hs.lengths,
            &ts.lengths,
            &cpu.targets.rows,
            hs.len,
            ts.len,
            LossPositions::All,
            false,
            Rows::Padded,
        )
        .unwrap();
        let to_packed = |shape: &PchBatchShape| {
            let order: Vec<usize> = shape.valid_rows().collect();
            move |r: i32| order.iter().position(|&v| v == r as usize).unwrap() as i32
        };
        let (q, c) = (to_packed(hs), to_packed(ts));
        assert_eq!(plan.layout.q_row, padded.q_row.iter().map(|&r| q(r)).collect::<Vec<_>>());
        assert_eq!(plan.layout.c_row, padded.c_row.iter().map(|&r| c(r)).collect::<Vec<_>>());
        assert_eq!((plan.layout.ban.clone(), plan.layout.pairs), (padded.ban.clone(), padded.pairs));
        assert!(plan.layout.ban.iter().any(|&w| w != 0), "the batch shares items, so some columns are banned");
        assert_eq!((plan.layout.user_rows, plan.layout.item_rows), (12, 9));
    }
}
