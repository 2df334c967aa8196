"""What a user would run instead of fastpt: PyTorch + transformers + PEFT prompt tuning, timed
the way `fastpt bench` times itself, on the same built-in shape with random weights.

    python tools/peft_baseline.py --shape t5-base --batch 8 --input-len 64 --target-len 8 \
        --steps 10 --warmup 2 --num-virtual-tokens 100 --out peft.json

The shape's config.json comes from `fastpt shape NAME` (--fastpt names the binary), so both sides
build the same architecture. The model is initialised from the config (random weights), frozen,
and wrapped in PEFT's PromptTuningConfig (random init); bf16 on a GPU, f32 on the CPU. One
training step is forward, backward and AdamW (lr 0.3) on the prompt; inference is greedy
generation of exactly target-len tokens. On a GPU the times come from CUDA events and memory from
torch.cuda.max_memory_allocated; on the CPU from the host clock and the process's peak RSS above
its RSS once torch, transformers and peft are imported (so the libraries' own code and import-time
heap, about 0.8 GB, do not count against the baseline; fastpt's CPU figure is its heap peak).

The JSON it writes has the keys of a `fastpt bench` row (shape, setting, train_step_ms,
generate_ms, peak_memory_bytes, train_params). With --serve it is a cell of `fastpt bench
--baseline`'s interleaved rounds instead: after the warm-up it prints one JSON line
{"ready": true, ...}, then answers each `round` line on stdin with one line of the round's mean
times ({"train_step_ms": ..., "generate_ms": ...}: --steps training steps, then as many
generations) and `finish` with its peak memory and parameters, and exits. Needs torch,
transformers and peft (the GPU machines have them).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def stats(samples):
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def current_rss_bytes():
    """The process's resident set now (Linux: /proc/self/statm), or 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", required=True)
    ap.add_argument("--fastpt", default="target/release/fastpt")
    ap.add_argument("--num-virtual-tokens", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--target-len", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument(
        "--serve",
        action="store_true",
        help="answer round/finish lines on stdin (fastpt bench --baseline's rounds)",
    )
    args = ap.parse_args()
    # --serve's replies own stdout: anything the libraries print goes to stderr.
    replies = sys.stdout
    if args.serve:
        sys.stdout = sys.stderr

    import torch
    import transformers
    import peft

    rss_after_imports = current_rss_bytes()

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("peft_baseline: --device cuda but torch sees no GPU")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(args.seed)

    config_json = subprocess.run(
        [args.fastpt, "shape", args.shape], check=True, capture_output=True, text=True
    ).stdout
    cfg_dict = json.loads(config_json)
    decoder_only = cfg_dict["model_type"] == "llama"
    if decoder_only:
        config = transformers.LlamaConfig(**cfg_dict)
        model = transformers.LlamaForCausalLM(config)
        task = peft.TaskType.CAUSAL_LM
    else:
        config = transformers.T5Config(**cfg_dict)
        model = transformers.T5ForConditionalGeneration(config)
        task = peft.TaskType.SEQ_2_SEQ_LM
    model = model.to(device=device, dtype=dtype)
    # Prompt rows on the encoder only, as fastpt (and the DePT/DPT code) place them; PEFT's
    # default for seq2seq would prefix the decoder too.
    extra = {} if decoder_only else {"num_transformer_submodules": 1}
    pt_config = peft.PromptTuningConfig(
        task_type=task,
        num_virtual_tokens=args.num_virtual_tokens,
        prompt_tuning_init=peft.PromptTuningInit.RANDOM,
        **extra,
    )
    model = peft.get_peft_model(model, pt_config)
    train_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optim = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.3, weight_decay=1e-5
    )

    b, t, td, v = args.batch, args.input_len, args.target_len, cfg_dict["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, v, (b, t), generator=gen)
    target = torch.randint(3, v, (b, td), generator=gen)
    if decoder_only:
        input_ids = torch.cat([ids, target], dim=1)
        labels = torch.cat([torch.full((b, t), -100), target], dim=1)
        batch = {"input_ids": input_ids, "labels": labels}
        gen_inputs = {"input_ids": ids}
    else:
        batch = {"input_ids": ids, "labels": target}
        gen_inputs = {"input_ids": ids}
    batch = {k: x.to(device) for k, x in batch.items()}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    gen_inputs = {k: x.to(device) for k, x in gen_inputs.items()}
    gen_inputs["attention_mask"] = torch.ones_like(gen_inputs["input_ids"])

    def train_step():
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss

    def generate():
        with torch.no_grad():
            model.generate(
                **gen_inputs, max_new_tokens=td, min_new_tokens=td, do_sample=False
            )

    def timed(fn):
        if device == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3

    def peak_memory():
        if device == "cuda":
            return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_after_imports
        return peak, "process peak RSS above the RSS after imports"

    backend = (
        f"torch {torch.__version__} {device} {str(dtype).removeprefix('torch.')}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )

    model.train()
    for _ in range(args.warmup):
        train_step()
    if args.warmup > 0:
        model.eval()
        generate()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    if args.serve:
        serve(args, replies, model, train_step, generate, timed, peak_memory, backend, train_params)
        return

    model.train()
    train = [timed(train_step) for _ in range(args.steps)]
    model.eval()
    infer = [timed(generate) for _ in range(args.steps)]
    peak, memory = peak_memory()

    row = {
        "shape": args.shape,
        "setting": f"peft-pt:num_virtual_tokens={args.num_virtual_tokens}",
        "prompt_rows": args.num_virtual_tokens,
        "train_step_ms": stats(train),
        "generate_ms": stats(infer),
        "peak_memory_bytes": peak,
        "train_params": train_params,
    }
    report = {
        "schema": 1,
        "backend": backend,
        "memory": memory,
        "batch": b,
        "input_len": t,
        "target_len": td,
        "warmup": args.warmup,
        "steps": args.steps,
        "rows": [row],
    }
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


def serve(args, replies, model, train_step, generate, timed, peak_memory, backend, train_params):
    """The --serve loop: one JSON line on `replies` per command on stdin (see the docstring)."""

    def say(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    say({"ready": True, "train_params": train_params, "backend": backend})
    for line in sys.stdin:
        command = line.strip()
        if command == "round":
            model.train()
            train = sum(timed(train_step) for _ in range(args.steps)) / args.steps
            model.eval()
            infer = sum(timed(generate) for _ in range(args.steps)) / args.steps
            say({"train_step_ms": train, "generate_ms": infer})
        elif command == "finish":
            peak, memory = peak_memory()
            say(
                {
                    "peak_memory_bytes": peak,
                    "memory": memory,
                    "train_params": train_params,
                    "backend": backend,
                }
            )
            return
        else:
            sys.exit(f"peft_baseline --serve: unknown command {command!r}")


if __name__ == "__main__":
    main()
