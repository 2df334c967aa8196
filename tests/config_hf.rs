//! Issue 20, item 4: transformers' TrainingArguments names in the run config, the schedules and
//! the step counts against transformers' own values (tests/fixtures/schedules.json, written by
//! tools/make_schedule_goldens.py), "did you mean", and the effective config.toml.

use std::path::{Path, PathBuf};

use fastpt::config::{RunConfig, Schedule, HF_ALIASES, RESUME_MAY_CHANGE};
use fastpt::train::schedule::lr_factor;

fn goldens() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedules.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn sets(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn parse(text: &str, overrides: &[&str]) -> fastpt::Result<RunConfig> {
    RunConfig::from_toml_str(text, Path::new("run.toml"), &sets(overrides))
}

fn err(text: &str, overrides: &[&str]) -> String {
    parse(text, overrides).unwrap_err().to_string()
}

#[test]
fn every_schedule_equals_transformers_at_every_step() {
    let g = goldens();
    let cases = g["schedules"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut seen = std::collections::BTreeSet::new();
    for case in cases {
        let name = case["schedule"].as_str().unwrap();
        let schedule: Schedule = serde_json::from_value(case["schedule"].clone()).unwrap();
        seen.insert(name.to_string());
        let (warmup, total) = (
            case["warmup"].as_u64().unwrap() as usize,
            case["total"].as_u64().unwrap() as usize,
        );
        let lrs = case["lr"].as_array().unwrap();
        assert_eq!(lrs.len(), total);
        for (i, want) in lrs.iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = lr_factor(schedule, i + 1, warmup, total);
            assert!(
                (got - want).abs() <= 1e-12 * want.abs(),
                "{name} warmup {warmup} total {total} step {}: {got} vs transformers {want}",
                i + 1
            );
        }
    }
    let all: Vec<&str> = vec!["constant", "constant_with_warmup", "cosine", "linear"];
    assert_eq!(seen.iter().map(String::as_str).collect::<Vec<_>>(), all);
}

#[test]
fn epochs_and_warmup_ratio_resolve_to_steps_as_a_trainer() {
    for case in goldens()["steps"].as_array().unwrap() {
        let n = |k: &str| case[k].as_f64().unwrap();
        let mut o = vec![
            format!("per_device_train_batch_size={}", n("batch_size")),
            format!("gradient_accumulation_steps={}", n("grad_accum")),
            format!("num_train_epochs={:?}", n("num_train_epochs")),
            "warmup_steps=0".to_string(),
        ];
        if n("max_steps") > 0.0 {
            o.push(format!("max_steps={}", n("max_steps")));
        }
        if n("warmup_ratio") > 0.0 {
            o.push(format!("warmup_ratio={:?}", n("warmup_ratio")));
        }
        // `{}` prints a whole f64 without a fraction (`16`), as TOML needs for an integer key.
        let o: Vec<&str> = o.iter().map(String::as_str).collect();
        let cfg = RunConfig::from_overrides(&sets(&o)).unwrap();
        cfg.validate(Path::new("run.toml")).unwrap();
        let plan = cfg.train.plan(n("examples") as usize).unwrap();
        assert_eq!(
            (plan.steps as f64, plan.warmup as f64),
            (n("steps"), n("warmup_steps")),
            "{case}"
        );
    }
}

/// One value per TrainingArguments name and how to read it back from the config.
type Check = fn(&RunConfig) -> String;

fn alias_cases() -> Vec<(&'static str, &'static str, &'static str, Check)> {
    // (TrainingArguments' name, TOML value, what the config must then hold, the reader)
    vec![
        ("learning_rate", "0.25", "0.25", |c| c.train.lr.to_string()),
        ("per_device_train_batch_size", "7", "7", |c| {
            c.train.batch_size.to_string()
        }),
        ("gradient_accumulation_steps", "3", "3", |c| {
            c.train.grad_accum.to_string()
        }),
        ("max_steps", "123", "123", |c| c.train.steps.to_string()),
        ("num_train_epochs", "2.5", "Some(2.5) 0", |c| {
            format!("{:?} {}", c.train.epochs, c.train.steps)
        }),
        ("warmup_steps", "11", "11", |c| {
            c.train.warmup_steps.to_string()
        }),
        ("warmup_ratio", "0.1", "Some(0.1) 0", |c| {
            format!("{:?} {}", c.train.warmup_ratio, c.train.warmup_steps)
        }),
        ("lr_scheduler_type", "\"cosine\"", "Cosine", |c| {
            format!("{:?}", c.train.schedule)
        }),
        ("weight_decay", "0.01", "0.01", |c| {
            c.train.weight_decay.to_string()
        }),
        ("max_grad_norm", "0.5", "0.5", |c| {
            c.train.max_grad_norm.to_string()
        }),
        ("adam_beta1", "0.8", "0.8", |c| {
            c.train.adam_beta1.to_string()
        }),
        ("adam_beta2", "0.98", "0.98", |c| {
            c.train.adam_beta2.to_string()
        }),
        ("adam_epsilon", "1e-6", "0.000001", |c| {
            c.train.adam_eps.to_string()
        }),
        ("eval_steps", "17", "17", |c| c.train.eval_every.to_string()),
        ("save_steps", "19", "19", |c| {
            c.train.checkpoint_every.to_string()
        }),
        ("output_dir", "\"runs/hf\"", "runs/hf", |c| {
            c.out_dir.display().to_string()
        }),
        ("seed", "42", "42", |c| c.seed.to_string()),
        ("group_by_length", "true", "true", |c| {
            c.train.group_by_length.to_string()
        }),
        ("early_stopping_patience", "4", "4", |c| {
            c.train.early_stopping_patience.to_string()
        }),
    ]
}

#[test]
fn every_trainingarguments_name_is_read_at_the_top_in_train_and_in_set() {
    let cases = alias_cases();
    // The cases cover every alias, and only them.
    let mut names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let mut aliases: Vec<&str> = HF_ALIASES.iter().map(|a| a.0).collect();
    names.sort();
    aliases.sort();
    assert_eq!(names, aliases);
    let default = RunConfig::default();
    for (name, value, want, read) in cases {
        assert_ne!(read(&default), want, "{name}: the default already holds it");
        let top = parse(&format!("{name} = {value}"), &[]).unwrap();
        let section = parse(&format!("[train]\n{name} = {value}"), &[]).unwrap();
        let set = RunConfig::from_overrides(&[format!("{name}={value}")]).unwrap();
        let set_train = RunConfig::from_overrides(&[format!("train.{name}={value}")]).unwrap();
        for (how, cfg) in [
            ("top level", &top),
            ("[train]", &section),
            ("--set", &set),
            ("--set train.", &set_train),
        ] {
            assert_eq!(read(cfg), want, "{name} at {how}");
        }
        // The effective config uses fastpt's names and reads back the same.
        let text = top.to_toml_string();
        let key = |l: &str| l.split(" = ").next().unwrap_or("").to_string();
        let fastpt_key = HF_ALIASES.iter().find(|a| a.0 == name).unwrap().1;
        let fastpt_name = fastpt_key.rsplit('.').next().unwrap();
        if fastpt_name != name {
            assert!(!text.lines().any(|l| key(l) == name), "{name} in\n{text}");
        }
        assert!(
            text.lines().any(|l| key(l) == fastpt_name),
            "{fastpt_key} not in\n{text}"
        );
        assert_eq!(read(&parse(&text, &[]).unwrap()), want, "{name}: {text}");
    }
}

#[test]
fn one_key_in_two_spellings_is_an_error_naming_both() {
    for &(name, key) in HF_ALIASES {
        let (section, fastpt_name) = match key.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, key),
        };
        let value = alias_cases()
            .into_iter()
            .find(|c| c.0 == name)
            .map(|c| c.1)
            .unwrap();
        let canonical = match section {
            Some(s) => format!("[{s}]\n{fastpt_name} = {value}"),
            None => format!("{fastpt_name} = {value}"),
        };
        // TrainingArguments' name at the top level with fastpt's key (where it differs), and
        // one name both at the top level and in [train].
        if name != key {
            let text = format!("{name} = {value}\n{canonical}");
            let msg = err(&text, &[]);
            assert!(
                msg.contains(&format!("`{key}`")) && msg.contains(&format!("`{name}`")),
                "{name}: {msg}"
            );
        }
        if key != format!("train.{name}") {
            let text = format!("{name} = {value}\n[train]\n{name} = {value}");
            let msg = err(&text, &[]);
            assert!(
                msg.contains(&format!("`{name}`")) && msg.contains(&format!("`train.{name}`")),
                "{name}: {msg}"
            );
        }
    }
    // An override replaces the file's value whatever the spelling.
    let cfg = parse("[train]\nlr = 0.3", &["learning_rate=0.1"]).unwrap();
    assert_eq!(cfg.train.lr, 0.1);
    let cfg = parse("learning_rate = 0.3", &["train.lr=0.2"]).unwrap();
    assert_eq!(cfg.train.lr, 0.2);
}

#[test]
fn an_unknown_key_says_which_known_one_was_meant() {
    for (text, field, suggestion) in [
        ("learnig_rate = 0.1", "learnig_rate", "learning_rate"),
        ("[train]\nstepz = 1", "train.stepz", "`steps`"),
        (
            "[train]\nlr_schedular_type = \"cosine\"",
            "train.lr_schedular_type",
            "`lr_scheduler_type` (TrainingArguments' name of train.schedule)",
        ),
        ("[train]\nnum_epochs = 2", "train.num_epochs", "`epochs`"),
        ("[data]\ntsk = \"rte\"", "data.tsk", "`task`"),
        ("method = \"ept\"\n[ept]\nrnak = 4", "ept.rnak", "`rank`"),
        ("ouput_dir = \"x\"", "ouput_dir", "`output_dir`"),
        ("modle = \"t5-base\"", "modle", "`model`"),
    ] {
        let msg = err(text, &[]);
        assert!(
            msg.contains(&format!("field `{field}`")) && msg.contains("did you mean"),
            "{text}: {msg}"
        );
        assert!(msg.contains(suggestion), "{text}: {msg}");
    }
    // Through --set the same.
    let msg = err("", &["train.learnig_rate=0.1"]);
    assert!(msg.contains("did you mean `learning_rate`"), "{msg}");
    // Nothing close: no guess.
    let msg = err("[train]\nzzzzzzzz = 1", &[]);
    assert!(!msg.contains("did you mean"), "{msg}");
}

#[test]
fn the_effective_config_holds_only_the_keys_that_apply() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let keys = |cfg: &RunConfig, section: &str| -> Vec<String> {
        let table: toml::Table = toml::from_str(&cfg.to_toml_string()).unwrap();
        match section {
            "" => table.keys().cloned().collect(),
            s => table[s].as_table().unwrap().keys().cloned().collect(),
        }
    };
    // A task read from files: no synthetic sizes.
    let rte = RunConfig::from_overrides(&[
        "data.task=rte".into(),
        format!(
            "data.dir={:?}",
            fixtures.join("data/glue/rte").display().to_string()
        ),
        "data.train_examples=99".into(),
    ])
    .unwrap();
    let data = keys(&rte, "data");
    assert!(data.contains(&"dir".to_string()) && data.contains(&"labels".to_string()));
    assert!(!data.contains(&"train_examples".to_string()), "{data:?}");
    assert!(!data.contains(&"dev_examples".to_string()), "{data:?}");
    // The synthetic task: its sizes only.
    let synthetic = RunConfig::from_overrides(&["data.dir=\"x\"".into()]).unwrap();
    assert_eq!(
        keys(&synthetic, "data"),
        ["dev_examples", "task", "train_examples"].map(String::from)
    );
    // Multi-line strings around a left-out key survive (a custom task's path with a newline).
    let odd = RunConfig::from_overrides(&[
        "data.task=\"custom\\nline.toml\"".into(),
        "data.dir=\"da\\nta\"".into(),
    ])
    .unwrap();
    assert_eq!(odd.data.task, "custom\nline.toml");
    let back = parse(&odd.to_toml_string(), &[]).unwrap();
    assert_eq!(
        (back.data.task, back.data.dir),
        (odd.data.task.clone(), odd.data.dir.clone())
    );
    // Steps from epochs: no steps; steps given: no epochs (steps win).
    let epochs = parse("num_train_epochs = 3", &[]).unwrap();
    let train = keys(&epochs, "train");
    assert!(train.contains(&"epochs".into()) && !train.contains(&"steps".into()));
    let both = parse("num_train_epochs = 3\nmax_steps = 9", &[]).unwrap();
    let train = keys(&both, "train");
    assert!(!train.contains(&"epochs".into()) && train.contains(&"steps".into()));
    // The warmup: the ratio when it decides, the steps otherwise, neither without a warmup.
    let ratio = parse("warmup_ratio = 0.1", &[]).unwrap();
    let train = keys(&ratio, "train");
    assert!(train.contains(&"warmup_ratio".into()) && !train.contains(&"warmup_steps".into()));
    let steps_win = parse("warmup_ratio = 0.1\nwarmup_steps = 5", &[]).unwrap();
    let train = keys(&steps_win, "train");
    assert!(!train.contains(&"warmup_ratio".into()) && train.contains(&"warmup_steps".into()));
    assert_eq!(steps_win.train.plan(100).unwrap().warmup, 5);
    let constant = parse("lr_scheduler_type = \"constant\"", &[]).unwrap();
    let train = keys(&constant, "train");
    assert!(!train.contains(&"warmup_steps".into()), "{train:?}");
    assert_eq!(constant.train.plan(100).unwrap().warmup, 0);
    // --init-from is recorded, and reads back.
    let init = RunConfig::from_overrides(&["init_from=\"runs/a/export/adapter\"".into()]).unwrap();
    assert!(keys(&init, "").contains(&"init_from".into()));
    let back = parse(&init.to_toml_string(), &[]).unwrap();
    assert_eq!(back.init_from, Some(PathBuf::from("runs/a/export/adapter")));
    assert!(!keys(&RunConfig::default(), "").contains(&"init_from".into()));
    // Every config here reads back to the same effective config.
    for cfg in [
        &rte, &synthetic, &epochs, &both, &ratio, &steps_win, &constant, &init,
    ] {
        let text = cfg.to_toml_string();
        assert_eq!(parse(&text, &[]).unwrap().to_toml_string(), text);
    }
}

#[test]
fn a_resume_compares_fastpt_names_with_trainingarguments_names_and_may_change_epochs() {
    let stored = parse("[train]\nlr = 0.1\nsteps = 50", &[]).unwrap();
    let same = parse("learning_rate = 0.1\nmax_steps = 50", &[]).unwrap();
    assert_eq!(stored.resume_changes(&same), (vec![], vec![]));
    let other = parse("learning_rate = 0.2\nmax_steps = 50", &[]).unwrap();
    let (may, refused) = stored.resume_changes(&other);
    assert!(may.is_empty());
    assert_eq!(refused[0].0, "train.lr");
    // A run of epochs may get more epochs, or steps instead.
    let epochs = parse("num_train_epochs = 2", &[]).unwrap();
    let more = parse("num_train_epochs = 3", &[]).unwrap();
    let (may, refused) = epochs.resume_changes(&more);
    assert!(refused.is_empty() && may[0].0 == "train.epochs", "{may:?}");
    let steps = parse("num_train_epochs = 2", &["train.steps=100"]).unwrap();
    let (may, refused) = epochs.resume_changes(&steps);
    assert!(refused.is_empty(), "{refused:?}");
    let keys: Vec<&str> = may.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(keys, ["train.epochs", "train.steps"]);
    assert!(RESUME_MAY_CHANGE.contains(&"train.epochs"));
}

#[test]
fn new_keys_are_validated_naming_key_and_value() {
    let invalid = |overrides: &[&str]| {
        let cfg = RunConfig::from_overrides(&sets(overrides)).unwrap();
        cfg.validate(Path::new("run.toml")).unwrap_err().to_string()
    };
    for (o, needle) in [
        (&["num_train_epochs=0"][..], "field `train.epochs`: got 0,"),
        (
            &["num_train_epochs=-1"][..],
            "field `train.epochs`: got -1,",
        ),
        (
            &["num_train_epochs=inf"][..],
            "field `train.epochs`: got inf,",
        ),
        (
            &["num_train_epochs=1e9"][..],
            "field `train.epochs`: got 1000000000,",
        ),
        (
            &["warmup_ratio=1.5"][..],
            "field `train.warmup_ratio`: got 1.5,",
        ),
        (
            &["warmup_ratio=-0.1"][..],
            "field `train.warmup_ratio`: got -0.1,",
        ),
        (&["max_steps=0"][..], "field `train.steps`: got 0,"),
        (
            &["early_stopping_patience=2", "eval_steps=0"][..],
            "field `train.early_stopping_patience`: got 2, but train.eval_every = 0",
        ),
    ] {
        let msg = invalid(o);
        assert!(msg.contains(needle), "{o:?}: {msg}");
    }
    // Steps from epochs past the limit: named when the data's size is known.
    let cfg =
        RunConfig::from_overrides(&sets(&["num_train_epochs=90000000", "warmup_steps=0"])).unwrap();
    cfg.validate(Path::new("run.toml")).unwrap();
    let msg = cfg.train.plan(1_000_000).unwrap_err().to_string();
    assert!(
        msg.contains("train.epochs = 90000000") && msg.contains("MAX_STEPS"),
        "{msg}"
    );
    // Warmup steps past steps from epochs: named with how the steps were found.
    let cfg = RunConfig::from_overrides(&sets(&["num_train_epochs=1", "warmup_steps=10"])).unwrap();
    let msg = cfg.train.plan(16).unwrap_err().to_string();
    assert!(
        msg.contains("train.warmup_steps = 10") && msg.contains("train.epochs = 1"),
        "{msg}"
    );
    // An unsupported schedule lists the ones there are.
    let msg = err("lr_scheduler_type = \"polynomial\"", &[]);
    assert!(
        msg.contains("train.schedule") && msg.contains("constant_with_warmup"),
        "{msg}"
    );
}

/// The constant schedule's config.toml leaves warmup_steps out; read back (the default 500
/// steps) it still validates with fewer steps (a resume reads it so).
#[test]
fn a_constant_schedule_config_validates_without_its_warmup() {
    let cfg = parse(
        "[train]\nsteps = 8\nwarmup_steps = 0\nschedule = \"constant\"",
        &[],
    )
    .unwrap();
    let back = parse(&cfg.to_toml_string(), &[]).unwrap();
    back.validate(Path::new("config.toml")).unwrap();
    assert_eq!(back.train.plan(10).unwrap().warmup, 0);
}

/// transformers 5 dropped `warmup_ratio`: `warmup_steps` in [0, 1) is the ratio
/// (`TrainingArguments.get_warmup_steps`), ≥ 1 a step count, in a file and with --set.
#[test]
fn transformers_5_fractional_warmup_steps_is_the_ratio() {
    let cfg = parse("warmup_steps = 0.1\nmax_steps = 95", &[]).unwrap();
    assert_eq!(
        (cfg.train.warmup_ratio, cfg.train.warmup_steps),
        (Some(0.1), 0)
    );
    // ceil(0.1 × 95) = 10, as get_warmup_steps.
    assert_eq!(cfg.train.plan(1000).unwrap().warmup, 10);
    let cfg = parse("max_steps = 95", &["warmup_steps=0.25"]).unwrap();
    assert_eq!(cfg.train.plan(1000).unwrap().warmup, 24);
    let cfg = parse("[train]\nwarmup_steps = 12.0", &[]).unwrap();
    assert_eq!((cfg.train.warmup_ratio, cfg.train.warmup_steps), (None, 12));
    let msg = err("warmup_steps = 0.1\nwarmup_ratio = 0.2", &[]);
    assert!(
        msg.contains("train.warmup_steps") && msg.contains("warmup_ratio = 0.2"),
        "{msg}"
    );
    let msg = err("warmup_steps = 2.5", &[]);
    assert!(msg.contains("warmup_steps"), "{msg}");
}
