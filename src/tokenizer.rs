//! Text → token ids for the content-embedding LLM.
//!
//! A model directory carries `tokenizer.json` (Hugging Face format, read by the `tokenizers` crate, whose
//! post-processor decides whether a BOS token is added) or, as Baichuan2 ships it, only a SentencePiece
//! `tokenizer.model` (encoded by [`crate::sentencepiece`]; BOS / EOS as `tokenizer_config.json`'s
//! `add_bos_token` / `add_eos_token` say, none when absent). `tokenizer.json` wins when both exist.
//! Truncation keeps the first `max_tokens` ids, special tokens counted, exactly as
//! `tokenizer(text, max_length=…, truncation=True)` does in Python: the text is cut to leave room for the
//! special tokens, so an EOS stays last.

use crate::error::input;
use crate::sentencepiece::{SentencePiece, Specials};
use anyhow::Result;
use std::path::Path;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

// Boxed: the two differ much in size, and a process holds one tokenizer.
enum Backend {
    Json(Box<Tokenizer>),
    SentencePiece { model: Box<SentencePiece>, specials: Specials },
}

pub struct TextTokenizer {
    backend: Backend,
    max_tokens: usize,
}

impl TextTokenizer {
    /// Loads the tokenizer of a model directory; encodings keep at most `max_tokens` ids.
    pub fn load(model_dir: &Path, max_tokens: usize) -> Result<Self> {
        let json = model_dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(&json, max_tokens);
        }
        let model = model_dir.join("tokenizer.model");
        if model.is_file() {
            let sp = SentencePiece::load(&model)?;
            let specials = sp.specials(model_dir)?;
            return Self::from_sentencepiece(sp, specials, max_tokens);
        }
        Err(input(format!("{}: no tokenizer.json or tokenizer.model in the model directory", model_dir.display())))
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| input(format!("{}: not a readable tokenizer.json ({e})", path.display())))?;
        Self::new(inner, max_tokens)
    }

    /// Wraps a Hugging Face tokenizer, replacing its truncation with `max_tokens` (keep the first ids).
    pub fn new(mut inner: Tokenizer, max_tokens: usize) -> Result<Self> {
        check_max_tokens(max_tokens, 0)?;
        // The library's truncation reserves room for the post-processor's special tokens, exactly as
        // `tokenizer(text, max_length=..., truncation=True)` does in Python.
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| input(format!("cannot truncate to {max_tokens} tokens: {e}")))?;
        inner.with_padding(None);
        Ok(Self { backend: Backend::Json(Box::new(inner)), max_tokens })
    }

    /// Wraps a SentencePiece model with the BOS / EOS to add around each text.
    pub fn from_sentencepiece(model: SentencePiece, specials: Specials, max_tokens: usize) -> Result<Self> {
        check_max_tokens(max_tokens, specials.count())?;
        Ok(Self { backend: Backend::SentencePiece { model: Box::new(model), specials }, max_tokens })
    }

    /// Token ids of `text`, special tokens included.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Json(inner) => {
                let encoding = inner
                    .encode_fast(text, true)
                    .map_err(|e| anyhow::anyhow!("tokenizer failed on a text of {} bytes: {e}", text.len()))?;
                Ok(encoding.get_ids().to_vec())
            }
            Backend::SentencePiece { model, specials } => {
                let mut ids = Vec::new();
                ids.extend(specials.bos);
                model.encode_into(text, &mut ids)?;
                ids.truncate(self.max_tokens - usize::from(specials.eos.is_some()));
                ids.extend(specials.eos);
                Ok(ids)
            }
        }
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Number of ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Json(inner) => inner.get_vocab_size(true),
            Backend::SentencePiece { model, .. } => model.vocab_size(),
        }
    }
}

fn check_max_tokens(max_tokens: usize, specials: usize) -> Result<()> {
    if max_tokens == 0 {
        return Err(input("--max-tokens must be at least 1"));
    }
    if max_tokens < specials {
        return Err(input(format!(
            "--max-tokens {max_tokens} leaves no room for the {specials} special tokens tokenizer_config.json adds"
        )));
    }
    Ok(())
}
