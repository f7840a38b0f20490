//! `CudaEncoder`: the embed job's encoder on one GPU (SPEC §2.5, §6).
//!
//! Two input slots alternate between batches. `submit` packs a batch (ids, positions, offsets, attention
//! tiles) into the slot's pinned staging buffer, copies it to the device on a copy stream, and queues the
//! forward pass on the compute stream behind an event that marks the copy done; the pooled embeddings are
//! copied back into the slot's pinned output buffer on the compute stream, and an event marks them ready.
//! Then `submit` waits for the previous batch's event (one host synchronisation per batch) and hands its
//! embeddings back. So the host packs and uploads batch i+1, and the job writes batch i to the store, while
//! the GPU computes; the device never waits for the host between batches. Nothing is allocated per batch:
//! the weights, the activation arena, the slots and their pinned mirrors are all made once here.

use super::Gpu;
use super::memory::{Dev, Pinned};
use super::model::{Activations, GpuModel};
use super::ops::attention_tiles;
use crate::embed::encoder::ContentEncoder;
use crate::error::input;
use crate::llm::Llm;
use anyhow::{Result, bail};
use cudarc::driver::{CudaEvent, CudaStream, sys};
use std::sync::Arc;

struct Slot {
    /// Host mirror of the device input slot, laid out as `Activations::input_layout`.
    staging: Pinned<u8>,
    /// Pooled embeddings `[seqs, D]` of the batch that used this slot.
    output: Pinned<f32>,
    seqs: usize,
    /// Recorded on the copy stream once the inputs are on the device.
    uploaded: CudaEvent,
    /// Recorded on the compute stream once the outputs are in `output` (and the inputs are consumed).
    done: CudaEvent,
}

/// Memory the encoder holds on its device, for reports.
#[derive(Clone, Copy, Debug)]
pub struct MemoryReport {
    pub weights: usize,
    pub arena: usize,
    /// total − free as the driver reports it once everything is allocated (includes the CUDA context,
    /// cuBLAS's workspace and the kernels' code).
    pub device_used: usize,
    pub device_total: usize,
}

pub struct CudaEncoder {
    // Drop order: slots (pinned memory, events) and the arena before the model, all before the GPU.
    slots: [Slot; 2],
    acts: Activations,
    model: GpuModel,
    copy: Arc<CudaStream>,
    /// The slot the next batch uses.
    next: usize,
    /// The slot whose batch is queued and not yet handed back.
    pending: Option<usize>,
    offsets: Vec<usize>,
    tiles: Vec<[i32; 2]>,
    memory: MemoryReport,
    gpu: Gpu,
}

// SAFETY: the encoder owns its GPU objects and is driven by one thread at a time (`&mut self`); every
// method binds the device's context to the calling thread before any CUDA call. Pinned buffers are plain
// host memory owned here.
unsafe impl Send for CudaEncoder {}

impl CudaEncoder {
    /// Opens `cuda:ordinal`, uploads the weights of `llm` (progress on stderr unless `quiet`) and sizes the
    /// arena for batches of up to `max_tokens` tokens.
    pub fn load(ordinal: usize, llm: &Llm, max_tokens: usize, quiet: bool) -> Result<Self> {
        let gpu = Gpu::open(ordinal)?;
        let model = GpuModel::load(&gpu, llm, quiet)?;
        Self::new(gpu, model, max_tokens)
    }

    /// An encoder around a model already on `gpu`.
    pub fn new(gpu: Gpu, model: GpuModel, max_tokens: usize) -> Result<Self> {
        if max_tokens == 0 {
            return Err(input("--batch-tokens must be at least 1"));
        }
        let acts = Activations::new(&gpu, &model.config, max_tokens)?;
        let d = model.config.hidden_size;
        let slot = || -> Result<Slot> {
            Ok(Slot {
                staging: Pinned::new(&gpu.ctx, acts.input_layout.bytes)?,
                output: Pinned::new(&gpu.ctx, max_tokens * d)?,
                seqs: 0,
                uploaded: gpu.ctx.new_event(None)?,
                // The host waits on this one once per batch: a blocking event lets it sleep instead of
                // spinning a core that the tokeniser threads could use.
                done: gpu.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))?,
            })
        };
        let slots = [slot()?, slot()?];
        let copy = gpu.ctx.new_stream()?;
        let (free, total) = gpu.memory()?;
        let memory = MemoryReport {
            weights: model.bytes(),
            arena: acts.bytes(),
            device_used: total - free,
            device_total: total,
        };
        Ok(CudaEncoder {
            slots,
            acts,
            model,
            copy,
            next: 0,
            pending: None,
            offsets: Vec::with_capacity(max_tokens + 1),
            tiles: Vec::new(),
            memory,
            gpu,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    pub fn memory(&self) -> MemoryReport {
        self.memory
    }

    /// Checks a batch as the CPU path does (the same bad input, the same messages) and lays it out in the
    /// next slot's staging buffer.
    fn pack(&mut self, seqs: &[&[u32]]) -> Result<(usize, usize)> {
        self.model.config.pack_offsets(seqs, &mut self.offsets)?;
        let tokens = self.offsets[seqs.len()];
        if tokens > self.acts.max_tokens {
            return Err(input(format!(
                "a batch of {tokens} tokens exceeds the {} the encoder was sized for (--batch-tokens)",
                self.acts.max_tokens
            )));
        }
        attention_tiles(&self.offsets, &mut self.tiles);
        let l = self.acts.input_layout;
        let staging = self.slots[self.next].staging.as_mut_slice();
        let ids: &mut [u32] = bytemuck::cast_slice_mut(&mut staging[l.ids..l.ids + 4 * tokens]);
        for (w, seq) in self.offsets.windows(2).zip(seqs) {
            ids[w[0]..w[1]].copy_from_slice(seq);
        }
        let pos: &mut [i32] = bytemuck::cast_slice_mut(&mut staging[l.positions..l.positions + 4 * tokens]);
        for w in self.offsets.windows(2) {
            for (p, slot) in pos[w[0]..w[1]].iter_mut().enumerate() {
                *slot = p as i32;
            }
        }
        let cu: &mut [i32] =
            bytemuck::cast_slice_mut(&mut staging[l.cu_seqlens..l.cu_seqlens + 4 * self.offsets.len()]);
        for (dst, &o) in cu.iter_mut().zip(&self.offsets) {
            *dst = o as i32;
        }
        let tiles: &mut [[i32; 2]] = bytemuck::cast_slice_mut(&mut staging[l.tiles..l.tiles + 8 * self.tiles.len()]);
        tiles.copy_from_slice(&self.tiles);
        Ok((tokens, seqs.len()))
    }

    /// Copies the embeddings of the batch in `slot` (once its event has fired) into `done`.
    fn collect(&mut self, slot: usize, done: &mut Vec<f32>) -> Result<()> {
        let s = &self.slots[slot];
        s.done.synchronize()?;
        let n = s.seqs * self.model.config.hidden_size;
        done.clear();
        done.extend_from_slice(&s.output.as_slice()[..n]);
        Ok(())
    }

    /// Queues the packed batch of the next slot: upload on the copy stream, forward and download on the
    /// compute stream.
    fn launch(&mut self, tokens: usize, seqs: usize) -> Result<()> {
        let index = self.next;
        let l = self.acts.input_layout;
        let device_slot: Dev<u8> = self.acts.inputs[index];
        let slot = &mut self.slots[index];
        // The copy may not overwrite inputs the batch before last (same slot) is still reading.
        self.copy.wait(&slot.done)?;
        slot.staging.copy_to_device(device_slot, l.bytes, &self.copy)?;
        slot.uploaded.record(&self.copy)?;
        self.gpu.stream.wait(&slot.uploaded)?;
        let batch = l.batch(device_slot, tokens, seqs, self.tiles.len());
        let pooled = self.model.forward(&self.gpu, &self.acts, &batch)?;
        let d = self.model.config.hidden_size;
        slot.output.copy_from_device(pooled, seqs * d, &self.gpu.stream)?;
        slot.done.record(&self.gpu.stream)?;
        slot.seqs = seqs;
        Ok(())
    }
}

impl ContentEncoder for CudaEncoder {
    fn dim(&self) -> usize {
        self.model.config.hidden_size
    }

    fn encode(&mut self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        if self.pending.is_some() {
            bail!("internal: encode() called with a batch still queued; flush() it first");
        }
        let mut out = Vec::new();
        self.submit(seqs, &mut out)?;
        self.flush(&mut out)?;
        Ok(out)
    }

    fn describe(&self) -> String {
        self.gpu.describe()
    }

    fn submit(&mut self, seqs: &[&[u32]], done: &mut Vec<f32>) -> Result<bool> {
        self.gpu.ctx.bind_to_thread()?;
        // The slot's previous batch was handed back before the one after it was queued, so its staging
        // and output buffers are free; the event makes sure even if that order ever changes.
        self.slots[self.next].done.synchronize()?;
        let (tokens, count) = self.pack(seqs)?;
        if let Err(err) = self.launch(tokens, count) {
            self.pending = None;
            return Err(err);
        }
        let previous = self.pending.replace(self.next);
        self.next ^= 1;
        match previous {
            Some(slot) => self.collect(slot, done).map(|_| true),
            None => Ok(false),
        }
    }

    fn flush(&mut self, done: &mut Vec<f32>) -> Result<bool> {
        self.gpu.ctx.bind_to_thread()?;
        match self.pending.take() {
            Some(slot) => self.collect(slot, done).map(|_| true),
            None => Ok(false),
        }
    }
}

impl Drop for CudaEncoder {
    fn drop(&mut self) {
        // Let queued copies finish before their pinned buffers are freed.
        let _ = self.gpu.ctx.bind_to_thread();
        let _ = self.copy.synchronize();
        let _ = self.gpu.stream.synchronize();
    }
}
