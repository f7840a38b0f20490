//! A small Baichuan-style tokenizer for random-weight models: SentencePiece-like BPE with byte fallback, so
//! it covers any UTF-8 text, written as a Hugging Face `tokenizer.json`.
//!
//! Layout follows Baichuan2's: `<unk>` 0, `<s>` 1, `</s>` 2, then the 256 byte pieces `<0x00>`…`<0xFF>`, then
//! merged pieces learnt on a corpus. Spaces become `▁` and start a new piece, digits are split one by one,
//! and no BOS is added (Baichuan2's tokenizer config adds none).

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder};

const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];
const BYTE_PIECES: usize = 256;

fn pre_tokenizer() -> PreTokenizerWrapper {
    Sequence::new(vec![Metaspace::new('▁', PrependScheme::Never, true).into(), Digits::new(true).into()]).into()
}

/// Learns merges on `corpus` and returns the `tokenizer.json` text with at most `vocab_size` ids.
pub fn build_tokenizer_json(corpus: &[String], vocab_size: usize) -> Result<String> {
    let reserved = SPECIALS.len() + BYTE_PIECES;
    anyhow::ensure!(vocab_size > reserved, "a tokenizer needs more than {reserved} ids");
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_pre_tokenizer(Some(pre_tokenizer()))
            .build()
            .map_err(|e| anyhow!("cannot build the tokenizer: {e}"))?;
    let mut trainer =
        BpeTrainerBuilder::new().vocab_size(vocab_size - reserved).min_frequency(2).show_progress(false).build();
    tokenizer.train(&mut trainer, corpus.iter()).map_err(|e| anyhow!("cannot train the tokenizer: {e}"))?;
    let trained: Value = serde_json::from_str(&tokenizer.to_string(false).map_err(|e| anyhow!("{e}"))?)?;

    // Renumber: specials, then byte pieces, then the learnt pieces in their learnt order.
    let learnt = trained["model"]["vocab"].as_object().context("trained tokenizer has no vocab")?;
    let mut pieces: Vec<(&String, u64)> = learnt.iter().filter_map(|(k, v)| Some((k, v.as_u64()?))).collect();
    pieces.sort_by_key(|&(_, id)| id);
    let mut vocab = serde_json::Map::new();
    for s in SPECIALS {
        vocab.insert(s.to_string(), json!(vocab.len()));
    }
    for b in 0..BYTE_PIECES {
        vocab.insert(format!("<0x{b:02X}>"), json!(vocab.len()));
    }
    for (piece, _) in pieces {
        if !vocab.contains_key(piece.as_str()) {
            vocab.insert(piece.clone(), json!(vocab.len()));
        }
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, s)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": trained["pre_tokenizer"],
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": trained["model"]["merges"]
        }
    });
    Ok(serde_json::to_string_pretty(&document)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::Tokenizer;

    fn corpus() -> Vec<String> {
        crate::demo::catalogue::generate(400, 1)
            .iter()
            .map(|item| crate::embed::text::TextRecipe::Default.render(item.record.as_object().unwrap()))
            .collect()
    }

    #[test]
    fn any_utf8_text_round_trips_without_unknown_tokens() {
        let json = build_tokenizer_json(&corpus(), 600).unwrap();
        let tok = Tokenizer::from_bytes(json.as_bytes()).unwrap();
        assert!(tok.get_vocab_size(true) <= 600);
        assert_eq!(tok.token_to_id("<0x41>"), Some(3 + 0x41));
        for text in [
            "Acme Stainless Kettle K123",
            "户外 露营 🏕️ tent",
            "tabs\tand\nnewlines  double",
            "\u{1F600}\u{10FFFD}",
            "é",
        ] {
            let enc = tok.encode(text, true).unwrap();
            assert!(!enc.get_ids().contains(&0), "{text:?} produced <unk>");
            assert!(!enc.get_ids().contains(&1), "no BOS is added");
            let back = tok.decode(enc.get_ids(), false).unwrap();
            assert_eq!(back, text);
        }
        // Learnt merges compress catalogue text well below one token per character.
        let sample = corpus()[..50].join("\n");
        let tokens = tok.encode(sample.as_str(), false).unwrap().len();
        assert!((tokens as f64) < 0.4 * sample.chars().count() as f64, "{tokens} tokens");
    }

    #[test]
    fn training_is_deterministic() {
        let c = corpus();
        assert_eq!(build_tokenizer_json(&c, 500).unwrap(), build_tokenizer_json(&c, 500).unwrap());
    }
}
