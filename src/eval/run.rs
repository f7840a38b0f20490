//! `learn-kern eval` (SPEC §5): rank the gallery for every user by dot product of the towers' unit
//! embeddings and average H@K, R@K and N@K over users, beside a most-popular baseline.

use super::metrics::MetricsAccumulator;
use super::topk::{Hit, Popularity, top_k_block};
use super::towers::{item_embeddings, user_embeddings};
use crate::data::sequences::UserSequence;
use crate::embed::store::ContentStore;
use crate::pch::PchParams;
use anyhow::Result;
use rayon::prelude::*;

/// Users ranked per block on the CPU (one GEMM against the gallery per block).
const USER_BLOCK: usize = 1024;

pub struct EvalOptions {
    pub history: usize,
    pub ks: Vec<usize>,
    pub keep_history: bool,
    /// Store rows of the gallery, ascending (so ties fall to the lower item row).
    pub gallery: Vec<u32>,
    /// Interaction counts per gallery position for the most-popular baseline, when asked for.
    pub popularity: Option<Vec<u64>>,
}

pub struct EvalReport {
    pub users: usize,
    pub gallery: usize,
    pub model: Vec<(String, f64)>,
    pub popular: Option<Vec<(String, f64)>>,
}

/// A user's history and targets as gallery positions (targets outside the gallery counted as absent).
struct UserView {
    exclude: Vec<usize>,
    targets: Vec<usize>,
    absent: usize,
}

fn view(user: &UserSequence, position: &[Option<u32>], keep_history: bool) -> UserView {
    let exclude = if keep_history {
        Vec::new()
    } else {
        let mut e: Vec<usize> = user.history.iter().filter_map(|&r| position[r as usize].map(|p| p as usize)).collect();
        e.sort_unstable();
        e.dedup();
        e
    };
    let mut targets: Vec<usize> =
        user.targets.iter().filter_map(|&r| position[r as usize].map(|p| p as usize)).collect();
    targets.sort_unstable();
    targets.dedup();
    let mut all = user.targets.clone();
    all.sort_unstable();
    all.dedup();
    UserView { exclude, absent: all.len() - targets.len(), targets }
}

/// What ranks the gallery for blocks of users: the towers and top-K of one engine (the CPU reference here,
/// the GPU in [`super::gpu`]), holding the gallery's embeddings.
pub trait Ranker {
    /// Users per call of [`Ranker::rank`] that suit the engine.
    fn users_per_block(&self) -> usize;

    /// For each of `users`, the `k` best gallery positions, best first, leaving out that user's `exclude`
    /// positions (sorted).
    fn rank(&mut self, users: &[&UserSequence], k: usize, exclude: &[&[usize]]) -> Result<Vec<Vec<Hit<f32>>>>;
}

/// The CPU reference: towers through [`super::towers`], ranking with [`top_k_block`].
pub struct CpuRanker<'a> {
    params: &'a PchParams<f32>,
    store: &'a ContentStore,
    history: usize,
    gallery: Vec<f32>,
}

impl<'a> CpuRanker<'a> {
    /// Embeds the gallery (store rows `gallery`, in ranking order).
    pub fn new(params: &'a PchParams<f32>, store: &'a ContentStore, gallery: &[u32], history: usize) -> Result<Self> {
        Ok(CpuRanker { params, store, history, gallery: item_embeddings(params, store, gallery)? })
    }
}

impl Ranker for CpuRanker<'_> {
    fn users_per_block(&self) -> usize {
        USER_BLOCK
    }

    fn rank(&mut self, users: &[&UserSequence], k: usize, exclude: &[&[usize]]) -> Result<Vec<Vec<Hit<f32>>>> {
        let embeddings = user_embeddings(self.params, self.store, users, self.history)?;
        Ok(top_k_block(&embeddings, &self.gallery, self.params.config().d_out, k, exclude))
    }
}

/// Evaluates `params` on `users` (full histories and targets as in the file) on the CPU.
pub fn evaluate(
    params: &PchParams<f32>,
    store: &ContentStore,
    users: &[UserSequence],
    options: &EvalOptions,
) -> Result<EvalReport> {
    let mut ranker = CpuRanker::new(params, store, &options.gallery, options.history)?;
    evaluate_with(&mut ranker, store.len(), users, options)
}

/// Evaluates with `ranker` (built for `options.gallery` and `options.history`) on `users` from a store of
/// `store_len` items. Users are added to the averages in file order whatever the engine, so that equal
/// rankings give equal metrics.
pub fn evaluate_with(
    ranker: &mut dyn Ranker,
    store_len: usize,
    users: &[UserSequence],
    options: &EvalOptions,
) -> Result<EvalReport> {
    let mut position = vec![None; store_len];
    for (p, &row) in options.gallery.iter().enumerate() {
        position[row as usize] = Some(p as u32);
    }
    let mut model = MetricsAccumulator::new(&options.ks)?;
    let mut popular = options.popularity.as_ref().map(|_| MetricsAccumulator::new(&options.ks)).transpose()?;
    let ranking = options.popularity.as_ref().map(|counts| Popularity::new(counts));
    let k = model.max_k();
    for block in users.chunks(ranker.users_per_block().max(1)) {
        let refs: Vec<&UserSequence> = block.iter().collect();
        let views: Vec<UserView> = block.par_iter().map(|u| view(u, &position, options.keep_history)).collect();
        let excludes: Vec<&[usize]> = views.iter().map(|v| v.exclude.as_slice()).collect();
        let hits = ranker.rank(&refs, k, &excludes)?;
        for (v, user_hits) in views.iter().zip(&hits) {
            let ranked: Vec<usize> = user_hits.iter().map(|h| h.row).collect();
            model.add(&ranked, &v.targets, v.absent);
            if let (Some(acc), Some(rank)) = (popular.as_mut(), ranking.as_ref()) {
                let ranked: Vec<usize> = rank.top_k(k, &v.exclude).iter().map(|h| h.row).collect();
                acc.add(&ranked, &v.targets, v.absent);
            }
        }
    }
    Ok(EvalReport {
        users: users.len(),
        gallery: options.gallery.len(),
        model: model.averages(),
        popular: popular.map(|p| p.averages()),
    })
}
