//! The PCH training step on one GPU (SPEC §4 with §6's precision): the [`StepEngine`] that
//! `train --device cuda` drives.
//!
//! One update, all queued on the compute stream with a single host synchronisation at the end (to read the
//! loss and the optimiser's figures):
//! ```text
//! the update's tables and content rows (packed fp16), staged in pinned memory, copied on the copy stream
//!   → one forward over both towers: the histories (causal), then the targets (causal or self-only)
//!   → InfoNCE over the packed outputs, gradients × loss scale into one [rows, d_out] gradient
//!   → one backward over both towers into the gradient buffer
//!   → global norm, overflow check, clipping, Adam on the fp32 masters, fresh fp16 copy
//! ```
//! The towers share the weights, so they run as one pass: the user tower's rows, then the item tower's, in
//! one arena. Each GEMM and kernel of the model then launches once per update instead of once per tower,
//! over all the rows; the weight gradients are one GEMM over them instead of two accumulated ones.
//! While the GPU runs an update, the host gathers the next batch into the other of two pinned buffers and
//! starts its copy into a landing buffer, so neither waits for the other; the update moves it from there to
//! the buffer its launches read (one device copy), which has the same address every time.
//!
//! [`Launch::Graphs`] (the default) pads each batch to its shape bucket (crate::cuda::bucket) and replays
//! the bucket's CUDA graph (graphs.rs): the host's work per update is then the staging, four copies (the
//! batch up and on to the inputs, the scalars up, the figures back), one graph launch and the
//! synchronisation. Everything that changes between the updates of a bucket is in
//! device memory: the staged tables, the loss scale and the pair count (InfoNCE's weights), the learning
//! rate and the bias corrections (Adam's scalars). Padding changes no result: the dummy rows get exactly
//! zero gradients, every kernel here gives the real rows the same bits padded or not (the reductions split
//! rows by the padded count), and tests/cuda_train_step.rs holds the padded step to the unpadded one bit for
//! bit on the emulator. The one thing outside this code is cuBLAS, which may pick another algorithm for a
//! padded GEMM shape and round differently (that test says so on a GPU); a graph replay is always the same
//! launches as the padded step made eagerly.
//!
//! An update whose scaled fp16 gradients overflow is skipped on the device (`adam_update` reads the flag
//! `grad_norm_finish` leaves), inside a replayed graph as well; the scale halves (see [`LossScale`]) and
//! Adam's update count does not move.

mod graphs;
mod prepare;

use super::Gpu;
use super::bucket::{BucketKey, padded_rows};
use super::infonce::{INFONCE_MAX_TARGETS, INFONCE_WIDTHS, infonce_scratch_len, infonce_weights};
use super::memory::{Dev, DeviceBuffer, Layout, Pinned};
use super::pch::{Activations, GpuPch, check_config};
use super::train_ops::{AdamStats, AdamStep};
use crate::bail_input;
use crate::data::sequences::UserSequence;
use crate::embed::store::ContentStore;
use crate::pch::{PchConfig, PchParams};
use crate::train::engine::{OptimState, StepEngine, StepOutcome, StepSettings};
use crate::train::loss_scale::LossScale;
use anyhow::{Context, Result, ensure};
use cudarc::driver::{CudaEvent, CudaStream, result, sys};
use graphs::Graphs;
pub use graphs::MAX_GRAPHS;
use half::f16;
use prepare::{Prepared, StepViews};
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

/// How the trainer launches an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// The host launches every kernel, at the batch's own shape.
    Eager,
    /// The host launches every kernel, at the batch's shape bucket: what a graph replays, without one.
    Bucketed,
    /// At the batch's shape bucket, replayed from the bucket's CUDA graph (captured on its first update).
    Graphs,
}

/// One of the two pinned staging buffers.
struct Staging {
    pinned: Pinned<u8>,
    /// The copy out of `pinned` is done (copy stream): the host may refill it.
    uploaded: CudaEvent,
    batch: Option<Prepared>,
}

/// Floats of the per-update scalars on the device: InfoNCE's two weights, then Adam's scalars.
const SCALARS: usize = 2 + AdamStep::SCALARS;

/// Optimiser and loss buffers, carved from one allocation.
struct Buffers {
    m: Dev<f32>,
    v: Dev<f32>,
    /// The loss, then the optimiser's stats ([`AdamStats::LEN`]): read back with one copy.
    figures: Dev<f32>,
    adam_scratch: Dev<f64>,
    lse: Dev<f32>,
    /// The loss's gradient for both towers' outputs, `[rows, d_out]` as the pass lays them out: the user
    /// tower's rows, then the item tower's.
    d_out: Dev<f32>,
    nce_scratch: Dev<f32>,
    _buffer: DeviceBuffer,
}

/// Milliseconds of the last update's phases on the compute stream (from events), when timing is on.
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseTimes {
    /// The forward pass over both towers (from the moment the content has arrived).
    pub forward: f64,
    /// The InfoNCE loss, forward and backward.
    pub loss: f64,
    /// The backward pass over both towers.
    pub backward: f64,
    /// Norm, clipping and Adam.
    pub optimizer: f64,
}

/// Device memory of a [`GpuTrainer`] in bytes.
#[derive(Clone, Copy, Debug)]
pub struct TrainerMemory {
    /// Parameters (fp32 and fp16), gradients, Adam's moments, the loss's buffers.
    pub parameters: usize,
    /// The activation arena of the pass over both towers.
    pub activations: usize,
    /// The device's staging buffers: where an update's copy lands, and where its launches read it.
    pub staging: usize,
}

/// The GPU training engine.
pub struct GpuTrainer<'a> {
    settings: StepSettings,
    store: &'a dyn ContentRows,
    max_users: usize,
    model: GpuPch,
    acts: Activations,
    buffers: Buffers,
    staging: [Staging; 2],
    /// The staging buffer of the next update.
    next: usize,
    /// Bytes an update may stage: the largest bucket's.
    capacity: usize,
    /// Where the copy stream lands an update's staged bytes, and where its launches read them, a device
    /// copy apart: the next update's copy overlaps this one's launches, whose addresses never change.
    landing: Dev<u8>,
    inputs: Dev<u8>,
    /// The landing buffer's bytes have moved on to `inputs` (compute stream): the next copy may land.
    landed: CudaEvent,
    /// The update's scalars ([`SCALARS`] floats), staged at the update itself: its loss scale is known only
    /// once the previous update's overflow flag has been read.
    scalars: Dev<f32>,
    scalars_pinned: Pinned<f32>,
    readback: Pinned<f32>,
    loss_scale: LossScale,
    /// The scale the last update's gradients carry (what [`Self::gradients`] divides out).
    last_scale: f64,
    adam_step: u64,
    dropout_word_pos: u128,
    launch: Launch,
    graphs: Graphs,
    copy: Arc<CudaStream>,
    /// Events at the phase boundaries of an update, when [`GpuTrainer::time_phases`] asked for them.
    phase_events: Option<[CudaEvent; 5]>,
    /// The last update recorded them (a graph replay records none).
    phases_timed: bool,
    _staging: DeviceBuffer,
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
    /// most `settings.history` and `settings.targets` items, padded to their shape bucket, so nothing is
    /// allocated per update. Updates replay CUDA graphs unless [`Self::set_launch`] says otherwise.
    pub fn new(
        ordinal: usize,
        settings: StepSettings,
        store: &'a dyn ContentRows,
        state: OptimState,
        max_users: usize,
    ) -> Result<Self> {
        let cfg = state.params.config().clone();
        check_trainable(&cfg, settings.targets)?;
        let dc = store.dim();
        ensure!(dc == cfg.d_content, "the store's rows are {dc}-d, the model's d_content {}", cfg.d_content);
        let gpu = Gpu::open(ordinal)?;
        let b = max_users;
        // The largest bucket: every user full, and each tower's dummy sequence.
        let (rows_h, rows_t) = (padded_rows(b * settings.history), padded_rows(b * settings.targets));
        let model = GpuPch::new(&gpu, &state.params)?;
        let acts = model.activations(&gpu, rows_h + rows_t, 2 * (b + 1))?;

        let n = state.params.flat().len();
        let o = cfg.d_out;
        let mut plan = Layout::default();
        // At most one InfoNCE query per history row and one column per target row (a padded bucket's, or
        // every row's without padding).
        let offsets = [
            plan.take::<f32>(n),
            plan.take::<f32>(n),
            plan.take::<f32>(1 + AdamStats::LEN),
            plan.take::<f64>(gpu.adam_scratch_len(n)),
            plan.take::<f32>(rows_h),
            plan.take::<f32>((rows_h + rows_t) * o),
            plan.take::<f32>(infonce_scratch_len(rows_h, rows_t, b, o)),
        ];
        let buffer = gpu.alloc(plan.bytes(), "the optimiser state and the loss buffers")?;
        let buffers = Buffers {
            m: buffer.view(offsets[0], n),
            v: buffer.view(offsets[1], n),
            figures: buffer.view(offsets[2], 1 + AdamStats::LEN),
            adam_scratch: buffer.view(offsets[3], gpu.adam_scratch_len(n)),
            lse: buffer.view(offsets[4], rows_h),
            d_out: buffer.view(offsets[5], (rows_h + rows_t) * o),
            nce_scratch: buffer.view(offsets[6], infonce_scratch_len(rows_h, rows_t, b, o)),
            _buffer: buffer,
        };
        gpu.upload(buffers.m, &state.m)?;
        gpu.upload(buffers.v, &state.v)?;

        let capacity = Prepared::largest_bytes(&settings, b, dc)?;
        let mut plan = Layout::default();
        let offsets = [plan.take::<u8>(capacity), plan.take::<u8>(capacity), plan.take::<f32>(SCALARS)];
        let staging_buffer = gpu.alloc(plan.bytes(), "the staging buffers")?;
        let blocking = Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC);
        let staging = |_| -> Result<Staging> {
            Ok(Staging {
                pinned: Pinned::new(&gpu.ctx, capacity)?,
                uploaded: gpu.ctx.new_event(blocking)?,
                batch: None,
            })
        };
        let staging = [staging(0)?, staging(1)?];
        let copy = gpu.ctx.new_stream()?;
        let (landed, scalars_pinned) = (gpu.ctx.new_event(None)?, Pinned::new(&gpu.ctx, SCALARS)?);
        let readback = Pinned::new(&gpu.ctx, 1 + AdamStats::LEN)?;
        gpu.sync()?;
        Ok(GpuTrainer {
            settings,
            store,
            max_users,
            model,
            acts,
            buffers,
            staging,
            next: 0,
            capacity,
            landing: staging_buffer.view(offsets[0], capacity),
            inputs: staging_buffer.view(offsets[1], capacity),
            landed,
            scalars: staging_buffer.view(offsets[2], SCALARS),
            scalars_pinned,
            readback,
            loss_scale: state.loss_scale,
            last_scale: state.loss_scale.scale,
            adam_step: state.adam_step,
            dropout_word_pos: state.dropout_word_pos,
            launch: Launch::Graphs,
            graphs: Graphs::default(),
            copy,
            phase_events: None,
            phases_timed: false,
            _staging: staging_buffer,
            gpu,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// How updates launch from now on.
    pub fn set_launch(&mut self, launch: Launch) {
        self.launch = launch;
    }

    /// CUDA graphs captured so far: one per shape bucket met (at most [`MAX_GRAPHS`]).
    pub fn graphs_captured(&self) -> usize {
        self.graphs.len()
    }

    /// Records events between the phases of every update from now on (for benchmarks; they cost a few
    /// microseconds), read with [`Self::phase_times`].
    pub fn time_phases(&mut self) -> Result<()> {
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = || self.gpu.ctx.new_event(timed);
        self.phase_events = Some([event()?, event()?, event()?, event()?, event()?]);
        Ok(())
    }

    /// The phases of the last update, after its step returned; `None` for a graph replay, whose launches
    /// no event can fall between.
    pub fn phase_times(&self) -> Result<Option<PhaseTimes>> {
        let Some(e) = self.phase_events.as_ref().filter(|_| self.phases_timed) else { return Ok(None) };
        let ms = |a: usize| -> Result<f64> { Ok(e[a].elapsed_ms(&e[a + 1])? as f64) };
        Ok(Some(PhaseTimes { forward: ms(0)?, loss: ms(1)?, backward: ms(2)?, optimizer: ms(3)? }))
    }

    /// Device memory the trainer holds, by use.
    pub fn memory(&self) -> TrainerMemory {
        TrainerMemory {
            parameters: self.model.bytes() + self.buffers._buffer.bytes(),
            activations: self.acts.bytes(),
            staging: self._staging.bytes(),
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
        if users.is_empty() || users.len() > self.max_users {
            bail_input!("GPU trainer: a batch of {} users; it was sized for 1 to {}", users.len(), self.max_users);
        }
        let padded = self.launch != Launch::Eager;
        let batch = Prepared::plan(&self.settings, users, padded, self.store.dim())?;
        let bytes = batch.plan.bytes;
        ensure!(bytes <= self.capacity, "GPU trainer: {bytes} staged bytes, beyond the {} planned", self.capacity);
        let stage = &mut self.staging[slot];
        // The copy that last read this buffer (two updates ago) is done with it.
        stage.uploaded.synchronize().context("waiting for a staging buffer")?;
        batch.fill(&mut stage.pinned.as_mut_slice()[..bytes], self.store)?;
        // The landing buffer's last batch has moved on to the launches' inputs.
        self.copy.wait(&self.landed)?;
        stage.pinned.copy_to_device(self.landing, bytes, &self.copy)?;
        stage.uploaded.record(&self.copy)?;
        stage.batch = Some(batch);
        Ok(())
    }

    /// Queues one update on the prepared batch in staging buffer `slot`; returns its pair count.
    fn launch_update(&mut self, slot: usize, lr: f64) -> Result<usize> {
        let batch = self.staging[slot].batch.take().context("GPU trainer: no prepared batch")?;
        let scale = self.loss_scale.scale;
        let step = AdamStep { lr, t: self.adam_step + 1, loss_scale: scale };
        let scalars = self.scalars_pinned.as_mut_slice();
        scalars[..2].copy_from_slice(&infonce_weights(batch.layout.pairs, scale)?);
        scalars[2..].copy_from_slice(&step.scalars(&self.settings.adam)?);
        let gpu = &self.gpu;
        self.scalars_pinned.copy_to_device(self.scalars, SCALARS, &gpu.stream)?;
        gpu.stream.wait(&self.staging[slot].uploaded)?;
        gpu.ctx.bind_to_thread()?;
        // SAFETY: both ranges lie in the staging allocation, `capacity` ≥ plan.bytes each (checked in
        // prepare); the copy is ordered after the landing copy (the wait above) and before the launches.
        unsafe {
            result::memcpy_dtod_async(self.inputs.ptr(), self.landing.ptr(), batch.plan.bytes, gpu.stream.cu_stream())
        }?;
        self.landed.record(&gpu.stream)?;
        let views = batch.views(self.inputs, self.store.dim())?;
        self.phases_timed = false;
        self.run(&views, batch.key)?;
        self.readback.copy_from_device(self.buffers.figures, 1 + AdamStats::LEN, &self.gpu.stream)?;
        self.last_scale = scale;
        Ok(batch.layout.pairs)
    }

    /// Runs the update: the bucket's graph (captured now if it is the bucket's first), or the launches one
    /// by one (eagerly, past [`MAX_GRAPHS`], or once a capture has failed).
    fn run(&mut self, views: &StepViews, key: Option<BucketKey>) -> Result<()> {
        let key = match key {
            Some(key) if self.launch == Launch::Graphs => key,
            _ => return self.queue(views, true),
        };
        if self.graphs.get(&key).is_none() {
            if !self.graphs.room() {
                return self.queue(views, true);
            }
            let stream = self.gpu.stream.clone();
            match graphs::capture(&stream, || self.queue(views, false)) {
                Ok(graph) => self.graphs.insert(key, graph),
                Err(err) => {
                    eprintln!("warning: CUDA graphs are off for the rest of the run: {err:#}");
                    self.launch = Launch::Bucketed;
                    return self.queue(views, true);
                }
            }
        }
        let graph = self.graphs.get(&key).context("GPU trainer: a graph captured and gone")?;
        graph.launch().context("launching the training step's CUDA graph")?;
        Ok(())
    }

    /// Queues the update's launches on the compute stream, with the phase events when `timed` (not while
    /// capturing: an event recorded into a graph times nothing).
    fn queue(&mut self, v: &StepViews, timed: bool) -> Result<()> {
        self.phases_timed = timed && self.phase_events.is_some();
        let (gpu, buf, s) = (&self.gpu, &self.buffers, &self.settings);
        let events = self.phase_events.as_ref().filter(|_| timed);
        let mark = |phase: usize| -> Result<()> {
            if let Some(events) = events {
                events[phase].record(&gpu.stream)?;
            }
            Ok(())
        };
        let o = self.model.config().d_out;
        mark(0)?;
        let out = self.model.forward_packed(gpu, &mut self.acts, &v.pass)?;
        mark(1)?;
        let (loss, stats) = (buf.figures.slice(0, 1), buf.figures.slice(1, AdamStats::LEN));
        // The user embeddings are the pass's first rows, the item embeddings the rest; their gradients
        // likewise, so that one backward takes both.
        let (user_rows, item_rows) = (v.pass.shape.split, v.item_rows);
        ensure!(user_rows + item_rows == v.pass.shape.rows, "GPU trainer: a pass of another shape");
        let d_out = buf.d_out.slice(0, v.pass.shape.rows * o);
        let (users, items) = (out.slice(0, user_rows * o), out.slice(user_rows * o, item_rows * o));
        let (d_users, d_items) = (d_out.slice(0, user_rows * o), d_out.slice(user_rows * o, item_rows * o));
        let weights = self.scalars.slice(0, 2);
        let scratch = buf.nce_scratch;
        gpu.infonce(&v.nce, users, items, v.log_q, o, s.tau, weights, loss, buf.lse, d_users, d_items, scratch)?;
        mark(2)?;
        self.model.backward(gpu, &self.acts, d_out)?;
        mark(3)?;
        let (params, params16, grads) = self.model.buffers();
        let adam = self.scalars.slice(2, AdamStep::SCALARS);
        let (max_norm, scratch) = (s.clip_grad_norm, buf.adam_scratch);
        gpu.adam_step(params, buf.m, buf.v, params16, grads, stats, scratch, adam, &s.adam, max_norm)?;
        mark(4)
    }
}

impl StepEngine for GpuTrainer<'_> {
    fn step(&mut self, users: &[&UserSequence], next: Option<&[&UserSequence]>, lr: f64) -> Result<StepOutcome> {
        let slot = self.next;
        let ids: Vec<usize> = users.iter().map(|u| *u as *const UserSequence as usize).collect();
        let padded = self.launch != Launch::Eager;
        let staged = self.staging[slot].batch.as_ref().is_some_and(|b| b.users == ids && b.key.is_some() == padded);
        if !staged {
            self.prepare(slot, users)?;
        }
        let pairs = self.launch_update(slot, lr)?;
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
