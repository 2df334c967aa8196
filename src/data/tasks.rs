//! GLUE and SuperGLUE tasks as text-to-text examples, with the templates, label texts, metrics and
//! splits of the papers' reference code (compacter → ATTEMPT → DePT `tasks.py`), plus custom tasks
//! described in TOML.
//!
//! # Templates
//! The input is the reference's task name, then `key: value` pairs joined by single spaces, as the
//! reference's `seq2seq_format` with `add_prefix` (ATTEMPT's setting; DePT's runs drop the name):
//!
//! | task (aliases)                 | input                                                         | label words (index order)              |
//! |--------------------------------|---------------------------------------------------------------|----------------------------------------|
//! | `cola`                         | `cola sentence: …`                                            | unacceptable, acceptable               |
//! | `sst2` (`sst-2`)               | `sst2 sentence: …`                                            | negative, positive                     |
//! | `mrpc`                         | `mrpc sentence1: … sentence2: …`                              | not_equivalent, equivalent             |
//! | `qqp`                          | `qqp question1: … question2: …`                               | not_duplicate, duplicate               |
//! | `stsb` (`sts-b`)               | `stsb sentence1: … sentence2: …`                              | (score rounded to 0.2: "3.4")          |
//! | `mnli`, `mnli_mismatched`      | `mnli premise: … hypothesis: …`                               | entailment, neutral, contradiction     |
//! | `qnli`                         | `qnli question: … sentence: …`                                | entailment, not_entailment             |
//! | `rte`                          | `rte sentence1: … sentence2: …`                               | entailment, not_entailment             |
//! | `boolq` (`superglue-boolq`)    | `superglue-boolq question: … passage: …`                      | False, True                            |
//! | `cb` (`superglue-cb`)          | `superglue-cb premise: … hypothesis: …`                       | entailment, contradiction, neutral     |
//! | `copa` (`superglue-copa`)      | `superglue-copa premise: … choice1: … choice2: …`             | choice1, choice2                       |
//! | `multirc` (`superglue-multirc`)| `superglue-multirc question: … answer: … paragraph: …`        | False, True                            |
//! | `record` (`superglue-record`)  | `superglue-record record query: … entities: a, b passage: …`  | (an answer entity)                     |
//! | `superglue-rte`                | `superglue-rte premise: … hypothesis: …`                      | entailment, not_entailment             |
//! | `wic` (`superglue-wic`)        | `superglue-wic sentence1: … sentence2: … word: …`             | False, True                            |
//! | `wsc` (`superglue-wsc`, `superglue-wsc.fixed`) | `superglue-wsc.fixed text: …` with `* noun *` and `# pronoun #` marked | False, True |
//!
//! With [`LabelStyle::Indices`] (the reference's targets) a label is its index ("0", "1", …);
//! with [`LabelStyle::Words`] it is the word above (the HF `ClassLabel` names). COPA's input omits
//! the `question` (cause/effect) field, as the reference does. MultiRC removes `<br>` and `<b>`
//! markup; ReCoRD turns `@highlight` lines into sentences; WSC marks the spans at their word
//! indices (T5's preprocessor) and leaves the text unmarked where a span is not found there.
//! STS-B targets are `round(score·5)/5` with ties to even (numpy's `round`, T5's rule), written
//! with one decimal: 3.27 → "3.2", 3.3 (16.5 fifths) → "3.2", 3.31 → "3.4", 4 → "4.0". (The
//! ATTEMPT/DePT code misplaces a bracket and rounds to 0.1 instead.)
//!
//! # Files
//! `dir` is the task's own folder. The first file found in each list is read:
//! - GLUE train: `train.tsv`, `train.jsonl`, `train.json`; validation: `dev.tsv`,
//!   `validation.jsonl`, `validation.json`. MNLI validation: `dev_matched.tsv` /
//!   `validation_matched.jsonl` / `.json`, and `dev_mismatched.tsv` / `validation_mismatched.jsonl`
//!   / `.json`.
//! - SuperGLUE train: `train.jsonl`, `train.json`; validation: `val.jsonl`, `validation.jsonl`,
//!   `validation.json`.
//! - Then, for every task, the Hub's and `datasets`' layouts of the split (`train`, `validation`,
//!   MNLI's `validation_matched` / `validation_mismatched`): Parquet files (one, or all shards of
//!   `train-00000-of-0000N.parquet`, also under `data/`) or a `save_to_disk` split folder; see
//!   [`super::columnar`]. Their values keep their types, as JSON's do.
//!
//! GLUE TSVs use GLUE's column names (RTE `sentence1 sentence2 label` with label words; MNLI
//! `sentence1 sentence2 gold_label`; MRPC `#1 String #2 String Quality`; QQP `… is_duplicate`;
//! STS-B `… score`; CoLA without a header: `source label original_label sentence`), HF exports
//! (`datasets` `to_json`) use HF's (`premise`, `hypothesis`, integer `label`, …). Labels may be an
//! index (number or numeric string), a label word (any case) or, for two-class tasks, a boolean
//! (SuperGLUE's own files). MultiRC and ReCoRD read SuperGLUE's nested format (one passage per
//! line) and HF's flat one; WSC SuperGLUE's nested `target` and HF's flat span fields.
//!
//! # Splits (the reference's `split_validation_test`)
//! - Small tasks (cola, mrpc, rte, stsb, boolq, cb, copa, multirc, superglue-rte, wic, wsc): all
//!   of train is train; the validation set is shuffled with the seed, its first ⌊n/2⌋ become dev
//!   and the rest test. MultiRC splits whole questions, so a question's options stay together.
//!   (The reference lists MultiRC with the small tasks, though its train set has 27k rows.)
//! - Large tasks (sst2, qqp, qnli, record): train is shuffled with the seed, its first
//!   `dev_holdout` (1000) examples become dev, the rest train; the validation set is test.
//! - MNLI is in neither reference list, so it keeps its splits: train is train, dev is the
//!   mismatched validation set and test the matched one; `mnli_mismatched` swaps the two.
//! - ReCoRD is split per query; train queries with several answers then become one example per
//!   answer (the reference's duplication), dev/test keep one example per query with all answers.
//! - k-shot (`k_shot = Some(k)`, after the split): train is shuffled (a second seeded stream) and
//!   the first k examples of each class are kept (fewer where a class has fewer); STS-B, ReCoRD
//!   and custom tasks without classes keep the first k examples (ReCoRD: k queries). (DePT's
//!   `k_shot_example` instead spreads k over the classes.)
//!
//! All shuffles use `ChaCha8Rng::seed_from_u64(seed)`: the same seed gives the same splits.
//!
//! # Custom tasks (TOML)
//! ```toml
//! name = "my-sentiment"
//! input = "review: {text} rating: {stars}"  # {field} placeholders, {{ and }} for braces
//! target = "{label}"                        # optional with label_field; may use only that field
//! label_field = "label"                     # makes it a classification task
//! metrics = ["accuracy", "f1"]              # default ["accuracy"]
//! train = "train.csv"                       # relative to the data dir; .csv .tsv .jsonl .json
//!                                           # .parquet .arrow, or a save_to_disk / Parquet folder
//! dev = "dev.csv"                           # optional
//! test = "test.csv"                         # optional
//! [label_map]                               # optional: raw label value → label text
//! "0" = "negative"
//! "1" = "positive"
//! ```
//! With `label_field` the classes are the `label_map` keys (or, without a map, the distinct label
//! values of train), ordered numerically when all are integers, else as text; the label text is
//! the map's value (or the raw value), or the class index with [`LabelStyle::Indices`], put into
//! `target` (default `"{label_field}"`). Without `label_field`, `target` is free text (no classes).
//! Splits: dev and test given → used as they are; dev only → the rule above with dev as the
//! validation set (small when train has fewer than 10 000 examples); no dev → min(dev_holdout,
//! n/2) shuffled train examples are held out as dev (and halved into dev and test when test is
//! also absent).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::columnar;
use super::readers::{
    find_field, read_records, read_tsv_headerless, show_value, tsv_first_row, Loc, Record, Records,
};
use crate::data::metric::Metric;
use crate::error::{Error, Result};

/// One text-to-text example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextExample {
    /// The encoder input, e.g. "rte sentence1: … sentence2: …".
    pub input: String,
    /// The label text.
    pub target: String,
    /// ReCoRD: all gold answers; empty elsewhere.
    pub answers: Vec<String>,
    /// Candidates for rank classification: the task's label texts, ReCoRD's entities; empty for
    /// STS-B and free-text custom tasks.
    pub options: Vec<String>,
    /// MultiRC: the question id (for exact match per question); None elsewhere.
    pub group: Option<String>,
}

/// Label targets as words ("entailment") or as indices ("0", the reference code's targets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelStyle {
    Words,
    #[default]
    Indices,
}

/// How a task is loaded: the seed of every shuffle, k-shot sampling, label style, and how many
/// train examples large tasks hold out as dev.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskOptions {
    pub seed: u64,
    pub k_shot: Option<usize>,
    pub labels: LabelStyle,
    pub dev_holdout: usize,
}

impl Default for TaskOptions {
    fn default() -> Self {
        TaskOptions {
            seed: 42,
            k_shot: None,
            labels: LabelStyle::Indices,
            dev_holdout: 1000,
        }
    }
}

/// What the rest of fastpt needs to know about a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub name: String,
    pub metrics: Vec<Metric>,
    /// Label texts in index order (in the chosen [`LabelStyle`]); empty for stsb and record.
    pub classes: Vec<String>,
}

/// A task's examples, split.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskData {
    pub spec: TaskSpec,
    pub train: Vec<TextExample>,
    pub dev: Vec<TextExample>,
    pub test: Vec<TextExample>,
}

/// The built-in task names (see the module docs for aliases, templates and files).
pub const TASK_NAMES: &[&str] = &[
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
];

/// Train sets with fewer examples than this count as small (custom tasks).
const SMALL_TRAIN: usize = 10_000;

/// Which rule turns the files into train / dev / test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SplitRule {
    /// The validation set is halved into dev and test.
    Small,
    /// `dev_holdout` train examples are dev; the validation set is test.
    Large,
    /// Train as is; dev and test are MNLI's two validation sets.
    Mnli { test_matched: bool },
}

/// How records become examples.
#[derive(Debug, Clone, Copy)]
enum Format {
    /// `key: value` pairs from fields (each with its alternative names), then a label field.
    Fields {
        parts: &'static [(&'static str, &'static [&'static str])],
        label: &'static [&'static str],
    },
    MultiRc,
    Record,
    Wsc,
}

#[derive(Debug)]
struct TaskDef {
    name: &'static str,
    aliases: &'static [&'static str],
    /// The reference's task name, which starts every input.
    prefix: &'static str,
    /// Label words in index order; empty for regression (STS-B) and ReCoRD.
    words: &'static [&'static str],
    metrics: &'static [Metric],
    split: SplitRule,
    glue: bool,
    format: Format,
}

const NLI3: &[&str] = &["entailment", "neutral", "contradiction"];
const NLI2: &[&str] = &["entailment", "not_entailment"];
const BOOL: &[&str] = &["False", "True"];
const ACC: &[Metric] = &[Metric::Accuracy];
const F1_ACC: &[Metric] = &[Metric::F1, Metric::Accuracy];

const TASKS: &[TaskDef] = &[
    TaskDef {
        name: "cola",
        aliases: &[],
        prefix: "cola",
        words: &["unacceptable", "acceptable"],
        metrics: &[Metric::Matthews],
        split: SplitRule::Small,
        glue: true,
        format: Format::Fields {
            parts: &[("sentence:", &["sentence"])],
            label: &["label"],
        },
    },
    TaskDef {
        name: "sst2",
        aliases: &["sst-2"],
        prefix: "sst2",
        words: &["negative", "positive"],
        metrics: ACC,
        split: SplitRule::Large,
        glue: true,
        format: Format::Fields {
            parts: &[("sentence:", &["sentence"])],
            label: &["label"],
        },
    },
    TaskDef {
        name: "mrpc",
        aliases: &[],
        prefix: "mrpc",
        words: &["not_equivalent", "equivalent"],
        metrics: F1_ACC,
        split: SplitRule::Small,
        glue: true,
        format: Format::Fields {
            parts: &[
                ("sentence1:", &["sentence1", "#1 String"]),
                ("sentence2:", &["sentence2", "#2 String"]),
            ],
            label: &["label", "Quality"],
        },
    },
    TaskDef {
        name: "qqp",
        aliases: &[],
        prefix: "qqp",
        words: &["not_duplicate", "duplicate"],
        metrics: F1_ACC,
        split: SplitRule::Large,
        glue: true,
        format: Format::Fields {
            parts: &[
                ("question1:", &["question1"]),
                ("question2:", &["question2"]),
            ],
            label: &["label", "is_duplicate"],
        },
    },
    TaskDef {
        name: "stsb",
        aliases: &["sts-b"],
        prefix: "stsb",
        words: &[],
        metrics: &[Metric::PearsonSpearman],
        split: SplitRule::Small,
        glue: true,
        format: Format::Fields {
            parts: &[
                ("sentence1:", &["sentence1"]),
                ("sentence2:", &["sentence2"]),
            ],
            label: &["label", "score"],
        },
    },
    TaskDef {
        name: "mnli",
        aliases: &["mnli_matched"],
        prefix: "mnli",
        words: NLI3,
        metrics: ACC,
        split: SplitRule::Mnli { test_matched: true },
        glue: true,
        format: Format::Fields {
            parts: &[
                ("premise:", &["premise", "sentence1"]),
                ("hypothesis:", &["hypothesis", "sentence2"]),
            ],
            label: &["label", "gold_label"],
        },
    },
    TaskDef {
        name: "mnli_mismatched",
        aliases: &[],
        prefix: "mnli",
        words: NLI3,
        metrics: ACC,
        split: SplitRule::Mnli {
            test_matched: false,
        },
        glue: true,
        format: Format::Fields {
            parts: &[
                ("premise:", &["premise", "sentence1"]),
                ("hypothesis:", &["hypothesis", "sentence2"]),
            ],
            label: &["label", "gold_label"],
        },
    },
    TaskDef {
        name: "qnli",
        aliases: &[],
        prefix: "qnli",
        words: NLI2,
        metrics: ACC,
        split: SplitRule::Large,
        glue: true,
        format: Format::Fields {
            parts: &[("question:", &["question"]), ("sentence:", &["sentence"])],
            label: &["label"],
        },
    },
    TaskDef {
        name: "rte",
        aliases: &[],
        prefix: "rte",
        words: NLI2,
        metrics: ACC,
        split: SplitRule::Small,
        glue: true,
        format: Format::Fields {
            parts: &[
                ("sentence1:", &["sentence1"]),
                ("sentence2:", &["sentence2"]),
            ],
            label: &["label"],
        },
    },
    TaskDef {
        name: "boolq",
        aliases: &["superglue-boolq"],
        prefix: "superglue-boolq",
        words: BOOL,
        metrics: ACC,
        split: SplitRule::Small,
        glue: false,
        format: Format::Fields {
            parts: &[("question:", &["question"]), ("passage:", &["passage"])],
            label: &["label", "answer"],
        },
    },
    TaskDef {
        name: "cb",
        aliases: &["superglue-cb"],
        prefix: "superglue-cb",
        words: &["entailment", "contradiction", "neutral"],
        metrics: &[Metric::F1Macro, Metric::Accuracy],
        split: SplitRule::Small,
        glue: false,
        format: Format::Fields {
            parts: &[("premise:", &["premise"]), ("hypothesis:", &["hypothesis"])],
            label: &["label"],
        },
    },
    TaskDef {
        name: "copa",
        aliases: &["superglue-copa"],
        prefix: "superglue-copa",
        words: &["choice1", "choice2"],
        metrics: ACC,
        split: SplitRule::Small,
        glue: false,
        format: Format::Fields {
            parts: &[
                ("premise:", &["premise"]),
                ("choice1:", &["choice1"]),
                ("choice2:", &["choice2"]),
            ],
            label: &["label"],
        },
    },
    TaskDef {
        name: "multirc",
        aliases: &["superglue-multirc"],
        prefix: "superglue-multirc",
        words: BOOL,
        metrics: &[Metric::MultiRc],
        split: SplitRule::Small,
        glue: false,
        format: Format::MultiRc,
    },
    TaskDef {
        name: "record",
        aliases: &["superglue-record"],
        prefix: "superglue-record",
        words: &[],
        metrics: &[Metric::Record],
        split: SplitRule::Large,
        glue: false,
        format: Format::Record,
    },
    TaskDef {
        name: "superglue-rte",
        aliases: &[],
        prefix: "superglue-rte",
        words: NLI2,
        metrics: ACC,
        split: SplitRule::Small,
        glue: false,
        format: Format::Fields {
            parts: &[("premise:", &["premise"]), ("hypothesis:", &["hypothesis"])],
            label: &["label"],
        },
    },
    TaskDef {
        name: "wic",
        aliases: &["superglue-wic"],
        prefix: "superglue-wic",
        words: BOOL,
        metrics: ACC,
        split: SplitRule::Small,
        glue: false,
        format: Format::Fields {
            parts: &[
                ("sentence1:", &["sentence1"]),
                ("sentence2:", &["sentence2"]),
                ("word:", &["word"]),
            ],
            label: &["label"],
        },
    },
    TaskDef {
        name: "wsc",
        aliases: &["superglue-wsc", "superglue-wsc.fixed"],
        prefix: "superglue-wsc.fixed",
        words: BOOL,
        metrics: ACC,
        split: SplitRule::Small,
        glue: false,
        format: Format::Wsc,
    },
];

/// Where a split's data may be: its own file names (the first found is read), then the
/// Hub / `datasets` layouts of split `hub` ([`columnar::find_split`]).
struct SplitNames {
    files: &'static [&'static str],
    hub: &'static str,
}

const GLUE_TRAIN: SplitNames = SplitNames {
    files: &["train.tsv", "train.jsonl", "train.json"],
    hub: "train",
};
const GLUE_VAL: SplitNames = SplitNames {
    files: &["dev.tsv", "validation.jsonl", "validation.json"],
    hub: "validation",
};
const MNLI_MATCHED: SplitNames = SplitNames {
    files: &[
        "dev_matched.tsv",
        "validation_matched.jsonl",
        "validation_matched.json",
    ],
    hub: "validation_matched",
};
const MNLI_MISMATCHED: SplitNames = SplitNames {
    files: &[
        "dev_mismatched.tsv",
        "validation_mismatched.jsonl",
        "validation_mismatched.json",
    ],
    hub: "validation_mismatched",
};
const SG_TRAIN: SplitNames = SplitNames {
    files: &["train.jsonl", "train.json"],
    hub: "train",
};
const SG_VAL: SplitNames = SplitNames {
    files: &["val.jsonl", "validation.jsonl", "validation.json"],
    hub: "validation",
};

/// CoLA's GLUE train/dev TSVs have no header row; these are their columns.
const COLA_COLUMNS: &[&str] = &["source", "label", "original_label", "sentence"];

/// The examples of one split unit: one example, except a MultiRC question (all its answer
/// options), which is split and shuffled as a whole.
type Unit = Vec<TextExample>;

fn task_def(name: &str) -> Result<&'static TaskDef> {
    TASKS
        .iter()
        .find(|t| t.name == name || t.aliases.contains(&name))
        .ok_or_else(|| {
            Error::Input(format!(
                "unknown task {name:?}; the tasks are {} (or a custom task TOML)",
                TASK_NAMES.join(", ")
            ))
        })
}

/// The files of one split in `dir`: the first of `names.files` that exists, else the split's
/// Parquet / `save_to_disk` files; or an error listing every place looked at.
fn find_split(dir: &Path, names: &SplitNames, task: &str, split: &str) -> Result<Vec<PathBuf>> {
    if let Some(p) = names
        .files
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
    {
        return Ok(vec![p]);
    }
    if let Some(files) = columnar::find_split(dir, names.hub)? {
        return Ok(files);
    }
    let why = if dir.is_dir() {
        ""
    } else {
        " (the folder does not exist)"
    };
    Err(Error::format(
        dir,
        format!(
            "task `{task}`: no {split} file{why}; looked for {}, {}",
            names.files.join(", "),
            columnar::split_layouts(names.hub)
        ),
    ))
}

fn label_text(i: usize, words: &[&str], style: LabelStyle) -> String {
    match style {
        LabelStyle::Words => words[i].to_string(),
        LabelStyle::Indices => i.to_string(),
    }
}

fn class_texts(words: &[&str], style: LabelStyle) -> Vec<String> {
    (0..words.len())
        .map(|i| label_text(i, words, style))
        .collect()
}

/// A label as a class index: an index (number or numeric string), a label word (any case), or a
/// boolean for two-class tasks.
fn class_index(loc: Loc<'_>, field: &str, v: &Value, words: &[&str]) -> Result<usize> {
    let n = words.len();
    let expected = format!(
        "expected an index 0..{} or one of {}",
        n - 1,
        words.join(", ")
    );
    let idx: i64 = match v {
        Value::Bool(b) if n == 2 => return Ok(usize::from(*b)),
        Value::String(s) => {
            let t = s.trim();
            if let Some(i) = words.iter().position(|w| w.eq_ignore_ascii_case(t)) {
                return Ok(i);
            }
            match t.parse() {
                Ok(i) => i,
                Err(_) => return Err(loc.err(field, format!("{}: {expected}", show_value(v)))),
            }
        }
        Value::Number(_) => loc
            .int(v, field)
            .map_err(|_| loc.err(field, format!("{}: {expected}", show_value(v))))?,
        _ => return Err(loc.err(field, format!("{}: {expected}", show_value(v)))),
    };
    if idx == -1 {
        return Err(loc.err(
            field,
            "label -1 marks an unlabelled example (a test split?); use the labelled train and validation files",
        ));
    }
    usize::try_from(idx)
        .ok()
        .filter(|&i| i < n)
        .ok_or_else(|| loc.err(field, format!("{}: {expected}", show_value(v))))
}

/// The range of STS-B's similarity scores.
const STSB_RANGE: (f64, f64) = (0.0, 5.0);

/// The most classes a custom task may have: every example carries its task's label texts as
/// rank-classification options, so memory grows with examples × classes.
pub const MAX_CLASSES: usize = 1000;

/// The largest custom task TOML read (it names files and labels, nothing large).
const MAX_TOML_BYTES: u64 = 1 << 20;

/// STS-B's target: the score rounded to the nearest 0.2 (ties to even, as numpy), one decimal.
pub fn stsb_target(score: f64) -> String {
    format!("{:.1}", (score * 5.0).round_ties_even() / 5.0)
}

/// The first of `names` in `rec`, or an error naming them.
fn any_field<'r>(
    loc: Loc<'_>,
    rec: &'r Record,
    names: &[&'static str],
) -> Result<(&'static str, &'r Value)> {
    find_field(rec, names).ok_or_else(|| loc.missing(&names.join("` or `"), rec))
}

/// The template of a `key: value` task on one record: its prefix, then each part.
fn fields_input(
    def: &TaskDef,
    loc: Loc<'_>,
    rec: &Record,
    parts: &[(&str, &'static [&'static str])],
) -> Result<String> {
    let mut input = def.prefix.to_string();
    for (key, names) in parts {
        let (name, v) = any_field(loc, rec, names)?;
        input.push(' ');
        input.push_str(key);
        input.push(' ');
        input.push_str(&loc.text(v, name)?);
    }
    Ok(input)
}

fn fields_example(
    def: &TaskDef,
    loc: Loc<'_>,
    rec: &Record,
    parts: &[(&str, &'static [&'static str])],
    label: &[&'static str],
    style: LabelStyle,
) -> Result<TextExample> {
    let input = fields_input(def, loc, rec, parts)?;
    let (name, v) = any_field(loc, rec, label)?;
    let (target, options) = if def.words.is_empty() {
        let score = loc.float(v, name)?;
        // STS-B's similarity scores lie in [0, 5]; a value outside is a wrong column or scale.
        if !(STSB_RANGE.0..=STSB_RANGE.1).contains(&score) {
            return Err(loc.err(
                name,
                format!(
                    "{}: outside {}'s score range {}–{}",
                    show_value(v),
                    def.name,
                    STSB_RANGE.0,
                    STSB_RANGE.1
                ),
            ));
        }
        (stsb_target(score), Vec::new())
    } else {
        let i = class_index(loc, name, v, def.words)?;
        (
            label_text(i, def.words, style),
            class_texts(def.words, style),
        )
    };
    Ok(TextExample {
        input,
        target,
        answers: Vec::new(),
        options,
        group: None,
    })
}

/// MultiRC's markup removal: `<br>` becomes a space, `<b>` and `</b>` go.
fn remove_markup(s: &str) -> String {
    s.replace("<br>", " ")
        .replace("<b>", "")
        .replace("</b>", "")
}

fn multirc_example(
    def: &TaskDef,
    question: &str,
    answer: &str,
    paragraph: &str,
    label: usize,
    group: String,
    style: LabelStyle,
) -> TextExample {
    TextExample {
        input: format!(
            "{} question: {} answer: {} paragraph: {}",
            def.prefix,
            remove_markup(question),
            remove_markup(answer),
            remove_markup(paragraph)
        ),
        target: label_text(label, def.words, style),
        answers: Vec::new(),
        options: class_texts(def.words, style),
        group: Some(group),
    }
}

/// MultiRC: SuperGLUE's nested lines (a passage with questions with answers) or HF's flat rows
/// (`paragraph question answer label idx{paragraph, question}`); one unit per question.
fn multirc_units(def: &TaskDef, recs: &Records, style: LabelStyle) -> Result<Vec<Unit>> {
    let mut units: Vec<Unit> = Vec::new();
    let mut by_group: HashMap<String, usize> = HashMap::new();
    for (loc, rec) in recs.iter() {
        let line = loc.line;
        if let Some(Value::Object(passage)) = rec.get("passage") {
            let text = loc.text(loc.get(passage, "text", "passage.text")?, "passage.text")?;
            let pid = match rec.get("idx") {
                Some(v) => loc.text(v, "idx")?,
                None => format!("line{line}"),
            };
            let qs = loc.array(
                loc.get(passage, "questions", "passage.questions")?,
                "passage.questions",
            )?;
            for (qi, q) in qs.iter().enumerate() {
                let qf = format!("passage.questions[{qi}]");
                let q = loc.object(q, &qf)?;
                let question = loc.text(
                    loc.get(q, "question", &format!("{qf}.question"))?,
                    &format!("{qf}.question"),
                )?;
                let qid = match q.get("idx") {
                    Some(v) => loc.text(v, &format!("{qf}.idx"))?,
                    None => qi.to_string(),
                };
                let af = format!("{qf}.answers");
                let answers = loc.array(loc.get(q, "answers", &af)?, &af)?;
                if answers.is_empty() {
                    return Err(loc.err(&af, "no answer options"));
                }
                let mut unit = Vec::new();
                for (ai, a) in answers.iter().enumerate() {
                    let f = format!("{af}[{ai}]");
                    let a = loc.object(a, &f)?;
                    let atext = loc.text(
                        loc.get(a, "text", &format!("{f}.text"))?,
                        &format!("{f}.text"),
                    )?;
                    let lf = format!("{f}.label");
                    let label = class_index(loc, &lf, loc.get(a, "label", &lf)?, def.words)?;
                    unit.push(multirc_example(
                        def,
                        &question,
                        &atext,
                        &text,
                        label,
                        format!("{pid}-{qid}"),
                        style,
                    ));
                }
                units.push(unit);
            }
        } else {
            let get = |name: &str| -> Result<String> { loc.text(loc.get(rec, name, name)?, name) };
            let (paragraph, question, answer) =
                (get("paragraph")?, get("question")?, get("answer")?);
            let label = class_index(loc, "label", loc.get(rec, "label", "label")?, def.words)?;
            let idx = loc.object(loc.get(rec, "idx", "idx")?, "idx")?;
            let p = loc.text(loc.get(idx, "paragraph", "idx.paragraph")?, "idx.paragraph")?;
            let q = loc.text(loc.get(idx, "question", "idx.question")?, "idx.question")?;
            let group = format!("{p}-{q}");
            let ex = multirc_example(
                def,
                &question,
                &answer,
                &paragraph,
                label,
                group.clone(),
                style,
            );
            match by_group.get(&group) {
                Some(&u) => units[u].push(ex),
                None => {
                    by_group.insert(group, units.len());
                    units.push(vec![ex]);
                }
            }
        }
    }
    Ok(units)
}

/// ReCoRD's passage cleanup (T5's): an `@highlight` line after . ? ! " ' joins with a space,
/// any other with ". ".
fn record_passage(text: &str) -> String {
    const MARK: &str = "\n@highlight\n";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(MARK) {
        let before = &rest[..i];
        out.push_str(before);
        // An empty `before` follows another mark (ends in a newline) or starts the text.
        let after_punct = before
            .chars()
            .next_back()
            .is_some_and(|c| matches!(c, '.' | '?' | '!' | '"' | '\''));
        out.push_str(if after_punct { " " } else { ". " });
        rest = &rest[i + MARK.len()..];
    }
    out.push_str(rest);
    out
}

fn record_example(
    def: &TaskDef,
    query: &str,
    entities: Vec<String>,
    answers: Vec<String>,
    passage: &str,
) -> TextExample {
    TextExample {
        input: format!(
            "{} record query: {query} entities: {} passage: {}",
            def.prefix,
            entities.join(", "),
            record_passage(passage)
        ),
        target: answers[0].clone(),
        answers,
        options: entities,
        group: None,
    }
}

/// ReCoRD: SuperGLUE's nested lines (a passage with entity spans and its queries) or HF's flat
/// rows (`passage query entities answers`). One example per query; entities and answers are
/// de-duplicated and sorted (as HF's loader), the target is the first answer.
fn record_units(def: &TaskDef, recs: &Records) -> Result<Vec<Unit>> {
    let mut units = Vec::new();
    for (loc, rec) in recs.iter() {
        let texts = |v: &Value, f: &str| -> Result<BTreeSet<String>> {
            loc.array(v, f)?
                .iter()
                .enumerate()
                .map(|(i, x)| loc.text(x, &format!("{f}[{i}]")))
                .collect()
        };
        if let Some(Value::Object(passage)) = rec.get("passage") {
            let text = loc.text(loc.get(passage, "text", "passage.text")?, "passage.text")?;
            let chars: Vec<char> = text.chars().collect();
            let ef = "passage.entities";
            let mut entities = BTreeSet::new();
            for (i, e) in loc
                .array(loc.get(passage, "entities", ef)?, ef)?
                .iter()
                .enumerate()
            {
                let f = format!("{ef}[{i}]");
                let e = loc.object(e, &f)?;
                let start = loc.int(
                    loc.get(e, "start", &format!("{f}.start"))?,
                    &format!("{f}.start"),
                )?;
                let end = loc.int(loc.get(e, "end", &format!("{f}.end"))?, &format!("{f}.end"))?;
                // Inclusive character offsets, as in SuperGLUE's files.
                if start < 0 || end < start || end as usize >= chars.len() {
                    return Err(loc.err(
                        &f,
                        format!(
                            "span {start}..={end} is outside the passage ({} characters)",
                            chars.len()
                        ),
                    ));
                }
                entities.insert(
                    chars[start as usize..=end as usize]
                        .iter()
                        .collect::<String>(),
                );
            }
            let qas = loc.array(loc.get(rec, "qas", "qas")?, "qas")?;
            for (qi, qa) in qas.iter().enumerate() {
                let qf = format!("qas[{qi}]");
                let qa = loc.object(qa, &qf)?;
                let query = loc.text(
                    loc.get(qa, "query", &format!("{qf}.query"))?,
                    &format!("{qf}.query"),
                )?;
                let af = format!("{qf}.answers");
                let mut answers = BTreeSet::new();
                for (ai, a) in loc
                    .array(loc.get(qa, "answers", &af)?, &af)?
                    .iter()
                    .enumerate()
                {
                    let f = format!("{af}[{ai}]");
                    let a = loc.object(a, &f)?;
                    answers.insert(loc.text(
                        loc.get(a, "text", &format!("{f}.text"))?,
                        &format!("{f}.text"),
                    )?);
                }
                if answers.is_empty() {
                    return Err(loc.err(&af, "no answers"));
                }
                units.push(vec![record_example(
                    def,
                    &query,
                    entities.iter().cloned().collect(),
                    answers.into_iter().collect(),
                    &text,
                )]);
            }
        } else {
            let passage = loc.text(loc.get(rec, "passage", "passage")?, "passage")?;
            let query = loc.text(loc.get(rec, "query", "query")?, "query")?;
            let entities = texts(loc.get(rec, "entities", "entities")?, "entities")?;
            let answers = texts(loc.get(rec, "answers", "answers")?, "answers")?;
            if answers.is_empty() {
                return Err(loc.err("answers", "no answers"));
            }
            units.push(vec![record_example(
                def,
                &query,
                entities.into_iter().collect(),
                answers.into_iter().collect(),
                &passage,
            )]);
        }
    }
    Ok(units)
}

/// T5's WSC span marking: if the text from word `index` on (words = non-space runs each followed
/// by one whitespace character) starts with `span`, surround it with `mark`; else leave the text.
fn mark_span(text: &str, span: &str, index: usize, mark: char) -> String {
    let mut chars = text.char_indices().peekable();
    for _ in 0..index {
        let mut word = false;
        while let Some(&(_, c)) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            word = true;
            chars.next();
        }
        // One whitespace character must end each word.
        if !word || chars.next().is_none() {
            return text.to_string();
        }
    }
    let at = chars.peek().map_or(text.len(), |&(i, _)| i);
    match text[at..].strip_prefix(span) {
        Some(after) if !span.is_empty() => {
            format!("{}{mark} {span} {mark}{after}", &text[..at])
        }
        _ => text.to_string(),
    }
}

/// WSC: SuperGLUE's lines (`text`, `target{span1_index, span1_text, span2_index, span2_text}`,
/// `label`) or HF's flat rows with the span fields at the top level.
fn wsc_example(
    def: &TaskDef,
    loc: Loc<'_>,
    rec: &Record,
    style: LabelStyle,
) -> Result<TextExample> {
    let text = loc.text(loc.get(rec, "text", "text")?, "text")?;
    let (spans, pre) = match rec.get("target") {
        Some(t) => (loc.object(t, "target")?, "target."),
        None => (rec, ""),
    };
    let get_int = |name: &str| -> Result<usize> {
        let f = format!("{pre}{name}");
        let v = loc.get(spans, name, &f)?;
        let i = loc.int(v, &f)?;
        usize::try_from(i).map_err(|_| loc.err(&f, format!("{i}: expected a word index ≥ 0")))
    };
    let get_text = |name: &str| -> Result<String> {
        let f = format!("{pre}{name}");
        loc.text(loc.get(spans, name, &f)?, &f)
    };
    let (i1, t1) = (get_int("span1_index")?, get_text("span1_text")?);
    let (i2, t2) = (get_int("span2_index")?, get_text("span2_text")?);
    let marked = mark_span(&text, &t1, i1, '*');
    // The first mark added two words before the second span if it comes first.
    let i2 = if i1 < i2 { i2 + 2 } else { i2 };
    let marked = mark_span(&marked, &t2, i2, '#');
    let label = class_index(loc, "label", loc.get(rec, "label", "label")?, def.words)?;
    Ok(TextExample {
        input: format!("{} text: {marked}", def.prefix),
        target: label_text(label, def.words, style),
        answers: Vec::new(),
        options: class_texts(def.words, style),
        group: None,
    })
}

/// Reads a file of a built-in task (CoLA's header-less TSVs included).
fn read_task_file(def: &TaskDef, path: &Path) -> Result<Records> {
    let is_tsv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
    if def.name == "cola" && is_tsv && !tsv_first_row(path)?.iter().any(|f| f == "sentence") {
        return read_tsv_headerless(path, COLA_COLUMNS);
    }
    read_records(path)
}

/// A split's records (several files: in order) as split units.
fn load_units(def: &TaskDef, paths: &[PathBuf], style: LabelStyle) -> Result<Vec<Unit>> {
    let mut parts = Vec::with_capacity(paths.len());
    for p in paths {
        parts.push(read_task_file(def, p)?);
    }
    let recs = Records::concat(parts)
        .ok_or_else(|| Error::Input(format!("task `{}`: a split without files", def.name)))?;
    match def.format {
        Format::MultiRc => multirc_units(def, &recs, style),
        Format::Record => record_units(def, &recs),
        Format::Fields { parts, label } => recs
            .iter()
            .map(|(loc, rec)| fields_example(def, loc, rec, parts, label, style).map(|e| vec![e]))
            .collect(),
        Format::Wsc => recs
            .iter()
            .map(|(loc, rec)| wsc_example(def, loc, rec, style).map(|e| vec![e]))
            .collect(),
    }
}

fn split_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// k-shot sampling draws from its own stream, so it does not depend on the split's draws.
fn kshot_rng(seed: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1);
    rng
}

/// Shuffles `val` and halves it: (first ⌊n/2⌋, rest).
fn halve(mut val: Vec<Unit>, rng: &mut ChaCha8Rng) -> (Vec<Unit>, Vec<Unit>) {
    val.shuffle(rng);
    let test = val.split_off(val.len() / 2);
    (val, test)
}

/// Shuffles `train` and holds out its first `n`: (rest, held out).
fn hold_out(
    mut train: Vec<Unit>,
    n: usize,
    rng: &mut ChaCha8Rng,
    task: &str,
    path: &Path,
) -> Result<(Vec<Unit>, Vec<Unit>)> {
    if n == 0 || train.len() <= n {
        return Err(Error::format(
            path,
            format!(
                "task `{task}`: {} training examples, too few to hold out dev_holdout = {n} for dev \
                 (dev_holdout must be at least 1 and below the train size)",
                train.len()
            ),
        ));
    }
    train.shuffle(rng);
    let rest = train.split_off(n);
    Ok((rest, train))
}

/// k examples per class (in shuffled order), or k in total when there are no classes.
fn k_shot(train: Vec<Unit>, k: usize, classes: &[String], seed: u64) -> Result<Vec<Unit>> {
    if k == 0 {
        return Err(Error::Input("k_shot must be at least 1".into()));
    }
    let mut rng = kshot_rng(seed);
    if classes.is_empty() {
        let mut train = train;
        train.shuffle(&mut rng);
        train.truncate(k);
        return Ok(train);
    }
    let mut examples: Vec<TextExample> = train.into_iter().flatten().collect();
    examples.shuffle(&mut rng);
    let mut counts = vec![0usize; classes.len()];
    let mut out = Vec::new();
    for ex in examples {
        if let Some(c) = classes.iter().position(|c| *c == ex.target) {
            if counts[c] < k {
                counts[c] += 1;
                out.push(vec![ex]);
            }
        }
    }
    Ok(out)
}

fn flatten(units: Vec<Unit>) -> Vec<TextExample> {
    units.into_iter().flatten().collect()
}

/// ReCoRD training: one example per gold answer (the reference duplicates queries this way).
fn expand_answers(train: Vec<TextExample>) -> Vec<TextExample> {
    train
        .into_iter()
        .flat_map(|ex| {
            let n = ex.answers.len().max(1);
            (0..n).map(move |i| {
                let mut e = ex.clone();
                if let Some(a) = ex.answers.get(i) {
                    e.target = a.clone();
                }
                e
            })
        })
        .collect()
}

/// Loads a built-in task (see [`TASK_NAMES`] and the module docs) from its folder `dir`.
pub fn load_task(name: &str, dir: &Path, opts: &TaskOptions) -> Result<TaskData> {
    let def = task_def(name)?;
    let style = opts.labels;
    let (train_names, val_names) = if def.glue {
        (&GLUE_TRAIN, &GLUE_VAL)
    } else {
        (&SG_TRAIN, &SG_VAL)
    };
    let train_path = find_split(dir, train_names, def.name, "train")?;
    let train_units = load_units(def, &train_path, style)?;
    let mut rng = split_rng(opts.seed);
    let (train, dev, test) = match def.split {
        SplitRule::Small => {
            let val_path = find_split(dir, val_names, def.name, "validation")?;
            let (dev, test) = halve(load_units(def, &val_path, style)?, &mut rng);
            (train_units, dev, test)
        }
        SplitRule::Large => {
            let val_path = find_split(dir, val_names, def.name, "validation")?;
            let test = load_units(def, &val_path, style)?;
            let (train, dev) = hold_out(
                train_units,
                opts.dev_holdout,
                &mut rng,
                def.name,
                train_path.first().map_or(dir, PathBuf::as_path),
            )?;
            (train, dev, test)
        }
        SplitRule::Mnli { test_matched } => {
            let matched = find_split(dir, &MNLI_MATCHED, def.name, "matched validation")?;
            let mismatched = find_split(dir, &MNLI_MISMATCHED, def.name, "mismatched validation")?;
            let (dev_path, test_path) = if test_matched {
                (mismatched, matched)
            } else {
                (matched, mismatched)
            };
            (
                train_units,
                load_units(def, &dev_path, style)?,
                load_units(def, &test_path, style)?,
            )
        }
    };
    let classes = class_texts(def.words, style);
    let train = match opts.k_shot {
        Some(k) => k_shot(train, k, &classes, opts.seed)?,
        None => train,
    };
    let mut train = flatten(train);
    if matches!(def.format, Format::Record) {
        train = expand_answers(train);
    }
    Ok(TaskData {
        spec: TaskSpec {
            name: def.name.to_string(),
            metrics: def.metrics.to_vec(),
            classes,
        },
        train,
        dev: flatten(dev),
        test: flatten(test),
    })
}

// ---------------------------------------------------------------------------------------------
// Custom tasks

/// A custom task's TOML (see the module docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomToml {
    name: String,
    input: String,
    target: Option<String>,
    label_field: Option<String>,
    label_map: Option<std::collections::BTreeMap<String, String>>,
    metrics: Option<Vec<String>>,
    train: String,
    dev: Option<String>,
    test: Option<String>,
}

/// A piece of a `{field}` template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(String),
}

/// Parses `"review: {text}"` into pieces; `{{` and `}}` are literal braces.
fn parse_template(s: &str, toml: &Path, key: &str) -> Result<Vec<Piece>> {
    let bad = |msg: String| Error::config(toml, key, format!("{msg} in template {s:?}"));
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') | None => return Err(bad("unclosed `{`".into())),
                        Some(c) => name.push(c),
                    }
                }
                if name.trim().is_empty() {
                    return Err(bad("empty `{}` placeholder".into()));
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Field(name.trim().to_string()));
            }
            '}' => return Err(bad("unmatched `}` (write `}}` for a brace)".into())),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// Fills a template from a record; a missing field names the data file, line, field and the
/// TOML key that uses it.
fn render(pieces: &[Piece], loc: Loc<'_>, rec: &Record, key: &str, toml: &Path) -> Result<String> {
    let mut out = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Field(f) => match rec.get(f) {
                Some(v) => out.push_str(&loc.text(v, f)?),
                None => {
                    let have: Vec<&str> = rec.keys().map(String::as_str).collect();
                    return Err(loc.err(
                        f,
                        format!(
                            "missing (used by `{key}` in {}; the record has: {})",
                            toml.display(),
                            have.join(", ")
                        ),
                    ));
                }
            },
        }
    }
    Ok(out)
}

/// Fills a target template that may use only the label field with a label text.
fn render_label(pieces: &[Piece], label: &str) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.as_str(),
            Piece::Field(_) => label,
        })
        .collect()
}

/// Numeric order when every key is an integer ("2" before "10"), else text order.
fn sort_keys(keys: &mut [String]) {
    let nums: Option<Vec<i64>> = keys.iter().map(|k| k.trim().parse().ok()).collect();
    if nums.is_some() {
        keys.sort_by_key(|k| k.trim().parse::<i64>().unwrap_or(0));
    } else {
        keys.sort();
    }
}

/// Classification settings of a custom task.
struct CustomLabels {
    field: String,
    /// Raw label values in class order.
    keys: Vec<String>,
    /// Label texts in class order (before the label style).
    texts: Vec<String>,
}

/// Each record as an example of a custom task. With `label_optional` (`fastpt predict`) a
/// record without its label (or without a free-text target's fields) gets an empty target.
fn custom_examples(
    recs: &Records,
    input: &[Piece],
    target: &[Piece],
    labels: Option<&CustomLabels>,
    classes: &[String],
    toml: &Path,
    label_optional: bool,
) -> Result<Vec<Unit>> {
    recs.iter()
        .map(|(loc, rec)| {
            let input = render(input, loc, rec, "input", toml)?;
            let target = match labels {
                Some(l) if label_optional && rec.get(&l.field).is_none() => String::new(),
                None if label_optional => {
                    render(target, loc, rec, "target", toml).unwrap_or_default()
                }
                Some(l) => {
                    let raw = loc.text(loc.get(rec, &l.field, &l.field)?, &l.field)?;
                    let i = l.keys.iter().position(|k| k == raw.trim()).ok_or_else(|| {
                        loc.err(
                            &l.field,
                            format!(
                                "label {raw:?} is not one of the classes ({}) of {}",
                                l.keys.join(", "),
                                toml.display()
                            ),
                        )
                    })?;
                    classes[i].clone()
                }
                None => render(target, loc, rec, "target", toml)?,
            };
            Ok(vec![TextExample {
                input,
                target,
                answers: Vec::new(),
                options: classes.to_vec(),
                group: None,
            }])
        })
        .collect()
}

/// Loads a task described by a TOML file (see the module docs); data paths are relative to `dir`.
pub fn load_custom_task(toml_path: &Path, dir: &Path, opts: &TaskOptions) -> Result<TaskData> {
    let cfg = read_custom_toml(toml_path)?;
    let metrics = custom_metrics(&cfg, toml_path)?;
    let (input, target) = custom_templates(&cfg, toml_path)?;

    let data_path = |key: &str, rel: &str| -> Result<PathBuf> {
        if rel.trim().is_empty() {
            return Err(Error::config(toml_path, key, "empty path"));
        }
        Ok(dir.join(rel))
    };
    let read_split = |key: &str, rel: Option<&str>| -> Result<Option<Records>> {
        rel.map(|r| data_path(key, r).and_then(|p| read_records(&p)))
            .transpose()
    };
    let train_recs = read_records(&data_path("train", &cfg.train)?)?;
    let dev_recs = read_split("dev", cfg.dev.as_deref())?;
    let test_recs = read_split("test", cfg.test.as_deref())?;

    let labels = custom_labels(&cfg, &train_recs, toml_path)?;
    let classes = custom_classes(labels.as_ref(), &target, opts.labels);
    check_metric_classes(&metrics, &classes, toml_path)?;

    let units = |recs: &Records| {
        custom_examples(
            recs,
            &input,
            &target,
            labels.as_ref(),
            &classes,
            toml_path,
            false,
        )
    };
    let train_units = units(&train_recs)?;
    let dev_units = dev_recs.as_ref().map(units).transpose()?;
    let test_units = test_recs.as_ref().map(units).transpose()?;
    let (train, dev, test) = split_custom(
        train_units,
        dev_units,
        test_units,
        opts,
        &cfg.name,
        &train_recs.path,
    )?;
    let train = match opts.k_shot {
        Some(k) => k_shot(train, k, &classes, opts.seed)?,
        None => train,
    };
    Ok(TaskData {
        spec: TaskSpec {
            name: cfg.name,
            metrics,
            classes,
        },
        train: flatten(train),
        dev: flatten(dev),
        test: flatten(test),
    })
}

/// A custom task's class texts in `style`, each through the target template.
fn custom_classes(
    labels: Option<&CustomLabels>,
    target: &[Piece],
    style: LabelStyle,
) -> Vec<String> {
    match labels {
        Some(l) => (0..l.texts.len())
            .map(|i| {
                let label = match style {
                    LabelStyle::Words => l.texts[i].clone(),
                    LabelStyle::Indices => i.to_string(),
                };
                render_label(target, &label)
            })
            .collect(),
        None => Vec::new(),
    }
}

/// The task's TOML, parsed, with a non-empty name.
fn read_custom_toml(toml_path: &Path) -> Result<CustomToml> {
    let size = std::fs::metadata(toml_path)
        .map_err(|e| Error::io(toml_path, e))?
        .len();
    if size > MAX_TOML_BYTES {
        return Err(Error::format(
            toml_path,
            format!("{size} bytes: a task TOML is at most {MAX_TOML_BYTES} bytes"),
        ));
    }
    let text = std::fs::read_to_string(toml_path).map_err(|e| Error::io(toml_path, e))?;
    let cfg: CustomToml =
        toml::from_str(&text).map_err(|e| Error::format(toml_path, e.to_string()))?;
    if cfg.name.trim().is_empty() {
        return Err(Error::config(toml_path, "name", "must not be empty"));
    }
    Ok(cfg)
}

/// `metrics` (default: accuracy), refusing the ones only a built-in task's data can feed.
fn custom_metrics(cfg: &CustomToml, toml_path: &Path) -> Result<Vec<Metric>> {
    let metrics = cfg
        .metrics
        .clone()
        .unwrap_or_else(|| vec!["accuracy".into()])
        .iter()
        .map(|m| {
            m.parse::<Metric>()
                .map_err(|e| Error::config(toml_path, "metrics", e.to_string()))
        })
        .collect::<Result<Vec<Metric>>>()?;
    if metrics.is_empty() {
        return Err(Error::config(
            toml_path,
            "metrics",
            "must name at least one metric",
        ));
    }
    for m in &metrics {
        if matches!(m, Metric::MultiRc | Metric::Record) {
            return Err(Error::config(
                toml_path,
                "metrics",
                format!(
                    "`{}` needs the built-in task's data (groups/answers)",
                    m.name()
                ),
            ));
        }
    }
    Ok(metrics)
}

/// The input and target templates. The target is free text, or the label field's text.
fn custom_templates(cfg: &CustomToml, toml_path: &Path) -> Result<(Vec<Piece>, Vec<Piece>)> {
    let input = parse_template(&cfg.input, toml_path, "input")?;
    if !input.iter().any(|p| matches!(p, Piece::Field(_))) {
        return Err(Error::config(
            toml_path,
            "input",
            format!("template {:?} uses no {{field}}", cfg.input),
        ));
    }
    let target_src = match (&cfg.target, &cfg.label_field) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => format!("{{{f}}}"),
        (None, None) => {
            return Err(Error::config(
                toml_path,
                "target",
                "give `target` (a template) or `label_field` (a classification task)",
            ))
        }
    };
    let target = parse_template(&target_src, toml_path, "target")?;
    if cfg.label_map.is_some() && cfg.label_field.is_none() {
        return Err(Error::config(toml_path, "label_map", "needs `label_field`"));
    }
    if let Some(f) = &cfg.label_field {
        let other = target.iter().find_map(|p| match p {
            Piece::Field(g) if g != f => Some(g.clone()),
            _ => None,
        });
        if let Some(g) = other {
            return Err(Error::config(
                toml_path,
                "target",
                format!("with label_field = {f:?} the target may use only {{{f}}}, not {{{g}}}"),
            ));
        }
    }
    Ok((input, target))
}

/// A classification task's classes: the label map's keys, or the label values seen in train,
/// sorted, each with its label text. `None` for a task without `label_field`.
fn custom_labels(
    cfg: &CustomToml,
    train_recs: &Records,
    toml_path: &Path,
) -> Result<Option<CustomLabels>> {
    let Some(field) = &cfg.label_field else {
        return Ok(None);
    };
    let (mut keys, map) = match &cfg.label_map {
        Some(map) => {
            if map.is_empty() {
                return Err(Error::config(toml_path, "label_map", "is empty"));
            }
            if map.len() > MAX_CLASSES {
                return Err(Error::config(
                    toml_path,
                    "label_map",
                    format!("{} labels, more than {MAX_CLASSES}", map.len()),
                ));
            }
            (
                map.keys().map(|k| k.trim().to_string()).collect::<Vec<_>>(),
                Some(map),
            )
        }
        None => {
            let mut seen = BTreeSet::new();
            for (loc, rec) in train_recs.iter() {
                seen.insert(
                    loc.text(loc.get(rec, field, field)?, field)?
                        .trim()
                        .to_string(),
                );
                if seen.len() > MAX_CLASSES {
                    return Err(loc.err(
                        field,
                        format!(
                            "more than {MAX_CLASSES} distinct labels in {} by this line: is                              `label_field = {field:?}` in {} a class label? (a free-text target:                              give `target` without `label_field`)",
                            loc.path.display(),
                            toml_path.display()
                        ),
                    ));
                }
            }
            (seen.into_iter().collect(), None)
        }
    };
    sort_keys(&mut keys);
    let texts: Vec<String> = keys
        .iter()
        .map(|k| {
            map.and_then(|m| {
                m.iter()
                    .find(|(mk, _)| mk.trim() == k)
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| k.clone())
        })
        .collect();
    for (i, t) in texts.iter().enumerate() {
        if texts[..i].contains(t) {
            return Err(Error::config(
                toml_path,
                "label_map",
                format!("label text {t:?} is given to two labels"),
            ));
        }
    }
    Ok(Some(CustomLabels {
        field: field.clone(),
        keys,
        texts,
    }))
}

/// F1 and Matthews need two classes, macro F1 at least one.
fn check_metric_classes(metrics: &[Metric], classes: &[String], toml_path: &Path) -> Result<()> {
    for m in metrics {
        let need_two = matches!(m, Metric::F1 | Metric::Matthews);
        if (need_two && classes.len() != 2) || (*m == Metric::F1Macro && classes.is_empty()) {
            return Err(Error::config(
                toml_path,
                "metrics",
                format!(
                    "`{}` needs {} classes from `label_field`, found {}",
                    m.name(),
                    if need_two { "two" } else { "labelled" },
                    classes.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Train, dev and test of a custom task from the files its TOML names: `dev` and `test` are
/// used as they are; a `dev` without `test` is halved into dev and test when train is small (as
/// for the built-in SuperGLUE tasks), else it becomes the test set and dev is held out of train;
/// without `dev`, dev (and test, when absent) are held out of train.
fn split_custom(
    train: Vec<Unit>,
    dev: Option<Vec<Unit>>,
    test: Option<Vec<Unit>>,
    opts: &TaskOptions,
    name: &str,
    train_path: &Path,
) -> Result<(Vec<Unit>, Vec<Unit>, Vec<Unit>)> {
    let mut rng = split_rng(opts.seed);
    Ok(match (dev, test) {
        (Some(dev), Some(test)) => (train, dev, test),
        (Some(val), None) if train.len() < SMALL_TRAIN => {
            let (dev, test) = halve(val, &mut rng);
            (train, dev, test)
        }
        (Some(val), None) => {
            let (train, dev) = hold_out(train, opts.dev_holdout, &mut rng, name, train_path)?;
            (train, dev, val)
        }
        (None, test) => {
            let n = opts.dev_holdout.min(train.len() / 2);
            let (train, held) = hold_out(train, n, &mut rng, name, train_path)?;
            match test {
                Some(test) => (train, held, test),
                None => {
                    let (dev, test) = halve(held, &mut rng);
                    (train, dev, test)
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Issue 20 (predict): a built-in task's spec and inputs without its files' splits.

/// The spec (name, metrics, label texts in `style`) of built-in task `name`, read from no file.
pub fn builtin_spec(name: &str, style: LabelStyle) -> Result<TaskSpec> {
    let def = task_def(name)?;
    Ok(TaskSpec {
        name: def.name.to_string(),
        metrics: def.metrics.to_vec(),
        classes: class_texts(def.words, style),
    })
}

/// The examples of built-in task `name` in `recs` (`fastpt predict --task`): its template on each
/// record's fields, in file order. Tasks of `key: value` fields may omit the label (the
/// example's target is then empty); MultiRC, ReCoRD and WSC read their records as their own
/// files are read, label included. Errors name the file, line and field.
pub fn task_inputs(name: &str, recs: &Records, style: LabelStyle) -> Result<Vec<TextExample>> {
    let def = task_def(name)?;
    match def.format {
        Format::MultiRc => Ok(flatten(multirc_units(def, recs, style)?)),
        Format::Record => Ok(flatten(record_units(def, recs)?)),
        Format::Wsc => recs
            .iter()
            .map(|(loc, rec)| wsc_example(def, loc, rec, style))
            .collect(),
        Format::Fields { parts, label } => recs
            .iter()
            .map(|(loc, rec)| {
                if find_field(rec, label).is_some() {
                    return fields_example(def, loc, rec, parts, label, style);
                }
                Ok(TextExample {
                    input: fields_input(def, loc, rec, parts)?,
                    target: String::new(),
                    answers: Vec::new(),
                    options: class_texts(def.words, style),
                    group: None,
                })
            })
            .collect(),
    }
}

/// A custom task (its TOML) as `fastpt predict --task FILE.toml` applies it: its spec and its
/// templates, without its data splits.
pub struct CustomInputs {
    toml: PathBuf,
    spec: TaskSpec,
    input: Vec<Piece>,
    target: Vec<Piece>,
    labels: Option<CustomLabels>,
}

impl CustomInputs {
    /// Reads the task's TOML. Its classes come from `label_map`; a task that takes them from
    /// its training file reads that file under `data_dir` (the run's data folder), and without
    /// one is refused with what to do.
    pub fn load(toml_path: &Path, style: LabelStyle, data_dir: Option<&Path>) -> Result<Self> {
        let cfg = read_custom_toml(toml_path)?;
        let metrics = custom_metrics(&cfg, toml_path)?;
        let (input, target) = custom_templates(&cfg, toml_path)?;
        let train_recs = match (&cfg.label_field, &cfg.label_map, data_dir) {
            (Some(_), None, Some(dir)) => read_records(&dir.join(&cfg.train))?,
            (Some(field), None, None) => {
                return Err(Error::config(
                    toml_path,
                    "label_map",
                    format!(
                        "missing: the task takes its classes (`{field}`) from its train file \
                         {:?}, which predict cannot find without a data folder; give \
                         `label_map` in the TOML, or predict from the run folder (its data.dir)",
                        cfg.train
                    ),
                ))
            }
            _ => Records::lines(toml_path, Vec::new()),
        };
        let labels = custom_labels(&cfg, &train_recs, toml_path)?;
        let classes = custom_classes(labels.as_ref(), &target, style);
        check_metric_classes(&metrics, &classes, toml_path)?;
        Ok(CustomInputs {
            toml: toml_path.to_path_buf(),
            spec: TaskSpec {
                name: cfg.name,
                metrics,
                classes,
            },
            input,
            target,
            labels,
        })
    }

    /// The task's name, metrics and class texts.
    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    /// The examples of `recs`: the input template on each record; its label, when present,
    /// as the target. Errors name the file, line and field.
    pub fn inputs(&self, recs: &Records) -> Result<Vec<TextExample>> {
        Ok(flatten(custom_examples(
            recs,
            &self.input,
            &self.target,
            self.labels.as_ref(),
            &self.spec.classes,
            &self.toml,
            true,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stsb_rounds_to_fifths_ties_to_even() {
        assert_eq!(stsb_target(3.27), "3.2");
        assert_eq!(stsb_target(3.3), "3.2"); // 16.5 fifths → 16 (even)
        assert_eq!(stsb_target(3.31), "3.4");
        assert_eq!(stsb_target(0.5), "0.4"); // 2.5 → 2
        assert_eq!(stsb_target(0.7), "0.8"); // 3.5 → 4
        assert_eq!(stsb_target(4.0), "4.0");
        assert_eq!(stsb_target(5.0), "5.0");
        assert_eq!(stsb_target(0.0), "0.0");
        assert_eq!(stsb_target(2.333), "2.4");
    }

    #[test]
    fn wsc_marks_spans_at_word_indices() {
        // T5's example.
        let t = mark_span("This is a test sentence .", "test", 3, '*');
        assert_eq!(t, "This is a * test * sentence .");
        let t = mark_span(&t, "This", 0, '#');
        assert_eq!(t, "# This # is a * test * sentence .");
        // Not found at that index (or past the end): unchanged.
        assert_eq!(mark_span("a b c", "b", 2, '*'), "a b c");
        assert_eq!(mark_span("a b c", "c", 9, '*'), "a b c");
        // Two spaces break T5's `(\S+\s){N}` pattern, so nothing is marked.
        assert_eq!(mark_span("a  b", "b", 1, '*'), "a  b");
        // Spans are literal text, not patterns.
        assert_eq!(mark_span("x (it) y", "(it)", 1, '#'), "x # (it) # y");
    }

    #[test]
    fn record_highlights_become_sentences() {
        let p = "Story text.\n@highlight\nFirst point\n@highlight\nSecond point";
        assert_eq!(record_passage(p), "Story text. First point. Second point");
        assert_eq!(record_passage("Q?\n@highlight\nA"), "Q? A");
        assert_eq!(record_passage("no marks"), "no marks");
    }

    #[test]
    fn multirc_markup_is_removed() {
        assert_eq!(
            remove_markup("<b>Sent 1: </b>Hi.<br><b>Sent 2: </b>Yo."),
            "Sent 1: Hi. Sent 2: Yo."
        );
    }

    #[test]
    fn templates_parse_escapes_and_reject_bad_braces() {
        let p = Path::new("t.toml");
        assert_eq!(
            parse_template("a {x} {{y}}", p, "input").unwrap(),
            vec![
                Piece::Text("a ".into()),
                Piece::Field("x".into()),
                Piece::Text(" {y}".into())
            ]
        );
        for bad in ["a {x", "a } b", "{}"] {
            let e = parse_template(bad, p, "input").unwrap_err().to_string();
            assert!(e.contains("t.toml") && e.contains("`input`"), "{e}");
        }
    }

    #[test]
    fn labels_accept_indices_words_and_booleans() {
        let loc = Loc::at_line(Path::new("f.jsonl"), 4);
        let w = NLI2;
        assert_eq!(class_index(loc, "label", &Value::from(1), w).unwrap(), 1);
        assert_eq!(class_index(loc, "label", &Value::from("0"), w).unwrap(), 0);
        assert_eq!(
            class_index(loc, "label", &Value::from("Not_Entailment"), w).unwrap(),
            1
        );
        assert_eq!(
            class_index(loc, "label", &Value::from(true), BOOL).unwrap(),
            1
        );
        let e = class_index(loc, "label", &Value::from(-1), w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 4") && e.contains("unlabelled"), "{e}");
        let e = class_index(loc, "label", &Value::from("maybe"), w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`label`") && e.contains("\"maybe\""), "{e}");
        let e = class_index(loc, "label", &Value::from(2), w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0..1"), "{e}");
    }

    #[test]
    fn every_task_name_resolves() {
        for n in TASK_NAMES {
            assert_eq!(task_def(n).unwrap().name, *n);
        }
        assert_eq!(task_def("superglue-wsc.fixed").unwrap().name, "wsc");
        assert!(task_def("nope").unwrap_err().to_string().contains("boolq"));
    }

    #[test]
    fn k_shot_takes_k_per_class_deterministically() {
        let ex = |t: &str| {
            vec![TextExample {
                input: String::new(),
                target: t.into(),
                answers: vec![],
                options: vec![],
                group: None,
            }]
        };
        let train: Vec<Unit> = (0..20)
            .map(|i| ex(if i % 4 == 0 { "1" } else { "0" }))
            .collect();
        let classes = vec!["0".to_string(), "1".to_string()];
        let a = k_shot(train.clone(), 3, &classes, 7).unwrap();
        assert_eq!(a.len(), 6);
        assert_eq!(a, k_shot(train.clone(), 3, &classes, 7).unwrap());
        let b = k_shot(train.clone(), 10, &classes, 7).unwrap();
        assert_eq!(b.len(), 15); // 10 of "0", all 5 of "1"
        assert_eq!(k_shot(train, 4, &[], 1).unwrap().len(), 4);
    }
}
