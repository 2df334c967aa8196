//! Evaluation of a (prompt-tuned) model on a text task: predictions by greedy generation of the
//! label text (KV cache) or by rank classification (score every option, pick the most likely),
//! then the task's metrics on the predictions.
//!
//! Generation compares the decoded text with the gold after [`metrics::normalize`]; rank
//! classification is faster for classification tasks (one forward over every option, no decode
//! loop) and can only answer one of the options.

pub mod metrics;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::backend::collective::{Collective, SingleProcess};
use crate::backend::Backend;
use crate::data::batching::Batcher;
use crate::data::tasks::{TaskSpec, TextExample};
use crate::data::tokenize::TextCodec;
use crate::data::Example;
use crate::engine::{generate_greedy, label_nll};
use crate::error::{Error, Result};
use crate::model::generate::GenerateConfig;
use crate::model::Backbone;
use crate::prompt::PromptMethod;
use metrics::{score, Gold};

/// How predictions are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    /// Greedy generation of the label text.
    #[default]
    Generate,
    /// The option (label text, or ReCoRD entity) with the highest likelihood.
    Rank,
}

impl std::str::FromStr for EvalMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "generate" => Ok(EvalMode::Generate),
            "rank" => Ok(EvalMode::Rank),
            _ => Err(Error::Input(format!(
                "unknown evaluation mode {s:?}: generate or rank"
            ))),
        }
    }
}

/// Sizes of an evaluation.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    pub mode: EvalMode,
    /// Rows per forward (options count as rows in rank mode).
    pub batch_size: usize,
    /// Inputs are truncated to this many tokens, as in training.
    pub max_len: usize,
    /// Generation stops after this many tokens (the training targets' maximum).
    pub max_new_tokens: usize,
    /// Show a progress bar over the examples (only when stdout is a terminal).
    pub progress: bool,
}

/// A bar over `n` examples, hidden unless asked for and stdout is a terminal.
fn progress_bar(opts: &EvalOptions, n: usize, what: &str) -> ProgressBar {
    if !(opts.progress && std::io::stdout().is_terminal()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n as u64);
    let style = ProgressStyle::with_template(&format!(
        "{what} {{bar:30}} {{pos}}/{{len}} examples  ETA {{eta}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// The metrics of one split and what produced them.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Metric name → value (fractions, correlations in [-1, 1]).
    pub metrics: BTreeMap<String, f64>,
    /// The mean of the metrics: what keep-best compares (the papers average a task's metrics).
    pub score: f64,
    /// The prediction of each example, in order.
    pub predictions: Vec<String>,
    pub seconds: f64,
}

/// Predicts every example and scores the predictions with the task's metrics.
pub fn evaluate<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    codec: &TextCodec,
    spec: &TaskSpec,
    examples: &[TextExample],
    opts: &EvalOptions,
) -> Result<Evaluation> {
    evaluate_on_ranks(
        be,
        model,
        method,
        (codec, spec),
        examples,
        opts,
        &SingleProcess,
    )
}

/// [`evaluate`] split across the ranks of a data-parallel run: rank r predicts the r-th of
/// `ranks.size()` contiguous blocks of the examples, the predictions are gathered on every rank
/// (in example order) and each rank scores them all, so every rank gets the same metrics.
pub fn evaluate_on_ranks<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    (codec, spec): (&TextCodec, &TaskSpec),
    examples: &[TextExample],
    opts: &EvalOptions,
    ranks: &dyn Collective,
) -> Result<Evaluation> {
    if examples.is_empty() {
        return Err(Error::Input(format!(
            "{}: no examples to evaluate",
            spec.name
        )));
    }
    let start = Instant::now();
    let block = rank_block(examples.len(), ranks.rank(), ranks.size());
    let mine = &examples[block];
    let mine_predicted = match (mine.is_empty(), opts.mode) {
        (true, _) => Vec::new(),
        (false, EvalMode::Generate) => predict_generate(be, model, method, codec, mine, opts)?,
        (false, EvalMode::Rank) => predict_rank(be, model, method, codec, spec, mine, opts)?,
    };
    let predictions = match ranks.size() {
        1 => mine_predicted,
        _ => gather_predictions(ranks, &mine_predicted)?,
    };
    if predictions.len() != examples.len() {
        return Err(Error::Ranks(format!(
            "{}: the ranks predicted {} of {} examples",
            spec.name,
            predictions.len(),
            examples.len()
        )));
    }
    let golds: Vec<Gold<'_>> = examples
        .iter()
        .map(|ex| Gold {
            target: &ex.target,
            answers: &ex.answers,
            group: ex.group.as_deref(),
        })
        .collect();
    let mut values = BTreeMap::new();
    for &metric in &spec.metrics {
        for (name, value) in score(metric, &predictions, &golds, &spec.classes)? {
            values.insert(name, value);
        }
    }
    let score = values.values().sum::<f64>() / values.len().max(1) as f64;
    Ok(Evaluation {
        metrics: values,
        score,
        predictions,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The examples rank `rank` of `size` takes: the rank-th of `size` contiguous blocks whose
/// lengths differ by at most one (the first `n mod size` blocks are the longer ones).
pub fn rank_block(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let size = size.max(1);
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Every rank's predictions, concatenated in rank order, on every rank.
fn gather_predictions(ranks: &dyn Collective, mine: &[String]) -> Result<Vec<String>> {
    let bytes =
        serde_json::to_vec(mine).map_err(|e| Error::Ranks(format!("encoding predictions: {e}")))?;
    let mut all = Vec::new();
    for (r, b) in ranks.all_gather(&bytes)?.iter().enumerate() {
        let part: Vec<String> = serde_json::from_slice(b)
            .map_err(|e| Error::Ranks(format!("rank {r}'s predictions: {e}")))?;
        all.extend(part);
    }
    Ok(all)
}

/// A batcher over `rows` that truncates and pads as training does.
fn batcher<'a>(
    model: &Backbone<impl Backend>,
    rows: &'a [Example],
    opts: &EvalOptions,
) -> Result<Batcher<'a>> {
    Ok(Batcher::new(
        rows,
        opts.batch_size.max(1),
        opts.max_len,
        // Rank targets are options: never cut them.
        usize::MAX,
        false,
        0,
        model.batch_ids(),
    )?
    .causal(model.is_decoder_only()))
}

/// Greedy generation of each example's label text. Llama rows are batched by input length so
/// no row is padded (generation continues each row from its last token).
pub fn predict_generate<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    mut method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    codec: &TextCodec,
    examples: &[TextExample],
    opts: &EvalOptions,
) -> Result<Vec<String>> {
    // T5's decoder input is ignored by generation; Llama rows are the input alone.
    let decoder_only = model.is_decoder_only();
    let rows: Vec<Example> = examples
        .iter()
        .map(|ex| {
            let mut input = codec.encode_input_max(&ex.input, opts.max_len.max(1))?;
            input.truncate(opts.max_len.max(1));
            let target = match decoder_only {
                false => vec![codec.eos],
                true => Vec::new(),
            };
            Ok(Example { input, target })
        })
        .collect::<Result<_>>()?;
    // Longest first: batches of similar length pad little; the order is undone below.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].input.len()));
    let gen = GenerateConfig {
        max_new_tokens: opts.max_new_tokens.max(1),
        eos_token_ids: vec![codec.eos as u32],
        keep_logits: false,
    };
    let batcher = batcher(model, &rows, opts)?;
    let bar = progress_bar(opts, rows.len(), "generating");
    let mut predictions = vec![String::new(); rows.len()];
    let mut i = 0;
    while i < order.len() {
        let mut end = (i + opts.batch_size.max(1)).min(order.len());
        if decoder_only {
            let len = rows[order[i]].input.len();
            end = i + order[i..end]
                .iter()
                .take_while(|&&j| rows[j].input.len() == len)
                .count();
        }
        let chunk: Vec<&Example> = order[i..end].iter().map(|&j| &rows[j]).collect();
        let (batch, _) = batcher.pad(&chunk);
        let out = generate_greedy(be, model, method.as_deref_mut(), &batch, &gen)?;
        for (&j, tokens) in order[i..end].iter().zip(&out.tokens) {
            predictions[j] = codec.decode(tokens)?;
        }
        bar.inc((end - i) as u64);
        i = end;
    }
    bar.finish_and_clear();
    Ok(predictions)
}

/// Rank classification: each example's options (its own, else the task's label texts) scored
/// by the summed negative log-likelihood of their tokens; the least wins (the first on a tie).
pub fn predict_rank<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    codec: &TextCodec,
    spec: &TaskSpec,
    examples: &[TextExample],
    opts: &EvalOptions,
) -> Result<Vec<String>> {
    let nll = option_nll(be, model, method, codec, spec, examples, opts)?;
    Ok(examples
        .iter()
        .zip(&nll)
        .map(|(ex, scores)| options_of(ex, spec)[rank_best(scores)].clone())
        .collect())
}

/// The options rank classification chooses from: the example's own, else the task's labels.
pub fn options_of<'a>(ex: &'a TextExample, spec: &'a TaskSpec) -> &'a [String] {
    if ex.options.is_empty() {
        &spec.classes
    } else {
        &ex.options
    }
}

/// The index of the least negative log-likelihood (the first on a tie).
pub fn rank_best(nll: &[f64]) -> usize {
    let mut best = (f64::INFINITY, 0);
    for (k, &score) in nll.iter().enumerate() {
        if score < best.0 {
            best = (score, k);
        }
    }
    best.1
}

/// The summed negative log-likelihood of each option's tokens (see [`options_of`]) after each
/// example's input: `[example][option]`, in the options' order.
pub fn option_nll<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    mut method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    codec: &TextCodec,
    spec: &TaskSpec,
    examples: &[TextExample],
    opts: &EvalOptions,
) -> Result<Vec<Vec<f64>>> {
    // Every (example, option) pair is one row.
    let mut rows: Vec<Example> = Vec::new();
    let mut owner: Vec<usize> = Vec::new(); // the example of each row
    for (i, ex) in examples.iter().enumerate() {
        let options = options_of(ex, spec);
        if options.is_empty() {
            return Err(Error::Input(format!(
                "{}: rank classification needs label options and example {i} has none (a \
                 regression or free-text task): evaluate with generation",
                spec.name
            )));
        }
        let mut input = codec.encode_input_max(&ex.input, opts.max_len.max(1))?;
        input.truncate(opts.max_len.max(1));
        for option in options {
            rows.push(Example {
                input: input.clone(),
                target: codec.encode_target(option)?,
            });
            owner.push(i);
        }
    }
    let batcher = batcher(model, &rows, opts)?;
    let mut nll: Vec<Vec<f64>> = examples.iter().map(|_| Vec::new()).collect(); // [example][option]
    let all: Vec<&Example> = rows.iter().collect();
    let bar = progress_bar(opts, examples.len(), "ranking");
    for (chunk, owners) in all
        .chunks(opts.batch_size.max(1))
        .zip(owner.chunks(opts.batch_size.max(1)))
    {
        let (batch, _) = batcher.pad(chunk);
        let scores = label_nll(be, model, method.as_deref_mut(), &batch)?;
        // Rows come in option order, so each example's scores are pushed in that order.
        for (&i, &score) in owners.iter().zip(&scores) {
            nll[i].push(score);
        }
        // An example is done once its last option is scored.
        if let Some(&i) = owners.last() {
            bar.set_position(i as u64);
        }
    }
    bar.finish_and_clear();
    Ok(nll)
}
