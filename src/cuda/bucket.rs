//! Shape buckets of the GPU training step (SPEC §6, issue 6): the arithmetic that lets one CUDA graph serve
//! every batch of similar shape. A graph freezes every launch's grid and arguments, so a replay needs the
//! same row counts, tile counts and table sizes as its capture. A bucket pads a batch to them:
//!
//! - each tower's packed rows go up to [`padded_rows`], the missing rows being one dummy sequence after the
//!   real ones (zero content; its output gradient is zero, so it adds exactly zero to every parameter
//!   gradient);
//! - the attention kernels launch over the most tiles any batch of the bucket can have
//!   ([`TowerShape::padded`]), the unused ones marked empty (sequence −1: their blocks return at once);
//! - the InfoNCE queries and columns pad to the towers' padded rows, whole 64-row tiles, with entries that
//!   the kernels treat as padding (row −1).
//!
//! Nothing here needs a GPU; the row maps and tiles built here are what the kernels trust.

use super::ops::{ATTENTION_TILE, attention_tiles, packed_offsets};
use anyhow::{Result, ensure};

/// Padded row counts are multiples of this: the attention and InfoNCE tiles. Finer buckets would leave
/// partial tiles; coarser ones would waste more work on padding (here under 64 rows a tower, 1.3% of the
/// 2,400 history rows of B 30, H 80) to save captures, which cost about one eager update each.
pub const ROW_QUANTUM: usize = 64;

/// The rows a bucket launches for `rows` packed rows. A padded count is its own bucket
/// (`padded_rows(padded_rows(r)) == padded_rows(r)`), which the two-pass reductions rely on: they split the
/// rows into blocks by the padded count (`Gpu::rows_per_block`), so padding never moves a real row into
/// another block and the sums keep their order.
pub fn padded_rows(rows: usize) -> usize {
    rows.next_multiple_of(ROW_QUANTUM)
}

/// What a captured graph is keyed by, with the staging buffer it reads: the number of users and each tower's
/// padded rows. Everything else a launch depends on follows from these and the trainer's settings (the
/// history and target lengths, which bound the tile counts, are fixed for a trainer's life).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub users: usize,
    pub history_rows: usize,
    pub target_rows: usize,
}

/// One tower's packed batch as its kernels are launched: `rows` rows (the real ones first) in `seqs`
/// sequences, positions numbered in a padded `[seqs, len]` layout by the row map, `tiles` attention tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TowerShape {
    pub rows: usize,
    pub real_rows: usize,
    pub seqs: usize,
    pub len: usize,
    pub tiles: usize,
}

/// A tower's tables as the kernels read them: packed row r is padded position `valid[r]`, sequence b is
/// rows `cu_seqlens[b] .. cu_seqlens[b + 1]`, and `tiles` the attention tiles (sequence, first row).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TowerTables {
    pub valid: Vec<i32>,
    pub cu_seqlens: Vec<i32>,
    pub tiles: Vec<[i32; 2]>,
}

impl TowerShape {
    /// The batch as it is: sequences of `lengths`, padded to the longest.
    pub fn exact(lengths: &[usize]) -> Self {
        let rows = lengths.iter().sum();
        let tiles = lengths.iter().map(|n| n.div_ceil(ATTENTION_TILE)).sum();
        let len = lengths.iter().copied().max().unwrap_or(0);
        TowerShape { rows, real_rows: rows, seqs: lengths.len(), len, tiles }
    }

    /// The bucket of sequences of `lengths`, each at most `max_len` long: rows padded by one dummy sequence
    /// (empty when none are missing) and the most tiles a batch of the bucket can have.
    pub fn padded(lengths: &[usize], max_len: usize) -> Result<Self> {
        ensure!(
            lengths.iter().all(|&n| (1..=max_len).contains(&n)),
            "a batch with sequence lengths outside 1..={max_len}"
        );
        let (users, real_rows) = (lengths.len(), lengths.iter().sum::<usize>());
        let rows = padded_rows(real_rows);
        // The dummy sequence holds fewer than 64 rows, so a padded length of at least 64 numbers its positions
        // too.
        let len = max_len.max(ROW_QUANTUM);
        Ok(TowerShape { rows, real_rows, seqs: users + 1, len, tiles: max_tiles(users, rows, max_len) })
    }

    /// The tables of sequences of `lengths`, padded as this shape says.
    pub fn tables(&self, lengths: &[usize]) -> Result<TowerTables> {
        let real: usize = lengths.iter().sum();
        ensure!(real == self.real_rows, "tower tables: {real} rows, the shape has {}", self.real_rows);
        let mut all = lengths.to_vec();
        if self.seqs > lengths.len() {
            all.push(self.rows - real);
        }
        ensure!(all.len() == self.seqs && all.iter().all(|&n| n <= self.len), "tower tables: lengths beyond the shape");
        let offsets = packed_offsets(&all);
        let mut tiles = Vec::with_capacity(self.tiles);
        attention_tiles(&offsets, &mut tiles);
        ensure!(tiles.len() <= self.tiles, "tower tables: {} tiles, the shape launches {}", tiles.len(), self.tiles);
        tiles.resize(self.tiles, [-1, -1]);
        let valid = all.iter().enumerate().flat_map(|(b, &n)| (0..n).map(move |i| (b * self.len + i) as i32)).collect();
        Ok(TowerTables { valid, cu_seqlens: offsets.iter().map(|&o| o as i32).collect(), tiles })
    }
}

/// A training pass: the user tower's sequences, then the item tower's, as one set of packed rows that one
/// forward and one backward take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassShape {
    /// Rows and sequences of both towers.
    pub rows: usize,
    pub seqs: usize,
    /// The user tower's rows, the first: the reductions sum them in blocks apart from the item tower's.
    pub split: usize,
    /// Causal attention tiles: the user tower's, then the item tower's when its mask is causal.
    pub tiles: usize,
    /// The first row of the diagonal mask: `rows` (none) for a causal item tower, `split` for a self-only
    /// one.
    pub diagonal: usize,
}

/// A pass's tables as the kernels read them: sequence b is rows `cu_seqlens[b] .. cu_seqlens[b + 1]`, and
/// `tiles` the causal attention tiles (sequence, first row within it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassTables {
    pub cu_seqlens: Vec<i32>,
    pub tiles: Vec<[i32; 2]>,
}

impl PassShape {
    /// The pass of the user tower `users` and the item tower `items`, causal or self-only.
    pub fn new(users: &TowerShape, items: &TowerShape, items_causal: bool) -> Self {
        let rows = users.rows + items.rows;
        let (tiles, diagonal) = match items_causal {
            true => (users.tiles + items.tiles, rows),
            false => (users.tiles, users.rows),
        };
        PassShape { rows, seqs: users.seqs + items.seqs, split: users.rows, tiles, diagonal }
    }

    /// The tables of the pass from each tower's ([`TowerShape::tables`]): the item tower's sequences
    /// numbered after the user tower's, its rows after theirs; its tiles only when it is causal (empty tiles,
    /// sequence −1, stay empty).
    pub fn tables(&self, users: &TowerTables, items: &TowerTables) -> Result<PassTables> {
        let (seqs, rows) = (users.cu_seqlens.len() - 1, *users.cu_seqlens.last().unwrap_or(&0));
        ensure!(rows as usize == self.split, "pass tables: a user tower of {rows} rows, the shape has {}", self.split);
        let mut cu_seqlens = users.cu_seqlens.clone();
        cu_seqlens.extend(items.cu_seqlens.iter().skip(1).map(|&o| o + rows));
        let mut tiles = users.tiles.clone();
        if self.diagonal == self.rows {
            let shift = |t: &[i32; 2]| if t[0] < 0 { *t } else { [t[0] + seqs as i32, t[1]] };
            tiles.extend(items.tiles.iter().map(shift));
        }
        ensure!(
            cu_seqlens.len() == self.seqs + 1 && tiles.len() == self.tiles,
            "pass tables: {} offsets and {} tiles for a shape of {} sequences and {} tiles",
            cu_seqlens.len(),
            tiles.len(),
            self.seqs,
            self.tiles
        );
        ensure!(cu_seqlens.last() == Some(&(self.rows as i32)), "pass tables: rows beyond the shape");
        Ok(PassTables { cu_seqlens, tiles })
    }
}

/// The most attention tiles of a bucket of `users` sequences of at most `max_len` rows, `rows` rows in all
/// with its dummy sequence. A sequence of n rows has ⌈n/64⌉ ≤ (n + 63)/64 tiles and at most ⌈max_len/64⌉;
/// the real rows are at most `rows`; the dummy sequence, under 64 rows, has at most one.
fn max_tiles(users: usize, rows: usize, max_len: usize) -> usize {
    let t = ATTENTION_TILE;
    ((rows + (t - 1) * users) / t).min(users * max_len.div_ceil(t)) + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn rows_pad_to_whole_tiles_and_a_padded_count_is_its_own_bucket() {
        for (rows, want) in [(0, 0), (1, 64), (64, 64), (65, 128), (2400, 2432), (3600, 3648)] {
            assert_eq!(padded_rows(rows), want, "{rows} rows");
        }
        for rows in 1..5000 {
            let p = padded_rows(rows);
            assert!(p >= rows && p - rows < 64 && p.is_multiple_of(ROW_QUANTUM), "{rows} → {p}");
            assert_eq!(padded_rows(p), p, "{rows} → {p} is not its own bucket");
        }
    }

    #[test]
    fn a_padded_tower_adds_one_dummy_sequence_and_empty_tiles() {
        let lengths = [5, 80, 1, 64, 65];
        let exact = TowerShape::exact(&lengths);
        assert_eq!(exact, TowerShape { rows: 215, real_rows: 215, seqs: 5, len: 80, tiles: 1 + 2 + 1 + 1 + 2 });
        let t = exact.tables(&lengths).unwrap();
        assert_eq!(t.cu_seqlens, [0, 5, 85, 86, 150, 215]);
        assert_eq!(t.valid[..7], [0, 1, 2, 3, 4, 80, 81]);
        assert_eq!(t.tiles.len(), 7);

        let shape = TowerShape::padded(&lengths, 80).unwrap();
        // 215 rows → 256: a dummy of 41 rows; tiles: min((256 + 63·5)/64, 5·2) + 1 = 8 + 1.
        assert_eq!(shape, TowerShape { rows: 256, real_rows: 215, seqs: 6, len: 80, tiles: 9 });
        assert_eq!(TowerShape::padded(&[1; 40], 80).unwrap().tiles, 41, "one tile a user, and the dummy's");
        let p = shape.tables(&lengths).unwrap();
        assert_eq!(p.cu_seqlens, [0, 5, 85, 86, 150, 215, 256]);
        assert_eq!(p.valid.len(), 256);
        assert_eq!(p.valid[..215], t.valid[..], "the real rows keep their positions");
        assert_eq!(p.valid[215..], (0..41).map(|i| 5 * 80 + i).collect::<Vec<_>>()[..]);
        assert_eq!(p.tiles.iter().filter(|t| t[0] == 5).count(), 1, "one tile for the dummy sequence");
        assert_eq!(&p.tiles[8..], &[[-1, -1]], "unused tiles are empty, after the real ones");

        // No row missing: the dummy sequence is empty, and has no tile.
        let full = TowerShape::padded(&[64, 64], 64).unwrap();
        let tables = full.tables(&[64, 64]).unwrap();
        assert_eq!((full.rows, full.seqs, tables.cu_seqlens.as_slice()), (128, 3, &[0, 64, 128, 128][..]));
        assert!(tables.tiles[2..].iter().all(|t| t[0] < 0));
        // Short histories: the dummy may outgrow them, so positions are numbered in rows of 64 at least.
        let short = TowerShape::padded(&[3, 2], 4).unwrap();
        assert_eq!((short.rows, short.len), (64, 64));
        assert_eq!(short.tables(&[3, 2]).unwrap().valid[5..7], [128, 129]);
        assert!(TowerShape::padded(&[3, 0], 4).is_err() && TowerShape::padded(&[5], 4).is_err());
    }

    #[test]
    fn every_batch_of_a_bucket_fits_its_tiles() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for _ in 0..2000 {
            let (users, max_len) = (rng.random_range(1..=40), rng.random_range(1..=300));
            let lengths: Vec<usize> = (0..users)
                .map(|_| if rng.random_bool(0.3) { max_len } else { rng.random_range(1..=max_len) })
                .collect();
            let shape = TowerShape::padded(&lengths, max_len).unwrap();
            let tables = shape.tables(&lengths).unwrap();
            assert_eq!(tables.valid.len(), shape.rows);
            assert_eq!(tables.tiles.len(), shape.tiles);
            assert!(tables.valid.iter().all(|&v| (v as usize) < shape.seqs * shape.len));
            // The same bucket for another batch of the same users and padded rows: the same launch.
            let other = TowerShape::padded(&vec![1; users], max_len).unwrap();
            if other.rows == shape.rows {
                assert_eq!(other, TowerShape { real_rows: users, ..shape });
            }
        }
    }
}
