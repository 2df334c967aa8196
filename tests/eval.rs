//! Evaluation: rank classification's per-row scores, batched predictions equal one-at-a-time
//! predictions (padding, ordering, Llama's length buckets), and the metrics of `evaluate` equal
//! the metrics of its own predictions.

use fastpt::backend::cpu::CpuBackend;
use fastpt::data::tasks::{TaskSpec, TextExample};
use fastpt::data::tokenize::TextCodec;
use fastpt::data::{Example, HostBatch};
use fastpt::engine::{build_backbone_method, forward_loss, label_nll};
use fastpt::eval::metrics::{accuracy, Metric};
use fastpt::eval::{evaluate, predict_generate, predict_rank, EvalMode, EvalOptions};
use fastpt::model::hf::load_tokenizer;
use fastpt::model::linear::Quant;
use fastpt::model::{load_model, Backbone};
use fastpt::prompt::{MethodConfig, PromptMethod};
use fastpt::testing::fixture;

type B = CpuBackend<f32>;

const MODELS: [&str; 2] = ["t5-v1_0-tiny", "llama-gqa-tiny"];

fn setup(name: &str) -> (B, Backbone<B>, TextCodec, Box<dyn PromptMethod<B>>) {
    let be = B::new();
    let dir = fixture(name);
    let model = load_model(&be, &dir, Quant::None).unwrap();
    let codec = TextCodec::new(load_tokenizer(&dir).unwrap(), &model);
    let cfg = MethodConfig::from_toml("pt", "prompt_len = 3\ninit = \"uniform\"").unwrap();
    let method = build_backbone_method(&be, &model, &cfg, 64, 5, None).unwrap();
    (be, model, codec, method)
}

fn example(input: &str, target: &str, options: &[&str]) -> TextExample {
    TextExample {
        input: input.into(),
        target: target.into(),
        answers: Vec::new(),
        options: options.iter().map(|s| s.to_string()).collect(),
        group: None,
    }
}

/// Inputs of several lengths (so batches pad, and Llama's buckets split), two share a length.
fn examples() -> Vec<TextExample> {
    vec![
        example("rte sentence1: a cat. sentence2: a pet.", "0", &[]),
        example("rte sentence1: rain. sentence2: sun.", "1", &[]),
        example("cola sentence: big dog", "1", &[]),
        example("cola sentence: dog big", "0", &["0", "1", "2"]),
        example(
            "boolq question: is it? passage: it is so, they said.",
            "1",
            &[],
        ),
    ]
}

fn spec() -> TaskSpec {
    TaskSpec {
        name: "test".into(),
        metrics: vec![Metric::Accuracy],
        classes: vec!["0".into(), "1".into()],
    }
}

fn one_batch(model: &Backbone<B>, codec: &TextCodec, rows: &[Example]) -> HostBatch {
    let inputs: Vec<Vec<i32>> = rows.iter().map(|r| r.input.clone()).collect();
    let targets: Vec<Vec<i32>> = rows.iter().map(|r| r.target.clone()).collect();
    let ids = model.special_ids();
    match ids.decoder_start {
        Some(start) => HostBatch::from_ids(&inputs, &targets, ids.pad, start),
        None => HostBatch::causal_from_ids(&inputs, &targets, codec.eos),
    }
}

#[test]
fn label_nll_is_each_rows_mean_loss_times_its_label_count() {
    for name in MODELS {
        let (be, model, codec, mut method) = setup(name);
        // Targets of 1, 3 and 2 tokens (EOS included), inputs of different lengths.
        let rows: Vec<Example> = [("a b c", "x y"), ("hello there", "z"), ("q", "w w w w")]
            .iter()
            .map(|(i, t)| Example {
                input: codec.encode_input(i).unwrap(),
                target: codec.encode_target(t).unwrap(),
            })
            .collect();
        let batch = one_batch(&model, &codec, &rows);
        let nll = label_nll(&be, &model, Some(method.as_mut()), &batch).unwrap();
        assert_eq!(nll.len(), 3);
        for (i, row) in rows.iter().enumerate() {
            let alone = one_batch(&model, &codec, std::slice::from_ref(row));
            let mean = forward_loss(&be, &model, Some(method.as_mut()), &alone).unwrap();
            let expected = mean * row.target.len() as f64;
            assert!(
                (nll[i] - expected).abs() <= 1e-4 * expected.abs(),
                "{name} row {i}: {} vs {expected}",
                nll[i]
            );
        }
    }
}

#[test]
fn rank_classification_picks_the_least_nll_option_of_each_example() {
    for name in MODELS {
        let (be, model, codec, mut method) = setup(name);
        let spec = spec();
        let exs = examples();
        let opts = EvalOptions {
            mode: EvalMode::Rank,
            batch_size: 3, // options of one example straddle batches
            max_len: 64,
            max_new_tokens: 4,
            progress: false,
        };
        let preds = predict_rank(
            &be,
            &model,
            Some(method.as_mut()),
            &codec,
            &spec,
            &exs,
            &opts,
        )
        .unwrap();
        for (ex, pred) in exs.iter().zip(&preds) {
            let options = if ex.options.is_empty() {
                &spec.classes
            } else {
                &ex.options
            };
            let scores: Vec<f64> = options
                .iter()
                .map(|o| {
                    let row = Example {
                        input: codec.encode_input(&ex.input).unwrap(),
                        target: codec.encode_target(o).unwrap(),
                    };
                    let batch = one_batch(&model, &codec, &[row]);
                    label_nll(&be, &model, Some(method.as_mut()), &batch).unwrap()[0]
                })
                .collect();
            let best = (0..scores.len())
                .min_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                .unwrap();
            assert_eq!(
                pred, &options[best],
                "{name}: {:?} scores {scores:?}",
                ex.input
            );
        }
        // A task without options cannot be ranked.
        let stsb = TaskSpec {
            name: "stsb".into(),
            metrics: vec![Metric::PearsonSpearman],
            classes: Vec::new(),
        };
        let err = predict_rank(
            &be,
            &model,
            Some(method.as_mut()),
            &codec,
            &stsb,
            &[example("stsb x", "3.4", &[])],
            &opts,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("evaluate with generation"),
            "{err}"
        );
    }
}

#[test]
fn batched_generation_predicts_what_one_example_at_a_time_does() {
    for name in MODELS {
        let (be, model, codec, mut method) = setup(name);
        let exs = examples();
        let opts = |batch_size| EvalOptions {
            mode: EvalMode::Generate,
            batch_size,
            max_len: 64,
            max_new_tokens: 5,
            progress: false,
        };
        let batched =
            predict_generate(&be, &model, Some(method.as_mut()), &codec, &exs, &opts(4)).unwrap();
        let single: Vec<String> = exs
            .iter()
            .map(|ex| {
                predict_generate(
                    &be,
                    &model,
                    Some(method.as_mut()),
                    &codec,
                    std::slice::from_ref(ex),
                    &opts(1),
                )
                .unwrap()
                .remove(0)
            })
            .collect();
        assert_eq!(batched, single, "{name}");
        // Random weights rarely stop early: the predictions are text, not empty.
        assert!(batched.iter().any(|p| !p.is_empty()), "{name}: {batched:?}");
        assert_eq!(codec.decoder_only, name.starts_with("llama"));
    }
}

#[test]
fn evaluate_scores_its_own_predictions() {
    for name in MODELS {
        let (be, model, codec, mut method) = setup(name);
        let exs = examples();
        for mode in [EvalMode::Generate, EvalMode::Rank] {
            let opts = EvalOptions {
                mode,
                batch_size: 2,
                max_len: 64,
                max_new_tokens: 3,
                progress: false,
            };
            let ev = evaluate(
                &be,
                &model,
                Some(method.as_mut()),
                &codec,
                &spec(),
                &exs,
                &opts,
            )
            .unwrap();
            let golds: Vec<&str> = exs.iter().map(|e| e.target.as_str()).collect();
            let acc = accuracy(&ev.predictions, &golds).unwrap();
            assert_eq!(ev.metrics["accuracy"], acc, "{name} {mode:?}");
            assert_eq!(ev.score, acc);
            assert_eq!(ev.predictions.len(), exs.len());
        }
        let err = evaluate(
            &be,
            &model,
            Some(method.as_mut()),
            &codec,
            &spec(),
            &[],
            &EvalOptions {
                mode: EvalMode::Rank,
                batch_size: 2,
                max_len: 64,
                max_new_tokens: 3,
                progress: false,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("no examples"), "{err}");
    }
}
