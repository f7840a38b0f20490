//! The Baichuan2 forward pass in f32 on the CPU (SPEC §2.2), the reference every CUDA kernel is held to.
//!
//! A batch is packed varlen: the tokens of all its sequences lie back to back in one `[T, D]` matrix, so each
//! projection is one GEMM over every token of the batch with no padding, while attention runs per sequence
//! and head. Residual adds are folded into the o_proj and down_proj GEMMs, which accumulate into `x`.

use super::{LlmConfig, LlmWeights};
use crate::cpu::causal_attention::causal_attention;
use crate::cpu::gemm::a_bt;
use crate::cpu::pool::mean_pool_l2;
use crate::cpu::rmsnorm::rmsnorm;
use crate::cpu::rope::{RopeTable, rope};
use crate::cpu::swiglu::swiglu;
use crate::error::input;
use anyhow::Result;
use rayon::prelude::*;
use std::path::Path;

pub struct Llm {
    config: LlmConfig,
    weights: LlmWeights,
}

impl Llm {
    /// Loads `config.json` and the safetensors weights of a model directory, checking every tensor.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = LlmConfig::from_file(&dir.join("config.json"))?;
        let weights = LlmWeights::load(dir, &config)?;
        Ok(Llm { config, weights })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    pub fn weights(&self) -> &LlmWeights {
        &self.weights
    }

    /// The content embedding of each sequence (SPEC §2.3): the mean of its final hidden states, L2-normalised.
    pub fn embed(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let (ids, offsets) = self.pack(seqs)?;
        let d = self.config.hidden_size;
        let y = self.forward(&ids, &offsets);
        let mut pooled = vec![0.0; seqs.len() * d];
        mean_pool_l2(&mut pooled, &y, &offsets, d);
        Ok(pooled.chunks_exact(d).map(<[f32]>::to_vec).collect())
    }

    /// The final-normed hidden states `[n, D]` of one sequence (Hugging Face's `last_hidden_state`).
    pub fn last_hidden_state(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let (ids, offsets) = self.pack(&[ids])?;
        Ok(self.forward(&ids, &offsets))
    }

    /// The final-normed hidden states `[T, D]` of sequences already packed back to back: sequence `s` is
    /// `ids[offsets[s]..offsets[s+1]]`.
    pub fn forward_packed(&self, ids: &[u32], offsets: &[usize]) -> Result<Vec<f32>> {
        if offsets.first() != Some(&0) || offsets.last() != Some(&ids.len()) {
            return Err(input(format!("packed offsets must run from 0 to the {} token ids", ids.len())));
        }
        let seqs = offsets
            .windows(2)
            .map(|w| ids.get(w[0]..w[1]).ok_or_else(|| input(format!("packed offsets {w:?} are not increasing"))))
            .collect::<Result<Vec<_>>>()?;
        let (ids, offsets) = self.pack(&seqs)?;
        Ok(self.forward(&ids, &offsets))
    }

    /// Checks every sequence and lays them back to back.
    fn pack(&self, seqs: &[&[u32]]) -> Result<(Vec<u32>, Vec<usize>)> {
        let mut offsets = Vec::with_capacity(seqs.len() + 1);
        self.config.pack_offsets(seqs, &mut offsets)?;
        Ok((seqs.concat(), offsets))
    }

    /// SPEC §2.2 over checked, packed sequences.
    fn forward(&self, ids: &[u32], offsets: &[usize]) -> Vec<f32> {
        let c = &self.config;
        let w = &self.weights;
        let (t, d, f) = (ids.len(), c.hidden_size, c.intermediate_size);
        let (heads, dh) = (c.num_attention_heads, c.head_dim());
        let eps = c.rms_norm_eps as f32;
        let longest = offsets.windows(2).map(|s| s[1] - s[0]).max().unwrap_or(0);
        let table = RopeTable::new(dh, c.rope_theta, longest);
        let positions: Vec<usize> = offsets.windows(2).flat_map(|s| 0..s[1] - s[0]).collect();

        let mut x = vec![0.0f32; t * d];
        x.par_chunks_mut(d).zip(ids).for_each(|(row, &id)| w.row_f32(&w.embed_tokens, id as usize, row));
        let mut h = vec![0.0f32; t * d];
        let mut qkv = vec![0.0f32; t * 3 * d];
        let mut attn = vec![0.0f32; t * d];
        let mut gate_up = vec![0.0f32; t * 2 * f];
        let mut act = vec![0.0f32; t * f];
        let mut buf = Vec::new();
        for layer in &w.layers {
            rmsnorm(&mut h, &x, &layer.input_layernorm, eps);
            a_bt(&mut qkv, &h, w.stacked_f32(&[&layer.w_pack], &mut buf), t, 3 * d, d, false);
            rope(&mut qkv, 3 * d, 2 * heads, &positions, &table);
            causal_attention(&mut attn, &qkv, offsets, heads, dh);
            a_bt(&mut x, &attn, w.stacked_f32(&[&layer.o_proj], &mut buf), t, d, d, true);

            rmsnorm(&mut h, &x, &layer.post_attention_layernorm, eps);
            // Gate and up in one GEMM: their f32 rows are stacked into the same buffer a bf16 model converts
            // into anyway (an f32 file is read in place when the two tensors are adjacent, as safetensors
            // writers order them).
            let stacked = w.stacked_f32(&[&layer.gate_proj, &layer.up_proj], &mut buf);
            a_bt(&mut gate_up, &h, stacked, t, 2 * f, d, false);
            swiglu(&mut act, &gate_up, f);
            a_bt(&mut x, &act, w.stacked_f32(&[&layer.down_proj], &mut buf), t, d, f, true);
        }
        rmsnorm(&mut h, &x, &w.norm, eps);
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_input_error;
    use crate::llm::weights::tests::{random_tensors, write_model};
    use safetensors::Dtype;

    fn config() -> LlmConfig {
        LlmConfig { num_hidden_layers: 2, max_position_embeddings: 40, ..LlmConfig::preset("tiny").unwrap() }
            .with_vocab_size(50)
    }

    /// A random model stored in `dtype`; with `round_to_bf16` its values are bf16 numbers whatever the dtype.
    fn model(dtype: Dtype, round_to_bf16: bool) -> (tempfile::TempDir, Llm) {
        let config = config();
        let mut tensors = random_tensors(&config, 9);
        if round_to_bf16 {
            for t in &mut tensors {
                t.values.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
            }
        }
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &config, &tensors, dtype);
        let llm = Llm::load(dir.path()).unwrap();
        (dir, llm)
    }

    fn ids(len: usize, seed: u32) -> Vec<u32> {
        (0..len as u32).map(|i| (i * 17 + seed * 31 + i * i) % 50).collect()
    }

    #[test]
    fn a_packed_batch_embeds_like_each_sequence_alone() {
        let (_dir, llm) = model(Dtype::F32, false);
        let seqs = [ids(5, 1), ids(1, 2), ids(33, 3), ids(17, 4), ids(40, 5)];
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let batch = llm.embed(&refs).unwrap();
        assert_eq!(batch.len(), seqs.len());
        for (s, seq) in seqs.iter().enumerate() {
            let alone = llm.embed(&[seq]).unwrap().remove(0);
            let y = llm.last_hidden_state(seq).unwrap();
            let d = llm.config().hidden_size;
            assert_eq!(y.len(), seq.len() * d);
            // Pool the hidden states here in f64: the embedding is their mean, normalised.
            let mean: Vec<f64> =
                (0..d).map(|c| y.chunks_exact(d).map(|r| r[c] as f64).sum::<f64>() / seq.len() as f64).collect();
            let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
            for c in 0..d {
                assert!((batch[s][c] - alone[c]).abs() < 1e-5, "seq {s} col {c}: {} vs {}", batch[s][c], alone[c]);
                assert!((alone[c] as f64 - mean[c] / norm).abs() < 1e-6, "seq {s} col {c}");
            }
        }
        // Distinct texts give distinct embeddings: the model is not degenerate.
        let cos: f32 = batch[0].iter().zip(&batch[2]).map(|(a, b)| a * b).sum();
        assert!(cos < 0.99, "cosine {cos}");
        assert!(llm.embed(&[]).unwrap().is_empty());
    }

    #[test]
    fn bf16_weights_compute_exactly_as_their_f32_values() {
        let (_a, bf16) = model(Dtype::BF16, false);
        let (_b, f32) = model(Dtype::F32, true);
        let seqs = [ids(9, 7), ids(23, 8)];
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        assert_eq!(bf16.embed(&refs).unwrap(), f32.embed(&refs).unwrap());
    }

    #[test]
    fn bad_sequences_are_input_errors() {
        let (_dir, llm) = model(Dtype::F32, false);
        let cases: [(&[&[u32]], &str); 3] = [
            (&[&[1, 2], &[]], "sequence 1 of the batch has no tokens"),
            (&[&[1, 50, 3]], "token id 50 at position 1 is outside the vocabulary of 50"),
            (&[&[7; 41]], "has 41 tokens, more than the model's 40 positions"),
        ];
        for (seqs, want) in cases {
            let err = llm.embed(seqs).unwrap_err();
            assert!(is_input_error(&err) && err.to_string().contains(want), "{err}");
        }
        assert!(is_input_error(&llm.forward_packed(&[1, 2, 3], &[0, 2]).unwrap_err()));
        assert!(is_input_error(&llm.forward_packed(&[1, 2, 3], &[0, 2, 1, 3]).unwrap_err()));
        let packed = llm.forward_packed(&[1, 2, 3], &[0, 2, 3]).unwrap();
        let alone = llm.last_hidden_state(&[1, 2]).unwrap();
        assert!(packed.iter().zip(&alone).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}
