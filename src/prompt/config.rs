//! The options of every prompt method, with the papers' defaults (../shared/methods.md), their
//! validation, and their parameter counts (train-time and stored).
//!
//! Each struct deserializes from the method's TOML section of a run config; absent keys keep the
//! defaults, unknown keys are errors.

use serde::{Deserialize, Serialize};

use crate::backend::FusionMode;
use crate::error::{Error, Result};

/// How a prompt matrix P starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptInit {
    /// Rows copied from embeddings of ids drawn from the 5000 lowest regular ids.
    Vocab,
    /// U(−0.5, 0.5).
    Uniform,
    /// A tokenised sentence (`init_text`) repeated to the prompt length.
    Text,
}

/// DPT's init of A and B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DptInit {
    /// U(−0.5, 0.5), as the official code.
    Uniform,
    /// N(0, 1).
    Gaussian,
}

/// EPT-MS's init of the low-rank pair A, B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LowRankInit {
    /// From the truncated SVD of the source prompt padded to M rows.
    Svd,
    /// DePT's: A ~ U(−1/√r, 1/√r), B = 0.
    Lora,
}

/// LAMP's pooling of the compressed outer product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LampPool {
    /// Mean of blocks of `pool` consecutive rows.
    Average,
    /// Appendix A.1: `A = softmax(C·W_sa)` over the l axis, rows `Aᵀ·C`.
    Attention,
}

/// How LAMP stores the singular values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QInit {
    /// Q = the singular values (they enter squared, so C ≠ the truncation of P at init).
    Plain,
    /// Q = √(singular values), so C at init equals the rank-r truncation of P.
    Sqrt,
}

/// The fusion modes of EPT-MS, as written in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    Attend,
    Paper,
}

impl From<Fusion> for FusionMode {
    fn from(f: Fusion) -> Self {
        match f {
            Fusion::Attend => FusionMode::Attend,
            Fusion::Paper => FusionMode::Paper,
        }
    }
}

/// PT (Lester et al. 2021): rows = P (l, d).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PtConfig {
    pub prompt_len: usize,
    pub init: PromptInit,
    pub init_text: String,
}

impl Default for PtConfig {
    fn default() -> Self {
        PtConfig {
            prompt_len: 100,
            init: PromptInit::Vocab,
            init_text: String::new(),
        }
    }
}

/// P-Tuning with PEFT's MLP encoder: rows = L3(ReLU(L2(ReLU(L1(P))))), each L a d→d linear.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PTuningConfig {
    pub prompt_len: usize,
    pub init: PromptInit,
    pub init_text: String,
}

impl Default for PTuningConfig {
    fn default() -> Self {
        PTuningConfig {
            prompt_len: 10,
            init: PromptInit::Vocab,
            init_text: String::new(),
        }
    }
}

/// Residual PT (Razdaibiedina et al. 2023): rows = LayerNorm(W2·ReLU(W1·P + b1) + b2) + P.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResidualConfig {
    pub prompt_len: usize,
    /// Bottleneck width h.
    pub bottleneck: usize,
    pub init: PromptInit,
    pub init_text: String,
}

impl Default for ResidualConfig {
    fn default() -> Self {
        ResidualConfig {
            prompt_len: 100,
            bottleneck: 400,
            init: PromptInit::Vocab,
            init_text: String::new(),
        }
    }
}

/// DPT (Xiao et al. 2023): rows = A (l, b) · B (b, d).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DptConfig {
    pub prompt_len: usize,
    /// Inner dimension b.
    pub rank: usize,
    pub init: DptInit,
}

impl Default for DptConfig {
    fn default() -> Self {
        DptConfig {
            prompt_len: 100,
            rank: 10,
            init: DptInit::Uniform,
        }
    }
}

/// DePT (Shi & Lipani 2024): rows = Ps (s, d); E(x) += α/√r · (A (m, r) · B (r, d))[..n].
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeptConfig {
    /// Short prompt length s.
    pub prompt_len: usize,
    pub rank: usize,
    pub alpha: f64,
    pub init: PromptInit,
    pub init_text: String,
}

impl Default for DeptConfig {
    fn default() -> Self {
        DeptConfig {
            prompt_len: 60,
            rank: 30,
            alpha: 8.0,
            init: PromptInit::Vocab,
            init_text: String::new(),
        }
    }
}

/// EPT-MS (Lan et al. 2024): decomposition of a source prompt, prompt fusion, gated experts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EptConfig {
    /// Length l of the source prompt P that the decomposition starts from.
    pub source_len: usize,
    /// Short prompt length s (Ps = P[..s]).
    pub prompt_len: usize,
    pub rank: usize,
    pub lowrank_init: LowRankInit,
    pub fusion: Fusion,
    /// The gated multi-space projection (off: rows = P_f, an ablation).
    pub multi_space: bool,
    /// Number of experts N_e.
    pub experts: usize,
    /// Hidden width h of each expert; `None`: m (the paper's linear1 ∈ R^{m×d}).
    // TOML has no null: `None` is written as an absent key, which reads back as `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_hidden: Option<usize>,
    pub init: PromptInit,
    pub init_text: String,
}

impl Default for EptConfig {
    fn default() -> Self {
        EptConfig {
            source_len: 100,
            prompt_len: 60,
            rank: 30,
            lowrank_init: LowRankInit::Svd,
            fusion: Fusion::Attend,
            multi_space: true,
            experts: 4,
            expert_hidden: None,
            init: PromptInit::Vocab,
            init_text: String::new(),
        }
    }
}

impl EptConfig {
    /// The expert hidden width h for maximum input length `m`.
    pub fn hidden(&self, m: usize) -> usize {
        self.expert_hidden.unwrap_or(m)
    }
}

/// LAMP (Lan et al. 2025): truncated SVD of P, compressed outer product, pooling.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LampConfig {
    pub prompt_len: usize,
    pub rank: usize,
    /// Pooling block p (rows = l/p).
    pub pool: usize,
    pub pool_mode: LampPool,
    pub q_init: QInit,
    pub init: PromptInit,
    pub init_text: String,
}

impl Default for LampConfig {
    fn default() -> Self {
        LampConfig {
            prompt_len: 100,
            rank: 8,
            pool: 1,
            pool_mode: LampPool::Average,
            q_init: QInit::Plain,
            init: PromptInit::Vocab,
            init_text: String::new(),
        }
    }
}

/// Explosive PT: one prompt p1 (d), rows = W_up·(W_down·p1) repeated n times (n = 1: EPT, 10: EPT*).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct XptConfig {
    /// n, the number of identical rows.
    pub repeats: usize,
    /// Hidden width h of the under-parameterised MLP.
    pub hidden: usize,
}

impl Default for XptConfig {
    fn default() -> Self {
        XptConfig {
            repeats: 1,
            hidden: 1,
        }
    }
}

/// One prompt method and its options.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodConfig {
    Pt(PtConfig),
    PTuning(PTuningConfig),
    Residual(ResidualConfig),
    Dpt(DptConfig),
    Dept(DeptConfig),
    Ept(EptConfig),
    Lamp(LampConfig),
    Xpt(XptConfig),
}

/// The method names accepted in configs and on the command line.
pub const METHOD_NAMES: &[&str] = &[
    "pt", "ptuning", "residual", "dpt", "dept", "ept", "lamp", "xpt",
];

/// The most trainable parameters a method may have (40 GB in f32, far beyond any paper's
/// setting): larger settings are typing mistakes, refused before anything is allocated.
pub const MAX_METHOD_PARAMS: u64 = 10_000_000_000;

/// The most prompt rows a method may put in front of the input (the papers use at most a few
/// hundred).
pub const MAX_PROMPT_ROWS: usize = 1 << 20;

/// Train-time and stored parameter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// Everything the optimiser updates.
    pub train: usize,
    /// What inference needs once the reparameterisation is folded away (the smaller of the
    /// folded rows and the factors, where a method can use either).
    pub stored: usize,
}

impl MethodConfig {
    /// The papers' defaults for a method name.
    pub fn default_for(name: &str) -> Result<Self> {
        Self::from_toml(name, "")
    }

    /// A method from its name and the text of its TOML section (empty: all defaults).
    pub fn from_toml(name: &str, section: &str) -> Result<Self> {
        fn parse<T: serde::de::DeserializeOwned>(name: &str, text: &str) -> Result<T> {
            toml::from_str(text)
                .map_err(|e| Error::Input(format!("[{name}] options: {}", e.message().trim())))
        }
        Ok(match name {
            "pt" => MethodConfig::Pt(parse(name, section)?),
            "ptuning" => MethodConfig::PTuning(parse(name, section)?),
            "residual" => MethodConfig::Residual(parse(name, section)?),
            "dpt" => MethodConfig::Dpt(parse(name, section)?),
            "dept" => MethodConfig::Dept(parse(name, section)?),
            "ept" => MethodConfig::Ept(parse(name, section)?),
            "lamp" => MethodConfig::Lamp(parse(name, section)?),
            "xpt" => MethodConfig::Xpt(parse(name, section)?),
            _ => {
                return Err(Error::Input(format!(
                    "unknown method `{name}`; methods: {}",
                    METHOD_NAMES.join(", ")
                )))
            }
        })
    }

    /// The method of a run config (TOML): `method = "NAME"` at the top level, and the options
    /// in the method's own `[NAME]` section (absent: the papers' defaults). Other keys belong
    /// to the rest of the run config and are not read here. Errors name the file.
    pub fn from_run_toml(text: &str, path: &std::path::Path) -> Result<Self> {
        let table: toml::Table = toml::from_str(text)
            .map_err(|e| Error::format(path, format!("invalid TOML: {}", e.message())))?;
        let name = match table.get("method") {
            Some(toml::Value::String(name)) => name.as_str(),
            Some(other) => {
                return Err(Error::config(
                    path,
                    "method",
                    format!("expected a method name, found {other}"),
                ))
            }
            None => {
                return Err(Error::config(
                    path,
                    "method",
                    format!("missing; one of {}", METHOD_NAMES.join(", ")),
                ))
            }
        };
        let section = match table.get(name) {
            None => String::new(),
            Some(toml::Value::Table(t)) => {
                toml::to_string(t).map_err(|e| Error::format(path, format!("[{name}]: {e}")))?
            }
            Some(other) => {
                return Err(Error::config(
                    path,
                    name,
                    format!("expected a [{name}] section, found {other}"),
                ))
            }
        };
        Self::from_toml(name, &section).map_err(|e| Error::format(path, e.to_string()))
    }

    /// The options as the body of the method's TOML section (without the `[name]` header),
    /// with every default filled in; `from_toml(name, body)` gives the same config back.
    pub fn options_toml(&self) -> String {
        let body = match self {
            MethodConfig::Pt(c) => toml::to_string(c),
            MethodConfig::PTuning(c) => toml::to_string(c),
            MethodConfig::Residual(c) => toml::to_string(c),
            MethodConfig::Dpt(c) => toml::to_string(c),
            MethodConfig::Dept(c) => toml::to_string(c),
            MethodConfig::Ept(c) => toml::to_string(c),
            MethodConfig::Lamp(c) => toml::to_string(c),
            MethodConfig::Xpt(c) => toml::to_string(c),
        };
        // Only values no TOML file can hold (integers above i64::MAX) fail; say so in the text
        // rather than panic, since the result is only echoed into the run folder.
        body.unwrap_or_else(|e| {
            format!(
                "# [{}] options not representable in TOML: {e}\n",
                self.name()
            )
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            MethodConfig::Pt(_) => "pt",
            MethodConfig::PTuning(_) => "ptuning",
            MethodConfig::Residual(_) => "residual",
            MethodConfig::Dpt(_) => "dpt",
            MethodConfig::Dept(_) => "dept",
            MethodConfig::Ept(_) => "ept",
            MethodConfig::Lamp(_) => "lamp",
            MethodConfig::Xpt(_) => "xpt",
        }
    }

    /// Checks the options against the model width `d` and maximum input length `m`; errors
    /// name the option and both values.
    pub fn validate(&self, d: usize, m: usize) -> Result<()> {
        self.validate_options(d, m)?;
        // Sizes no run can hold are refused here, before anything is allocated from them.
        let (train, _) = self.param_counts_wide(d, m);
        if train > MAX_METHOD_PARAMS as u128 {
            return Err(Error::Input(format!(
                "[{}] these settings need {train} trainable parameters at d = {d}, m = {m}; \
                 fastpt accepts at most {MAX_METHOD_PARAMS}",
                self.name()
            )));
        }
        if self.prompt_rows() > MAX_PROMPT_ROWS {
            return Err(Error::Input(format!(
                "[{}] {} prompt rows; fastpt accepts at most {MAX_PROMPT_ROWS}",
                self.name(),
                self.prompt_rows()
            )));
        }
        Ok(())
    }

    /// Each method's own rules (ranks within bounds, required options given).
    fn validate_options(&self, d: usize, m: usize) -> Result<()> {
        let bad = |msg: String| Err(Error::Input(format!("[{}] {msg}", self.name())));
        let positive = |what: &str, v: usize| {
            if v == 0 {
                bad(format!("{what} = 0; it must be at least 1"))
            } else {
                Ok(())
            }
        };
        let text_given = |init: PromptInit, text: &str| {
            if init == PromptInit::Text && text.trim().is_empty() {
                bad("init = \"text\" needs init_text".into())
            } else {
                Ok(())
            }
        };
        match self {
            MethodConfig::Pt(c) => {
                positive("prompt_len", c.prompt_len)?;
                text_given(c.init, &c.init_text)
            }
            MethodConfig::PTuning(c) => {
                positive("prompt_len", c.prompt_len)?;
                text_given(c.init, &c.init_text)
            }
            MethodConfig::Residual(c) => {
                positive("prompt_len", c.prompt_len)?;
                positive("bottleneck (h)", c.bottleneck)?;
                text_given(c.init, &c.init_text)
            }
            MethodConfig::Dpt(c) => {
                positive("prompt_len", c.prompt_len)?;
                positive("rank (b)", c.rank)?;
                if c.rank > c.prompt_len.min(d) {
                    return bad(format!(
                        "rank b = {} > min(prompt_len l = {}, d = {d})",
                        c.rank, c.prompt_len
                    ));
                }
                Ok(())
            }
            MethodConfig::Dept(c) => {
                positive("prompt_len", c.prompt_len)?;
                // The update is scaled by α/√r: r = 0 has no update to scale.
                positive("rank (r)", c.rank)?;
                if c.rank > m.min(d) {
                    return bad(format!("rank r = {} > min(m = {m}, d = {d})", c.rank));
                }
                if !(c.alpha.is_finite() && c.alpha > 0.0) {
                    return bad(format!("alpha = {} must be a positive number", c.alpha));
                }
                text_given(c.init, &c.init_text)
            }
            MethodConfig::Ept(c) => {
                positive("source_len (l)", c.source_len)?;
                // s = 0 is the end point of the paper's sweep (Fig. 4b): the low-rank update alone.
                if c.prompt_len == 0 && c.rank == 0 {
                    return bad("prompt_len s = 0 and rank r = 0: nothing to train".into());
                }
                if c.prompt_len > c.source_len {
                    return bad(format!(
                        "prompt_len s = {} > source_len l = {}",
                        c.prompt_len, c.source_len
                    ));
                }
                if c.source_len > m {
                    return bad(format!(
                        "source_len l = {} > max input length m = {m} (P is padded to m rows)",
                        c.source_len
                    ));
                }
                if c.rank > m.min(d) {
                    return bad(format!("rank r = {} > min(m = {m}, d = {d})", c.rank));
                }
                if c.multi_space && c.prompt_len > 0 {
                    positive("experts (N_e)", c.experts)?;
                    positive("expert_hidden (h)", c.hidden(m))?;
                }
                text_given(c.init, &c.init_text)
            }
            MethodConfig::Lamp(c) => {
                positive("prompt_len", c.prompt_len)?;
                positive("rank", c.rank)?;
                positive("pool (p)", c.pool)?;
                if c.rank > c.prompt_len.min(d) {
                    return bad(format!(
                        "rank r = {} > min(prompt_len l = {}, d = {d})",
                        c.rank, c.prompt_len
                    ));
                }
                if !c.prompt_len.is_multiple_of(c.pool) {
                    return bad(format!(
                        "prompt_len l = {} is not a multiple of pool p = {}",
                        c.prompt_len, c.pool
                    ));
                }
                text_given(c.init, &c.init_text)
            }
            MethodConfig::Xpt(c) => {
                positive("repeats (n)", c.repeats)?;
                positive("hidden (h)", c.hidden)
            }
        }
    }

    /// Number of prompt rows the method prepends.
    pub fn prompt_rows(&self) -> usize {
        match self {
            MethodConfig::Pt(c) => c.prompt_len,
            MethodConfig::PTuning(c) => c.prompt_len,
            MethodConfig::Residual(c) => c.prompt_len,
            MethodConfig::Dpt(c) => c.prompt_len,
            MethodConfig::Dept(c) => c.prompt_len,
            MethodConfig::Ept(c) => c.prompt_len,
            MethodConfig::Lamp(c) => c.prompt_len / c.pool.max(1),
            MethodConfig::Xpt(c) => c.repeats,
        }
    }

    /// Parameter counts for model width `d` and maximum input length `m`, from the formulas of
    /// methods.md (a test checks them against the tensors the methods allocate).
    pub fn param_counts(&self, d: usize, m: usize) -> ParamCounts {
        let (train, stored) = self.param_counts_wide(d, m);
        // `validate` refuses settings whose counts exceed MAX_METHOD_PARAMS, so these fit.
        ParamCounts {
            train: usize::try_from(train).unwrap_or(usize::MAX),
            stored: usize::try_from(stored).unwrap_or(usize::MAX),
        }
    }

    /// (train-time, stored) counts that saturate instead of wrapping: any size a config can
    /// hold gives either the exact count or one far above `MAX_METHOD_PARAMS`.
    fn param_counts_wide(&self, d: usize, m: usize) -> (u128, u128) {
        let w = |x: usize| Count(x as u128);
        let (d, m) = (w(d), w(m));
        let (train, stored) = match self {
            MethodConfig::Pt(c) => (w(c.prompt_len) * d, w(c.prompt_len) * d),
            MethodConfig::PTuning(c) => (
                w(c.prompt_len) * d + Count(3) * (d * d + d),
                w(c.prompt_len) * d,
            ),
            MethodConfig::Residual(c) => {
                let h = w(c.bottleneck);
                (
                    w(c.prompt_len) * d + (d * h + h) + (h * d + d) + Count(2) * d,
                    w(c.prompt_len) * d,
                )
            }
            MethodConfig::Dpt(c) => {
                let factors = w(c.prompt_len) * w(c.rank) + w(c.rank) * d;
                (factors, factors.min(w(c.prompt_len) * d))
            }
            MethodConfig::Dept(c) => {
                let n = w(c.prompt_len) * d + (m + d) * w(c.rank);
                (n, n)
            }
            MethodConfig::Ept(c) => {
                let stored = w(c.prompt_len) * d + (m + d) * w(c.rank);
                // The experts project the prompt rows: none at s = 0.
                let extra = if c.multi_space && c.prompt_len > 0 {
                    let (e, h) = (w(c.experts), c.expert_hidden.map_or(m, w));
                    e * (Count(2) * d * h + h + d) + e * (d + Count(1))
                } else {
                    Count(0)
                };
                (stored + extra, stored)
            }
            MethodConfig::Lamp(c) => {
                let (l, r, p) = (w(c.prompt_len), w(c.rank), w(c.pool.max(1)));
                let factors = l * r + r + r * d;
                let attention = match c.pool_mode {
                    LampPool::Average => Count(0),
                    LampPool::Attention => d * (l / p),
                };
                (factors + attention, (factors + attention).min(l / p * d))
            }
            // φ(p1) is one row, repeated: d values once folded.
            MethodConfig::Xpt(c) => (d + Count(2) * d * w(c.hidden), d),
        };
        (train.0, stored.0)
    }
}

/// A parameter count whose `+` and `·` saturate at `u128::MAX` (sizes come from user input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Count(u128);

impl std::ops::Add for Count {
    type Output = Count;
    fn add(self, other: Count) -> Count {
        Count(self.0.saturating_add(other.0))
    }
}

impl std::ops::Mul for Count {
    type Output = Count;
    fn mul(self, other: Count) -> Count {
        Count(self.0.saturating_mul(other.0))
    }
}

impl std::ops::Div for Count {
    type Output = Count;
    /// The divisor is a pooling block, at least 1.
    fn div(self, other: Count) -> Count {
        Count(self.0 / other.0.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn run_toml_selects_the_method_and_reads_its_section() {
        let text = "method = \"lamp\"\nsteps = 10\n[lamp]\nrank = 4\npool = 2\n[ept]\nrank = 99\n";
        let cfg = MethodConfig::from_run_toml(text, Path::new("run.toml")).unwrap();
        let MethodConfig::Lamp(lamp) = cfg else {
            panic!("expected LAMP, got {cfg:?}");
        };
        assert_eq!((lamp.rank, lamp.pool, lamp.prompt_len), (4, 2, 100));
        let defaults =
            MethodConfig::from_run_toml("method = \"ept\"", Path::new("r.toml")).unwrap();
        assert_eq!(defaults, MethodConfig::Ept(EptConfig::default()));
    }

    #[test]
    fn run_toml_errors_name_the_file_and_field() {
        for (text, needle) in [
            ("steps = 1", "field `method`: missing"),
            ("method = 3", "field `method`: expected a method name"),
            (
                "method = \"pt\"\npt = 1",
                "field `pt`: expected a [pt] section",
            ),
            (
                "method = \"pt\"\n[pt]\nprompt_len = \"long\"",
                "[pt] options",
            ),
            ("method = \"pt\"\n[pt]\nlength = 5", "length"),
            ("method = [", "invalid TOML"),
        ] {
            let err = MethodConfig::from_run_toml(text, Path::new("run.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("run.toml") && err.contains(needle),
                "{text}: {err}"
            );
        }
    }
}
