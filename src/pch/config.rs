//! The PCH model's configuration (SPEC §3): the JSON stored in a checkpoint's `__metadata__["config"]`.

use crate::error::input;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Position information added to the adaptor output.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// No positions, as the official LEARN code: order enters only through the causal mask.
    #[default]
    None,
    /// A learned table `pos_emb.weight [max_len, d_model]`.
    Learned,
}

/// What a sequence position holds.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// Frozen content embeddings `[d_content]` through the `adaptor` linear layer.
    #[default]
    Content,
    /// Item ids into a learned table `item_emb.weight [n_items, d_model]` (the paper's ID baseline).
    Id,
}

/// How the item tower runs over a user's target sequence (SPEC §3, LEARN's Variants 1 and 2).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ItemTower {
    /// Variant 1: the same causal module as the user tower.
    #[default]
    #[serde(rename = "causal")]
    Causal,
    /// Variant 2: each target item attends only to itself (a diagonal mask).
    #[serde(rename = "self")]
    SelfOnly,
}

impl ItemTower {
    /// The `--item-tower` flag's value: `causal` or `self`.
    pub fn parse(flag: &str) -> Result<Self> {
        match flag {
            "causal" => Ok(ItemTower::Causal),
            "self" => Ok(ItemTower::SelfOnly),
            other => Err(input(format!("--item-tower {other:?}: expected causal or self"))),
        }
    }
}

/// The PCH transformer's shape and options. JSON keys are the field names; unknown keys are refused so that
/// a misspelt key cannot silently fall back to a default.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PchConfig {
    /// Width of a content embedding (4096 for Baichuan2-7B); unused when `input = "id"`.
    #[serde(default)]
    pub d_content: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    pub d_out: usize,
    #[serde(default = "default_ln_eps")]
    pub ln_eps: f64,
    #[serde(default)]
    pub positions: Positions,
    /// Rows of the position table; required when `positions = "learned"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    #[serde(default)]
    pub input: InputKind,
    /// Rows of the item-id table; required when `input = "id"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_items: Option<usize>,
    /// Dropout probability at BERT's three places; 0 disables it.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub item_tower: ItemTower,
}

fn default_ln_eps() -> f64 {
    1e-12
}

impl PchConfig {
    /// The paper-scale model: BERT-base width over Baichuan2-7B content embeddings.
    pub fn base() -> Self {
        Self {
            d_content: 4096,
            d_model: 768,
            n_layers: 12,
            n_heads: 12,
            d_ff: 3072,
            d_out: 64,
            ln_eps: 1e-12,
            positions: Positions::None,
            max_len: None,
            input: InputKind::Content,
            n_items: None,
            dropout: 0.0,
            item_tower: ItemTower::Causal,
        }
    }

    /// A small model for tests and demos.
    pub fn tiny() -> Self {
        Self { d_content: 64, d_model: 64, n_layers: 2, n_heads: 4, d_ff: 128, d_out: 16, ..Self::base() }
    }

    /// A mid-sized model whose heads are 64 wide, so that the GPU tower runs it: the shape of
    /// tools/peer/cpu_train.py --small over 512-d content.
    pub fn small() -> Self {
        Self { d_content: 512, d_model: 256, n_layers: 4, n_heads: 4, d_ff: 1024, d_out: 64, ..Self::base() }
    }

    /// A named preset (`pch-base`, `pch-small`, `pch-tiny`), validated.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "pch-base" => Ok(Self::base()),
            "pch-small" => Ok(Self::small()),
            "pch-tiny" => Ok(Self::tiny()),
            _ => Err(input(format!("unknown PCH preset \"{name}\"; expected pch-base, pch-small or pch-tiny"))),
        }
    }

    /// The same configuration over content embeddings of another width.
    pub fn with_d_content(self, d_content: usize) -> Self {
        Self { d_content, ..self }
    }

    /// Parses and validates the JSON form; `origin` names where it came from (a file, a checkpoint).
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let cfg: Self =
            serde_json::from_str(text).map_err(|e| input(format!("{origin}: the PCH config is not valid: {e}")))?;
        cfg.validate().map_err(|e| input(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    /// The JSON form, as stored in a checkpoint.
    pub fn to_json(&self) -> String {
        // Serialising plain numbers, strings and enums cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Checks every constraint the model relies on; the error names the key and what was expected.
    pub fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("d_ff", self.d_ff),
            ("d_out", self.d_out),
        ] {
            if value == 0 {
                crate::bail_input!("PCH config: {key} must be at least 1");
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            crate::bail_input!("PCH config: d_model {} is not divisible by n_heads {}", self.d_model, self.n_heads);
        }
        if !(self.ln_eps > 0.0 && self.ln_eps.is_finite()) {
            crate::bail_input!("PCH config: ln_eps must be a positive number, got {}", self.ln_eps);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            crate::bail_input!("PCH config: dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.input == InputKind::Content && self.d_content == 0 {
            crate::bail_input!("PCH config: d_content must be at least 1 when input = \"content\"");
        }
        if self.positions == Positions::Learned && self.max_len.unwrap_or(0) == 0 {
            crate::bail_input!("PCH config: positions = \"learned\" needs max_len of at least 1");
        }
        if self.input == InputKind::Id && self.n_items.unwrap_or(0) == 0 {
            crate::bail_input!("PCH config: input = \"id\" needs n_items of at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_input_error;

    #[test]
    fn json_round_trip_keeps_every_field() {
        let cfg = PchConfig {
            positions: Positions::Learned,
            max_len: Some(80),
            input: InputKind::Id,
            n_items: Some(1000),
            dropout: 0.1,
            item_tower: ItemTower::SelfOnly,
            ..PchConfig::tiny()
        };
        let text = cfg.to_json();
        assert!(text.contains("\"item_tower\":\"self\"") && text.contains("\"positions\":\"learned\""), "{text}");
        assert_eq!(PchConfig::from_json(&text, "test").unwrap(), cfg);
    }

    #[test]
    fn defaults_follow_the_spec() {
        let text = r#"{"d_content": 4096, "d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072, "d_out": 64}"#;
        assert_eq!(PchConfig::from_json(text, "test").unwrap(), PchConfig::base());
        assert_eq!(PchConfig::preset("pch-tiny").unwrap().with_d_content(32).d_content, 32);
    }

    #[test]
    fn bad_configs_are_input_errors_that_name_the_key() {
        let base = PchConfig::tiny();
        let cases = [
            (PchConfig { n_heads: 3, ..base.clone() }, "not divisible by n_heads"),
            (PchConfig { positions: Positions::Learned, ..base.clone() }, "max_len"),
            (PchConfig { input: InputKind::Id, ..base.clone() }, "n_items"),
            (PchConfig { dropout: 1.0, ..base.clone() }, "dropout"),
            (PchConfig { dropout: f64::NAN, ..base.clone() }, "dropout"),
            (PchConfig { ln_eps: 0.0, ..base.clone() }, "ln_eps"),
            (PchConfig { d_ff: 0, ..base.clone() }, "d_ff"),
            (PchConfig { d_content: 0, ..base.clone() }, "d_content"),
        ];
        for (cfg, needle) in cases {
            let err = cfg.validate().unwrap_err();
            assert!(is_input_error(&err));
            assert!(err.to_string().contains(needle), "{err}");
        }
        let err = PchConfig::from_json(&PchConfig { n_heads: 3, ..base }.to_json(), "ckpt.safetensors").unwrap_err();
        assert!(is_input_error(&err) && err.to_string().starts_with("ckpt.safetensors: PCH config: d_model"), "{err}");
        for text in [r#"{"d_model": 64}"#, r#"{"d_model": 64, "n_layer": 2}"#, "not json"] {
            assert!(is_input_error(&PchConfig::from_json(text, "c.json").unwrap_err()));
        }
        assert!(is_input_error(&PchConfig::preset("pch-huge").unwrap_err()));
    }
}
