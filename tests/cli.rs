//! The `fastpt` binary end to end: the README's `run`, and `forward` on a golden fixture folder
//! (its outputs must match the Hugging Face goldens), with text input and with bad input.

use std::path::Path;
use std::process::Command;

mod common;

use common::fastpt;

use fastpt::model::hf::read_all_f64;
use fastpt::testing::{fixture, rel_err};

/// `fastpt forward --model MODEL --batch BATCH --out OUT`.
fn forward(model: &Path, batch: &Path, out: &Path) -> (bool, String, String) {
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let (model, batch, out) = (arg(model), arg(batch), arg(out));
    fastpt(&[
        "forward", "--model", &model, "--batch", &batch, "--out", &out,
    ])
}

#[test]
fn step_says_the_backbone_is_random_and_prints_loss_and_gradient() {
    let (ok, stdout, stderr) = fastpt(&["step"]);
    assert!(ok, "{stderr}");
    let first = stdout.lines().next().unwrap();
    assert!(first.contains("RANDOM weights"), "{first}");
    let loss: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("loss"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Random init over a 1000-token vocabulary: near ln(1000) ≈ 6.9, certainly finite.
    assert!(loss.is_finite() && loss > 3.0 && loss < 20.0, "{loss}");
    assert!(stdout.contains("grad norm") && stdout.contains("backward"));
}

#[test]
fn forward_on_a_golden_folder_matches_hf() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["t5-v1_0-tiny", "t5-v1_1-tiny"] {
        let model = fixture(name);
        let g = read_all_f64(&model.join("golden.safetensors")).unwrap();
        // Rebuild the golden batch as ragged JSON rows (padding and mask are then implicit).
        let rows = |key: &str, keep: &dyn Fn(usize, usize) -> bool| -> Vec<Vec<i64>> {
            let (shape, data) = &g[key];
            (0..shape[0])
                .map(|i| {
                    (0..shape[1])
                        .filter(|&j| keep(i, j))
                        .map(|j| data[i * shape[1] + j] as i64)
                        .collect()
                })
                .collect()
        };
        let (mshape, mask) = &g["attention_mask"];
        let (lshape, labels) = &g["labels"];
        let real = |i: usize, j: usize| mask[i * mshape[1] + j] != 0.0;
        let labeled = |i: usize, j: usize| labels[i * lshape[1] + j] != -100.0;
        let batch = serde_json::json!({
            "input_ids": rows("input_ids", &real),
            "labels": rows("labels", &labeled),
        });
        let batch_path = dir.path().join(format!("{name}.json"));
        std::fs::write(&batch_path, batch.to_string()).unwrap();
        let out = dir.path().join(format!("{name}.safetensors"));
        let (ok, stdout, stderr) = forward(&model, &batch_path, &out);
        assert!(ok, "{name}: {stderr}");
        assert!(stdout.contains("wrote"));
        let res = read_all_f64(&out).unwrap();
        let loss = res["loss"].1[0];
        let want = g["loss"].1[0];
        assert!(
            ((loss - want) / want).abs() < 1e-4,
            "{name}: loss {loss} vs {want}"
        );
        let grad_err = rel_err(&res["d_inputs_embeds"].1, &g["d_inputs_embeds"].1);
        assert!(
            grad_err < 1e-3,
            "{name}: d_inputs_embeds rel err {grad_err}"
        );
        let v = res["logits"].0[1];
        let golden_logits = &g["logits"].1;
        let expected: Vec<f64> = res["label_rows"]
            .1
            .iter()
            .flat_map(|&r| golden_logits[r as usize * v..(r as usize + 1) * v].to_vec())
            .collect();
        assert!(
            rel_err(&res["logits"].1, &expected) < 1e-4,
            "{name}: logits"
        );
    }
}

#[test]
fn forward_tokenizes_text_with_the_folder_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("text.json");
    std::fs::write(
        &batch,
        r#"{"input_text": ["the cat sat on the mat", "a dog"], "target_text": ["yes", "no"]}"#,
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let model = fixture("t5-v1_0-tiny");
    let (ok, _, stderr) = forward(&model, &batch, &out);
    assert!(ok, "{stderr}");
    let res = read_all_f64(&out).unwrap();
    assert!(res["loss"].1[0].is_finite());
    assert_eq!(res["inputs_embeds"].0[0], 2);
}

#[test]
fn forward_with_a_bad_batch_names_the_file_and_field_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("bad.json");
    std::fs::write(&batch, r#"{"input_ids": [[3, 4, 99999]], "labels": [[1]]}"#).unwrap();
    let out = dir.path().join("out.safetensors");
    let model = fixture("t5-v1_0-tiny");
    let (ok, _, stderr) = forward(&model, &batch, &out);
    assert!(!ok);
    assert!(
        stderr.contains("bad.json") && stderr.contains("input_ids") && stderr.contains("99999"),
        "{stderr}"
    );
    assert!(!out.exists());

    let (ok, _, stderr) = forward(Path::new("/nonexistent/model"), &batch, &out);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");
}

#[test]
fn params_prints_the_counts_of_one_method_and_the_papers_table() {
    let (ok, stdout, stderr) = fastpt(&[
        "params",
        "--shape",
        "t5-base",
        "--method",
        "lamp",
        "--prompt-len",
        "100",
        "--rank",
        "8",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("train-time parameters  6,952"), "{stdout}");
    let (ok, stdout, _) = fastpt(&["params", "--method", "ept", "--option", "fusion=paper"]);
    assert!(ok);
    assert!(
        stdout.contains("train-time parameters  1,656,836"),
        "{stdout}"
    );
    let (ok, stdout, _) = fastpt(&["params", "--table"]);
    assert!(ok);
    assert!(
        stdout.contains("| llama-2-7b | lamp | prompt_len = 10000, rank = 8 | 112,776 |"),
        "{stdout}"
    );
    let (ok, _, stderr) = fastpt(&["params", "--method", "lamp", "--option", "pool=3"]);
    assert!(!ok);
    assert!(
        stderr.contains("prompt_len l = 100 is not a multiple of pool p = 3"),
        "{stderr}"
    );
}

#[test]
fn step_with_a_method_reports_its_parameters_and_gradient() {
    let (ok, stdout, stderr) = fastpt(&["step", "--method", "lamp"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("method     lamp: 100 prompt rows, 1,320 train-time"),
        "{stdout}"
    );
    assert!(stdout.contains("method grad norm"), "{stdout}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        "method = \"dept\"\n[dept]\nprompt_len = 7\nrank = 3\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = fastpt(&["step", "--config", config.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("method     dept: 7 prompt rows"),
        "{stdout}"
    );
    std::fs::write(&config, "method = \"dept\"\n[dept]\nrank = 0\n").unwrap();
    let (ok, _, stderr) = fastpt(&["step", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("rank (r) = 0"), "{stderr}");
}

#[test]
fn run_trains_writes_the_run_folder_and_names_bad_config_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("r");
    let set_out = format!("out_dir={:?}", out_dir.display().to_string());
    let (ok, stdout, stderr) = fastpt(&[
        "run",
        "--set",
        "train.steps=5",
        "--set",
        "train.warmup_steps=1",
        "--set",
        &set_out,
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.lines().next().unwrap().contains("RANDOM weights"),
        "{stdout}"
    );
    assert!(stdout.contains("finished after 5 steps"), "{stdout}");
    assert!(out_dir.join("report.json").exists() && out_dir.join("loss.svg").exists());
    // Same folder again: refused, nothing overwritten; --resume of a finished run is a no-op.
    let (ok, _, stderr) = fastpt(&[
        "run",
        "--set",
        "train.steps=5",
        "--set",
        "train.warmup_steps=1",
        "--set",
        &set_out,
    ]);
    assert!(!ok && stderr.contains("--resume"), "{stderr}");
    // A real folder through --model: no random-backbone warning, the folder's name in the summary.
    let model = fixture("t5-v1_1-tiny");
    let set_out2 = format!("out_dir={:?}", dir.path().join("r2").display().to_string());
    let (ok, stdout, stderr) = fastpt(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--set",
        "train.steps=3",
        "--set",
        "train.warmup_steps=1",
        "--set",
        &set_out2,
    ]);
    assert!(ok, "{stderr}");
    assert!(
        !stdout.contains("RANDOM") && stdout.contains("t5-v1_1-tiny"),
        "{stdout}"
    );
    let (ok, _, stderr) = fastpt(&["run", "--set", "train.stepz=5"]);
    assert!(!ok && stderr.contains("train.stepz"), "{stderr}");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "method = \"lamp\"\n[train]\nlr = -1\n").unwrap();
    let (ok, _, stderr) = fastpt(&["run", "--config", config.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("bad.toml") && stderr.contains("train.lr") && stderr.contains("-1"),
        "{stderr}"
    );
}

#[test]
fn device_flags_are_checked() {
    let (ok, _, err) = fastpt(&["step", "--f64", "--device", "vgpu"]);
    assert!(!ok);
    assert!(err.contains("--f64 runs the CPU reference"), "{err}");
    let (ok, _, err) = fastpt(&["step", "--device", "tpu"]);
    assert!(!ok);
    assert!(err.contains("tpu"), "{err}");
}

#[test]
fn forward_on_the_virtual_gpu_matches_the_cpu_loss() {
    // The v1.0 fixture through `fastpt forward` on the virtual GPU in f32 and on the CPU.
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("batch.json");
    std::fs::write(
        &batch,
        r#"{"input_ids": [[37, 5, 1], [8, 1]], "labels": [[5, 1], [9, 9, 1]]}"#,
    )
    .unwrap();
    let model = fixture("t5-v1_0-tiny");
    let loss = |device: &str| -> f64 {
        let out = dir.path().join(format!("{device}.safetensors"));
        let (ok, stdout, err) = fastpt(&[
            "forward",
            "--device",
            device,
            "--dtype",
            "f32",
            "--model",
            model.to_str().unwrap(),
            "--batch",
            batch.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{device}: {err}");
        assert!(
            stdout.contains(&format!(
                "backend    {}",
                if device == "cpu" { "cpu" } else { "vgpu-f32" }
            )),
            "{stdout}"
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("loss"))
            .expect("a loss line");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (cpu, vgpu) = (loss("cpu"), loss("vgpu"));
    assert!(
        ((cpu - vgpu) / cpu).abs() < 1e-5,
        "cpu {cpu} vs vgpu {vgpu}"
    );
}

#[test]
fn forward_on_a_llama_golden_folder_matches_hf() {
    // The golden batch (prompt rows + text, right-padded) as ragged inputs_embeds rows and
    // unshifted labels: the family is read from config.json.
    let dir = tempfile::tempdir().unwrap();
    for name in ["llama-gqa-tiny", "llama3-tied-tiny"] {
        let model = fixture(name);
        let g = read_all_f64(&model.join("golden.safetensors")).unwrap();
        let (eshape, embeds) = &g["inputs_embeds"];
        let (b, t, c) = (eshape[0], eshape[1], eshape[2]);
        let mask = &g["attention_mask"].1;
        let labels = &g["labels"].1;
        let real = |i: usize| (0..t).filter(move |&j| mask[i * t + j] != 0.0);
        let embed_rows: Vec<Vec<Vec<f64>>> = (0..b)
            .map(|i| {
                real(i)
                    .map(|j| embeds[(i * t + j) * c..(i * t + j + 1) * c].to_vec())
                    .collect()
            })
            .collect();
        let label_rows: Vec<Vec<i64>> = (0..b)
            .map(|i| real(i).map(|j| labels[i * t + j] as i64).collect())
            .collect();
        let batch = serde_json::json!({"inputs_embeds": embed_rows, "labels": label_rows});
        let batch_path = dir.path().join(format!("{name}.json"));
        std::fs::write(&batch_path, batch.to_string()).unwrap();
        let out = dir.path().join(format!("{name}.safetensors"));
        let (ok, stdout, stderr) = forward(&model, &batch_path, &out);
        assert!(ok, "{name}: {stderr}");
        assert!(stdout.contains("Llama"), "{stdout}");
        let res = read_all_f64(&out).unwrap();
        let (loss, want) = (res["loss"].1[0], g["loss"].1[0]);
        assert!(
            ((loss - want) / want).abs() < 1e-4,
            "{name}: loss {loss} vs {want}"
        );
        let grad_err = rel_err(&res["d_inputs_embeds"].1, &g["d_inputs_embeds"].1);
        assert!(
            grad_err < 1e-3,
            "{name}: d_inputs_embeds rel err {grad_err}"
        );
        assert!(!res.contains_key("encoder_last_hidden_state"));
        let v = res["logits"].0[1];
        let expected: Vec<f64> = res["label_rows"]
            .1
            .iter()
            .flat_map(|&r| g["logits"].1[r as usize * v..(r as usize + 1) * v].to_vec())
            .collect();
        assert!(
            rel_err(&res["logits"].1, &expected) < 1e-4,
            "{name}: logits"
        );
    }
}

#[test]
fn step_runs_a_llama_shape_with_a_method() {
    let (ok, stdout, stderr) = fastpt(&["step", "--shape", "llama-tiny", "--method", "dept"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("Llama") && stdout.contains("method grad norm"),
        "{stdout}"
    );
    let loss: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("loss"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Random init over a 1000-token vocabulary: near ln(1000) ≈ 6.9.
    assert!((loss - 1000f64.ln()).abs() < 1.0, "{loss}");
}

#[test]
fn step_with_nf4_weights_runs_for_t5_and_llama_and_bad_quant_is_named() {
    let loss = |stdout: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("loss"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    for shape in ["t5-tiny", "llama-tiny"] {
        let args = ["step", "--shape", shape, "--device", "cpu"];
        let (ok, dense, stderr) = fastpt(&args);
        assert!(ok, "{stderr}");
        let (ok, nf4, stderr) = fastpt(&[&args[..], &["--quant", "nf4"]].concat());
        assert!(ok, "{stderr}");
        let (d, q) = (loss(&dense), loss(&nf4));
        // Same random weights, 4-bit: close, not equal.
        assert!(
            q.is_finite() && d != q && (d - q).abs() < 0.1 * d,
            "{shape}: {d} vs {q}"
        );
    }
    let (ok, _, stderr) = fastpt(&["run", "--device", "cpu", "--set", "quant=\"int8\""]);
    assert!(!ok);
    assert!(
        stderr.contains("quant") && stderr.contains("int8"),
        "{stderr}"
    );
}

#[test]
fn bench_smoke_writes_a_report_with_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let (ok, stdout, stderr) = fastpt(&[
        "bench",
        "--device",
        "cpu",
        "--shape",
        "t5-tiny",
        "--shape",
        "llama-tiny",
        "--setting",
        "none",
        "--setting",
        "pt:prompt_len=5",
        "--batch",
        "2",
        "--input-len",
        "9",
        "--target-len",
        "3",
        "--warmup",
        "1",
        "--rounds",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("| t5-tiny | pt:prompt_len=5 | 5 |"),
        "{stdout}"
    );
    // Two rounds: the intervals are [min, max] at 50%, which the table says.
    assert!(stdout.contains("[interval at 50%: 2 rounds]"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["schema"], 2);
    assert_eq!(report["backend"], "cpu-f32");
    assert_eq!(report["rounds"], 2);
    // The machine: the CPU's model, cores and SIMD level and the commit; no GPU figures.
    let machine = &report["machine"];
    assert_eq!(machine["device"], "cpu-f32");
    assert!(machine["cores"].as_u64().unwrap() >= 1, "{machine}");
    for key in ["cpu", "simd", "commit"] {
        assert!(!machine[key].as_str().unwrap().is_empty(), "{machine}");
    }
    assert!(machine["gemm_peak_tflops"].is_null() && machine["gpu_start"].is_null());
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for (row, (shape, setting, prompt_rows, params)) in rows.iter().zip([
        ("t5-tiny", "none", 0, 0),
        ("t5-tiny", "pt:prompt_len=5", 5, 5 * 64),
        ("llama-tiny", "none", 0, 0),
        ("llama-tiny", "pt:prompt_len=5", 5, 5 * 64),
    ]) {
        assert_eq!(row["shape"], shape);
        assert_eq!(row["setting"], setting);
        assert_eq!(row["prompt_rows"], prompt_rows);
        assert_eq!(row["train_params"], params);
        assert_eq!(row["stored_params"], params);
        for key in ["train_step_ms", "forward_ms", "generate_ms"] {
            let stats = &row[key];
            let (median, min, max) = (
                stats["median"].as_f64().unwrap(),
                stats["min"].as_f64().unwrap(),
                stats["max"].as_f64().unwrap(),
            );
            assert!(
                0.0 < min && min <= median && median <= max,
                "{key}: {stats}"
            );
            // One value per round.
            assert_eq!(stats["samples"].as_array().unwrap().len(), 2);
        }
        assert!(row["train_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(row["train_tflops"].as_f64().unwrap() > 0.0);
        // MFU needs a measured GPU GEMM peak.
        assert!(row["mfu"].is_null());
        assert!(row["peak_memory_bytes"].as_u64().unwrap() > 0);
        assert!(row["final_loss"].as_f64().unwrap().is_finite());
    }
    assert!(out.join("table.md").exists());
    assert_eq!(report["memory"], "heap peak");
    // The model's weights are live during every cell, so each peak holds at least its f32
    // token embeddings.
    let embeddings = |shape: &str| {
        let cfg: serde_json::Value = serde_json::from_str(&fastpt(&["shape", shape]).1).unwrap();
        let width = cfg["d_model"].as_u64().or(cfg["hidden_size"].as_u64());
        4 * width.unwrap() * cfg["vocab_size"].as_u64().unwrap()
    };
    for row in rows {
        let least = embeddings(row["shape"].as_str().unwrap());
        assert!(row["peak_memory_bytes"].as_u64().unwrap() > least, "{row}");
    }
    let chart = std::fs::read_to_string(out.join("memory.svg")).unwrap();
    for text in [
        "peak memory by shape",
        "pt:prompt_len=5",
        "t5-tiny",
        "llama-tiny",
    ] {
        assert!(chart.contains(text), "memory.svg has no {text}");
    }
    // A bad setting is named.
    let (ok, _, stderr) = fastpt(&["bench", "--device", "cpu", "--setting", "pt:rank"]);
    assert!(!ok && stderr.contains("pt:rank"), "{stderr}");
}

#[test]
fn bench_claims_on_the_cpu_writes_the_table_sweeps_and_charts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("claims");
    let (ok, stdout, stderr) = fastpt(&[
        "bench",
        "--claims",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--input-len",
        "12",
        "--target-len",
        "3",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--rounds",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("every claim runs at t5-tiny"), "{stdout}");
    assert!(stdout.contains("| EPT-MS vs PT (Lan et al. 2024) | training step time | -14.00% |"));
    // The claims run at the papers' batch 16 × 256, the sweeps at the bench's sizes; every row
    // says where it was measured and how that differs from the paper.
    assert!(
        stdout.contains("t5-tiny, batch 16 × (256 in + 3 target), cpu-f32"),
        "{stdout}"
    );
    assert!(stdout.contains("stand-in shape (the paper: t5-base)"));
    assert!(stdout.contains("cpu-f32 instead of a GPU"));
    assert!(stdout.contains("batch 2 × (12 in + 3 target)"));
    // Two rounds: times carry [min, max] at 50%, and the header says so.
    assert!(stdout.contains("[interval at 50%: 2 rounds]"), "{stdout}");
    assert!(
        stdout.contains("Claims re-measured: cpu-f32 on"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("claims.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    // Six groups × four metrics; the papers' numbers where they make a claim.
    assert_eq!(rows.len(), 24);
    let lamp: Vec<_> = rows
        .iter()
        .filter(|r| r["claim"].as_str().unwrap().starts_with("LAMP"))
        .collect();
    assert_eq!(lamp.len(), 4);
    for r in &lamp {
        assert!(r["paper"].is_number(), "{r}");
        assert_eq!(r["shape"], "t5-tiny");
        assert_eq!(r["paper_shape"], "t5-11b");
    }
    // Parameters are exact on any device; memory is the heap peak the binary counts.
    let params = lamp.iter().find(|r| r["metric"] == "params").unwrap();
    assert!(params["measured"].as_f64().unwrap() < -50.0, "{params}");
    let memory = lamp.iter().find(|r| r["metric"] == "memory").unwrap();
    assert!(memory["measured"].as_f64().unwrap().is_finite(), "{memory}");
    assert_eq!(report["reports"][0]["memory"], "heap peak");
    let sweeps = report["sweeps"].as_array().unwrap();
    let xs = |i: usize| -> Vec<u64> {
        sweeps[i]["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["x"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(xs(0), [0, 20, 40, 60, 80, 100]);
    assert_eq!(xs(1), [1, 2, 4, 5, 10, 20]);
    for name in ["claims.md", "sweep-1.svg", "sweep-2.svg"] {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        assert!(text.len() > 100, "{name}");
    }
    assert!(std::fs::read_to_string(out.join("sweep-2.svg"))
        .unwrap()
        .contains("pooling block p"));
}

#[test]
fn bench_baseline_errors_name_what_is_missing() {
    let base = [
        "bench",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch",
        "1",
        "--input-len",
        "4",
        "--target-len",
        "2",
        "--baseline",
    ];
    // No PT setting to compare with.
    let (ok, _, stderr) = fastpt(&[&base[..], &["--setting", "none"]].concat());
    assert!(!ok && stderr.contains("--setting pt"), "{stderr}");
    // An interpreter that does not exist is named.
    let out = Command::new(env!("CARGO_BIN_EXE_fastpt"))
        .args([&base[..], &["--setting", "pt:prompt_len=3"]].concat())
        .env("FASTPT_PYTHON", "/nonexistent/python")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent/python") && stderr.contains("peft_baseline.py"),
        "{stderr}"
    );
}

/// `fastpt run` of `model` on the RTE fixture for one step, from the folder `cwd`.
fn run_rte_from(cwd: &Path, model: &str) -> (bool, String, String) {
    let data = fixture("data/glue/rte");
    let out = cwd.join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_fastpt"))
        .current_dir(cwd)
        .args(["run", "--device", "cpu", "--model", model, "--task", "rte"])
        .args(["--data", data.to_str().unwrap()])
        .args(["--set", "train.steps=1", "--set", "train.batch_size=2"])
        .args([
            "--set",
            "train.warmup_steps=0",
            "--set",
            "data.labels=words",
        ])
        .args(["--set", "train.eval_every=1", "--set", "train.max_len=32"])
        .args(["--set", "method=pt", "--set", "method.prompt_len=2"])
        .args(["--set", &format!("out_dir={:?}", out.to_str().unwrap())])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A copy of the T5 fixture folder's files at `dst`, without the files named in `skip`.
fn copy_t5_fixture(dst: &Path, skip: &[&str]) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !skip.contains(&f) {
            std::fs::copy(fixture("t5-v1_0-tiny").join(f), dst.join(f)).unwrap();
        }
    }
}

#[test]
fn model_folder_edges_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let batch = tmp.path().join("text.json");
    std::fs::write(
        &batch,
        r#"{"input_text": ["a cat"], "target_text": ["yes"]}"#,
    )
    .unwrap();
    let out = tmp.path().join("out.safetensors");

    // A Hub id: fastpt reads local folders, and the download command names that id.
    let (ok, _, stderr) = run_rte_from(tmp.path(), "google/flan-t5-base");
    common::assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("Hub id")
            && stderr.contains("hf download google/flan-t5-base --local-dir models/flan-t5-base"),
        "{stderr}"
    );
    let (ok, _, stderr) = forward(Path::new("google/flan-t5-base"), &batch, &out);
    common::assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("hf download google/flan-t5-base"),
        "{stderr}"
    );

    // A PyTorch pickle instead of safetensors: how to convert it.
    let pickle = tmp.path().join("pickle");
    copy_t5_fixture(&pickle, &["model.safetensors"]);
    std::fs::write(pickle.join("pytorch_model.bin"), b"not read").unwrap();
    let (ok, _, stderr) = forward(&pickle, &batch, &out);
    common::assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("pytorch_model.bin") && stderr.contains("save_pretrained"),
        "{stderr}"
    );

    // A SentencePiece model without tokenizer.json: how to write tokenizer.json.
    let spm = tmp.path().join("spm");
    copy_t5_fixture(&spm, &["tokenizer.json"]);
    std::fs::write(spm.join("spiece.model"), b"not read").unwrap();
    let (ok, _, stderr) = run_rte_from(tmp.path(), spm.to_str().unwrap());
    common::assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("only spiece.model") && stderr.contains("AutoTokenizer"),
        "{stderr}"
    );
    assert!(!tmp.path().join("run").exists());
}

#[test]
fn a_folder_named_like_a_builtin_shape_is_loaded() {
    // Without a folder, "t5-tiny" is the built-in random shape, which has no tokenizer.
    let bare = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = run_rte_from(bare.path(), "t5-tiny");
    common::assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("built-in shape without a tokenizer"),
        "{stderr}"
    );

    // A folder of that name in the working directory is a model folder, and it trains.
    let cwd = tempfile::tempdir().unwrap();
    copy_t5_fixture(&cwd.path().join("t5-tiny"), &[]);
    let (ok, stdout, stderr) = run_rte_from(cwd.path(), "t5-tiny");
    assert!(ok, "{stdout}\n{stderr}");
    assert!(!stdout.contains("RANDOM weights"), "{stdout}");
    assert!(cwd.path().join("run/predictions.jsonl").is_file());
}

#[test]
fn params_prints_a_table_for_every_builtin_shape() {
    for shape in fastpt::model::shapes::builtin_shapes() {
        let (ok, stdout, stderr) = fastpt(&["params", "--shape", shape, "--method", "dept"]);
        assert!(ok, "{shape}: {stderr}");
        assert!(
            stdout.starts_with(&format!("dept on {shape} (d = ")),
            "{stdout}"
        );
        // An aligned table of the options and counts, no Rust Debug text.
        assert!(
            !stdout.contains('{') && !stdout.contains("Some("),
            "{stdout}"
        );
        let col = |key: &str| {
            let line = stdout
                .lines()
                .find(|l| l.trim_start().starts_with(key))
                .unwrap_or_else(|| panic!("{key}: {stdout}"));
            line.len()
                - line[line.find(key).unwrap() + key.len()..]
                    .trim_start()
                    .len()
        };
        assert_eq!(col("prompt_len"), col("train-time parameters"), "{stdout}");
    }
    let (ok, _, stderr) = fastpt(&["params", "--shape", "t5-huge", "--method", "pt"]);
    common::assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("t5-tiny") && stderr.contains("llama"),
        "{stderr}"
    );
}

/// `--baseline` checks what it needs before measuring anything, from any directory: the
/// script is found beside the binary, a Python without the packages is named with them.
#[test]
fn bench_baseline_checks_python_and_the_script_before_measuring() {
    let tmp = tempfile::tempdir().unwrap();
    // python3 without its site-packages: no torch, transformers or peft.
    let python = tmp.path().join("python-bare");
    std::fs::write(&python, "#!/bin/sh\nexec python3 -S \"$@\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bench = |envs: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fastpt"));
        cmd.current_dir(tmp.path())
            .args(["bench", "--device", "cpu", "--steps", "1", "--warmup", "0"])
            .args(["--setting", "pt:prompt_len=3", "--baseline"])
            .env_remove("FASTPT_BASELINE_SCRIPT");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = bench(&[("FASTPT_PYTHON", python.to_str().unwrap())]);
    common::assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("peft_baseline.py")
            && stderr.contains("lacks torch transformers peft")
            && stderr.contains("pip install"),
        "{stderr}"
    );
    // Nothing was measured: the bench's progress lines never started.
    assert!(!stderr.contains("bench: t5-tiny"), "{stderr}");
    // A script named by FASTPT_BASELINE_SCRIPT must exist.
    let (ok, stderr) = bench(&[("FASTPT_BASELINE_SCRIPT", "/nonexistent/peft_baseline.py")]);
    common::assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("FASTPT_BASELINE_SCRIPT=/nonexistent"),
        "{stderr}"
    );
}

/// A build without the `mpi` feature started by mpirun as one of several ranks refuses to run
/// (N independent runs would each train alone and write the same folder), saying how to build
/// with MPI.
#[cfg(not(feature = "mpi"))]
#[test]
fn run_as_one_of_several_ranks_without_mpi_refuses_and_says_how_to_build() {
    for (rank_var, size_var) in [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_fastpt"))
            .args(["run", "--set", "train.steps=1"])
            .current_dir(tmp.path())
            .env(rank_var, "1")
            .env(size_var, "2")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{rank_var}: {stderr}");
        assert!(
            stderr.contains("rank 1 of 2") && stderr.contains("--features mpi"),
            "{rank_var}: {stderr}"
        );
        assert!(!tmp.path().join("runs").exists(), "{rank_var}: wrote a run");
    }
    // One rank of one (a launcher's single process) is a plain run.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fastpt"))
        .args([
            "run",
            "--set",
            "train.steps=1",
            "--set",
            "train.warmup_steps=0",
        ])
        .current_dir(tmp.path())
        .env("OMPI_COMM_WORLD_RANK", "0")
        .env("OMPI_COMM_WORLD_SIZE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
