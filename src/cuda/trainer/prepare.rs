//! The host's share of a training update: the batch planned from its users (padded to its shape bucket or
//! not) and everything the device needs for it laid out in one staging buffer, so that one copy carries it:
//! the pass's sequence offsets and attention tiles (both towers' in one table set), the InfoNCE layout,
//! log q, and the content rows (the user tower's, then the item tower's, one region). A CUDA
//! graph cannot capture a copy from pageable memory, and it freezes the addresses it reads: within a bucket
//! every array has the same size, so it lies at the same offset in the slot, update after update.

use super::ContentRows;
use crate::cpu::infonce::LossPositions;
use crate::cpu::masked_attention::MaskKind;
use crate::cuda::bucket::{BucketKey, PassShape, PassTables, TowerShape};
use crate::cuda::infonce::{InfoNceDev, InfoNceLayout, Rows};
use crate::cuda::memory::{Dev, Layout};
use crate::cuda::pch::PackedBatch;
use crate::data::sequences::UserSequence;
use crate::train::engine::StepSettings;
use anyhow::{Result, anyhow, ensure};
use half::f16;
use rayon::prelude::*;

/// Where each array of an update lies in a staging slot, and the bytes they take (one copy).
#[derive(Clone, Copy, Debug)]
pub(super) struct StagePlan {
    cu_seqlens: usize,
    tiles: usize,
    layout: usize,
    log_q: Option<usize>,
    /// The pass's content rows, `[rows, d_content]` fp16: each tower's real rows, then its dummy sequence's
    /// zeros, the user tower first.
    content: usize,
    pub bytes: usize,
}

impl StagePlan {
    /// The plan for a pass of `shape` whose item tower has `item_rows` rows, a layout of `layout_bytes`, and
    /// log q when given.
    pub fn new(shape: &PassShape, item_rows: usize, layout_bytes: usize, log_q: bool, dc: usize) -> Self {
        let mut plan = Layout::default();
        let (cu_seqlens, tiles) = (plan.take::<i32>(shape.seqs + 1), plan.take::<[i32; 2]>(shape.tiles));
        let layout = plan.take::<u8>(layout_bytes);
        let log_q = log_q.then(|| plan.take::<f32>(item_rows));
        let content = plan.take::<f16>(shape.rows * dc);
        StagePlan { cu_seqlens, tiles, layout, log_q, content, bytes: plan.bytes() }
    }
}

/// A batch gathered on the host and on its way to the device.
pub(super) struct Prepared {
    /// Identity of the users it holds (their addresses), to check it is the batch the loop trains next.
    pub users: Vec<usize>,
    /// Its shape bucket, when padded to one.
    pub key: Option<BucketKey>,
    /// The history and target towers as launched, and the pass of both with its tables.
    pub shapes: [TowerShape; 2],
    pass: PassShape,
    tables: PassTables,
    pub layout: InfoNceLayout,
    /// log q per launched target row (0 for the dummy rows), with `--logq-correction`.
    log_q: Option<Vec<f32>>,
    /// Store rows of the content: every history, then every target list, user by user.
    packed: Vec<u32>,
    pub plan: StagePlan,
}

impl Prepared {
    /// The host's plan of a batch: the store rows of the valid positions, packed, and what the device needs
    /// beside their content, padded to the batch's shape bucket when `padded`.
    pub fn plan(s: &StepSettings, users: &[&UserSequence], padded: bool, dc: usize) -> Result<Prepared> {
        let histories: Vec<&[u32]> = users.iter().map(|u| u.recent_history(s.history)).collect();
        let targets: Vec<&[u32]> = users.iter().map(|u| u.first_targets(s.targets)).collect();
        let lengths = |lists: &[&[u32]]| -> Vec<usize> { lists.iter().map(|l| l.len()).collect() };
        let (h_len, t_len) = (lengths(&histories), lengths(&targets));
        let packed: Vec<u32> = histories.iter().chain(&targets).flat_map(|l| l.iter().copied()).collect();
        let (h, t) = (TowerShape::exact(&h_len).len, TowerShape::exact(&t_len).len);
        let mut target_ids = vec![0u32; users.len() * t];
        for (b, list) in targets.iter().enumerate() {
            target_ids[b * t..b * t + list.len()].copy_from_slice(list);
        }
        let (positions, keep) = (s.positions, s.keep_false_negatives);
        let mut layout = InfoNceLayout::new(&h_len, &t_len, &target_ids, h, t, positions, keep, Rows::Packed)?;
        let shapes = match padded {
            true => [TowerShape::padded(&h_len, s.history)?, TowerShape::padded(&t_len, s.targets)?],
            false => [TowerShape::exact(&h_len), TowerShape::exact(&t_len)],
        };
        let key =
            padded.then(|| BucketKey { users: users.len(), history_rows: shapes[0].rows, target_rows: shapes[1].rows });
        if padded {
            let queries = match positions {
                LossPositions::All => shapes[0].rows,
                LossPositions::Last => users.len(),
            };
            layout.pad(queries, shapes[1].rows, shapes[0].rows, shapes[1].rows)?;
        }
        let history_rows = shapes[0].real_rows;
        let log_q = s.log_q.as_ref().map(|per_item| {
            let mut values: Vec<f32> = packed[history_rows..].iter().map(|&r| per_item[r as usize]).collect();
            values.resize(shapes[1].rows, 0.0);
            values
        });
        let pass = PassShape::new(&shapes[0], &shapes[1], s.item_mask() == MaskKind::Causal);
        let tables = pass.tables(&shapes[0].tables(&h_len)?, &shapes[1].tables(&t_len)?)?;
        let plan = StagePlan::new(&pass, shapes[1].rows, layout.device_bytes(), log_q.is_some(), dc);
        Ok(Prepared {
            users: users.iter().map(|u| *u as *const UserSequence as usize).collect(),
            key,
            shapes,
            pass,
            tables,
            layout,
            log_q,
            packed,
            plan,
        })
    }

    /// Staging bytes enough for any batch of at most `max_users` users: the plan of the largest bucket,
    /// every user with `s.history` and `s.targets` items (tile counts and table sizes only grow with the
    /// users and the padded rows, and an unpadded batch needs no more than its bucket).
    pub fn largest_bytes(s: &StepSettings, max_users: usize, dc: usize) -> Result<usize> {
        // Store row 0 everywhere: sizes do not depend on the items (the false-negative mask has a word per
        // column whatever it holds).
        let full =
            UserSequence { user: String::new(), line: 0, history: vec![0; s.history], targets: vec![0; s.targets] };
        let s = StepSettings { log_q: s.log_q.as_ref().map(|_| vec![0.0]), ..s.clone() };
        Ok(Prepared::plan(&s, &vec![&full; max_users], true, dc)?.plan.bytes)
    }

    /// Writes the update's arrays and content rows into `out` (a pinned staging slot of at least
    /// `plan.bytes` bytes, page-aligned), reading the rows from `store` on every core.
    pub fn fill(&self, out: &mut [u8], store: &dyn ContentRows) -> Result<()> {
        let p = &self.plan;
        ensure!(out.len() >= p.bytes, "staging: {} bytes for an update of {}", out.len(), p.bytes);
        let put = |out: &mut [u8], at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(out, p.cu_seqlens, bytemuck::cast_slice(&self.tables.cu_seqlens));
        put(out, p.tiles, bytemuck::cast_slice(&self.tables.tiles));
        self.layout.write(&mut out[p.layout..])?;
        if let (Some(at), Some(values)) = (p.log_q, &self.log_q) {
            put(out, at, bytemuck::cast_slice(values));
        }
        let dc = store.dim();
        let region = &mut out[p.content..p.content + self.pass.rows * dc * 2];
        let halves: &mut [f16] =
            bytemuck::try_cast_slice_mut(region).map_err(|e| anyhow!("staging: content rows misaligned ({e})"))?;
        let (history, targets) = self.packed.split_at(self.shapes[0].real_rows);
        let (user_tower, item_tower) = halves.split_at_mut(self.pass.split * dc);
        for ((tower, shape), rows) in [user_tower, item_tower].into_iter().zip(&self.shapes).zip([history, targets]) {
            let (real, dummy) = tower.split_at_mut(shape.real_rows * dc);
            real.par_chunks_mut(dc).zip(rows).for_each(|(row, &r)| store.read_row_f16(r as usize, row));
            // The dummy sequence reads zeros: finite activations, so its zero gradients stay exactly zero.
            dummy.fill(f16::ZERO);
        }
        Ok(())
    }

    /// The device views of the update, once `fill`'s bytes are in `region` (the slot's device copy).
    pub fn views(&self, region: Dev<u8>, dc: usize) -> Result<StepViews> {
        let (p, shape) = (&self.plan, self.pass);
        ensure!(region.len() >= p.bytes, "staging: a device slot of {} bytes for {}", region.len(), p.bytes);
        Ok(StepViews {
            pass: PackedBatch {
                content: region.slice(p.content, shape.rows * dc * 2).cast::<f16>(),
                cu_seqlens: region.slice(p.cu_seqlens, (shape.seqs + 1) * 4).cast::<i32>(),
                tiles: region.slice(p.tiles, shape.tiles * 8).cast::<[i32; 2]>(),
                shape,
            },
            item_rows: self.shapes[1].rows,
            nce: self.layout.on_device(region.slice(p.layout, self.layout.device_bytes()))?,
            log_q: p.log_q.map(|at| region.slice(at, self.shapes[1].rows * 4).cast::<f32>()),
        })
    }
}

/// Where an update's inputs lie on the device, as the launches read them.
pub(super) struct StepViews {
    /// Both towers, the user tower's rows first (`pass.shape.split` of them), then `item_rows` more.
    pub pass: PackedBatch,
    pub item_rows: usize,
    pub nce: InfoNceDev,
    pub log_q: Option<Dev<f32>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pch::PchBatchShape;
    use crate::pch::config::ItemTower;
    use crate::train::batch::Batch;
    use crate::train::optim::AdamConfig;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn user(history: &[u32], targets: &[u32]) -> UserSequence {
        UserSequence { user: "u".into(), line: 1, history: history.to_vec(), targets: targets.to_vec() }
    }

    fn settings(positions: LossPositions) -> StepSettings {
        StepSettings {
            history: 4,
            targets: 3,
            tau: 0.05,
            keep_false_negatives: false,
            positions,
            item_tower: ItemTower::Causal,
            clip_grad_norm: None,
            adam: AdamConfig::default(),
            seed: 0,
            log_q: Some((0..16).map(|i| -(i as f32)).collect()),
        }
    }

    fn users() -> Vec<UserSequence> {
        vec![
            user(&[1, 2, 3, 4, 5, 6], &[7, 8, 9]),
            user(&[9], &[3, 1, 2, 5]),
            user(&[4, 4, 2], &[7]),
            user(&[11, 12, 13, 14], &[9, 2]),
        ]
    }

    /// Content row r of the store is r + 1 in every column: the staging shows which row went where.
    struct Rows16;

    impl ContentRows for Rows16 {
        fn dim(&self) -> usize {
            8
        }

        fn read_row_f16(&self, row: usize, out: &mut [f16]) {
            out.fill(f16::from_f32(row as f32 + 1.0));
        }
    }

    #[test]
    fn a_planned_batch_is_the_cpu_batch_packed() {
        let users = users();
        let refs: Vec<&UserSequence> = users.iter().collect();
        let plan = Prepared::plan(&settings(LossPositions::All), &refs, false, 8).unwrap();
        let cpu = Batch::assemble(&refs, 4, 3, None);
        let valid =
            |side: &crate::train::batch::Side| -> Vec<u32> { side.shape.valid_rows().map(|r| side.rows[r]).collect() };
        assert_eq!(plan.packed, [valid(&cpu.history), valid(&cpu.targets)].concat());
        assert_eq!(plan.packed[..12], [3, 4, 5, 6, 9, 4, 4, 2, 11, 12, 13, 14]);
        assert_eq!(plan.key, None);
        let exact = |shape: &PchBatchShape| TowerShape::exact(&shape.lengths);
        assert_eq!(plan.shapes, [exact(&cpu.history.shape), exact(&cpu.targets.shape)]);
        assert_eq!((plan.shapes[0].rows, plan.shapes[1].rows), (12, 9));
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

    #[test]
    fn a_padded_batch_fills_its_bucket_and_stages_every_array_in_place() {
        let users = users();
        let refs: Vec<&UserSequence> = users.iter().collect();
        for positions in [LossPositions::All, LossPositions::Last] {
            let exact = Prepared::plan(&settings(positions), &refs, false, 8).unwrap();
            let plan = Prepared::plan(&settings(positions), &refs, true, 8).unwrap();
            assert_eq!(plan.key, Some(BucketKey { users: 4, history_rows: 64, target_rows: 64 }));
            assert_eq!(plan.packed, exact.packed);
            assert_eq!((plan.shapes[0].real_rows, plan.shapes[0].seqs, plan.shapes[0].len), (12, 5, 64));
            let queries = if positions == LossPositions::All { 64 } else { 4 };
            assert_eq!((plan.layout.q_row.len(), plan.layout.c_row.len(), plan.layout.words), (queries, 64, 2));
            assert_eq!((plan.layout.pairs, plan.layout.user_rows), (exact.layout.pairs, 64));
            let log_q = plan.log_q.as_deref().unwrap();
            assert_eq!((&log_q[..9], &log_q[9..]), (exact.log_q.as_deref().unwrap(), &[0.0; 55][..]));

            let mut out = vec![0xffu8; plan.plan.bytes];
            plan.fill(&mut out, &Rows16).unwrap();
            let p = &plan.plan;
            let i32s = |at: usize, n: usize| -> Vec<i32> {
                out[at..at + 4 * n].chunks_exact(4).map(bytemuck::pod_read_unaligned).collect()
            };
            // Both towers' sequences in one table, the targets' rows after the histories' 64.
            let offsets = [0, 4, 5, 8, 12, 64, 67, 70, 71, 73, 128];
            assert_eq!((plan.pass.seqs, i32s(p.cu_seqlens, 11)), (10, offsets.to_vec()));
            // Four users and the dummy, one tile each, in each tower: the bucket's most.
            let tiles = [0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 0, 9, 0];
            assert_eq!((plan.pass.tiles, i32s(p.tiles, 20)), (10, tiles.to_vec()));
            assert_eq!((plan.pass.split, plan.pass.diagonal, plan.pass.rows), (64, 128, 128));
            assert_eq!(i32s(p.layout, queries), plan.layout.q_row, "the layout's first array");
            let content = |row: usize| -> Vec<f32> {
                let at = p.content + row * 16;
                out[at..at + 16].chunks_exact(2).map(|h| bytemuck::pod_read_unaligned::<f16>(h).to_f32()).collect()
            };
            // History row 4 is user 1's single item 9 (content 10); row 12 on is the dummy's zeros; the first
            // target (item 7) at row 64, the targets' dummy from row 73.
            assert_eq!((content(4), content(12), content(63)), (vec![10.0; 8], vec![0.0; 8], vec![0.0; 8]));
            assert_eq!((content(64), content(73), content(127)), (vec![8.0; 8], vec![0.0; 8], vec![0.0; 8]));

            // A self-only item tower: the histories' tiles alone, the target rows diagonal.
            let s = StepSettings { item_tower: ItemTower::SelfOnly, ..settings(positions) };
            let own = Prepared::plan(&s, &refs, true, 8).unwrap();
            assert_eq!((own.pass.tiles, own.pass.diagonal, own.pass.seqs), (5, 64, 10));
            assert_eq!(own.tables.tiles[..], plan.tables.tiles[..5]);
            assert_eq!(own.tables.cu_seqlens, plan.tables.cu_seqlens);
        }
    }

    #[test]
    fn every_batch_fits_the_largest_bucket_s_staging() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for positions in [LossPositions::All, LossPositions::Last] {
            let s = StepSettings { history: 90, targets: 40, log_q: Some(vec![-1.0; 120]), ..settings(positions) };
            let largest = Prepared::largest_bytes(&s, 30, 8).unwrap();
            for _ in 0..200 {
                let n = rng.random_range(1..=30);
                let mut list = |max: usize| -> Vec<u32> { (0..rng.random_range(1..=max)).map(|i| i as u32).collect() };
                let users: Vec<UserSequence> = (0..n).map(|_| user(&list(120), &list(50))).collect();
                let refs: Vec<&UserSequence> = users.iter().collect();
                for padded in [false, true] {
                    let bytes = Prepared::plan(&s, &refs, padded, 8).unwrap().plan.bytes;
                    assert!(bytes <= largest, "{n} users, padded {padded}: {bytes} > {largest}");
                }
            }
        }
    }
}
