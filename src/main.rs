//! The `fastpt` command line: parses the flags, picks the device, calls the library and prints what
//! it returns (the work is in the library; anyhow only here).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use fastpt::backend::collective::{from_launcher, Collective};
use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::gpu::cuda::CudaDevice;
use fastpt::backend::gpu::device::{DType, Device};
use fastpt::backend::gpu::vgpu::VirtualDevice;
use fastpt::backend::gpu::{AttentionKernel, GpuBackend};
use fastpt::backend::Backend;
use fastpt::bench::baseline::{baseline_table, check_baseline, peft_cells};
use fastpt::bench::charts::{write_memory_chart, write_sweep_charts};
use fastpt::bench::claims::{claims_markdown, run_claims};
use fastpt::bench::{markdown_table, run_bench, BenchClock, BenchConfig, Machine, Setting};
use fastpt::config::RunConfig;
use fastpt::data::tasks::LabelStyle;
use fastpt::data::BatchSpec;
use fastpt::data::HostBatch;
use fastpt::doctor::{check_ops, check_steps, results_table, CheckResult};
use fastpt::engine::{build_backbone_method, forward_backward, StepOutput};
use fastpt::fsutil::write_file_atomic;
use fastpt::model::hf::{load_tokenizer, save_safetensors, TensorData};
use fastpt::model::memory::{check_model, Workload};
use fastpt::model::shapes::{builtin_shapes, is_builtin_shape};
use fastpt::model::{load_model, random_model, shape_hf_json, Backbone};
use fastpt::prompt::table::{paper_table_markdown, shape_width, thousands};
use fastpt::prompt::{train_params, MethodConfig};
use fastpt::train::predict::{
    load_predictor, predictions_jsonl, read_inputs, PredictOptions, PromptSource,
};
use fastpt::train::run_dir::{check_resume_dir, resume_command};
use fastpt::train::trainer::{
    evaluate_run, evaluate_transfer, export_run, metrics_line, signal_name, train, RunParams,
    Stopped, TrainOptions, DEFAULT_RUN_TOML,
};

#[derive(Parser)]
#[command(
    name = "fastpt",
    version,
    about = "Prompt tuning of frozen T5 and Llama models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a prompt method. Without --config: the embedded default (EPT-MS on the built-in
    /// t5-tiny shape with random weights, on a built-in synthetic task).
    Run(TrainArgs),
    /// Evaluate a finished run folder on its task's dev or test set (metrics and predictions).
    Eval(EvalArgs),
    /// Apply a trained prompt (a run folder, an export folder or a PEFT prompt-tuning adapter)
    /// to new inputs: predictions as JSON Lines.
    Predict(PredictArgs),
    /// Export a finished run's prompt: prompt.safetensors, export.json and, for methods whose
    /// result is a plain prompt, a PEFT prompt-tuning adapter folder.
    Export(ExportArgs),
    /// One forward + backward of a built-in T5 shape (random weights) on a built-in batch,
    /// printing loss, gradient norm and timing.
    Step(RunArgs),
    /// One forward + backward of a model on a batch given as JSON; writes logits, loss and
    /// d loss / d inputs_embeds to a safetensors file, to check parity with another implementation.
    Forward(ForwardArgs),
    /// Parameter counts of a prompt method (train-time and stored), or the papers' table.
    Params(ParamsArgs),
    /// Check the GPU: device facts, kernel compilation, every op and whole training steps
    /// against the CPU reference in bf16 and f32. Without a GPU, the same on the virtual GPU.
    Doctor(DoctorArgs),
    /// Measure training-step and forward time, memory and parameters of prompt-method settings
    /// on built-in shapes (random weights): a markdown table, and report.json with --out.
    Bench(BenchArgs),
    /// Print the Hugging Face config.json of a built-in shape (for transformers; see
    /// tools/peft_baseline.py).
    Shape(ShapeArgs),
}

#[derive(Args)]
struct EvalArgs {
    /// The run folder (config.toml, best.safetensors / method.safetensors).
    run: PathBuf,
    #[arg(long, default_value = "test", value_parser = ["dev", "test"])]
    split: String,
    /// best: keep-best's parameters (best.safetensors, else the last); last: method.safetensors.
    #[arg(long, default_value = "best", value_parser = ["best", "last"])]
    params: String,
    /// Predictions by greedy generation or rank classification (default: the run's `data.eval`).
    #[arg(long, value_parser = ["generate", "rank"])]
    mode: Option<String>,
    /// Evaluate on another task (transfer): a built-in task name or a custom task's .toml,
    /// read from --data; writes eval-TASK-SPLIT.json. Without it: the run's own task.
    #[arg(long, requires = "data")]
    task: Option<String>,
    /// The data folder of --task.
    #[arg(long, requires = "task")]
    data: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct PredictArgs {
    /// A run folder, an export folder (prompt.safetensors; DePT's and EPT-MS's update
    /// included) or a PEFT prompt-tuning adapter folder.
    source: PathBuf,
    /// The inputs: a .jsonl / .json / .csv / .tsv / .parquet / .arrow file of records with an `input` field (or the
    /// fields of --task), or `-`: stdin, one input text per line (with --task: JSON Lines).
    input: PathBuf,
    /// Write the predictions (JSON Lines) to this file instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A built-in task (rte, boolq, ...) or a custom task's .toml whose template applies to the
    /// inputs' fields; its label texts are what --scores and --mode rank rank. Default: the
    /// run's task, for --scores.
    #[arg(long)]
    task: Option<String>,
    /// The base model folder (an adapter or export whose base_model_name_or_path is not a
    /// local folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Label texts as indices ("0") or words ("entailment"); default: the run's data.labels.
    #[arg(long, value_parser = ["indices", "words"])]
    labels: Option<String>,
    /// Greedy generation or rank classification (default: the run's data.eval, else generate).
    #[arg(long, value_parser = ["generate", "rank"])]
    mode: Option<String>,
    /// Add each label's log-likelihood (rank classification over the task's label texts).
    #[arg(long)]
    scores: bool,
    /// A run's keep-best parameters (best) or its last (last).
    #[arg(long, default_value = "best", value_parser = ["best", "last"])]
    params: String,
    /// Rows per batch (default: the run's data.eval_batch_size, else 32).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Inputs are cut to this many tokens (default: the run's train.max_len, else 256).
    #[arg(long)]
    max_len: Option<usize>,
    /// Generation stops after this many tokens (default: the run's train.max_target_len).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Store the backbone's linear weights in NF4 (default: the run's quant).
    #[arg(long, value_parser = ["none", "nf4"])]
    quant: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct ExportArgs {
    /// The run folder.
    run: PathBuf,
    /// Where to write the export (created).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "best", value_parser = ["best", "last"])]
    params: String,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct ShapeArgs {
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(builtin_shapes()))]
    name: String,
}

#[derive(Args)]
struct BenchArgs {
    /// Built-in shapes (T5 or Llama), repeatable; default t5-tiny. With --claims: the one shape
    /// every claim runs at instead of the papers' (the default on a CPU or the virtual GPU is
    /// t5-tiny; on a GPU, the papers' shapes).
    #[arg(long = "shape", value_parser = clap::builder::PossibleValuesParser::new(builtin_shapes()))]
    shapes: Vec<String>,
    /// Method settings, repeatable: `none` (the backbone alone), a method name at the papers'
    /// defaults (`pt`), or with options (`ept:prompt_len=60,rank=30`).
    #[arg(long = "setting", default_values = ["none", "pt"])]
    settings: Vec<String>,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Input tokens per row.
    #[arg(long, default_value_t = 64)]
    input_len: usize,
    /// Target tokens per row.
    #[arg(long, default_value_t = 8)]
    target_len: usize,
    /// Maximum input length m (the length of DePT's and EPT-MS's update; the papers use 256).
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Untimed training steps of each cell before the rounds (and one forward pass and one
    /// generation when above 0).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Interleaved rounds: each round times every cell in turn (order rotated per round), so
    /// the machine's drift hits all cells alike; medians and 95% intervals are over rounds
    /// (6 or more for 95%; 1 gives no interval).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Timed steps of each kind (training step, forward pass, generation) per cell and round;
    /// a round's time is their mean.
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// none or nf4 (the frozen linear weights in 4 bits).
    #[arg(long, default_value = "none", value_parser = ["none", "nf4"])]
    quant: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for report.json and table.md (with --claims: claims.json, claims.md, one SVG
    /// chart per sweep).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The papers' efficiency claims next to fastpt's measurements (../shared/methods.md);
    /// --setting is ignored.
    #[arg(long)]
    claims: bool,
    /// Also run PyTorch + transformers + PEFT prompt tuning on the same shapes, batch and
    /// lengths (tools/peft_baseline.py, with $FASTPT_PYTHON or python3) and print the ratios
    /// against fastpt's `pt` settings.
    #[arg(long, conflicts_with = "claims")]
    baseline: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Where a command runs.
#[derive(Args)]
struct DeviceArgs {
    /// auto: a CUDA GPU when one is usable, else the CPU; cpu: the CPU reference; cuda: the GPU
    /// (an error when none is usable); vgpu: the virtual GPU, our CUDA kernels compiled for the
    /// CPU (a test device: exact, slow).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda", "vgpu"])]
    device: String,
    /// Storage type on a GPU: bf16 (f32 accumulation) or f32 (for exact comparisons).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    dtype: String,
    /// Run the CPU reference in f64 instead of f32 (implies the CPU).
    #[arg(long)]
    f64: bool,
    /// Attention on a GPU: flash (fused kernels, the default), flash-tc (the same on tensor
    /// cores: bf16, heads of 64 or 128), gemm (cuBLAS around a softmax kernel).
    #[arg(long, default_value = "flash", value_parser = ["flash", "flash-tc", "gemm"])]
    attention: String,
}

#[derive(Args)]
struct DoctorArgs {
    /// auto: the CUDA GPU, or the virtual GPU when none is usable; cuda; vgpu.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cuda", "vgpu"])]
    device: String,
    /// Built-in shapes of the whole-step checks (repeat the flag for several; T5 or Llama).
    #[arg(long = "shape", default_values = ["t5-tiny", "llama-tiny"], value_parser = clap::builder::PossibleValuesParser::new(builtin_shapes()))]
    shapes: Vec<String>,
    /// Shapes of the whole-step checks with the tensor-core attention (bf16; heads 64 or 128 wide
    /// use it, others fall back to the scalar kernels).
    #[arg(long = "tc-shape", default_values = ["t5-tiny-d64", "llama-tiny-d64"], value_parser = clap::builder::PossibleValuesParser::new(builtin_shapes()))]
    tc_shapes: Vec<String>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct ParamsArgs {
    /// Print every method at the papers' settings on t5-small/base/large and llama-2-7b, next to
    /// the figures of the papers (markdown).
    #[arg(long, conflicts_with_all = ["method"])]
    table: bool,
    /// Model shape (sets the width d): any built-in shape, T5 or Llama.
    #[arg(long, default_value = "t5-base", value_parser = clap::builder::PossibleValuesParser::new(builtin_shapes()))]
    shape: String,
    /// pt, ptuning, residual, dpt, dept, ept, lamp or xpt.
    #[arg(long, required_unless_present = "table")]
    method: Option<String>,
    /// The method's prompt_len (l, or s for DePT / EPT-MS).
    #[arg(long)]
    prompt_len: Option<usize>,
    /// The method's rank (r, or b for DPT).
    #[arg(long)]
    rank: Option<usize>,
    /// Maximum input length m (DePT's and EPT-MS's update length).
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Any other option of the method, as in its TOML section: `--option pool=4`.
    #[arg(long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// The run config (TOML): see examples/*.toml. Without it, the embedded default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key: `--set train.lr=0.1`, `--set method.rank=8`, `--set model=DIR`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// A Hugging Face T5 folder or a built-in shape (same as `--set model=DIR`).
    #[arg(long)]
    model: Option<String>,
    /// The task (same as `--set data.task=NAME`): a GLUE / SuperGLUE name (rte, boolq, ...),
    /// a custom task's .toml file, or synthetic.
    #[arg(long)]
    task: Option<String>,
    /// The task's data folder (same as `--set data.dir=DIR`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Start PT's prompt from a PEFT prompt-tuning adapter folder (adapter_config.json +
    /// adapter_model.safetensors), e.g. the export/adapter of another run.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its checkpoint, with the folder's config.toml as the
    /// config (`--set` may change train.steps, train.eval_every, train.checkpoint_every). The
    /// older form `--config FILE --resume` resumes FILE's out_dir.
    #[arg(long, value_name = "RUN_DIR", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
    /// Store the backbone's linear weights in NF4 (same as `--set quant="nf4"`).
    #[arg(long, value_parser = ["none", "nf4"])]
    quant: Option<String>,
    /// Under mpirun / srun (several ranks): every N steps (and at the last) the ranks compare a
    /// hash of the method parameters and stop with an error if they differ; 0: never.
    #[arg(long, default_value_t = 100, value_name = "N")]
    check_replicas_every: u64,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Built-in shape with random weights (T5 or Llama).
    #[arg(long, default_value = "t5-tiny", value_parser = clap::builder::PossibleValuesParser::new(builtin_shapes()))]
    shape: String,
    /// Seed of the random weights and the built-in batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// none: linear weights in the device dtype; nf4: 4-bit NF4 with double-quantised absmax
    /// (bitsandbytes' layout), dequantised right before each GEMM.
    #[arg(long, default_value = "none", value_parser = ["none", "nf4"])]
    quant: String,
    #[command(flatten)]
    device: DeviceArgs,
    /// Prompt-tune with this method at the papers' defaults (pt, ptuning, residual, dpt, dept,
    /// ept, lamp, xpt).
    #[arg(long, conflicts_with = "config")]
    method: Option<String>,
    /// A run config (TOML): `method = "NAME"` and the method's `[NAME]` section of options.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Maximum input length m (the length of DePT's and EPT-MS's update).
    #[arg(long, default_value_t = 256)]
    max_len: usize,
}

#[derive(Args)]
struct ForwardArgs {
    /// A Hugging Face T5 or Llama folder: config.json, model.safetensors (or sharded),
    /// tokenizer.json; the family is read from config.json's model_type.
    #[arg(long, required_unless_present = "shape", conflicts_with = "shape")]
    model: Option<PathBuf>,
    /// A built-in shape with random weights, instead of --model.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(builtin_shapes()))]
    shape: Option<String>,
    /// Seed of the random weights (with --shape).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// none: linear weights in the device dtype; nf4: 4-bit NF4 with double-quantised absmax
    /// (bitsandbytes' layout), dequantised right before each GEMM.
    #[arg(long, default_value = "none", value_parser = ["none", "nf4"])]
    quant: String,
    /// The batch as JSON: input_ids | inputs_embeds | input_text, optional attention_mask,
    /// labels | target_text, optional decoder_input_ids; for Llama, labels aligned with the
    /// input (see README.md).
    #[arg(long)]
    batch: PathBuf,
    /// Where to write logits, label_rows, loss, inputs_embeds, d_inputs_embeds and (T5)
    /// encoder_last_hidden_state (safetensors).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Counts heap bytes so `fastpt bench` on the CPU reports each setting's peak memory.
#[global_allocator]
static ALLOC: fastpt::bench::heap::PeakAlloc = fastpt::bench::heap::PeakAlloc;

/// The signal that interrupted `fastpt run` (0: none); main exits with 128 + it.
static EXIT_SIGNAL: AtomicUsize = AtomicUsize::new(0);

/// Exit codes: 0 done (a finished run, or `--resume` of one), 1 an error, 130 a run stopped by
/// SIGINT, 143 by SIGTERM (128 + the signal, as shells report it), 2 a bad command line (clap).
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One rank of several when mpirun / srun started this process (MPI in an `mpi` build).
    let ranks = match from_launcher() {
        Ok(ranks) => ranks,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Errors print as one line with their causes (`{:#}`), without a backtrace.
    match dispatch(cli, ranks.as_ref()) {
        Ok(()) => match EXIT_SIGNAL.load(Ordering::SeqCst) {
            0 => std::process::ExitCode::SUCCESS,
            sig => std::process::ExitCode::from(u8::try_from(128 + sig).unwrap_or(u8::MAX)),
        },
        Err(e) if ranks.size() > 1 => {
            // The other ranks may be waiting in a collective: MPI's abort ends them all (the
            // launcher names this rank); every file written so far is whole.
            // One write: the lines of several ranks interleave, not their characters.
            let msg = format!(
                "error (rank {} of {}): {e:#}\nfastpt: rank {} failed; stopping every rank\n",
                ranks.rank(),
                ranks.size(),
                ranks.rank()
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
            ranks.abort(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The backend a command runs on, chosen by [`DeviceArgs`].
enum Selected {
    Cpu32,
    Cpu64,
    Vgpu(DType, AttentionKernel),
    Cuda(CudaDevice, DType, AttentionKernel),
}

/// The backend of `args`; a CUDA device is number `ordinal` modulo the devices the driver sees
/// (the rank's index on its machine: one GPU per rank).
fn select_device(args: &DeviceArgs, ordinal: usize) -> Result<Selected> {
    // The fallback notes once per machine (local rank 0), not once per rank.
    let note = |line: String| {
        if ordinal == 0 {
            eprintln!("{line}");
        }
    };
    let ordinal = ordinal % fastpt::backend::gpu::cuda::device_count().max(1);
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        _ => DType::Bf16,
    };
    let attention = match args.attention.as_str() {
        "gemm" => AttentionKernel::Gemm,
        "flash-tc" => AttentionKernel::FlashTc,
        _ => AttentionKernel::Flash,
    };
    if args.f64 {
        if matches!(args.device.as_str(), "cuda" | "vgpu") {
            bail!(
                "--f64 runs the CPU reference; it cannot be combined with --device {}",
                args.device
            );
        }
        return Ok(Selected::Cpu64);
    }
    Ok(match args.device.as_str() {
        "cpu" => Selected::Cpu32,
        "vgpu" => {
            // Reports a bad $FASTPT_VGPU_SCHEDULE here, before anything runs.
            fastpt::backend::gpu::vgpu::Schedule::from_env()?;
            Selected::Vgpu(dtype, attention)
        }
        "cuda" => {
            let dev = CudaDevice::new(ordinal)?;
            if let Some(why) = older_gpu_refusal(&dev, dtype, attention) {
                bail!("{why}; use --dtype f32 --attention flash on this GPU");
            }
            Selected::Cuda(dev, dtype, attention)
        }
        _ => match CudaDevice::new(ordinal) {
            Ok(dev) => match older_gpu_refusal(&dev, dtype, attention) {
                Some(why) => {
                    note(format!(
                        "fastpt: {why}; running in f32 with the scalar flash kernels"
                    ));
                    Selected::Cuda(dev, DType::F32, AttentionKernel::Flash)
                }
                None => Selected::Cuda(dev, dtype, attention),
            },
            Err(e) => {
                note(format!("fastpt: no usable GPU ({e}); running on the CPU"));
                Selected::Cpu32
            }
        },
    })
}

/// Why `dtype` / `attention` cannot run on `dev` (a GPU older than sm_80), or None.
fn older_gpu_refusal(dev: &CudaDevice, dtype: DType, attention: AttentionKernel) -> Option<String> {
    let (major, minor) = dev.compute_capability();
    if dev.supports_bf16() {
        return None;
    }
    if dtype == DType::Bf16 {
        Some(format!(
            "bf16 needs sm_80 or newer (bf16 GEMMs and mma.sync); this GPU is sm_{major}{minor}"
        ))
    } else if attention == AttentionKernel::FlashTc {
        Some(format!(
            "--attention flash-tc needs sm_80 or newer (bf16 mma.sync); this GPU is sm_{major}{minor}"
        ))
    } else {
        None
    }
}

/// Runs `$body` with `$be` bound to the selected backend (each arm is its own instantiation).
macro_rules! with_backend {
    ($args:expr, |$be:ident| $body:expr) => {
        with_backend!($args, 0, |$be| $body)
    };
    ($args:expr, $ordinal:expr, |$be:ident| $body:expr) => {
        match select_device($args, $ordinal)? {
            Selected::Cpu32 => {
                let $be = &CpuBackend::<f32>::new();
                $body
            }
            Selected::Cpu64 => {
                let $be = &CpuBackend::<f64>::new();
                $body
            }
            Selected::Vgpu(dtype, attention) => {
                let $be =
                    &GpuBackend::new(VirtualDevice::from_env()?, dtype).with_attention(attention);
                $body
            }
            Selected::Cuda(dev, dtype, attention) => {
                let $be = &GpuBackend::new(dev, dtype).with_attention(attention);
                $body
            }
        }
    };
}

fn dispatch(cli: Cli, ranks: &dyn Collective) -> Result<()> {
    let across = matches!(
        cli.command,
        Command::Run(_) | Command::Doctor(_) | Command::Bench(_)
    );
    if ranks.size() > 1 && !across {
        bail!(
            "started as rank {} of {} (mpirun / srun): only `fastpt run`, `bench` and `doctor` \
             run across ranks; run this command as one process",
            ranks.rank(),
            ranks.size()
        );
    }
    match cli.command {
        Command::Run(args) => {
            with_backend!(&args.device, ranks.local_rank(), |be| train_cmd(
                be, &args, ranks
            ))
        }
        Command::Eval(args) => with_backend!(&args.device, |be| eval_cmd(be, &args)),
        Command::Predict(args) => with_backend!(&args.device, |be| predict_cmd(be, &args)),
        Command::Export(args) => with_backend!(&args.device, |be| export_cmd(be, &args)),
        Command::Step(args) => with_backend!(&args.device, |be| run(be, &args)),
        Command::Params(args) => params(&args),
        Command::Forward(args) => with_backend!(&args.device, |be| forward(be, &args)),
        Command::Doctor(args) => doctor(&args, ranks),
        Command::Bench(args) => {
            with_backend!(&args.device, ranks.local_rank(), |be| bench(
                be, &args, ranks
            ))
        }
        Command::Shape(args) => {
            let json = shape_hf_json(&args.name)?;
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(())
        }
    }
}

fn describe<B: Backend>(name: &str, model: &Backbone<B>) -> String {
    format!("{name}: {}", model.describe())
}

fn print_step(be_name: &str, step: &StepOutput, batch: &HostBatch) {
    println!(
        "backend    {be_name} ({} threads)",
        rayon::current_num_threads()
    );
    let positions = if batch.dec_len == 0 {
        // Decoder-only: one sequence per row.
        format!("{} positions", batch.enc_len)
    } else {
        format!(
            "encoder {} positions, decoder {} positions",
            batch.enc_len, batch.dec_len
        )
    };
    println!(
        "batch      {} rows, {positions}, {} label positions",
        batch.batch,
        step.label_rows.len()
    );
    println!("loss       {:.6}", step.loss);
    println!(
        "grad norm  {:.6e}  (‖d loss / d inputs_embeds‖)",
        step.grad_norm()
    );
    println!(
        "time       forward {:.1} ms, backward {:.1} ms",
        step.forward_time.as_secs_f64() * 1e3,
        step.backward_time.as_secs_f64() * 1e3
    );
}

/// Installs the SIGINT and SIGTERM handlers of `fastpt run`: the first signal sets `signal` to
/// its number (the trainer finishes the step, writes the checkpoint and report.json, and
/// stops); a second one ends the process at once with 128 + its number (the files written so
/// far are whole: every write is atomic).
fn install_signal_handlers(signal: &Arc<AtomicUsize>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let seen = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so it sees `seen` as it was before this signal.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&seen))
            .with_context(|| format!("installing the handler of signal {sig}"))?;
        signal_hook::flag::register(sig, Arc::clone(&seen))
            .with_context(|| format!("installing the handler of signal {sig}"))?;
        signal_hook::flag::register_usize(sig, Arc::clone(signal), sig as usize)
            .with_context(|| format!("installing the handler of signal {sig}"))?;
    }
    Ok(())
}

fn train_cmd<B: Backend + 'static>(be: &B, args: &TrainArgs, ranks: &dyn Collective) -> Result<()> {
    // Rank 0 speaks for a data-parallel run; the other ranks print nothing but errors.
    let lead = ranks.rank() == 0;
    macro_rules! say {
        ($($t:tt)*) => {
            if lead {
                println!($($t)*);
            }
        };
    }
    let mut overrides = args.overrides.clone();
    if let Some(model) = &args.model {
        overrides.push(format!("model={model:?}"));
    }
    if let Some(quant) = &args.quant {
        overrides.push(format!("quant={quant:?}"));
    }
    if let Some(task) = &args.task {
        overrides.push(format!("data.task={task:?}"));
    }
    if let Some(dir) = &args.data {
        overrides.push(format!("data.dir={:?}", dir.display().to_string()));
    }
    // Recorded in config.toml as `init_from`, which `--config` files may give too.
    if let Some(dir) = &args.init_from {
        overrides.push(format!("init_from={:?}", dir.display().to_string()));
    }
    // `--resume RUN_DIR`: the folder's config.toml is the config (--config, when given too, is
    // compared with it). `--config FILE --resume`: the older form, FILE's out_dir.
    let resume_dir = match &args.resume {
        Some(Some(dir)) => {
            check_resume_dir(dir)?;
            Some(dir.clone())
        }
        Some(None) if args.config.is_none() => bail!(
            "--resume needs the run folder: fastpt run --resume RUN_DIR (or the older form \
             fastpt run --config FILE --resume, which resumes FILE's out_dir)"
        ),
        _ => None,
    };
    let (mut cfg, source) = match (&args.config, &resume_dir) {
        (Some(path), _) => (RunConfig::from_file(path, &overrides)?, path.clone()),
        (None, Some(dir)) => {
            let path = dir.join("config.toml");
            (RunConfig::from_file(&path, &overrides)?, path)
        }
        (None, None) => {
            let path = PathBuf::from("<embedded default>");
            (
                RunConfig::from_toml_str(DEFAULT_RUN_TOML, &path, &overrides)?,
                path,
            )
        }
    };
    let out_dir_set = overrides.iter().any(|o| {
        let o = o.trim_start();
        o.starts_with("out_dir") || o.starts_with("output_dir")
    });
    if let Some(dir) = &resume_dir {
        if out_dir_set && cfg.out_dir != *dir {
            bail!(
                "--resume {}: the run folder is where it is; --set out_dir = {} cannot move it \
                 (move the folder, then resume it there)",
                dir.display(),
                cfg.out_dir.display()
            );
        }
        // A moved or copied folder resumes where it is now.
        cfg.out_dir = dir.clone();
    }
    cfg.validate(&source)?;
    let resume = args.resume.is_some();
    let random = is_builtin_shape(&cfg.model);
    if args.config.is_none() && !resume && !out_dir_set {
        // The embedded default never refuses to start: each run gets its own folder (rank
        // 0's choice, which every rank takes).
        let mut dir = next_free_dir(&cfg.out_dir)
            .display()
            .to_string()
            .into_bytes();
        ranks.broadcast(&mut dir, 0)?;
        cfg.out_dir = PathBuf::from(String::from_utf8_lossy(&dir).into_owned());
    }
    if random {
        say!(
            "fastpt run: the backbone is the built-in `{}` shape with RANDOM weights (seed {}): the \
             numbers below show the engine working, not a trained model. To prompt-tune a real \
             model: fastpt run --config examples/ept.toml --model DIR --task rte --data DIR \
             (a Hugging Face T5 or Llama folder, a GLUE / SuperGLUE task's files).",
            cfg.model, cfg.seed
        );
    }
    // The trainer's banner follows with the data's sizes and the resolved steps and warmup.
    say!(
        "method {} | model {} | task {} | batches of {} × {} | run folder {}",
        cfg.method.name(),
        cfg.model,
        cfg.data.task,
        cfg.train.batch_size,
        cfg.train.grad_accum,
        cfg.out_dir.display()
    );
    if ranks.size() > 1 {
        let n = ranks.size();
        let b = cfg.train.batch_size;
        say!(
            "data-parallel over {n} ranks ({}): each takes rows r, r + {n}, ... of every batch of \
             {b} ({} or {} rows per rank); rank 0 writes the run folder",
            ranks.describe(),
            b / n,
            b.div_ceil(n)
        );
    }
    let signal = Arc::new(AtomicUsize::new(0));
    install_signal_handlers(&signal)?;
    let opts = TrainOptions {
        resume,
        interrupt: &signal,
        progress: lead,
        init_from: None,
        nan_grad_at_step: None,
        ranks,
        check_replicas_every: args.check_replicas_every,
        diverge_at_step: None,
    };
    let out = train(be, &cfg, &opts)?;
    let done = out.losses.last().map(|l| l.0).unwrap_or(0);
    if out.stopped == Stopped::AlreadyFinished && done < out.total_steps {
        say!(
            "{}: early stopping ended the run at step {done} of {} (train.early_stopping_patience \
             = {}); nothing was changed. To train it on: {} --set \
             train.early_stopping_patience=N (more evaluations, or 0 for no early stopping)",
            out.run_dir.display(),
            out.total_steps,
            cfg.train.early_stopping_patience,
            resume_command(&out.run_dir)
        );
        return Ok(());
    }
    if out.stopped == Stopped::AlreadyFinished {
        say!(
            "{}: the run is finished (step {done} of {}); nothing was changed. To train it \
             longer: {} --set train.steps=N",
            out.run_dir.display(),
            out.total_steps,
            resume_command(&out.run_dir)
        );
        return Ok(());
    }
    let first = out.losses.first().map(|l| l.1).unwrap_or(f64::NAN);
    let last = out.losses.last().map(|l| l.1).unwrap_or(f64::NAN);
    let tail = out.losses.len().min(20);
    let mean = |s: &[(u64, f64)]| s.iter().map(|l| l.1).sum::<f64>() / s.len().max(1) as f64;
    say!(
        "{} after {done} steps in {:.1} s ({:.0} tokens/s): loss {first:.4} at step 1, {last:.4} at the end (mean of the last {tail}: {:.4})",
        match (out.stopped, &out.early_stop) {
            (Stopped::Interrupted(sig), _) => format!("interrupted by {}", signal_name(sig)),
            (_, Some(_)) => format!("stopped early (of {} steps)", out.total_steps),
            _ => "finished".to_string(),
        },
        out.seconds,
        out.tokens_per_second,
        mean(&out.losses[out.losses.len() - tail..]),
    );
    let text_task = !cfg.data.is_synthetic();
    match out.best {
        Some((step, score)) if text_task => say!(
            "best dev score {:.2} at step {step} (best.safetensors: the mean of the task's metrics)",
            score * 100.0
        ),
        Some((step, loss)) => say!("best dev loss {loss:.4} at step {step} (best.safetensors)"),
        None => {}
    }
    for split in ["dev", "test"] {
        let metrics: std::collections::BTreeMap<String, f64> = out
            .eval
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&format!("{split}_"))?.to_string(), *v)))
            .collect();
        if !metrics.is_empty() {
            say!("{split}: {}", metrics_line(&metrics));
        }
    }
    if let Stopped::Interrupted(sig) = out.stopped {
        say!(
            "wrote {}: checkpoint.safetensors (step {done}), report.json, metrics.jsonl\n\
             resume with: {}",
            out.run_dir.display(),
            resume_command(&out.run_dir)
        );
        EXIT_SIGNAL.store(sig, Ordering::SeqCst);
    } else {
        say!(
            "wrote {}: report.json, metrics.jsonl, loss.svg, config.toml, checkpoint.safetensors, \
             method.safetensors, export/{}",
            out.run_dir.display(),
            if text_task { ", predictions.jsonl" } else { "" }
        );
    }
    Ok(())
}

fn run_params(name: &str) -> RunParams {
    match name {
        "last" => RunParams::Last,
        _ => RunParams::Best,
    }
}

fn eval_cmd<B: Backend + 'static>(be: &B, args: &EvalArgs) -> Result<()> {
    let mode = args.mode.as_deref().map(str::parse).transpose()?;
    let params_of = run_params(&args.params);
    let (ev, params, file) = match (&args.task, &args.data) {
        (Some(task), Some(data)) => {
            let (ev, params, name) =
                evaluate_transfer(be, &args.run, params_of, task, data, &args.split, mode)?;
            // The run's own eval-{split}.json stays; a transfer gets its own file.
            (ev, params, format!("eval-{name}-{}.json", args.split))
        }
        _ => {
            let (ev, params) = evaluate_run(be, &args.run, params_of, &args.split, mode)?;
            (ev, params, format!("eval-{}.json", args.split))
        }
    };
    println!(
        "{} on {}{} ({} examples, {:.1} s, parameters {}): {}",
        args.run.display(),
        args.task
            .as_deref()
            .map_or(String::new(), |t| format!("{t} ")),
        args.split,
        ev.predictions.len(),
        ev.seconds,
        params.display(),
        metrics_line(&ev.metrics)
    );
    let path = args.run.join(file);
    write_file_atomic(
        &path,
        serde_json::to_string_pretty(&ev)?.as_bytes(),
        &mut || Ok(()),
    )?;
    println!("wrote {}", path.display());
    Ok(())
}

fn predict_cmd<B: Backend + 'static>(be: &B, args: &PredictArgs) -> Result<()> {
    let source = PromptSource::detect(&args.source)?;
    let opts = PredictOptions {
        params: Some(run_params(&args.params)),
        model: args.model.clone(),
        task: args.task.clone(),
        labels: args.labels.as_deref().map(|l| match l {
            "words" => LabelStyle::Words,
            _ => LabelStyle::Indices,
        }),
        mode: args.mode.as_deref().map(str::parse).transpose()?,
        scores: args.scores,
        batch_size: args.batch_size,
        max_len: args.max_len,
        max_new_tokens: args.max_new_tokens,
        quant: args.quant.as_deref().map(str::parse).transpose()?,
    };
    let mut predictor = load_predictor(be, &source, &opts)?;
    // The task's labels in the style the prompt was trained with (the run's, or --labels).
    let examples = read_inputs(&args.input, predictor.inputs.as_ref(), predictor.labels)?;
    eprintln!("fastpt predict: {}", predictor.describe);
    let start = std::time::Instant::now();
    let predictions = predictor.predict(be, &examples, args.scores)?;
    let text = predictions_jsonl(&predictions);
    match &args.out {
        Some(path) => {
            write_file_atomic(path, text.as_bytes(), &mut || Ok(()))?;
            eprintln!(
                "wrote {} ({} predictions, {:.1} s)",
                path.display(),
                predictions.len(),
                start.elapsed().as_secs_f64()
            );
        }
        None => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("writing the predictions to stdout")?;
        }
    }
    Ok(())
}

fn export_cmd<B: Backend + 'static>(be: &B, args: &ExportArgs) -> Result<()> {
    let exported = export_run(be, &args.run, run_params(&args.params), &args.out)?;
    for f in &exported.files {
        println!("wrote {}", f.display());
    }
    if let Some(note) = &exported.note {
        println!("{note}");
    }
    Ok(())
}

/// `dir` if it is missing or empty, else `dir-2`, `dir-3`, ... (a folder holding anything, an
/// earlier run's results without their checkpoint included, is taken).
fn next_free_dir(dir: &Path) -> PathBuf {
    let taken =
        |d: &Path| std::fs::read_dir(d).is_ok_and(|mut r| r.next().is_some()) || d.is_file();
    if !taken(dir) {
        return dir.to_path_buf();
    }
    (2..)
        .map(|i| PathBuf::from(format!("{}-{i}", dir.display())))
        .find(|d| !taken(d))
        .unwrap_or_else(|| dir.to_path_buf())
}

fn run<B: Backend + 'static>(be: &B, args: &RunArgs) -> Result<()> {
    println!(
        "fastpt step: the backbone is the built-in `{}` shape with RANDOM weights (seed {}), no download.",
        args.shape, args.seed
    );
    println!(
        "`step` does one forward + backward on a built-in batch; to check a real checkpoint:\n  \
         fastpt forward --model DIR --batch FILE.json --out OUT.safetensors\n"
    );
    let method_cfg = match (&args.method, &args.config) {
        (Some(name), _) => Some(MethodConfig::default_for(name)?),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| fastpt::Error::io(path, e))?;
            Some(MethodConfig::from_run_toml(&text, path)?)
        }
        (None, None) => None,
    };
    // Issue 19: the method's sizes and the step's memory are checked before anything is built.
    let quant = args.quant.parse()?;
    let mut work = Workload {
        train_batch: 4,
        input_len: 32,
        target_len: 8,
        ..Workload::default()
    };
    if let Some(cfg) = &method_cfg {
        let d = shape_width(&args.shape)?;
        cfg.validate(d, args.max_len)?;
        work.prompt_rows = cfg.prompt_rows();
        work.method_params = cfg.param_counts(d, args.max_len).train as u128;
    }
    let what = format!("fastpt step --shape {}", args.shape);
    check_model(be, &args.shape, quant, &work, &what)?;
    let model = random_model(be, &args.shape, args.seed, quant)?;
    println!("model      {}", describe(&args.shape, &model));
    let mut method = match &method_cfg {
        Some(cfg) => Some(build_backbone_method(
            be,
            &model,
            cfg,
            args.max_len,
            args.seed,
            None,
        )?),
        None => None,
    };
    if let (Some(cfg), Some(m)) = (&method_cfg, &method) {
        println!(
            "method     {}: {} prompt rows, {} train-time / {} stored parameters",
            cfg.name(),
            m.prompt_rows(),
            thousands(train_params(m.as_ref())),
            thousands(m.stored_params())
        );
    }
    // Four rows of different lengths, as a dynamically padded batch would have.
    let (inputs, targets) = ([24, 17, 32, 9], [6, 3, 8, 5]);
    let batch = model.random_batch(&inputs, &targets, args.seed);
    let step = forward_backward(be, &model, method.as_deref_mut(), &batch)?;
    print_step(&be.name(), &step, &batch);
    let source = format!("the `{}` shape (seed {})", args.shape, args.seed);
    step.check_finite(&source)?;
    if let Some(m) = &method {
        let norm: f64 = m
            .params()
            .iter()
            .flat_map(|p| be.download_f64(&p.grad))
            .map(|g| g * g)
            .sum::<f64>()
            .sqrt();
        println!("method grad norm {norm:.6e}  (‖d loss / d method parameters‖)");
        if !norm.is_finite() {
            bail!("the method's gradient norm on {source} is {norm} (not finite)");
        }
    }
    Ok(())
}

fn forward<B: Backend + 'static>(be: &B, args: &ForwardArgs) -> Result<()> {
    // Issue 19: the weights must fit before they are loaded (the batch is checked once read).
    let source = match (&args.model, &args.shape) {
        (Some(dir), _) => dir.display().to_string(),
        (None, Some(shape)) => shape.clone(),
        (None, None) => bail!("give --model DIR or --shape NAME"),
    };
    let what = format!("fastpt forward on {source}");
    let quant = args.quant.parse()?;
    check_model(be, &source, quant, &Workload::default(), &what)?;
    let (model, tokenizer_dir) = match (&args.model, &args.shape) {
        (Some(dir), _) => (
            load_model(be, dir, args.quant.parse()?)?,
            Some(dir.as_path()),
        ),
        (None, Some(shape)) => (
            random_model(be, shape, args.seed, args.quant.parse()?)?,
            None,
        ),
        (None, None) => bail!("give --model DIR or --shape NAME"),
    };
    let name = match (&args.model, &args.shape) {
        (Some(dir), _) => dir.display().to_string(),
        (_, Some(shape)) => format!("{shape} (random weights, seed {})", args.seed),
        _ => unreachable!("checked above"),
    };
    println!("model      {}", describe(&name, &model));
    let spec = model.batch_spec();
    let batch = read_batch(&args.batch, spec, tokenizer_dir)?;
    check_model(be, &source, quant, &Workload::of_batch(&batch), &what)?;
    let step = forward_backward(be, &model, None, &batch)?;
    print_step(&be.name(), &step, &batch);
    // Checked now, reported after the outputs are written: they show where the NaN starts.
    let finite = step.check_finite(&format!("{name} on {}", args.batch.display()));

    let (b, t, c, v) = (batch.batch, batch.enc_len, spec.d_model, spec.vocab_size);
    let m = step.label_rows.len();
    let has_encoder = !step.encoder_out.is_empty();
    let mut tensors = vec![
        (
            "logits".to_string(),
            vec![m, v],
            TensorData::F32(step.logits),
        ),
        (
            "label_rows".to_string(),
            vec![m],
            TensorData::I64(step.label_rows.iter().map(|&r| r as i64).collect()),
        ),
        ("loss".to_string(), vec![], TensorData::F64(vec![step.loss])),
        (
            "inputs_embeds".to_string(),
            vec![b, t, c],
            TensorData::F32(step.inputs_embeds),
        ),
        (
            "d_inputs_embeds".to_string(),
            vec![b, t, c],
            TensorData::F32(step.d_inputs_embeds),
        ),
    ];
    if has_encoder {
        tensors.push((
            "encoder_last_hidden_state".to_string(),
            vec![b, t, c],
            TensorData::F32(step.encoder_out),
        ));
    }
    save_safetensors(&args.out, &tensors)?;
    println!("wrote      {}", args.out.display());
    finite.map_err(|e| {
        anyhow!(
            "{e}; the outputs are in {} for inspection",
            args.out.display()
        )
    })
}

fn params(args: &ParamsArgs) -> Result<()> {
    if args.table {
        print!("{}", paper_table_markdown()?);
        return Ok(());
    }
    let Some(method) = &args.method else {
        bail!("give --method NAME or --table");
    };
    let mut toml = String::new();
    if let Some(l) = args.prompt_len {
        toml.push_str(&format!("prompt_len = {l}\n"));
    }
    if let Some(r) = args.rank {
        toml.push_str(&format!("rank = {r}\n"));
    }
    for kv in &args.options {
        let Some((key, value)) = kv.split_once('=') else {
            bail!("--option {kv:?}: expected KEY=VALUE");
        };
        let value = value.trim();
        // Bare words (fusion=paper) become TOML strings; numbers, booleans and quoted text stay.
        let bare = value.parse::<f64>().is_err()
            && !matches!(value, "true" | "false")
            && !value.starts_with('"');
        let value = if bare {
            format!("\"{value}\"")
        } else {
            value.to_string()
        };
        toml.push_str(&format!("{} = {value}\n", key.trim()));
    }
    let d = shape_width(&args.shape)?;
    let cfg = MethodConfig::from_toml(method, &toml)?;
    cfg.validate(d, args.max_len)?;
    let counts = cfg.param_counts(d, args.max_len);
    print!(
        "{}",
        params_table(&cfg, &args.shape, d, args.max_len, counts)
    );
    Ok(())
}

/// `fastpt params`: the method's options (every default filled in) and its counts, as an
/// aligned two-column table.
fn params_table(
    cfg: &MethodConfig,
    shape: &str,
    d: usize,
    m: usize,
    counts: fastpt::prompt::config::ParamCounts,
) -> String {
    let mut rows: Vec<(String, String)> = cfg
        .options_toml()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let options = rows.len();
    rows.push(("train-time parameters".into(), thousands(counts.train)));
    rows.push(("stored parameters".into(), thousands(counts.stored)));
    rows.push(("prompt rows".into(), cfg.prompt_rows().to_string()));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("{} on {shape} (d = {d}, m = {m})\n\n", cfg.name());
    for (i, (k, v)) in rows.iter().enumerate() {
        if i == options {
            out.push('\n');
        }
        out.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    out
}

/// Reads the JSON batch, tokenizing text fields with the model folder's tokenizer.json.
fn read_batch(path: &Path, spec: BatchSpec, tokenizer_dir: Option<&Path>) -> Result<HostBatch> {
    let tokenizer = match tokenizer_dir {
        Some(dir) if dir.join("tokenizer.json").exists() => Some(load_tokenizer(dir)?),
        _ => None,
    };
    let encode = |text: &str| -> fastpt::Result<Vec<u32>> {
        let tok = tokenizer.as_ref().ok_or_else(|| {
            fastpt::Error::Input("text fields need a --model folder with tokenizer.json".into())
        })?;
        let enc = tok
            .encode(text, true)
            .map_err(|e| fastpt::Error::Input(format!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    };
    // The library's errors already name the batch file.
    Ok(HostBatch::from_json_file(path, spec, Some(&encode))?)
}

fn doctor(args: &DoctorArgs, ranks: &dyn Collective) -> Result<()> {
    if ranks.size() > 1 {
        return doctor_ranks(args, ranks);
    }
    match args.device.as_str() {
        "vgpu" => doctor_on(VirtualDevice::from_env()?, args),
        "cuda" => {
            doctor_on(CudaDevice::new(0)?, args)?;
            doctor_all_reduce()
        }
        _ => match CudaDevice::new(0) {
            Ok(dev) => {
                doctor_on(dev, args)?;
                doctor_all_reduce()
            }
            Err(e) => {
                println!("no usable GPU: {e}");
                println!("running the same checks on the virtual GPU (the CUDA kernels compiled for the CPU)\n");
                doctor_on(VirtualDevice::from_env()?, args)
            }
        },
    }
}

/// NCCL's all-reduce over every visible GPU in this process (one GPU: the identity). Without
/// NCCL the check is reported unavailable (data-parallel runs then stage gradients through the
/// host over MPI).
fn doctor_all_reduce() -> Result<()> {
    use fastpt::backend::gpu::nccl::{check_all_reduce_on_every_gpu, nccl_available, nccl_version};
    if !nccl_available() {
        println!(
            "\nunavailable all-reduce: no NCCL library (libnccl.so.2); data-parallel runs stage \
             gradients through the host over MPI"
        );
        return Ok(());
    }
    let n = (1 << 20) + 3;
    let checks = check_all_reduce_on_every_gpu(n)?;
    println!(
        "\nall-reduce NCCL {} over {} GPU(s), {n} f32 each (sum of (g + 1)·(1 + i mod 7)):",
        nccl_version()?,
        checks.len()
    );
    for c in &checks {
        println!(
            "           {:<40} rel err {:.1e}  {}",
            c.device,
            c.rel_err,
            if c.passed { "ok" } else { "FAILED" }
        );
    }
    if checks.iter().any(|c| !c.passed) {
        bail!("the NCCL all-reduce gave wrong sums (above)");
    }
    Ok(())
}

/// `mpirun -np N fastpt doctor`: the collectives across the ranks instead of the op checks (run
/// those with one process): MPI's all-reduce of host buffers, and with GPUs NCCL's across the
/// ranks' GPUs (each rank's local rank picks its GPU). Rank 0 prints.
fn doctor_ranks(args: &DoctorArgs, ranks: &dyn Collective) -> Result<()> {
    let (r, n) = (ranks.rank(), ranks.size());
    let lead = r == 0;
    if lead {
        println!("ranks      {}", ranks.describe());
    }
    // Rank r holds x_r[i] = (r + 1)·(1 + i mod 7); the sum is exact in f32 at this size.
    let len = (1 << 16) + 3;
    let value = |rank: usize, i: usize| ((rank + 1) * (1 + i % 7)) as f32;
    let want: Vec<f32> = (0..len)
        .map(|i| (0..n).map(|q| value(q, i)).sum())
        .collect();
    // Whether every rank got `want`, said by rank 0 after `what`.
    let everywhere = |what: &str, got: &[f32]| -> Result<bool> {
        let mut ok = [f64::from(u8::from(got == want.as_slice()))];
        ranks.all_reduce_sum_f64(&mut ok)?;
        let all = ok[0] as usize == n;
        if lead {
            let verdict = if all { "ok on every rank" } else { "FAILED" };
            println!("all-reduce {what}, {len} f32 per rank: {verdict}");
        }
        Ok(all)
    };
    let mut host: Vec<f32> = (0..len).map(|i| value(r, i)).collect();
    ranks.all_reduce_sum_f32(&mut host)?;
    let mut failed = !everywhere("MPI", &host)?;
    let gpu = args.device != "vgpu" && fastpt::backend::gpu::cuda::device_count() > 0;
    if gpu && fastpt::backend::gpu::nccl::nccl_available() {
        use fastpt::backend::gpu::nccl::NcclComm;
        let ordinal = ranks.local_rank() % fastpt::backend::gpu::cuda::device_count();
        let dev = CudaDevice::new(ordinal)?;
        let comm = NcclComm::init(&dev, ranks)?;
        let mut buf = dev.alloc(len * 4)?;
        let mine: Vec<f32> = (0..len).map(|i| value(r, i)).collect();
        dev.upload(&mut buf, bytemuck::cast_slice(&mine))?;
        comm.all_reduce_sum_f32(&dev, &mut buf, len)?;
        let mut got = vec![0f32; len];
        dev.download(&buf, bytemuck::cast_slice_mut(&mut got))?;
        failed |= !everywhere(&format!("NCCL across {n} ranks' GPUs"), &got)?;
    } else if lead {
        println!("all-reduce NCCL: skipped (no GPU or no NCCL library on this rank)");
    }
    if failed {
        bail!("an all-reduce across the ranks gave wrong sums (above)");
    }
    Ok(())
}

/// Every op and whole steps, f32 then bf16, each dtype's table printed as soon as it is done (a
/// run cut short keeps what finished); whole steps with the tensor-core attention on the
/// `--tc-shape` shapes in bf16. A step check that errors is a failed row, not the end of the run.
fn doctor_on<D: Device>(dev: D, args: &DoctorArgs) -> Result<()> {
    println!("device     {}", dev.name());
    for line in dev.describe() {
        println!("           {line}");
    }
    println!("modules");
    for (file, from) in dev.kernel_modules() {
        match from {
            Ok(from) => println!("           {file:<14} {from}"),
            Err(e) => println!("           {file:<14} FAILED: {e}"),
        }
    }
    let unavailable = dev.unavailable();
    for why in &unavailable {
        println!("unavailable {why}");
    }
    let name = dev.name();
    let f32_backend = GpuBackend::new(dev, DType::F32);
    let (mut total, mut failed) = (0, 0);
    for dtype in [DType::F32, DType::Bf16] {
        if dtype == DType::Bf16 && !unavailable.is_empty() {
            println!("\nskipped    bf16 and tensor-core checks (unavailable on this GPU, above)");
            continue;
        }
        let be = f32_backend.with_dtype(dtype);
        let start = std::time::Instant::now();
        let mut results = check_ops(&be, args.seed);
        let mut steps =
            |be: &GpuBackend<D>, shape: &str, tag: &str| match check_steps(be, shape, args.seed) {
                Ok(rows) => results.extend(rows.into_iter().map(|mut r| {
                    r.op.push_str(tag);
                    r
                })),
                Err(e) => results.push(CheckResult {
                    op: format!("{shape} steps{tag}: error: {e}"),
                    dtype,
                    rel_err: f64::NAN,
                    tol: 0.0,
                }),
            };
        for shape in &args.shapes {
            steps(&be, shape, "");
        }
        if dtype == DType::Bf16 {
            let tc = be.with_attention(AttentionKernel::FlashTc);
            for shape in &args.tc_shapes {
                steps(&tc, shape, " [flash-tc]");
            }
        }
        println!(
            "\nchecked    {dtype} in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        print!("{}", results_table(&results));
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        total += results.len();
        failed += results.iter().filter(|r| !r.passed()).count();
    }
    if failed > 0 {
        bail!("{failed} of {total} checks failed on {name}");
    }
    println!("\nall {total} checks passed on {name}");
    Ok(())
}

/// `mpirun -np N fastpt bench`: each shape × setting as one rank's step on the whole batch
/// against the N ranks' steps on their shares (src/bench/ranks.rs); rank 0 prints the table and
/// writes scaling.json and scaling.md into `out`.
fn bench_ranks<B: BenchClock + 'static>(
    be: &B,
    cfg: &BenchConfig,
    out: Option<&Path>,
    ranks: &dyn Collective,
) -> Result<()> {
    use fastpt::bench::ranks::{run_scaling, scaling_table};
    let lead = ranks.rank() == 0;
    if let (Some(dir), true) = (out, lead) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut machine = Machine::probe(be, option_env!("FASTPT_COMMIT"));
    let progress = &mut |cell: &str| eprintln!("bench: {cell}");
    let rows = run_scaling(be, cfg, ranks, progress)?;
    machine.finish();
    if !lead {
        return Ok(());
    }
    let table = format!(
        "{}\n\n{} ranks ({}); batch {} × ({} in + {} target); times in ms, median (interval) \
         over {} rounds; speedup per round = 1 rank / N ranks; efficiency = speedup / N\n\n{}",
        machine.summary(),
        ranks.size(),
        ranks.describe(),
        cfg.batch,
        cfg.input_len,
        cfg.target_len,
        cfg.rounds,
        scaling_table(&rows)
    );
    print!("{table}");
    if let Some(dir) = out {
        let json = serde_json::json!({ "machine": machine, "ranks": ranks.size(), "rows": rows });
        for (name, bytes) in [
            (
                "scaling.json",
                serde_json::to_string_pretty(&json)?.into_bytes(),
            ),
            ("scaling.md", table.into_bytes()),
        ] {
            write_file_atomic(&dir.join(name), &bytes, &mut || Ok(()))?;
            println!("wrote {}", dir.join(name).display());
        }
    }
    Ok(())
}

fn bench<B: BenchClock + 'static>(be: &B, args: &BenchArgs, ranks: &dyn Collective) -> Result<()> {
    let settings = args
        .settings
        .iter()
        .map(|s| Setting::parse(s))
        .collect::<fastpt::Result<Vec<_>>>()?;
    let shapes = if args.shapes.is_empty() {
        vec!["t5-tiny".to_string()]
    } else {
        args.shapes.clone()
    };
    let cfg = BenchConfig {
        shapes,
        settings,
        batch: args.batch,
        input_len: args.input_len,
        target_len: args.target_len,
        max_len: args.max_len,
        warmup: args.warmup,
        rounds: args.rounds,
        steps: args.steps,
        quant: args.quant.parse()?,
        seed: args.seed,
    };
    cfg.check_sizes()?;
    if ranks.size() > 1 {
        if args.claims || args.baseline {
            bail!(
                "--claims and --baseline run in one process; under mpirun, bench measures \
                 data-parallel scaling (one rank on the whole batch against the ranks' shares)"
            );
        }
        return bench_ranks(be, &cfg, args.out.as_deref(), ranks);
    }
    let progress = &mut |cell: &str| eprintln!("bench: {cell}");
    // What a run needs is checked before the first measurement: the output folder is
    // writable, and --baseline has a PT setting, its script and a Python with its packages.
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let probe = dir.join(".fastpt-write-check");
        std::fs::write(&probe, b"")
            .with_context(|| format!("{}: the output folder is not writable", dir.display()))?;
        let _ = std::fs::remove_file(&probe);
    }
    let baseline_tools = match args.baseline {
        true if !cfg.settings.iter().any(|s| s.name.starts_with("pt")) => {
            return Err(fastpt::Error::Input(
                "--baseline compares against fastpt's PT: add --setting pt (or pt:prompt_len=N)"
                    .into(),
            )
            .into())
        }
        true => Some(check_baseline()?),
        false => None,
    };
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        if let Some(dir) = &args.out {
            write_file_atomic(&dir.join(name), bytes, &mut || Ok(()))?;
            println!("wrote {}", dir.join(name).display());
        }
        Ok(())
    };
    // The machine (and on a GPU its GEMM peak and copy bandwidth) before the first cell.
    let mut machine = Machine::probe(be, option_env!("FASTPT_COMMIT"));
    if args.claims {
        let shape = match args.shapes.first() {
            Some(s) => Some(s.as_str()),
            None if !be.name().starts_with("cuda") => {
                println!("bench --claims: not on a GPU, so every claim runs at t5-tiny (--shape picks another)");
                Some("t5-tiny")
            }
            None => None,
        };
        let write_report = |report: &fastpt::bench::claims::ClaimsReport| -> Result<()> {
            write(
                "claims.json",
                serde_json::to_string_pretty(report)?.as_bytes(),
            )?;
            write("claims.md", claims_markdown(report).as_bytes())
        };
        // After each group too: a run stopped by a timeout keeps the groups that finished.
        let mut partial = |report: &fastpt::bench::claims::ClaimsReport| {
            write_report(report).map_err(|e| fastpt::Error::Input(format!("{e:#}")))
        };
        let mut report = run_claims(be, &cfg, shape, &machine, progress, &mut partial)?;
        report.machine.finish();
        println!("{}", claims_markdown(&report));
        write_report(&report)?;
        if let Some(dir) = &args.out {
            for path in write_sweep_charts(dir, &report)? {
                println!("wrote {}", path.display());
            }
        }
        return Ok(());
    }
    let cuda = be.name().starts_with("cuda");
    let mut externals = |shape: &str, cells: &[(String, usize)]| match &baseline_tools {
        Some(tools) => peft_cells(tools, &cfg, cuda, shape, cells),
        None => Ok(Vec::new()),
    };
    let mut report = run_bench(be, &cfg, &machine, progress, &mut externals)?;
    machine.finish();
    report.machine = machine;
    let table = markdown_table(&report);
    println!("{table}");
    write(
        "report.json",
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write("table.md", table.as_bytes())?;
    if let Some(dir) = &args.out {
        let path = dir.join("memory.svg");
        write_memory_chart(&path, &report)?;
        println!("wrote {}", path.display());
    }
    if baseline_tools.is_some() {
        let side_by_side = baseline_table(&report);
        println!("{side_by_side}");
        write("baseline.md", side_by_side.as_bytes())?;
    }
    Ok(())
}
