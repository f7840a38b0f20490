//! The loss at training scale must not hold the [B·H, B·T] score matrix: a counting allocator records the
//! peak heap use of one call at B = 256, H = 80, T = 40, d = 64, where that matrix alone is 839 MB.

use learn_kern::cpu::infonce::{InfoNceBatch, LossPositions, infonce};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator unchanged; only the byte counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(live, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs one loss call on a random batch of `b` users (H = 80, T = 40, d = 64, τ = 0.05, unit rows) and
/// checks its peak extra heap use against the input size.
fn bounded_at(b: usize) {
    let (h, t, d) = (80usize, 40usize, 64usize);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut unit_rows = |n: usize| {
        let mut v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        for r in v.chunks_exact_mut(d) {
            let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= norm);
        }
        v
    };
    let (users, items) = (unit_rows(b * h), unit_rows(b * t));
    let hist_len: Vec<usize> = (0..b).map(|_| rng.random_range(1..=h)).collect();
    let tgt_len: Vec<usize> = (0..b).map(|_| rng.random_range(1..=t)).collect();
    // A popular head of 500 ids makes false negatives common, as in real batches.
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..500)).collect();
    let mut du = vec![f32::NAN; users.len()];
    let mut di = vec![f32::NAN; items.len()];
    let batch = InfoNceBatch {
        users: &users,
        hist_len: &hist_len,
        items: &items,
        tgt_len: &tgt_len,
        target_ids: &ids,
        h,
        t,
        d,
        tau: 0.05,
        keep_false_negatives: false,
        positions: LossPositions::All,
        log_q: None,
    };

    let start = std::time::Instant::now();
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = infonce(&batch, &mut du, &mut di);
    let extra = PEAK.load(Ordering::SeqCst) - before;

    eprintln!("B = {b}: {:.2} s, peak extra heap {extra} bytes", start.elapsed().as_secs_f64());
    let full_matrix = (b * h) * (b * t) * std::mem::size_of::<f32>();
    let io = (users.len() + items.len()) * std::mem::size_of::<f32>();
    assert!(out.loss.is_finite() && out.loss > 0.0, "loss {}", out.loss);
    assert!(du.iter().chain(&di).all(|x| x.is_finite()));
    // Compact copies of inputs and gradients and one tile per job: a few times the input size.
    assert!(extra < 8 * io + (32 << 20), "peak extra heap {extra} bytes; inputs are {io}, full matrix {full_matrix}");
}

#[test]
fn training_scale_batch_runs_in_bounded_memory() {
    bounded_at(256);
}

/// The SPEC's size, B = 1024 (the full matrix would be 13.4 GB). Slow outside release builds:
/// `cargo test --release --test infonce_memory -- --ignored --nocapture`.
#[test]
#[ignore]
fn spec_scale_batch_runs_in_bounded_memory() {
    bounded_at(1024);
}
