//! The gallery top-K kernel (kernels/topk.cu, src/cuda/topk.rs) against the CPU top-K of src/eval/topk.rs:
//! random unit embeddings over user counts and gallery sizes that fill a user block or not, galleries shorter
//! than K and not a multiple of the 64-row chunk, K from 1 to the kernel's 256, widths below, at and past the
//! 64-column slab, galleries split into parts (the merge kernel), with and without exclusions; exact
//! agreement (rows and bit-equal scores) on grid-valued embeddings whose products are exact, with many tied
//! scores, duplicate gallery rows (and whatever ties random rows make) and NaN rows; and the refusals. The
//! output buffers are poisoned before every launch (GpuTopK does it). Without a GPU each test says why and
//! skips.

mod cuda_support;

use cuda_support::{gpu, real_gpu, rng, upload};
use learn_kern::cuda::Gpu;
use learn_kern::cuda::topk::{GpuTopK, TOPK_MAX_K, plan};
use learn_kern::error::is_input_error;
use learn_kern::eval::topk::{Hit, top_k_block};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// fp32 products summed in another order than the CPU's: a score is within this of its f64 value.
const SCORE_TOL: f64 = 1e-5;

fn unit_rows(rng: &mut ChaCha8Rng, n: usize, d: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    for row in v.chunks_mut(d) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Per user: 0..40 rows in any order, some repeated, some past the gallery (ignored by both).
fn random_exclusions(rng: &mut ChaCha8Rng, users: usize, m: usize) -> Vec<Vec<usize>> {
    (0..users)
        .map(|_| {
            let n = rng.random_range(0..40);
            let mut e: Vec<usize> = (0..n).map(|_| rng.random_range(0..m + 10)).collect();
            if n > 2 {
                e.push(e[0]);
            }
            e
        })
        .collect()
}

fn views(lists: &[Vec<usize>]) -> Vec<&[usize]> {
    lists.iter().map(|e| e.as_slice()).collect()
}

fn gpu_top_k(
    gpu: &Gpu,
    top: &mut GpuTopK,
    users: &[f32],
    gallery: &[f32],
    d: usize,
    k: usize,
    exclude: &[&[usize]],
) -> Vec<Vec<Hit<f32>>> {
    let (_buffer, dev) = upload(gpu, gallery);
    top.top_k(gpu, users, dev, d, k, exclude).unwrap()
}

/// The GPU's lists against the CPU's and against the definition in f64: same lengths (min(k, admissible
/// rows)); distinct admissible rows; scores within SCORE_TOL of the f64 products; best first with equal
/// scores by row; nothing left out that beats the last kept by more than SCORE_TOL; and the CPU's rows
/// exactly, except where a difference is between scores within SCORE_TOL (summation order). Returns how many
/// users differed from the CPU that way.
#[allow(clippy::too_many_arguments)]
fn check(
    got: &[Vec<Hit<f32>>],
    want: &[Vec<Hit<f32>>],
    users: &[f32],
    gallery: &[f32],
    d: usize,
    k: usize,
    exclude: &[&[usize]],
    what: &str,
) -> usize {
    let m = gallery.len() / d;
    assert_eq!(got.len(), want.len(), "{what}: users");
    let mut near_ties = 0;
    for (u, (g, w)) in got.iter().zip(want).enumerate() {
        let user = &users[u * d..(u + 1) * d];
        let exact: Vec<f64> =
            gallery.chunks_exact(d).map(|row| row.iter().zip(user).map(|(a, b)| *a as f64 * *b as f64).sum()).collect();
        let mut allowed = vec![true; m];
        exclude[u].iter().filter(|&&r| r < m).for_each(|&r| allowed[r] = false);
        let admissible = allowed.iter().filter(|&&a| a).count();
        assert_eq!(g.len(), k.min(admissible), "{what}: user {u}: list length");
        assert_eq!(w.len(), g.len(), "{what}: user {u}: the CPU's list length");
        let mut seen = vec![false; m];
        for (i, hit) in g.iter().enumerate() {
            assert!(hit.row < m && allowed[hit.row] && !seen[hit.row], "{what}: user {u}: hit {i} {hit:?}");
            seen[hit.row] = true;
            let err = (hit.score as f64 - exact[hit.row]).abs();
            assert!(err <= SCORE_TOL, "{what}: user {u}: hit {i} {hit:?}, exact {}", exact[hit.row]);
            if let Some(next) = g.get(i + 1) {
                assert!(
                    hit.score > next.score || (hit.score == next.score && hit.row < next.row),
                    "{what}: user {u}: {hit:?} before {next:?}"
                );
            }
        }
        if let Some(last) = g.last() {
            let floor = exact[last.row] + SCORE_TOL;
            let missed = (0..m).find(|&r| allowed[r] && !seen[r] && exact[r] > floor);
            assert!(missed.is_none(), "{what}: user {u}: row {missed:?} beats the last kept {last:?}");
        }
        let (gr, wr): (Vec<usize>, Vec<usize>) = (g.iter().map(|h| h.row).collect(), w.iter().map(|h| h.row).collect());
        if gr != wr {
            let i = gr.iter().zip(&wr).position(|(a, b)| a != b).unwrap();
            let gap = (exact[gr[i]] - exact[wr[i]]).abs();
            assert!(
                gap <= SCORE_TOL,
                "{what}: user {u}: position {i}: GPU row {}, CPU row {} ({gap:e} apart)",
                gr[i],
                wr[i]
            );
            near_ties += 1;
        }
    }
    eprintln!("{what}: {} users agree with the CPU, {near_ties} differ within a near tie", got.len() - near_ties);
    near_ties
}

#[test]
fn matches_the_cpu_on_random_unit_embeddings() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("top-K random");
    let mut top = GpuTopK::new();
    // (users, gallery, d, k): G < K; a single row; K = 1; two user blocks (one user in the second) over a
    // gallery that is no multiple of 64; galleries split into parts (merged by topk_merge) with K = 100 and
    // the largest K; widths under one slab, and of two slabs with a partial second.
    let cases = [
        (3, 5, 64, 10),
        (1, 1, 64, 1),
        (200, 1000, 64, 1),
        (129, 4099, 64, 100),
        (300, 20_001, 64, 100),
        (50, 40_000, 64, TOPK_MAX_K),
        (70, 3000, 16, 20),
        (70, 3000, 96, 20),
        (40, 2000, 132, 50),
    ];
    let mut near_ties = 0;
    let mut total = 0;
    for (n, m, d, k) in cases {
        let splits = plan(gpu.multiprocessors, n, m).splits;
        let users = unit_rows(&mut rng, n, d);
        let gallery = unit_rows(&mut rng, m, d);
        let none = vec![Vec::new(); n];
        let some = random_exclusions(&mut rng, n, m);
        for (exclude, label) in [(&none, "no exclusions"), (&some, "exclusions")] {
            let what = format!("{n} users × {m} rows × d {d}, k {k}, {splits} part(s), {label}");
            let got = gpu_top_k(&gpu, &mut top, &users, &gallery, d, k, &views(exclude));
            let want = top_k_block(&users, &gallery, d, k, &views(exclude));
            near_ties += check(&got, &want, &users, &gallery, d, k, &views(exclude), &what);
            total += n;
        }
    }
    // Near ties at the 1e-7 level are rare among random unit vectors: a handful at most.
    assert!(near_ties * 100 <= total, "{near_ties} of {total} users differ from the CPU");
}

#[test]
fn a_user_can_exclude_all_but_a_few_rows_or_everything() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("top-K exclusions");
    let (n, m, d, k) = (4, 300, 64, 50);
    let users = unit_rows(&mut rng, n, d);
    let gallery = unit_rows(&mut rng, m, d);
    let exclude = vec![(3..m).rev().collect(), (0..m).collect(), vec![], (0..m).filter(|r| r % 7 != 0).collect()];
    let got = gpu_top_k(&gpu, &mut GpuTopK::new(), &users, &gallery, d, k, &views(&exclude));
    let want = top_k_block(&users, &gallery, d, k, &views(&exclude));
    assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 0, 50, 43]);
    check(&got, &want, &users, &gallery, d, k, &views(&exclude), "exclusions of nearly everything");
}

/// Coordinates on a 1/8 grid: every product and partial sum is exact in fp32, so the GPU and the CPU compute
/// bit-equal scores whatever their order, and ties are exact.
fn grid_rows(rng: &mut ChaCha8Rng, n: usize, d: usize) -> Vec<f32> {
    (0..n * d).map(|_| rng.random_range(-4i32..=4) as f32 / 8.0).collect()
}

#[test]
fn equals_the_cpu_exactly_when_scores_are_exact_ties_and_nans_included() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("top-K exact");
    let mut top = GpuTopK::new();
    for (n, m, d, k) in [(150, 3000, 8, 100), (20, 20_000, 64, 256), (9, 700, 64, 1), (5, 40, 64, 60)] {
        let users = grid_rows(&mut rng, n, d);
        let mut gallery = grid_rows(&mut rng, m, d);
        // Duplicate rows (equal scores everywhere) and rows with a NaN (NaN scores, ranked after numbers).
        for _ in 0..m / 10 {
            let (a, b) = (rng.random_range(0..m), rng.random_range(0..m));
            let row: Vec<f32> = gallery[a * d..(a + 1) * d].to_vec();
            gallery[b * d..(b + 1) * d].copy_from_slice(&row);
        }
        for _ in 0..(m / 100).max(2) {
            let r = rng.random_range(0..m);
            gallery[r * d + rng.random_range(0..d)] = f32::NAN;
        }
        let exclude = random_exclusions(&mut rng, n, m);
        let got = gpu_top_k(&gpu, &mut top, &users, &gallery, d, k, &views(&exclude));
        let want = top_k_block(&users, &gallery, d, k, &views(&exclude));
        for (u, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len(), "{n} × {m}, d {d}, k {k}: user {u}");
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    a.row == b.row
                        && (a.score.to_bits() == b.score.to_bits() || (a.score.is_nan() && b.score.is_nan())),
                    "{n} × {m}, d {d}, k {k}: user {u}, hit {i}: GPU {a:?}, CPU {b:?}"
                );
            }
        }
        let ties = got.iter().flat_map(|g| g.windows(2)).filter(|w| w[0].score == w[1].score).count();
        eprintln!("{n} × {m}, d {d}, k {k}: exact match, {ties} tied neighbours");
    }
}

#[test]
fn duplicate_gallery_rows_rank_the_lower_row_first() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("top-K duplicates");
    let (n, d, k) = (30, 64, 40);
    let base = unit_rows(&mut rng, 500, d);
    // Row 500 + i repeats row i: equal fp32 scores, computed the same way on the GPU.
    let gallery = [base.clone(), base].concat();
    let users = unit_rows(&mut rng, n, d);
    let exclude: Vec<Vec<usize>> = (0..n).map(|u| if u % 3 == 0 { vec![u, 2 * u] } else { vec![] }).collect();
    let got = gpu_top_k(&gpu, &mut GpuTopK::new(), &users, &gallery, d, k, &views(&exclude));
    // Two different random rows may also score the same bits (about one run in a thousand): the checks
    // hold for any ties, not only the twins'.
    for (u, hits) in got.iter().enumerate() {
        let position = |row: usize| hits.iter().position(|h| h.row == row);
        assert_best_first(u, hits);
        for (i, hit) in hits.iter().enumerate() {
            let (twin, is_copy) = if hit.row >= 500 { (hit.row - 500, true) } else { (hit.row + 500, false) };
            if exclude[u].contains(&twin) {
                continue;
            }
            if is_copy {
                // The copy is kept only after its original, with the same score.
                let p = position(twin).unwrap_or_else(|| panic!("user {u}: row {} kept without row {twin}", hit.row));
                assert!(p < i, "user {u}: row {twin} at {p}, its copy at {i}");
                assert_eq!(hits[p].score.to_bits(), hit.score.to_bits(), "user {u}: twins score differently");
            } else if position(twin).is_none() {
                // An original's copy is cut only inside the run of its score that ends the list.
                let cut_in_its_run = hits[i..].iter().all(|h| h.score.to_bits() == hit.score.to_bits());
                assert!(cut_in_its_run, "user {u}: row {} kept without its copy", hit.row);
            }
        }
    }
    // An odd K cuts a run of twins: the original must win.
    let odd = gpu_top_k(&gpu, &mut GpuTopK::new(), &users, &gallery, d, 7, &views(&vec![vec![]; n]));
    for (u, hits) in odd.iter().enumerate() {
        assert_best_first(u, hits);
        let original_kept = |row: usize| row < 500 || hits.iter().any(|h| h.row == row - 500);
        assert!(hits.iter().all(|h| original_kept(h.row)), "user {u}: a copy kept without its original: {hits:?}");
    }
}

/// Scores fall down the list, and equal scores rank the lower row first.
fn assert_best_first(u: usize, hits: &[Hit<f32>]) {
    for w in hits.windows(2) {
        let in_order = w[0].score > w[1].score || (w[0].score == w[1].score && w[0].row < w[1].row);
        assert!(in_order, "user {u}: {:?} ranked before {:?}", w[0], w[1]);
    }
}

#[test]
fn bad_inputs_are_refused() {
    let Some(gpu) = gpu() else { return };
    let mut top = GpuTopK::new();
    let gallery = vec![0.5f32; 64 * 10];
    let (_buffer, dev) = upload(&gpu, &gallery);
    let users = vec![0.5f32; 64 * 2];
    let err = top.top_k(&gpu, &users, dev, 64, TOPK_MAX_K + 1, &[&[], &[]]).unwrap_err();
    assert!(is_input_error(&err) && err.to_string().contains("--k 257"), "{err:#}");
    assert!(top.top_k(&gpu, &users, dev, 6, 5, &[&[], &[]]).is_err(), "a width that is no multiple of 4");
    assert!(top.top_k(&gpu, &users[..100], dev, 64, 5, &[&[]]).is_err(), "users not rows of d");
    assert!(top.top_k(&gpu, &users, dev, 64, 5, &[&[]]).is_err(), "one exclusion list for two users");
    // Nothing refused breaks the next call.
    let hits = top.top_k(&gpu, &users, dev, 64, 3, &[&[0], &[]]).unwrap();
    assert_eq!(hits[0].iter().map(|h| h.row).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(hits[1].iter().map(|h| h.row).collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[test]
fn throughput_report() {
    let Some(gpu) = real_gpu("the top-K throughput report") else { return };
    let mut rng = rng("top-K throughput");
    let (n, m, d, k) = (32_768, 262_144, 64, 100);
    let users = unit_rows(&mut rng, n, d);
    let gallery = unit_rows(&mut rng, m, d);
    let (_buffer, dev) = upload(&gpu, &gallery);
    let exclude = vec![Vec::new(); n];
    let mut top = GpuTopK::new();
    top.top_k(&gpu, &users, dev, d, k, &views(&exclude)).unwrap();
    let start = std::time::Instant::now();
    let got = top.top_k(&gpu, &users, dev, d, k, &views(&exclude)).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let flops = 2.0 * n as f64 * m as f64 * d as f64;
    eprintln!(
        "top-K throughput: {n} users × {m} rows × d {d}, k {k}: {:.1} ms with copies, {:.1} TFLOP/s of fp32 scores",
        seconds * 1e3,
        flops / seconds / 1e12
    );
    // The first users against the CPU.
    let sample = 256;
    let want = top_k_block(&users[..sample * d], &gallery, d, k, &views(&exclude[..sample]));
    check(&got[..sample], &want, &users[..sample * d], &gallery, d, k, &views(&exclude[..sample]), "throughput sample");
}
