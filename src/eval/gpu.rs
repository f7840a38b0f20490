//! `eval` and `infer` on the GPU: which engine a command's towers run on, and the GPU [`Ranker`] — towers
//! through [`GpuTowers`], the gallery's embeddings kept on the device, ranking with the top-K kernel.

use super::run::Ranker;
use super::topk::{Hit, top_k_block};
use crate::cli::Common;
use crate::cuda::Gpu;
use crate::cuda::gpu::gib;
use crate::cuda::memory::{Dev, DeviceBuffer};
use crate::cuda::topk::{GpuTopK, TOPK_MAX_K};
use crate::cuda::towers::{GpuTowers, default_budget};
use crate::data::sequences::UserSequence;
use crate::device::Device;
use crate::embed::store::ContentStore;
use crate::pch::PchParams;
use anyhow::Result;

/// Users per ranking call on the GPU: the top-K kernel wants many blocks of 128 users, and a block's keys
/// (users × K × 8 bytes) stay small.
const USER_BLOCK: usize = 32768;

/// The GPU and the model's towers on it, where `--device` picks a GPU and the GPU tower implements the
/// model; `None` for the CPU. With `--device auto` a model the GPU tower refuses (dropout, learned
/// positions, item-id input, …) runs on the CPU after a one-line notice; with an explicit `cuda` it is an
/// error naming the reason. `min_rows`: positions one tower pass must hold (the longest history).
pub fn open_towers(
    common: &Common,
    command: &str,
    params: &PchParams<f32>,
    min_rows: usize,
) -> Result<Option<(Gpu, GpuTowers)>> {
    let refused = || crate::cuda::pch::check_config(params.config());
    let ordinals = match crate::device::choose_for_job(common, command, refused)? {
        Device::Cpu => return Ok(None),
        Device::Cuda(list) => list,
    };
    if ordinals.len() > 1 {
        common.notice(format!("note: `{command}` runs on one GPU: cuda:{}", ordinals[0]));
    }
    let gpu = Gpu::open(ordinals[0])?;
    let budget = default_budget(&gpu)?;
    let towers = GpuTowers::new(&gpu, params, budget, min_rows)
        .map_err(|err| err.context(format!("--device {}", common.device)))?;
    Ok(Some((gpu, towers)))
}

/// Keeps the content store on the device when it takes at most half the free device memory, so that tower
/// passes (users' histories above all, whose items recur) gather their rows there; a store that does not fit
/// is gathered on the host pass by pass, said in one line.
pub fn keep_content_on_device(common: &Common, gpu: &Gpu, towers: &mut GpuTowers, store: &ContentStore) -> Result<()> {
    let (free, _) = gpu.memory()?;
    if !towers.keep_content_on_device(gpu, store, free / 2)? {
        common.notice(format!(
            "note: the content store ({}) does not fit in half the free device memory: tower passes gather it \
             on the host",
            gib(store.len() * store.dim() * 2)
        ));
    }
    Ok(())
}

/// The GPU engine of `eval`: the gallery embedded once into device memory, users embedded per block and
/// ranked by the top-K kernel (or, past its K limit, by the CPU top-K over the same embeddings).
pub struct GpuRanker<'a> {
    gpu: &'a Gpu,
    towers: &'a mut GpuTowers,
    store: &'a ContentStore,
    history: usize,
    gallery: Dev<f32>,
    _gallery: DeviceBuffer,
    topk: GpuTopK,
    /// The gallery's embeddings on the host, fetched the first time a K above the kernel's limit is asked.
    host_gallery: Option<Vec<f32>>,
}

impl<'a> GpuRanker<'a> {
    /// Embeds the gallery (store rows `gallery`, in ranking order) on the device.
    pub fn new(
        gpu: &'a Gpu,
        towers: &'a mut GpuTowers,
        store: &'a ContentStore,
        gallery: &[u32],
        history: usize,
    ) -> Result<Self> {
        let d = towers.config().d_out;
        let buffer = gpu.alloc(gallery.len().max(1) * d * 4, "the gallery's embeddings")?;
        let view = buffer.view::<f32>(0, gallery.len() * d);
        towers.item_embeddings_into(gpu, store, gallery, view)?;
        Ok(GpuRanker {
            gpu,
            towers,
            store,
            history,
            gallery: view,
            _gallery: buffer,
            topk: GpuTopK::new(),
            host_gallery: None,
        })
    }

    /// The gallery's embeddings `[gallery, d_out]`, from the device.
    pub fn gallery_embeddings(&self) -> Result<Vec<f32>> {
        self.gpu.download(self.gallery)
    }
}

impl Ranker for GpuRanker<'_> {
    fn users_per_block(&self) -> usize {
        USER_BLOCK
    }

    fn rank(&mut self, users: &[&UserSequence], k: usize, exclude: &[&[usize]]) -> Result<Vec<Vec<Hit<f32>>>> {
        let d = self.towers.config().d_out;
        let embeddings = self.towers.user_embeddings(self.gpu, self.store, users, self.history)?;
        if k <= TOPK_MAX_K && d.is_multiple_of(4) {
            return self.topk.top_k(self.gpu, &embeddings, self.gallery, d, k, exclude);
        }
        if self.host_gallery.is_none() {
            self.host_gallery = Some(self.gallery_embeddings()?);
        }
        let gallery = self.host_gallery.as_deref().unwrap_or_default();
        Ok(top_k_block(&embeddings, gallery, d, k, exclude))
    }
}
