//! Causal multi-head self-attention over packed variable-length sequences.
//!
//! All sequences of a batch lie back to back in one `[T, 3D]` matrix of Q | K | V rows (the output of one
//! W_pack GEMM); `offsets[s]..offsets[s+1]` are the rows of sequence `s`. Each (sequence, head) pair is an
//! independent task on the rayon pool: it gathers its Q, K and V rows, forms all `n × n` scores with one GEMM,
//! masks and normalises them row by row, and multiplies by V with a second GEMM. The GEMMs compute the masked
//! upper triangle too (zeros in the second), but at item lengths they still run twice as fast as row-by-row
//! dot products over the triangle alone. The scores of one task take `n²` floats of scratch.

use super::gemm::{a_b, a_bt};
use rayon::prelude::*;

/// Per-task buffers: the head's Q, K and V rows gathered contiguous, and its probabilities `[n, n]`.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
}

/// `out[t, h·dh..(h+1)·dh] = softmax(q·kᵀ/√dh over the keys ≤ t of t's sequence) · v` for every token `t` and
/// head `h`. `qkv` is `[T, 3·heads·dh]`, `out` is `[T, heads·dh]`; `offsets` starts at 0 and ends at `T`.
/// Softmax is in f32 with the row maximum subtracted.
pub fn causal_attention(out: &mut [f32], qkv: &[f32], offsets: &[usize], heads: usize, head_dim: usize) {
    let d = heads * head_dim;
    let total = *offsets.last().unwrap_or(&0);
    assert!(offsets.first() == Some(&0) && offsets.windows(2).all(|w| w[0] <= w[1]), "attention: bad offsets");
    assert_eq!(qkv.len(), total * 3 * d, "attention: qkv must be [{total}, {}]", 3 * d);
    assert_eq!(out.len(), total * d, "attention: out must be [{total}, {d}]");

    // Each task writes its head's [n, dh] block into a head-major scratch laid out per sequence as
    // [heads, n, dh], so the tasks own disjoint contiguous slices; one pass below interleaves the heads back.
    let mut ctx = vec![0.0f32; total * d];
    let mut tasks = Vec::with_capacity((offsets.len() - 1) * heads);
    let mut rest = ctx.as_mut_slice();
    for w in offsets.windows(2) {
        let n = w[1] - w[0];
        let (seq, tail) = rest.split_at_mut(n * d);
        rest = tail;
        for (h, block) in seq.chunks_mut((n * head_dim).max(1)).enumerate() {
            tasks.push((w[0], h, block));
        }
    }
    let scale = 1.0 / (head_dim as f32).sqrt();
    tasks.into_par_iter().for_each_init(Scratch::default, |s, (start, h, block)| {
        let n = block.len() / head_dim;
        for (part, buf) in [&mut s.q, &mut s.k, &mut s.v].into_iter().enumerate() {
            buf.clear();
            for t in 0..n {
                let at = (start + t) * 3 * d + part * d + h * head_dim;
                buf.extend_from_slice(&qkv[at..at + head_dim]);
            }
        }
        s.p.resize(n * n, 0.0);
        a_bt(&mut s.p, &s.q, &s.k, n, n, head_dim, false);
        for (i, row) in s.p.chunks_exact_mut(n).enumerate() {
            let (seen, future) = row.split_at_mut(i + 1);
            let max = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * scale;
            let mut sum = 0.0f32;
            for x in seen.iter_mut() {
                *x = (*x * scale - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            seen.iter_mut().for_each(|x| *x *= inv);
            future.fill(0.0);
        }
        a_b(block, &s.p, &s.v, n, head_dim, n, false);
    });

    let seq_of = |t: usize| offsets.partition_point(|&o| o <= t) - 1;
    out.par_chunks_mut(d).enumerate().with_min_len(64).for_each(|(t, o)| {
        let s = seq_of(t);
        let (start, n) = (offsets[s], offsets[s + 1] - offsets[s]);
        for h in 0..heads {
            let at = start * d + h * n * head_dim + (t - start) * head_dim;
            o[h * head_dim..(h + 1) * head_dim].copy_from_slice(&ctx[at..at + head_dim]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// Softmax attention of one sequence and head in f64, straight from the definition.
    fn naive(qkv: &[f32], start: usize, n: usize, h: usize, heads: usize, dh: usize) -> Vec<f64> {
        let d = heads * dh;
        let get = |t: usize, part: usize, i: usize| qkv[(start + t) * 3 * d + part * d + h * dh + i] as f64;
        let mut out = vec![0.0; n * dh];
        for i in 0..n {
            let s: Vec<f64> = (0..=i)
                .map(|j| (0..dh).map(|c| get(i, 0, c) * get(j, 1, c)).sum::<f64>() / (dh as f64).sqrt())
                .collect();
            let z: f64 = s.iter().map(|x| x.exp()).sum();
            for (j, sj) in s.iter().enumerate() {
                for c in 0..dh {
                    out[i * dh + c] += sj.exp() / z * get(j, 2, c);
                }
            }
        }
        out
    }

    #[test]
    fn matches_a_naive_f64_attention_per_sequence_and_head() {
        let (heads, dh) = (3, 6);
        let d = heads * dh;
        let offsets = [0, 5, 6, 15, 15, 17]; // lengths 5, 1, 9, 0, 2
        let total = 17;
        let qkv = filled(total * 3 * d, 11);
        let mut out = vec![f32::NAN; total * d];
        causal_attention(&mut out, &qkv, &offsets, heads, dh);
        for w in offsets.windows(2) {
            let (start, n) = (w[0], w[1] - w[0]);
            for h in 0..heads {
                let want = naive(&qkv, start, n, h, heads, dh);
                for i in 0..n {
                    for c in 0..dh {
                        let got = out[(start + i) * d + h * dh + c] as f64;
                        let w = want[i * dh + c];
                        assert!((got - w).abs() < 1e-5, "token {} head {h} col {c}: {got} vs {w}", start + i);
                    }
                }
            }
        }
        // A sequence of one token returns its own value row.
        for h in 0..heads {
            let v = &qkv[5 * 3 * d + 2 * d + h * dh..][..dh];
            let o = &out[5 * d + h * dh..][..dh];
            for (a, b) in o.iter().zip(v) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn later_tokens_and_other_sequences_do_not_leak_in() {
        let (heads, dh) = (2, 8);
        let d = heads * dh;
        let offsets = [0, 7, 12];
        let qkv = filled(12 * 3 * d, 5);
        let mut base = vec![f32::NAN; 12 * d];
        causal_attention(&mut base, &qkv, &offsets, heads, dh);
        // Change every value of token 4 (in the first sequence): tokens 0..4 and the whole second sequence
        // must come out bit for bit the same; token 4 itself must change.
        let mut changed = qkv.clone();
        changed[4 * 3 * d..5 * 3 * d].iter_mut().for_each(|x| *x = -*x * 3.0 + 1.0);
        let mut out = vec![f32::NAN; 12 * d];
        causal_attention(&mut out, &changed, &offsets, heads, dh);
        assert_eq!(&out[..4 * d], &base[..4 * d]);
        assert_eq!(&out[7 * d..], &base[7 * d..]);
        assert_ne!(&out[4 * d..5 * d], &base[4 * d..5 * d]);
    }
}
