//! GLUE / SuperGLUE / custom tasks from the hand-written fixtures in tests/fixtures/data: exact
//! templates, label styles, STS-B rounding, splits, k-shot, MultiRC / ReCoRD structure, and errors
//! that name file, line and field.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use fastpt::data::readers::{read_csv, read_records, read_tsv};
use fastpt::data::tasks::{
    load_custom_task, load_task, LabelStyle, TaskData, TaskOptions, TextExample, TASK_NAMES,
};
use fastpt::eval::metrics::Metric;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn dir(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

fn opts(labels: LabelStyle) -> TaskOptions {
    TaskOptions {
        seed: 42,
        k_shot: None,
        labels,
        dev_holdout: 1000,
    }
}

fn words() -> TaskOptions {
    opts(LabelStyle::Words)
}

fn load(name: &str, rel: &str, o: &TaskOptions) -> TaskData {
    load_task(name, &dir(rel), o).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn find<'a>(exs: &'a [TextExample], input_start: &str) -> &'a TextExample {
    exs.iter()
        .find(|e| e.input.starts_with(input_start))
        .unwrap_or_else(|| panic!("no example starting {input_start:?}"))
}

fn all(d: &TaskData) -> Vec<&TextExample> {
    d.train.iter().chain(&d.dev).chain(&d.test).collect()
}

fn err_of(r: fastpt::Result<TaskData>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn task_names_cover_glue_and_superglue() {
    for n in [
        "cola",
        "sst2",
        "mrpc",
        "qqp",
        "stsb",
        "mnli",
        "mnli_mismatched",
        "qnli",
        "rte",
        "boolq",
        "cb",
        "copa",
        "multirc",
        "record",
        "superglue-rte",
        "wic",
        "wsc",
    ] {
        assert!(TASK_NAMES.contains(&n), "{n}");
    }
    let e = err_of(load_task("glue-foo", &dir("glue/rte"), &words()));
    assert!(e.contains("glue-foo") && e.contains("rte"), "{e}");
}

#[test]
fn rte_glue_tsv_template_and_label_styles() {
    let d = load("rte", "glue/rte", &words());
    assert_eq!(d.spec.name, "rte");
    assert_eq!(d.spec.metrics, vec![Metric::Accuracy]);
    assert_eq!(d.spec.classes, vec!["entailment", "not_entailment"]);
    assert_eq!(d.train.len(), 6);
    let ex = &d.train[0];
    assert_eq!(
        ex.input,
        "rte sentence1: The cat sat on the mat. sentence2: A cat is sitting."
    );
    assert_eq!(ex.target, "entailment");
    assert_eq!(ex.options, vec!["entailment", "not_entailment"]);
    assert!(ex.answers.is_empty() && ex.group.is_none());
    assert_eq!(d.train[1].target, "not_entailment");
    // GLUE TSVs are not quoted: the quotes stay in the text.
    let q = find(
        &[d.dev.clone(), d.test.clone()].concat(),
        "rte sentence1: Ana",
    )
    .clone();
    assert_eq!(
        q.input,
        "rte sentence1: Ana wrote a \"short\" note. sentence2: Ana wrote something."
    );

    let d = load("rte", "glue/rte", &opts(LabelStyle::Indices));
    assert_eq!(d.spec.classes, vec!["0", "1"]);
    assert_eq!(
        (d.train[0].target.as_str(), d.train[1].target.as_str()),
        ("0", "1")
    );
    assert_eq!(d.train[0].options, vec!["0", "1"]);
}

#[test]
fn rte_hf_export_matches_glue_tsv() {
    let tsv = load("rte", "glue/rte", &words());
    let hf = load("rte", "glue/rte_hf", &words());
    assert_eq!(hf.train.len(), 4);
    assert_eq!(hf.train[..4], tsv.train[..4]);
    assert_eq!(hf.dev.len() + hf.test.len(), 4);
}

#[test]
fn glue_templates() {
    let d = load("mrpc", "glue/mrpc", &words());
    assert_eq!(d.spec.metrics, vec![Metric::F1, Metric::Accuracy]);
    assert_eq!(
        d.train[0].input,
        "mrpc sentence1: He said \"yes\" twice. sentence2: He answered \"yes\" two times."
    );
    assert_eq!(d.train[0].target, "equivalent");
    assert_eq!(d.train[1].target, "not_equivalent");

    let d = load("cola", "glue/cola", &words());
    assert_eq!(d.spec.metrics, vec![Metric::Matthews]);
    assert_eq!(d.train[0].input, "cola sentence: The book is on the table.");
    assert_eq!(d.train[0].target, "acceptable");
    assert_eq!(d.train[1].target, "unacceptable");
    assert_eq!(d.dev.len() + d.test.len(), 2);

    let o = TaskOptions {
        dev_holdout: 3,
        ..words()
    };
    let d = load("sst2", "glue/sst2", &o);
    assert!(d
        .train
        .iter()
        .any(|e| e.input == "sst2 sentence: a lovely film"));
    assert_eq!(d.test[0].input, "sst2 sentence: a joy to watch");
    assert_eq!(d.test[0].target, "positive");
}

#[test]
fn mnli_dev_is_mismatched_and_test_matched() {
    let d = load("mnli", "glue/mnli", &words());
    assert_eq!(
        d.spec.classes,
        vec!["entailment", "neutral", "contradiction"]
    );
    assert_eq!(d.train.len(), 3);
    assert_eq!(
        d.train[0].input,
        "mnli premise: The door was open. hypothesis: The door was not closed."
    );
    assert_eq!(
        d.train
            .iter()
            .map(|e| e.target.as_str())
            .collect::<Vec<_>>(),
        ["entailment", "neutral", "contradiction"]
    );
    assert_eq!(d.dev.len(), 1);
    assert!(d.dev[0].input.starts_with("mnli premise: Mismatched"));
    assert_eq!(d.test.len(), 2);
    assert!(d.test[0].input.starts_with("mnli premise: Matched"));

    let m = load("mnli_mismatched", "glue/mnli", &words());
    assert_eq!(m.dev, d.test);
    assert_eq!(m.test, d.dev);
    assert_eq!(m.spec.name, "mnli_mismatched");
}

#[test]
fn stsb_targets_round_to_fifths() {
    let d = load("stsb", "glue/stsb", &words());
    assert_eq!(d.spec.metrics, vec![Metric::PearsonSpearman]);
    assert!(d.spec.classes.is_empty());
    let targets: Vec<&str> = d.train.iter().map(|e| e.target.as_str()).collect();
    // 4.8 → "4.8", 0.5 (2.5 fifths, ties to even) → "0.4", 3.27 → "3.2", 3.3 (16.5) → "3.2".
    assert_eq!(targets, ["4.8", "0.4", "3.2", "3.2"]);
    assert_eq!(
        d.train[0].input,
        "stsb sentence1: A man plays a guitar. sentence2: A man is playing guitar."
    );
    assert!(d.train[0].options.is_empty());
    let mut dev_test: Vec<&str> = d
        .dev
        .iter()
        .chain(&d.test)
        .map(|e| e.target.as_str())
        .collect();
    dev_test.sort();
    // 3.31 → "3.4", 0.7 (3.5 fifths) → "0.8", 4 → "4.0", 5 → "5.0".
    assert_eq!(dev_test, ["0.8", "3.4", "4.0", "5.0"]);
}

#[test]
fn superglue_templates() {
    let d = load("boolq", "superglue/boolq", &words());
    assert_eq!(
        d.train[0].input,
        "superglue-boolq question: is the sky blue passage: On clear days the sky looks blue."
    );
    assert_eq!(
        (d.train[0].target.as_str(), d.train[1].target.as_str()),
        ("True", "False")
    );
    let d = load(
        "superglue-boolq",
        "superglue/boolq",
        &opts(LabelStyle::Indices),
    );
    assert_eq!(
        (d.train[0].target.as_str(), d.train[1].target.as_str()),
        ("1", "0")
    );

    let d = load("cb", "superglue/cb", &words());
    assert_eq!(d.spec.metrics, vec![Metric::F1Macro, Metric::Accuracy]);
    assert_eq!(
        d.spec.classes,
        vec!["entailment", "contradiction", "neutral"]
    );
    assert_eq!(
        d.train[0].input,
        "superglue-cb premise: It was raining, I think. hypothesis: It was raining."
    );
    let cb: Vec<&str> = d.train.iter().take(3).map(|e| e.target.as_str()).collect();
    assert_eq!(cb, ["entailment", "contradiction", "neutral"]);
    let d = load("cb", "superglue/cb", &opts(LabelStyle::Indices));
    let cb: Vec<&str> = d.train.iter().take(3).map(|e| e.target.as_str()).collect();
    assert_eq!(cb, ["0", "1", "2"]);

    let d = load("copa", "superglue/copa", &words());
    assert_eq!(
        d.train[0].input,
        "superglue-copa premise: The glass fell. choice1: It broke. choice2: It sang."
    );
    assert_eq!(
        (d.train[0].target.as_str(), d.train[1].target.as_str()),
        ("choice1", "choice2")
    );

    let d = load("wic", "superglue/wic", &words());
    assert_eq!(
        d.train[0].input,
        "superglue-wic sentence1: He sat on the river bank. sentence2: She works at the bank. word: bank"
    );
    assert_eq!(d.train[0].target, "False");
}

#[test]
fn wsc_marks_noun_and_pronoun() {
    let d = load("wsc", "superglue/wsc", &words());
    assert_eq!(
        d.train[0].input,
        "superglue-wsc.fixed text: * Mark * told Pete # he # was late ."
    );
    assert_eq!(d.train[0].target, "True");
    assert_eq!(
        d.train[1].input,
        "superglue-wsc.fixed text: The trophy did not fit in * the case * because # it # was big ."
    );
    let hf = load("superglue-wsc.fixed", "superglue/wsc_hf", &words());
    assert_eq!(hf.train[0], d.train[0]);
    let mut a: Vec<String> = d
        .dev
        .iter()
        .chain(&d.test)
        .map(|e| e.input.clone())
        .collect();
    let mut b: Vec<String> = hf
        .dev
        .iter()
        .chain(&hf.test)
        .map(|e| e.input.clone())
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert!(a.contains(
        &"superglue-wsc.fixed text: Anna thanked * Beth * because # she # helped .".to_string()
    ));
}

#[test]
fn multirc_one_example_per_option_grouped_by_question() {
    let d = load("multirc", "superglue/multirc", &words());
    assert_eq!(d.spec.metrics, vec![Metric::MultiRc]);
    assert_eq!(d.spec.classes, vec!["False", "True"]);
    assert_eq!(d.train.len(), 5);
    assert_eq!(
        d.train[0].input,
        "superglue-multirc question: How many goats? answer: Two paragraph: Sent 1: Lena keeps two goats. Sent 2: They eat hay."
    );
    let t: Vec<&str> = d.train.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(t, ["True", "False", "True", "False", "True"]);
    let g: Vec<&str> = d
        .train
        .iter()
        .map(|e| e.group.as_deref().unwrap())
        .collect();
    assert_eq!(g, ["0-0", "0-0", "0-1", "0-1", "0-1"]);
    // The 4 validation questions are halved whole: no question is split between dev and test.
    assert_eq!(d.dev.len() + d.test.len(), 8);
    let groups = |v: &[TextExample]| -> HashSet<String> {
        v.iter().map(|e| e.group.clone().unwrap()).collect()
    };
    let (gd, gt) = (groups(&d.dev), groups(&d.test));
    assert_eq!((gd.len(), gt.len()), (2, 2));
    assert!(gd.is_disjoint(&gt));

    let hf = load("superglue-multirc", "superglue/multirc_hf", &words());
    assert_eq!(hf.train[..2], d.train[..2]);
    // HF rows of one question are grouped even when not adjacent.
    let all_hf: Vec<&TextExample> = hf.dev.iter().chain(&hf.test).collect();
    assert_eq!(all_hf.len(), 4);
    let q2: Vec<&&TextExample> = all_hf
        .iter()
        .filter(|e| e.group.as_deref() == Some("1-2"))
        .collect();
    assert_eq!(q2.len(), 2);
    let dev_groups = groups(&hf.dev);
    assert!(dev_groups.is_disjoint(&groups(&hf.test)));
}

#[test]
fn record_answers_entities_and_train_duplicates() {
    let o = TaskOptions {
        dev_holdout: 1,
        ..words()
    };
    let d = load("record", "superglue/record", &o);
    assert_eq!(d.spec.metrics, vec![Metric::Record]);
    assert!(d.spec.classes.is_empty());
    // 3 training queries: 1 held out as dev; test is the validation file.
    assert_eq!(d.dev.len(), 1);
    assert_eq!(d.test.len(), 1);
    let t = &d.test[0];
    assert_eq!(
        t.input,
        "superglue-record record query: The win was in @placeholder. entities: Comet Club, Rome passage: The Comet Club won in Rome! Comet Club celebrates"
    );
    assert_eq!(t.target, "Rome");
    assert_eq!(t.answers, vec!["Rome"]);
    assert_eq!(t.options, vec!["Comet Club", "Rome"]);
    assert!(t.group.is_none());
    // Every query appears in train or dev; train has one example per gold answer.
    let queries: Vec<&TextExample> = all(&d);
    let met = queries
        .iter()
        .find(|e| e.input.contains("query: @placeholder met Vik."))
        .unwrap();
    assert_eq!(met.options, vec!["Bergen", "Nora Lind", "Vik"]);
    assert_eq!(met.answers, vec!["Nora Lind"]);
    assert!(met.input.ends_with(
        "passage: Nora Lind met Vik in Bergen. Nora Lind visits Bergen. Vik says hello"
    ));
    let won: Vec<&TextExample> = d
        .train
        .iter()
        .filter(|e| e.input.contains("query: @placeholder won."))
        .collect();
    if !won.is_empty() {
        let targets: Vec<&str> = won.iter().map(|e| e.target.as_str()).collect();
        assert_eq!(targets, ["Comet Club", "Rome"]);
        assert!(won.iter().all(|e| e.answers == vec!["Comet Club", "Rome"]));
    } else {
        assert_eq!(d.dev[0].answers, vec!["Comet Club", "Rome"]);
    }

    let hf = load("superglue-record", "superglue/record_hf", &o);
    assert_eq!(hf.test, d.test);
    let mut a: Vec<String> = all(&d).iter().map(|e| e.input.clone()).collect();
    let mut b: Vec<String> = all(&hf).iter().map(|e| e.input.clone()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

#[test]
fn small_task_splits_halve_validation_deterministically() {
    let d1 = load("boolq", "superglue/boolq", &words());
    assert_eq!(d1.train.len(), 4);
    assert_eq!((d1.dev.len(), d1.test.len()), (4, 4));
    let dev: HashSet<&str> = d1.dev.iter().map(|e| e.input.as_str()).collect();
    let test: HashSet<&str> = d1.test.iter().map(|e| e.input.as_str()).collect();
    assert!(dev.is_disjoint(&test));
    assert_eq!(dev.len() + test.len(), 8);
    assert_eq!(d1, load("boolq", "superglue/boolq", &words()));
    let other = (1..20u64)
        .map(|s| {
            load(
                "boolq",
                "superglue/boolq",
                &TaskOptions { seed: s, ..words() },
            )
        })
        .any(|d| d.dev != d1.dev);
    assert!(other, "some other seed gives another dev/test split");
    // RTE: 6 validation rows → 3 dev + 3 test.
    let r = load("rte", "glue/rte", &words());
    assert_eq!((r.dev.len(), r.test.len()), (3, 3));
}

#[test]
fn large_task_holds_out_dev_from_train() {
    let o = TaskOptions {
        dev_holdout: 3,
        ..words()
    };
    let d = load("sst2", "glue/sst2", &o);
    assert_eq!((d.train.len(), d.dev.len(), d.test.len()), (7, 3, 3));
    let train: HashSet<&str> = d.train.iter().map(|e| e.input.as_str()).collect();
    assert!(d.dev.iter().all(|e| !train.contains(e.input.as_str())));
    assert_eq!(d, load("sst2", "glue/sst2", &o));
    let changed = (1..20u64).any(|s| {
        load(
            "sst2",
            "glue/sst2",
            &TaskOptions {
                seed: s,
                ..o.clone()
            },
        )
        .dev != d.dev
    });
    assert!(changed);
    // The default hold-out (1000) does not fit in 10 examples: a clear error.
    let e = err_of(load_task("sst2", &dir("glue/sst2"), &words()));
    assert!(e.contains("train.tsv") && e.contains("dev_holdout"), "{e}");
}

#[test]
fn k_shot_samples_per_class() {
    let o = TaskOptions {
        k_shot: Some(2),
        ..words()
    };
    let d = load("rte", "glue/rte", &o);
    assert_eq!(d.train.len(), 4);
    for c in ["entailment", "not_entailment"] {
        assert_eq!(d.train.iter().filter(|e| e.target == c).count(), 2);
    }
    assert_eq!(d, load("rte", "glue/rte", &o));
    // k larger than a class: all of it.
    let d = load(
        "cb",
        "superglue/cb",
        &TaskOptions {
            k_shot: Some(2),
            ..words()
        },
    );
    let count = |c: &str| d.train.iter().filter(|e| e.target == c).count();
    assert_eq!(
        (
            count("entailment"),
            count("contradiction"),
            count("neutral")
        ),
        (2, 2, 1)
    );
    // Regression: k in total.
    let d = load(
        "stsb",
        "glue/stsb",
        &TaskOptions {
            k_shot: Some(3),
            ..words()
        },
    );
    assert_eq!(d.train.len(), 3);
    let e = err_of(load_task(
        "rte",
        &dir("glue/rte"),
        &TaskOptions {
            k_shot: Some(0),
            ..words()
        },
    ));
    assert!(e.contains("k_shot"), "{e}");
}

#[test]
fn custom_task_csv_with_label_map() {
    let toml = dir("custom/sentiment.toml");
    let d = load_custom_task(&toml, &dir("custom"), &words()).unwrap();
    assert_eq!(d.spec.name, "my-sentiment");
    assert_eq!(d.spec.metrics, vec![Metric::Accuracy, Metric::F1]);
    assert_eq!(d.spec.classes, vec!["negative", "positive"]);
    assert_eq!(d.train.len(), 6);
    assert_eq!(d.train[0].input, "review: Good, cheap, fast rating: 5");
    assert_eq!(d.train[0].target, "positive");
    assert_eq!(
        d.train[3].input,
        "review: He said \"never again\" rating: 2"
    );
    assert_eq!(d.train[3].target, "negative");
    assert_eq!(d.train[0].options, vec!["negative", "positive"]);
    // dev given, test absent, train small: dev halved.
    assert_eq!((d.dev.len(), d.test.len()), (2, 2));
    let d = load_custom_task(&toml, &dir("custom"), &opts(LabelStyle::Indices)).unwrap();
    assert_eq!(d.spec.classes, vec!["0", "1"]);
    assert_eq!(d.train[0].target, "1");
    let d = load_custom_task(
        &toml,
        &dir("custom"),
        &TaskOptions {
            k_shot: Some(1),
            ..words()
        },
    )
    .unwrap();
    assert_eq!(d.train.len(), 2);
}

#[test]
fn custom_free_text_task_holds_out_dev() {
    let d = load_custom_task(&dir("custom/free.toml"), &dir("custom"), &words()).unwrap();
    assert!(d.spec.classes.is_empty());
    assert_eq!(d.spec.metrics, vec![Metric::Accuracy]);
    // No dev file: min(dev_holdout, n/2) = 3 of 6 train rows become dev; test is test.csv.
    assert_eq!((d.train.len(), d.dev.len(), d.test.len()), (3, 3, 4));
    assert_eq!(d.test[0].input, "say: Fine, I guess");
    assert_eq!(d.test[0].target, "Fine, I guess!");
    assert!(d.test[0].options.is_empty());
}

#[test]
fn custom_task_errors_name_toml_and_fields() {
    let c = dir("custom");
    let e = err_of(load_custom_task(
        &dir("custom/unknown_key.toml"),
        &c,
        &words(),
    ));
    assert!(
        e.contains("unknown_key.toml") && e.contains("epochs"),
        "{e}"
    );
    let e = err_of(load_custom_task(
        &dir("custom/unknown_field.toml"),
        &c,
        &words(),
    ));
    assert!(
        e.contains("train.csv")
            && e.contains("line 2")
            && e.contains("`author`")
            && e.contains("unknown_field.toml"),
        "{e}"
    );
    let e = err_of(load_custom_task(
        &dir("custom/bad_label.toml"),
        &c,
        &words(),
    ));
    assert!(
        e.contains("bad_label.csv")
            && e.contains("line 3")
            && e.contains("`label`")
            && e.contains("\"7\""),
        "{e}"
    );
    let e = err_of(load_custom_task(
        &dir("custom/bad_metric.toml"),
        &c,
        &words(),
    ));
    assert!(
        e.contains("bad_metric.toml") && e.contains("metrics") && e.contains("bleu"),
        "{e}"
    );
    let e = err_of(load_custom_task(&dir("custom/missing.toml"), &c, &words()));
    assert!(e.contains("missing.toml"), "{e}");
}

#[test]
fn malformed_files_name_file_line_and_field() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "boolq",
            "bad/missing_field",
            &["train.jsonl", "line 2", "`passage`", "missing"],
        ),
        (
            "boolq",
            "bad/bad_json",
            &["train.jsonl", "line 2", "invalid JSON"],
        ),
        (
            "rte",
            "bad/wrong_columns",
            &["train.tsv", "line 3", "expected 4", "found 3"],
        ),
        ("rte", "bad/empty", &["train.tsv", "no records"]),
        ("rte", "bad/header_only", &["train.tsv", "only a header"]),
        (
            "rte",
            "bad/bad_label",
            &["train.tsv", "line 3", "`label`", "\"maybe\""],
        ),
        (
            "stsb",
            "bad/bad_score",
            &["train.tsv", "line 3", "`score`", "\"lots\""],
        ),
        (
            "multirc",
            "bad/bad_multirc",
            &[
                "train.jsonl",
                "line 1",
                "passage.questions[0].answers[0].label",
                "missing",
            ],
        ),
        (
            "rte",
            "bad/does_not_exist",
            &["does_not_exist", "train.tsv", "train.jsonl"],
        ),
        (
            "boolq",
            "glue/rte",
            &["task `boolq`", "train.jsonl", "train.json"],
        ),
    ];
    for (task, rel, needles) in cases {
        let e = err_of(load_task(task, &dir(rel), &words()));
        for n in *needles {
            assert!(e.contains(n), "{task} {rel}: {e:?} lacks {n:?}");
        }
    }
}

#[test]
fn readers_by_extension() {
    let r = read_records(&dir("glue/rte/train.tsv")).unwrap();
    assert_eq!(r.rows.len(), 6);
    assert_eq!(r.rows[0].0, 2);
    assert_eq!(r.rows[0].1["sentence1"], "The cat sat on the mat.");
    let r = read_records(&dir("custom/train.csv")).unwrap();
    assert_eq!(r.rows[0].1["text"], "Good, cheap, fast");
    assert_eq!(r.rows[0].1["stars"], "5");
    assert_eq!(read_csv(&dir("custom/train.csv")).unwrap(), r);
    let r = read_records(&dir("superglue/boolq/train.jsonl")).unwrap();
    assert_eq!(r.rows[0].1["label"], true);
    let e = read_tsv(&dir("bad/header_only/train.tsv"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("header_only/train.tsv"), "{e}");
    let e = read_records(&dir("custom/sentiment.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("sentiment.toml"), "{e}");
}
