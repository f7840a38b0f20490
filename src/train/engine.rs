//! One training update on either device. The loop in run.rs (batches, schedule, log, checkpoints, resume) is
//! the same for both; a [`StepEngine`] owns the parameters and the optimiser state and runs
//! forward → loss → backward → norm → Adam for one batch. [`CpuEngine`] is the reference (f32, the
//! hand-written backward of src/pch); the GPU engine is `crate::cuda::trainer::GpuTrainer`.
//!
//! Both read and write the same [`OptimState`], so a run saved on one device resumes on the other.

use super::batch::Batch;
use super::loss_scale::LossScale;
use super::optim::{Adam, AdamConfig, clip_grad_norm, grad_norm};
use crate::cpu::infonce::{InfoNceBatch, LossPositions, infonce};
use crate::cpu::masked_attention::MaskKind;
use crate::data::sequences::UserSequence;
use crate::embed::store::ContentStore;
use crate::pch::config::{InputKind, ItemTower};
use crate::pch::params::PchParams;
use crate::pch::{PchCache, backward, forward_reusing};
use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The ChaCha stream of the dropout masks (parameter initialisation uses its own streams).
const DROPOUT_STREAM: u64 = 1 << 40;

/// What one update did.
#[derive(Clone, Copy, Debug)]
pub struct StepOutcome {
    /// The batch's loss before the update.
    pub loss: f64,
    /// Valid (user, position, target) triples.
    pub pairs: usize,
    /// Global L2 norm of the (unscaled) gradients before clipping; not finite when `skipped`.
    pub grad_norm: f64,
    /// The fp16 gradients overflowed: nothing was applied (GPU only).
    pub skipped: bool,
}

/// Everything a run needs to continue exactly: parameters, Adam moments and update count, the loss scale
/// of the GPU path and the dropout RNG's position.
#[derive(Clone, Debug)]
pub struct OptimState {
    pub params: PchParams<f32>,
    /// Adam updates applied (the bias corrections' t).
    pub adam_step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub loss_scale: LossScale,
    pub dropout_word_pos: u128,
}

impl OptimState {
    /// A fresh optimiser over `params`.
    pub fn fresh(params: PchParams<f32>) -> Self {
        let n = params.flat().len();
        OptimState {
            params,
            adam_step: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
            loss_scale: LossScale::default(),
            dropout_word_pos: 0,
        }
    }
}

/// The settings of one update that do not depend on the device.
#[derive(Clone, Debug)]
pub struct StepSettings {
    pub history: usize,
    pub targets: usize,
    pub tau: f32,
    pub keep_false_negatives: bool,
    pub positions: LossPositions,
    pub item_tower: ItemTower,
    pub clip_grad_norm: Option<f64>,
    pub adam: AdamConfig,
    /// The dropout masks' seed (the run's `--seed`).
    pub seed: u64,
    /// log q(v) for every store row when `--logq-correction` is on.
    pub log_q: Option<Vec<f32>>,
}

impl StepSettings {
    /// The mask of the item tower: Variant 1 runs it causally over the targets, Variant 2 each item alone.
    pub fn item_mask(&self) -> MaskKind {
        match self.item_tower {
            ItemTower::Causal => MaskKind::Causal,
            ItemTower::SelfOnly => MaskKind::Diagonal,
        }
    }
}

/// A device that trains.
pub trait StepEngine {
    /// One update on `users` at learning rate `lr`. `next` is the batch that follows, which an engine may
    /// start gathering while this one computes.
    fn step(&mut self, users: &[&UserSequence], next: Option<&[&UserSequence]>, lr: f64) -> Result<StepOutcome>;

    /// The state to save (downloaded from the device where it lives there).
    fn state(&self) -> Result<OptimState>;
}

/// The CPU reference engine.
pub struct CpuEngine<'a> {
    settings: StepSettings,
    store: &'a ContentStore,
    params: PchParams<f32>,
    adam: Adam,
    grads: PchParams<f32>,
    user_cache: PchCache<f32>,
    item_cache: PchCache<f32>,
    dropout_rng: ChaCha8Rng,
    loss_scale: LossScale,
}

impl<'a> CpuEngine<'a> {
    pub fn new(settings: StepSettings, store: &'a ContentStore, state: OptimState) -> Result<Self> {
        let n = state.params.flat().len();
        let adam = Adam::restore(settings.adam, state.adam_step, vec![state.m], vec![state.v], &[n])?;
        let mut dropout_rng = ChaCha8Rng::seed_from_u64(settings.seed);
        dropout_rng.set_stream(DROPOUT_STREAM);
        dropout_rng.set_word_pos(state.dropout_word_pos);
        Ok(CpuEngine {
            grads: state.params.zeros_like(),
            params: state.params,
            adam,
            settings,
            store,
            user_cache: PchCache::default(),
            item_cache: PchCache::default(),
            dropout_rng,
            loss_scale: state.loss_scale,
        })
    }
}

impl CpuEngine<'_> {
    /// The last update's gradients (after clipping, when `--clip-grad-norm` is set).
    pub fn gradients(&self) -> &PchParams<f32> {
        &self.grads
    }
}

impl StepEngine for CpuEngine<'_> {
    fn step(&mut self, users: &[&UserSequence], _next: Option<&[&UserSequence]>, lr: f64) -> Result<StepOutcome> {
        let s = &self.settings;
        let cfg = self.params.config();
        let store = (cfg.input == InputKind::Content).then_some(self.store);
        let batch = Batch::assemble(users, s.history, s.targets, store);
        let dropout = cfg.dropout > 0.0;
        let rng = &mut self.dropout_rng;
        let (hist, tgt) = (&batch.history, &batch.targets);
        let u = forward_reusing(
            &self.params,
            hist.input(),
            &hist.shape,
            MaskKind::Causal,
            dropout.then_some(rng as &mut dyn rand::Rng),
            &mut self.user_cache,
        )?
        .to_vec();
        let v = forward_reusing(
            &self.params,
            tgt.input(),
            &tgt.shape,
            s.item_mask(),
            dropout.then_some(rng as &mut dyn rand::Rng),
            &mut self.item_cache,
        )?
        .to_vec();
        let (mut du, mut dv) = (vec![0.0f32; u.len()], vec![0.0f32; v.len()]);
        let log_q: Option<Vec<f32>> =
            s.log_q.as_ref().map(|per_item| tgt.rows.iter().map(|&r| per_item[r as usize]).collect());
        let loss = infonce(
            &InfoNceBatch {
                users: &u,
                hist_len: &hist.shape.lengths,
                items: &v,
                tgt_len: &tgt.shape.lengths,
                target_ids: &tgt.rows,
                h: hist.shape.len,
                t: tgt.shape.len,
                d: cfg.d_out,
                tau: s.tau,
                keep_false_negatives: s.keep_false_negatives,
                positions: s.positions,
                log_q: log_q.as_deref(),
            },
            &mut du,
            &mut dv,
        );
        let outcome = |grad_norm| StepOutcome { loss: loss.loss as f64, pairs: loss.pairs, grad_norm, skipped: false };
        if !loss.loss.is_finite() {
            return Ok(outcome(f64::NAN));
        }
        self.grads.fill_zero();
        backward(&self.params, &self.user_cache, &du, &mut self.grads);
        backward(&self.params, &self.item_cache, &dv, &mut self.grads);
        let norm = match s.clip_grad_norm {
            Some(max) => clip_grad_norm(&mut [self.grads.flat_mut()], max),
            None => grad_norm(&[self.grads.flat()]),
        };
        if norm.is_finite() {
            self.adam.update(&mut [self.params.flat_mut()], &[self.grads.flat()], lr);
        }
        Ok(outcome(norm))
    }

    fn state(&self) -> Result<OptimState> {
        Ok(OptimState {
            params: self.params.clone(),
            adam_step: self.adam.step,
            m: self.adam.m[0].clone(),
            v: self.adam.v[0].clone(),
            loss_scale: self.loss_scale,
            dropout_word_pos: self.dropout_rng.get_word_pos(),
        })
    }
}
