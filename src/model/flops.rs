//! The FLOPs of one training step of fastpt, for MFU: every frozen linear layer costs
//! `2·params·tokens` forward and as much again for its input gradient (no weight gradient: hence
//! 4·N·tokens rather than 6·N·tokens), the LM head only at label rows, and each attention
//! `4·B·H·T·S·D` forward plus `8·B·H·T·S·D` backward (dP, dV, dQ, dK), halved under a causal mask.
//! The prompt methods' own networks are negligible next to the backbone and are not counted.
//! Each family's `Family::train_step_flops` is its function here; `fastpt bench` divides it by the
//! step time.

use crate::model::config::{FeedForward, LlamaConfig, T5Config};

/// The token counts of a step: `b` rows of `prompt` prompt rows + `input` input tokens, and
/// `target` target tokens (T5: decoder positions; Llama: the labelled end of each row).
#[derive(Debug, Clone, Copy)]
pub struct StepTokens {
    pub b: usize,
    pub prompt: usize,
    pub input: usize,
    pub target: usize,
}

/// Forward + input-gradient FLOPs of attention with `h` heads of width `d`, `t` queries and `s`
/// keys per row (`causal`: about half the scores exist).
fn attention_flops(b: usize, h: usize, t: usize, s: usize, d: usize, causal: bool) -> f64 {
    let full = 12.0 * (b * h * t * s * d) as f64;
    if causal {
        full / 2.0
    } else {
        full
    }
}

pub(crate) fn t5_flops(cfg: &T5Config, x: StepTokens) -> f64 {
    let (c, hd, f) = (cfg.d_model, cfg.inner_dim(), cfg.d_ff);
    let ffn = match cfg.feed_forward {
        FeedForward::Relu => 2 * c * f,
        FeedForward::GatedGelu => 3 * c * f,
    };
    let enc_len = x.prompt + x.input;
    let (enc_tokens, dec_tokens) = ((x.b * enc_len) as f64, (x.b * x.target) as f64);
    let linear = |params: usize, tokens: f64| 4.0 * params as f64 * tokens;
    let encoder = cfg.num_layers as f64
        * (linear(4 * c * hd + ffn, enc_tokens)
            + attention_flops(x.b, cfg.num_heads, enc_len, enc_len, cfg.d_kv, false));
    // Decoder: self-attention q, k, v, o, cross-attention q, o and the FFN on decoder tokens;
    // the cross-attention k, v on the encoder output.
    let decoder = cfg.num_decoder_layers as f64
        * (linear(6 * c * hd + ffn, dec_tokens)
            + linear(2 * c * hd, enc_tokens)
            + attention_flops(x.b, cfg.num_heads, x.target, x.target, cfg.d_kv, true)
            + attention_flops(x.b, cfg.num_heads, x.target, enc_len, cfg.d_kv, false));
    let head = linear(cfg.vocab_size * c, dec_tokens);
    encoder + decoder + head
}

pub(crate) fn llama_flops(cfg: &LlamaConfig, x: StepTokens) -> f64 {
    let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let len = x.prompt + x.input + x.target;
    let tokens = (x.b * len) as f64;
    let params = 2 * c * qd + 2 * c * kvd + 3 * c * f;
    let layers = cfg.num_hidden_layers as f64
        * (4.0 * params as f64 * tokens
            + attention_flops(x.b, cfg.num_attention_heads, len, len, cfg.head_dim, true));
    // Logits only at the rows that predict a label.
    let head = 4.0 * (cfg.vocab_size * c) as f64 * (x.b * x.target) as f64;
    layers + head
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::shapes::{llama_shape, t5_shape};

    #[test]
    fn t5_flops_by_hand_for_one_layer() {
        let mut cfg = t5_shape("t5-tiny").unwrap();
        cfg.num_layers = 1;
        cfg.num_decoder_layers = 1;
        let x = StepTokens {
            b: 2,
            prompt: 3,
            input: 5,
            target: 4,
        };
        let (c, hd, f, v, h, d) = (
            cfg.d_model,
            cfg.inner_dim(),
            cfg.d_ff,
            cfg.vocab_size,
            cfg.num_heads,
            cfg.d_kv,
        );
        let ffn = match cfg.feed_forward {
            FeedForward::Relu => 2 * c * f,
            FeedForward::GatedGelu => 3 * c * f,
        } as f64;
        let (enc, dec) = (16.0, 8.0); // 2·(3 + 5) and 2·4 tokens
        let want = 4.0 * ((4 * c * hd) as f64 + ffn) * enc
            + 12.0 * (2 * h * 8 * 8 * d) as f64
            + 4.0 * ((6 * c * hd) as f64 + ffn) * dec
            + 4.0 * (2 * c * hd) as f64 * enc
            + 6.0 * (2 * h * 4 * 4 * d) as f64
            + 12.0 * (2 * h * 4 * 8 * d) as f64
            + 4.0 * (v * c) as f64 * dec;
        assert_eq!(t5_flops(&cfg, x), want);
    }

    #[test]
    fn llama_flops_grow_with_the_prompt_and_count_the_head_at_label_rows_only() {
        let cfg = llama_shape("llama-tiny").unwrap();
        let x = StepTokens {
            b: 1,
            prompt: 0,
            input: 10,
            target: 2,
        };
        let with_prompt = StepTokens { prompt: 5, ..x };
        assert!(llama_flops(&cfg, with_prompt) > llama_flops(&cfg, x));
        // The head: 4·V·C per label row.
        let more_labels = StepTokens {
            input: 9,
            target: 3,
            ..x
        };
        let head_row = 4.0 * (cfg.vocab_size * cfg.hidden_size) as f64;
        assert!((llama_flops(&cfg, more_labels) - llama_flops(&cfg, x) - head_row).abs() < 1.0);
    }
}
