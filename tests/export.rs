//! Prompt export (src/train/export.rs) on the CPU backend: PT round trips bit for bit through the
//! PEFT adapter folder, computed-prompt methods export what their forward computes, DePT/EPT-MS
//! export prompt + update and no adapter, adapter_config.json has PEFT's keys, and every bad
//! adapter is refused with the file and field named.

use std::path::{Path, PathBuf};

use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::Backend;
use fastpt::data::HostBatch;
use fastpt::engine::{build_backbone_method, label_nll};
use fastpt::engine::{build_llama_method, build_t5_method};
use fastpt::model::hf::{read_all_f64, save_safetensors, TensorData};
use fastpt::model::linear::Quant;
use fastpt::model::llama::Llama;
use fastpt::model::load_model;
use fastpt::model::t5::T5;
use fastpt::model::{load_llama, load_t5, Architecture};
use fastpt::prompt::{MethodConfig, PromptMethod};
use fastpt::testing::random_vec;
use fastpt::train::export::{
    export_prompt, exported_method, init_from_adapter, read_adapter, read_adapter_prompt,
    ExportInfo,
};
use serde_json::{json, Value};

type B = CpuBackend<f32>;

const MAX_LEN: usize = 8;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn t5(be: &B) -> T5<B> {
    load_t5(be, &fixture("t5-v1_0-tiny"), Quant::None).unwrap()
}

/// A method on the tiny T5 (d = 36) with every parameter set to seeded random values, so that
/// a zero-initialised factor cannot hide a wrong export.
fn t5_method(
    be: &B,
    model: &T5<B>,
    name: &str,
    options: &str,
    seed: u64,
) -> Box<dyn PromptMethod<B>> {
    let cfg = MethodConfig::from_toml(name, options).unwrap();
    let mut method = build_t5_method(be, model, &cfg, MAX_LEN, seed, None).unwrap();
    randomize(be, method.as_mut(), seed);
    method
}

fn randomize(be: &B, method: &mut dyn PromptMethod<B>, seed: u64) {
    for (i, p) in method.params_mut().iter_mut().enumerate() {
        let v = random_vec(p.numel(), 0.5, seed * 100 + i as u64);
        p.value = be.upload_f32(v.iter().map(|&x| x as f32).collect());
    }
}

fn t5_info(base: &Path) -> ExportInfo<'_> {
    ExportInfo {
        kind: Architecture::T5,
        base_model: base.to_str(),
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An adapter folder written by hand: config from `config`, weights `tensors`.
fn write_adapter(dir: &Path, config: &Value, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string(config).unwrap(),
    )
    .unwrap();
    let tensors: Vec<(String, Vec<usize>, TensorData)> = tensors
        .iter()
        .map(|(n, s, v)| (n.to_string(), s.clone(), TensorData::F32(v.clone())))
        .collect();
    save_safetensors(&dir.join("adapter_model.safetensors"), &tensors).unwrap();
}

/// A PEFT-0.21-style config (as PeftModel.save_pretrained writes it) for (p, c) rows.
fn peft_config(p: usize, c: usize) -> Value {
    json!({
        "auto_mapping": null, "base_model_name_or_path": "t5-small", "inference_mode": true,
        "modules_to_save": null, "num_attention_heads": 3, "num_layers": 2,
        "num_transformer_submodules": 1, "num_virtual_tokens": p, "peft_type": "PROMPT_TUNING",
        "peft_version": "0.21.2", "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": null,
        "revision": null, "task_type": "SEQ_2_SEQ_LM", "token_dim": c, "tokenizer_kwargs": null,
        "tokenizer_name_or_path": null
    })
}

fn err_text<T>(r: fastpt::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn pt_round_trips_bit_for_bit_through_the_peft_adapter() {
    let be = B::new();
    let model = t5(&be);
    let base = fixture("t5-v1_0-tiny");
    let mut pt = t5_method(&be, &model, "pt", "prompt_len = 5", 1);
    let original = be.download_f32(pt.rows());
    let tmp = tempfile::tempdir().unwrap();

    let out = export_prompt(&be, pt.as_mut(), &t5_info(&base), tmp.path()).unwrap();
    assert!(out.peft);
    assert!(out.note.is_none());
    let names: Vec<String> = out
        .files
        .iter()
        .map(|f| f.strip_prefix(tmp.path()).unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "prompt.safetensors",
            "adapter/adapter_model.safetensors",
            "adapter/README.md",
            "adapter/adapter_config.json",
            "export.json"
        ]
    );

    // fastpt's own file: the rows, no update, the method name in the metadata.
    let own = read_all_f64(&tmp.path().join("prompt.safetensors")).unwrap();
    assert_eq!(own.keys().collect::<Vec<_>>(), ["prompt"]);
    assert_eq!(own["prompt"].0, [5, 36]);
    let own_rows: Vec<f32> = own["prompt"].1.iter().map(|&x| x as f32).collect();
    assert_eq!(own_rows, original);
    assert_eq!(exported_method(tmp.path()).unwrap().as_deref(), Some("pt"));
    let doc = read_json(&tmp.path().join("export.json"));
    assert_eq!(doc["method"], "pt");
    assert_eq!(doc["peft_adapter"], "adapter");
    assert_eq!(doc["prompt"]["shape"], json!([5, 36]));

    let adapter = tmp.path().join("adapter");
    let (p, rows) = read_adapter(&adapter, 36).unwrap();
    assert_eq!(p, 5);
    assert_eq!(rows, original);

    let mut fresh = t5_method(&be, &model, "pt", "prompt_len = 5", 2);
    assert_ne!(be.download_f32(fresh.rows()), original);
    init_from_adapter(&be, fresh.as_mut(), &adapter).unwrap();
    let warm = be.download_f32(fresh.rows());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&warm), bits(&original));
    assert_eq!(
        bits(&be.download_f32(&fresh.params()[0].value)),
        bits(&original)
    );
}

#[test]
fn t5_adapter_config_holds_peft_prompt_tuning_keys() {
    let be = B::new();
    let model = t5(&be);
    let base = fixture("t5-v1_0-tiny");
    let mut pt = t5_method(&be, &model, "pt", "prompt_len = 4", 3);
    let tmp = tempfile::tempdir().unwrap();
    export_prompt(&be, pt.as_mut(), &t5_info(&base), tmp.path()).unwrap();
    let config = read_json(&tmp.path().join("adapter/adapter_config.json"));
    let expected = json!({
        "auto_mapping": null,
        "base_model_name_or_path": base.to_str().unwrap(),
        "inference_mode": true,
        "modules_to_save": null,
        // From the fixture's config.json (num_heads = 3, num_layers = 2).
        "num_attention_heads": 3,
        "num_layers": 2,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": 4,
        "peft_type": "PROMPT_TUNING",
        "peft_version": "0.21.2",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": null,
        "revision": null,
        "task_type": "SEQ_2_SEQ_LM",
        "token_dim": 36,
        "tokenizer_kwargs": null,
        "tokenizer_name_or_path": null
    });
    assert_eq!(config, expected);
    // Sorted keys, as PEFT writes them.
    let text = std::fs::read_to_string(tmp.path().join("adapter/adapter_config.json")).unwrap();
    assert!(text.starts_with("{\n  \"auto_mapping\": null,\n  \"base_model_name_or_path\""));

    // No base model: the counts are left to PEFT (null), the name too.
    let tmp2 = tempfile::tempdir().unwrap();
    let info = ExportInfo {
        kind: Architecture::T5,
        base_model: None,
    };
    export_prompt(&be, pt.as_mut(), &info, tmp2.path()).unwrap();
    let config = read_json(&tmp2.path().join("adapter/adapter_config.json"));
    assert_eq!(config["base_model_name_or_path"], Value::Null);
    assert_eq!(config["num_layers"], Value::Null);
    assert_eq!(config["num_attention_heads"], Value::Null);
}

#[test]
fn llama_adapter_config_is_causal_lm_with_the_models_counts() {
    let be = B::new();
    let dir = fixture("llama-gqa-tiny");
    let model: Llama<B> = load_llama(&be, &dir, Quant::None).unwrap();
    let cfg = MethodConfig::from_toml("pt", "prompt_len = 3").unwrap();
    let mut pt = build_llama_method(&be, &model, &cfg, MAX_LEN, 4, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let info = ExportInfo {
        kind: Architecture::Llama,
        base_model: dir.to_str(),
    };
    let out = export_prompt(&be, pt.as_mut(), &info, tmp.path()).unwrap();
    assert!(out.peft);
    let config = read_json(&tmp.path().join("adapter/adapter_config.json"));
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["token_dim"], 48);
    assert_eq!(config["num_layers"], 2);
    assert_eq!(config["num_attention_heads"], 4);
    assert_eq!(config["num_transformer_submodules"], 1);
    let (p, rows) = read_adapter(&tmp.path().join("adapter"), 48).unwrap();
    assert_eq!(p, 3);
    assert_eq!(rows, be.download_f32(pt.rows()));
    assert_eq!(
        read_json(&tmp.path().join("export.json"))["backbone"],
        "llama"
    );
}

#[test]
fn computed_prompt_methods_export_the_rows_their_forward_computes() {
    let be = B::new();
    let model = t5(&be);
    let base = fixture("t5-v1_0-tiny");
    let cases = [
        ("lamp", "prompt_len = 4\nrank = 2\npool = 2"),
        ("dpt", "prompt_len = 3\nrank = 2"),
        ("ptuning", "prompt_len = 2"),
        ("residual", "prompt_len = 3\nbottleneck = 4"),
        ("xpt", "repeats = 3"),
    ];
    for (name, options) in cases {
        let mut method = t5_method(&be, &model, name, options, 7);
        let tmp = tempfile::tempdir().unwrap();
        let out = export_prompt(&be, method.as_mut(), &t5_info(&base), tmp.path()).unwrap();
        assert!(out.peft, "{name}");
        // Recompute independently of the export's own forward.
        method.forward(&be);
        let expected = be.download_f32(method.rows());
        let p = method.prompt_rows();
        assert_eq!(expected.len(), p * 36, "{name}");
        let (p_read, rows) = read_adapter(&tmp.path().join("adapter"), 36).unwrap();
        assert_eq!(p_read, p, "{name}");
        assert_eq!(rows, expected, "{name}");
        let config = read_json(&tmp.path().join("adapter/adapter_config.json"));
        assert_eq!(config["num_virtual_tokens"], p, "{name}");
        assert_eq!(exported_method(tmp.path()).unwrap().as_deref(), Some(name));
    }
}

#[test]
fn dept_and_ept_export_prompt_and_update_without_adapter() {
    let be = B::new();
    let model = t5(&be);
    let base = fixture("t5-v1_0-tiny");
    let cases = [
        ("dept", "prompt_len = 2\nrank = 2"),
        (
            "ept",
            "source_len = 5\nprompt_len = 3\nrank = 2\nexperts = 2\nexpert_hidden = 4",
        ),
        // s = 0: no prompt rows, the width comes from the update.
        ("ept", "source_len = 5\nprompt_len = 0\nrank = 2"),
    ];
    for (name, options) in cases {
        let mut method = t5_method(&be, &model, name, options, 9);
        let tmp = tempfile::tempdir().unwrap();
        // A stale adapter of an earlier PT export into the same folder must not survive.
        let mut pt = t5_method(&be, &model, "pt", "prompt_len = 2", 9);
        export_prompt(&be, pt.as_mut(), &t5_info(&base), tmp.path()).unwrap();
        assert!(tmp.path().join("adapter/adapter_config.json").is_file());

        let out = export_prompt(&be, method.as_mut(), &t5_info(&base), tmp.path()).unwrap();
        assert!(!out.peft, "{name}");
        let note = out.note.clone().unwrap();
        assert!(note.contains("PROMPT_TUNING"), "{name}: {note}");
        assert!(note.contains("update"), "{name}: {note}");
        assert!(!tmp.path().join("adapter").exists(), "{name}");
        assert_eq!(out.files.len(), 2, "{name}: {:?}", out.files);

        method.forward(&be);
        let p = method.prompt_rows();
        let m = method.update_rows().unwrap();
        let own = read_all_f64(&tmp.path().join("prompt.safetensors")).unwrap();
        assert_eq!(own["prompt"].0, [p, 36], "{name}");
        assert_eq!(own["update"].0, [m, 36], "{name}");
        let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        assert_eq!(to_f32(&own["prompt"].1), be.download_f32(method.rows()));
        assert_eq!(
            to_f32(&own["update"].1),
            be.download_f32(method.update().unwrap())
        );
        assert!(own["update"].1.iter().any(|&x| x != 0.0), "{name}");

        let doc = read_json(&tmp.path().join("export.json"));
        assert_eq!(doc["method"], name);
        assert_eq!(doc["update"]["shape"], json!([m, 36]));
        assert_eq!(doc["peft_adapter"], Value::Null);
        assert_eq!(doc["note"], note.as_str());
        assert!(doc["apply"].as_str().unwrap().contains("t < min(n, M="));
    }
}

#[test]
fn missing_adapter_config_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = err_text(read_adapter(tmp.path(), 36));
    assert!(msg.contains("adapter_config.json"), "{msg}");
}

#[test]
fn wrong_peft_type_names_the_field_and_value() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = peft_config(2, 4);
    config["peft_type"] = json!("LORA");
    write_adapter(
        tmp.path(),
        &config,
        &[("prompt_embeddings", vec![2, 4], vec![0.0; 8])],
    );
    let msg = err_text(read_adapter(tmp.path(), 4));
    assert!(msg.contains("adapter_config.json"), "{msg}");
    assert!(msg.contains("peft_type"), "{msg}");
    assert!(msg.contains("LORA"), "{msg}");
}

#[test]
fn token_dim_mismatch_names_the_field_and_both_widths() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(
        tmp.path(),
        &peft_config(2, 4),
        &[("prompt_embeddings", vec![2, 4], vec![0.5; 8])],
    );
    let msg = err_text(read_adapter(tmp.path(), 36));
    assert!(msg.contains("adapter_config.json"), "{msg}");
    assert!(msg.contains("token_dim"), "{msg}");
    assert!(msg.contains("is 4") && msg.contains("36"), "{msg}");
    // The same folder with the right width reads (a PEFT-written config, peft_version and all).
    let (p, rows) = read_adapter(tmp.path(), 4).unwrap();
    assert_eq!((p, rows), (2, vec![0.5; 8]));
    // A row count past any prompt (an overflow of rows × submodules) is named, not computed.
    let mut huge = peft_config(2, 4);
    huge["num_virtual_tokens"] = json!(u64::MAX / 2 + 1);
    write_adapter(
        tmp.path(),
        &huge,
        &[("prompt_embeddings", vec![2, 4], vec![0.5; 8])],
    );
    let msg = err_text(read_adapter(tmp.path(), 4));
    assert!(
        msg.contains("num_virtual_tokens") && msg.contains("MAX_SEQ_LEN"),
        "{msg}"
    );
}

#[test]
fn missing_or_misshapen_prompt_embeddings_name_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(
        tmp.path(),
        &peft_config(2, 4),
        &[("embedding.weight", vec![2, 4], vec![0.0; 8])],
    );
    let msg = err_text(read_adapter(tmp.path(), 4));
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
    assert!(msg.contains("prompt_embeddings"), "{msg}");

    write_adapter(
        tmp.path(),
        &peft_config(2, 4),
        &[("prompt_embeddings", vec![3, 4], vec![0.0; 12])],
    );
    let msg = err_text(read_adapter(tmp.path(), 4));
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
    assert!(msg.contains("[2, 4]") && msg.contains("[3, 4]"), "{msg}");

    std::fs::remove_file(tmp.path().join("adapter_model.safetensors")).unwrap();
    let msg = err_text(read_adapter(tmp.path(), 4));
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
}

#[test]
fn two_transformer_submodules_keep_the_encoder_half_and_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = peft_config(2, 4);
    config["num_transformer_submodules"] = json!(2);
    let values: Vec<f32> = (0..16).map(|i| i as f32).collect();
    write_adapter(
        tmp.path(),
        &config,
        &[("prompt_embeddings", vec![4, 4], values.clone())],
    );
    let prompt = read_adapter_prompt(tmp.path(), 4).unwrap();
    assert_eq!((prompt.p, &prompt.rows[..]), (2, &values[..8]));
    let note = prompt.note.unwrap();
    assert!(
        note.contains("num_transformer_submodules = 2") && note.contains("rows 2..4"),
        "{note}"
    );
    // null means 2 for a seq2seq adapter (PEFT's default): the same.
    config["num_transformer_submodules"] = Value::Null;
    write_adapter(
        tmp.path(),
        &config,
        &[("prompt_embeddings", vec![4, 4], values.clone())],
    );
    assert_eq!(
        read_adapter(tmp.path(), 4).unwrap(),
        (2, values[..8].to_vec())
    );
    // ... but then the file must hold both halves.
    write_adapter(
        tmp.path(),
        &config,
        &[("prompt_embeddings", vec![2, 4], values[..8].to_vec())],
    );
    let msg = err_text(read_adapter(tmp.path(), 4));
    assert!(msg.contains("[4, 4]") && msg.contains("[2, 4]"), "{msg}");
    config["num_transformer_submodules"] = json!(3);
    write_adapter(
        tmp.path(),
        &config,
        &[("prompt_embeddings", vec![6, 4], vec![0.0; 24])],
    );
    let msg = err_text(read_adapter(tmp.path(), 4));
    assert!(
        msg.contains("num_transformer_submodules") && msg.contains("is 3"),
        "{msg}"
    );
}

/// PEFT's default seq2seq adapter (tools/make_peft_fixtures.py: 2 × 5 rows) read by
/// `--init-from` reproduces PEFT's own generation: the log-probability of every token PEFT's
/// greedy `generate` chose equals fastpt's with the encoder half (the decoder half would give
/// other numbers: PEFT's generate does not use it).
#[test]
fn peft_seq2seq_default_adapter_reproduces_peft_generation() {
    let be = B::new();
    let model = load_model(&be, &fixture("t5-v1_0-tiny"), Quant::None).unwrap();
    let dir = fixture("peft/t5-pt-seq2seq");
    let cfg = MethodConfig::from_toml("pt", "prompt_len = 5").unwrap();
    let mut pt = build_backbone_method(&be, &model, &cfg, MAX_LEN, 0, None).unwrap();
    let note = init_from_adapter(&be, pt.as_mut(), &dir).unwrap().unwrap();
    assert!(note.contains("rows 5..10"), "{note}");
    let golden = read_json(&dir.join("golden.json"));
    for case in golden["cases"].as_array().unwrap() {
        let ids: Vec<i32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let generated: Vec<i32> = serde_json::from_value(case["generated"].clone()).unwrap();
        let logprobs: Vec<f64> = serde_json::from_value(case["token_logprobs"].clone()).unwrap();
        // Token by token: the NLL of the first k generated tokens, for every k.
        for k in 1..generated.len() {
            let batch = HostBatch::from_ids(
                std::slice::from_ref(&ids),
                &[generated[1..=k].to_vec()],
                0,
                0,
            );
            let nll = label_nll(&be, &model, Some(pt.as_mut()), &batch).unwrap()[0];
            let want: f64 = -logprobs[..k].iter().sum::<f64>();
            assert!(
                (nll - want).abs() <= 1e-4 * want.abs(),
                "input {ids:?}, first {k} tokens: fastpt {nll}, PEFT {want}"
            );
        }
    }
}

/// P-Tuning's state under PEFT's names (`prompt_encoder.default.embedding.weight`,
/// `...mlp_head.{0,2,4}.*`) starts fastpt's `ptuning`, whose rows then equal the rows PEFT
/// saved in the adapter (its MLP's output).
#[test]
fn ptuning_starts_from_peft_mlp_head_state() {
    let be = B::new();
    let model = t5(&be);
    let dir = fixture("peft/t5-ptuning");
    let mut pt = t5_method(&be, &model, "ptuning", "prompt_len = 4", 3);
    let note =
        init_from_adapter(&be, pt.as_mut(), &dir.join("prompt_encoder.safetensors")).unwrap();
    assert_eq!(note, None);
    let ours = be.download_f32(pt.rows());
    let theirs =
        &read_all_f64(&dir.join("adapter_model.safetensors")).unwrap()["prompt_embeddings"];
    assert_eq!(theirs.0, [4, 36]);
    let (mut diff, mut norm) = (0.0, 0.0);
    for (a, b) in ours.iter().zip(&theirs.1) {
        diff += (*a as f64 - b).powi(2);
        norm += b * b;
    }
    assert!(
        diff.sqrt() <= 1e-5 * norm.sqrt(),
        "{} vs {}",
        diff.sqrt(),
        norm.sqrt()
    );
    // The saved adapter alone holds only those rows: they start `pt`, and `ptuning` says why not.
    let msg = err_text(init_from_adapter(&be, pt.as_mut(), &dir));
    assert!(
        msg.contains("mlp_head") && msg.contains("state_dict"),
        "{msg}"
    );
    let mut plain = t5_method(&be, &model, "pt", "prompt_len = 4", 3);
    let note = init_from_adapter(&be, plain.as_mut(), &dir)
        .unwrap()
        .unwrap();
    assert!(note.contains("P_TUNING"), "{note}");
    assert_eq!(
        be.download_f32(plain.rows()),
        theirs.1.iter().map(|&x| x as f32).collect::<Vec<_>>()
    );
}

/// The adapter folder has PEFT's model card (README.md with the Hub metadata PEFT writes) and
/// `peft_version` in its config.
#[test]
fn export_writes_peft_model_card_and_version() {
    let be = B::new();
    let model = t5(&be);
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("t5-v1_0-tiny");
    let mut pt = t5_method(&be, &model, "pt", "prompt_len = 3", 1);
    let out = export_prompt(&be, pt.as_mut(), &t5_info(&base), tmp.path()).unwrap();
    let card_path = tmp.path().join("adapter/README.md");
    assert!(out.files.contains(&card_path));
    let card = std::fs::read_to_string(&card_path).unwrap();
    let meta = card.split("---\n").nth(1).unwrap();
    let base_s = base.to_str().unwrap();
    assert!(
        meta.contains(&format!("base_model: {}", json!(base_s))),
        "{meta}"
    );
    assert!(meta.contains("library_name: peft"), "{meta}");
    assert!(
        meta.contains(&format!("base_model:adapter:{base_s}")),
        "{meta}"
    );
    assert!(card.contains("- PEFT 0.21.2"), "{card}");
    assert!(card.contains("AutoModelForSeq2SeqLM"), "{card}");
    let config = read_json(&tmp.path().join("adapter/adapter_config.json"));
    assert_eq!(config["peft_version"], "0.21.2");
    // A later DePT export into the same folder removes the card with the rest of the adapter.
    let mut dept = t5_method(&be, &model, "dept", "prompt_len = 2\nrank = 2", 1);
    export_prompt(&be, dept.as_mut(), &t5_info(&base), tmp.path()).unwrap();
    assert!(!card_path.exists());
}

#[test]
fn init_from_on_a_non_pt_method_is_an_error_naming_the_folder() {
    let be = B::new();
    let model = t5(&be);
    let tmp = tempfile::tempdir().unwrap();
    let mut pt = t5_method(&be, &model, "pt", "prompt_len = 3", 1);
    export_prompt(
        &be,
        pt.as_mut(),
        &t5_info(&fixture("t5-v1_0-tiny")),
        tmp.path(),
    )
    .unwrap();
    let adapter = tmp.path().join("adapter");
    let mut dpt = t5_method(&be, &model, "dpt", "prompt_len = 3\nrank = 2", 1);
    let msg = err_text(init_from_adapter(&be, dpt.as_mut(), &adapter));
    assert!(msg.contains(adapter.to_str().unwrap()), "{msg}");
    assert!(msg.contains("`dpt`") && msg.contains("`pt`"), "{msg}");
}

#[test]
fn init_from_with_another_prompt_len_names_both_shapes() {
    let be = B::new();
    let model = t5(&be);
    let tmp = tempfile::tempdir().unwrap();
    let mut pt = t5_method(&be, &model, "pt", "prompt_len = 3", 1);
    export_prompt(
        &be,
        pt.as_mut(),
        &t5_info(&fixture("t5-v1_0-tiny")),
        tmp.path(),
    )
    .unwrap();
    let adapter = tmp.path().join("adapter");
    let mut longer = t5_method(&be, &model, "pt", "prompt_len = 6", 1);
    let before = be.download_f32(longer.rows());
    let msg = err_text(init_from_adapter(&be, longer.as_mut(), &adapter));
    assert!(msg.contains(adapter.to_str().unwrap()), "{msg}");
    assert!(msg.contains("[3, 36]") && msg.contains("[6, 36]"), "{msg}");
    assert_eq!(
        be.download_f32(longer.rows()),
        before,
        "a failed init changed the prompt"
    );
}

#[test]
fn export_refuses_a_base_model_of_another_width_and_nan_rows() {
    let be = B::new();
    let model = t5(&be);
    let mut pt = t5_method(&be, &model, "pt", "prompt_len = 2", 1);
    let tmp = tempfile::tempdir().unwrap();
    // t5-tiny is 64 wide, the fixture's prompt 36.
    let info = ExportInfo {
        kind: Architecture::T5,
        base_model: Some("t5-tiny"),
    };
    let msg = err_text(export_prompt(&be, pt.as_mut(), &info, tmp.path()));
    assert!(msg.contains("t5-tiny") && msg.contains("d_model"), "{msg}");
    assert!(msg.contains("64") && msg.contains("36"), "{msg}");

    let mut values = be.download_f32(pt.rows());
    values[40] = f32::NAN;
    pt.params_mut()[0].value = be.upload_f32(values);
    let info = ExportInfo {
        kind: Architecture::T5,
        base_model: None,
    };
    let msg = err_text(export_prompt(&be, pt.as_mut(), &info, tmp.path()));
    assert!(
        msg.contains("row 1 column 4") && msg.contains("NaN"),
        "{msg}"
    );
    assert!(!tmp.path().join("prompt.safetensors").exists());
}

/// Not part of CI: writes adapters plus fastpt's loss on a fixed batch for
/// tools/check_peft_export.py, which loads them with PEFT and compares.
///
///     FASTPT_EXPORT_DIR=/tmp/fastpt-peft cargo test --release --test export -- --ignored
///     python tools/check_peft_export.py /tmp/fastpt-peft
#[test]
#[ignore = "writes adapters for tools/check_peft_export.py (needs FASTPT_EXPORT_DIR)"]
fn write_adapters_for_the_peft_check() {
    use fastpt::data::EncoderInput;
    use fastpt::engine::{build_backbone_method, forward_loss};
    use fastpt::model::load_model;

    type B64 = CpuBackend<f64>;
    let Some(out) = std::env::var_os("FASTPT_EXPORT_DIR") else {
        panic!("set FASTPT_EXPORT_DIR to the folder to write the adapters into");
    };
    let out = PathBuf::from(out);
    let be = B64::new();
    let cases = [
        ("t5-pt", "t5-v1_0-tiny", "pt", "prompt_len = 4"),
        (
            "t5-lamp",
            "t5-v1_0-tiny",
            "lamp",
            "prompt_len = 4\nrank = 2\npool = 2",
        ),
        (
            "t5v11-dpt",
            "t5-v1_1-tiny",
            "dpt",
            "prompt_len = 3\nrank = 2",
        ),
        ("llama-pt", "llama-gqa-tiny", "pt", "prompt_len = 4"),
    ];
    for (case, fixture_name, name, options) in cases {
        let dir = fixture(fixture_name);
        let model = load_model(&be, &dir, Quant::None).unwrap();
        let cfg = MethodConfig::from_toml(name, options).unwrap();
        let mut method = build_backbone_method(&be, &model, &cfg, MAX_LEN, 3, None).unwrap();
        // f32-representable parameters, so PEFT (f64 after loading) sees the same rows for PT.
        for (i, p) in method.params_mut().iter_mut().enumerate() {
            let v = random_vec(p.numel(), 0.5, 70 + i as u64);
            p.value = be.upload_f32(v.iter().map(|&x| x as f32).collect());
        }
        let batch = match model.is_decoder_only() {
            false => model.random_batch(&[6, 4], &[3, 5], 8),
            true => model.random_batch(&[5, 3], &[2, 3], 8),
        };
        let info = ExportInfo {
            kind: model.architecture(),
            base_model: dir.to_str(),
        };
        let case_dir = out.join(case);
        let exported = export_prompt(&be, method.as_mut(), &info, &case_dir).unwrap();
        assert!(exported.peft);
        let loss = forward_loss(&be, &model, Some(method.as_mut()), &batch).unwrap();
        let EncoderInput::Ids(ids) = &batch.input else {
            panic!("id batch")
        };
        let rows = |v: &[i32], t: usize| -> Vec<Vec<i32>> {
            if t == 0 {
                Vec::new()
            } else {
                v.chunks(t).map(<[i32]>::to_vec).collect()
            }
        };
        let label_len = batch.labels.len() / batch.batch;
        let check = json!({
            "model": dir.to_str(),
            "method": name,
            "input_ids": rows(ids, batch.enc_len),
            "attention_mask": rows(&batch.attention_mask, batch.enc_len),
            "decoder_input_ids": rows(&batch.decoder_input_ids, batch.dec_len),
            "labels": rows(&batch.labels, label_len),
            "fastpt_loss": loss,
        });
        std::fs::write(
            case_dir.join("check.json"),
            serde_json::to_string_pretty(&check).unwrap(),
        )
        .unwrap();
    }
}
