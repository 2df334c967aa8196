#!/usr/bin/env python3
"""bitsandbytes 4-bit fixtures for fastpt (issue 20, item 6).

Builds tiny *random* models from code (nothing is downloaded), quantises them with transformers +
bitsandbytes on the CPU (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32)) and `save_pretrained`s the
quantised folders as transformers writes them (transformers CAN save 4-bit on the CPU: no
functional-API stand-in is needed):

    tests/fixtures/bnb-t5-tiny/      T5 v1.1 (gated-gelu: wi_0/wi_1), untied lm_head; transformers
                                     keeps `wo` (T5's _keep_in_fp32_modules) and lm_head dense
    tests/fixtures/bnb-llama-tiny/   Llama, GQA (4 query / 2 key-value heads), untied lm_head

Each folder gets `bnb_batch.json` (a batch for `fastpt forward`) and `bnb_golden.safetensors`:
the logits transformers computes for that batch with the QUANTISED model (f32, full
`(B, T, V)`), and the batch as tensors.

    tests/fixtures/bnb-quant/quant_golden.safetensors

holds random f32 tensors `x.K` of several double-quantisation blocks (> 256 x 64 elements; one
with an odd last dimension and a partial final block, one with a zero block and mixed scales),
`deq.K`: what `bitsandbytes.functional.dequantize_4bit(*quantize_4bit(x, nf4, blocksize 64,
compress_statistics=True))` returns, and bitsandbytes' own maps `dynamic_map` (256) and
`nf4_code` (16). fastpt's `--quant nf4` must reproduce `deq.K` from `x.K`.

Usage:
    python tools/make_bnb_fixture.py [--out tests/fixtures]
"""

import argparse
import json
import os
import platform
import shutil

import bitsandbytes
import bitsandbytes.functional as bnbf
import numpy as np
import safetensors.torch
import torch
import transformers
from transformers import (
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96
BNB = dict(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32,
)


def perturb_norms(model, gen):
    """HF initialises RMSNorm weights to 1.0; perturb them so a loader that skips them fails."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def t5_model():
    torch.manual_seed(11)
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = T5ForConditionalGeneration(cfg)
    gen = torch.Generator().manual_seed(12)
    perturb_norms(model, gen)
    # transformers 5 ties T5's lm_head to shared; v1.1 checkpoints have their own (see
    # make_goldens.py): untie by hand.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=gen))
    return model.eval()


def llama_model():
    torch.manual_seed(21)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    perturb_norms(model, torch.Generator().manual_seed(22))
    # HF's init is N(0, 0.02): scale the linear weights up so the logits are O(1) and a wrong
    # dequantisation shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                p.mul_(5.0)
    return model.eval()


def quantise(model, cls, full_dir, out_dir):
    """save_pretrained(full) -> from_pretrained(bnb 4-bit, CPU) -> save_pretrained(out)."""
    model.save_pretrained(full_dir)
    qmodel = cls.from_pretrained(
        full_dir,
        quantization_config=BitsAndBytesConfig(**BNB),
        device_map="cpu",
        dtype=torch.float32,
    ).eval()
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    qmodel.save_pretrained(out_dir)
    for extra in ("generation_config.json",):
        p = os.path.join(out_dir, extra)
        if os.path.exists(p):
            os.remove(p)
    return qmodel


def hub_style_t5_config(folder):
    """transformers 5 writes tie_word_embeddings=true + scale_decoder_outputs for every T5; real
    v1.1 configs say tie_word_embeddings=false (as make_goldens.py)."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop("scale_decoder_outputs", None)
    cfg["tie_word_embeddings"] = False
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def f32_forward(qmodel):
    """bitsandbytes' Linear4bit, on a CPU with AVX512-BF16 in inference, repacks the weight with a
    bf16 absmax and multiplies in bf16 (`_convert_weight_packed_for_cpu`): a machine-dependent
    fast path. Turn it off so the goldens are bitsandbytes' f32 dequantisation on any CPU
    (dequantize_4bit, then an f32 GEMM), which is what the checkpoint's float32 quant state
    says."""
    n = 0
    for m in qmodel.modules():
        if isinstance(m, bitsandbytes.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    assert n > 0
    return qmodel


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.write("\n")


def t5_fixture(out_root, tmp):
    out = os.path.join(out_root, "bnb-t5-tiny")
    qmodel = quantise(t5_model(), T5ForConditionalGeneration, os.path.join(tmp, "t5"), out)
    hub_style_t5_config(out)
    # Reloaded from the folder as written, so the goldens are what that folder computes.
    qmodel = f32_forward(
        T5ForConditionalGeneration.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
    )
    assert isinstance(qmodel.encoder.block[0].layer[0].SelfAttention.q, bitsandbytes.nn.Linear4bit)
    assert not isinstance(qmodel.encoder.block[0].layer[1].DenseReluDense.wo, bitsandbytes.nn.Linear4bit)
    rng = np.random.default_rng(5)
    b, t, td = 2, 9, 6
    input_ids = rng.integers(3, VOCAB, size=(b, t))
    input_ids[:, -1] = 1
    labels = rng.integers(3, VOCAB, size=(b, td))
    labels[:, -1] = 1
    dec = np.zeros_like(labels)
    dec[:, 1:] = labels[:, :-1]
    with torch.no_grad():
        logits = qmodel(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.ones(b, t, dtype=torch.long),
            decoder_input_ids=torch.from_numpy(dec),
        ).logits
    write_json(
        os.path.join(out, "bnb_batch.json"),
        {"input_ids": input_ids.tolist(), "labels": labels.tolist()},
    )
    safetensors.torch.save_file(
        {
            "logits": logits.float().contiguous(),  # (B, Td, V)
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
        },
        os.path.join(out, "bnb_golden.safetensors"),
    )


def llama_fixture(out_root, tmp):
    out = os.path.join(out_root, "bnb-llama-tiny")
    quantise(llama_model(), LlamaForCausalLM, os.path.join(tmp, "llama"), out)
    qmodel = f32_forward(LlamaForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval())
    assert isinstance(qmodel.model.layers[0].mlp.down_proj, bitsandbytes.nn.Linear4bit)
    rng = np.random.default_rng(6)
    b, t = 2, 10
    input_ids = rng.integers(3, VOCAB, size=(b, t))
    input_ids[:, 0] = 1
    labels = input_ids.copy()
    labels[:, :4] = -100  # a loss on the last 6 positions of each row
    with torch.no_grad():
        logits = qmodel(input_ids=torch.from_numpy(input_ids)).logits
    write_json(
        os.path.join(out, "bnb_batch.json"),
        {"input_ids": input_ids.tolist(), "labels": labels.tolist()},
    )
    safetensors.torch.save_file(
        {
            "logits": logits.float().contiguous(),  # (B, T, V)
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
        },
        os.path.join(out, "bnb_golden.safetensors"),
    )


def quant_fixture(out_root):
    """Random tensors of several 256-blocks of absmax and bitsandbytes' dequantisation of them."""
    out = os.path.join(out_root, "bnb-quant")
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(31)
    a = torch.randn(320, 64, generator=gen) * 0.05  # 320 blocks: two absmax blocks
    b = torch.randn(130, 130, generator=gen)  # 265 blocks, rows cross block boundaries
    b[7] *= 40.0  # one large row: a skewed absmax vector
    c = torch.randn(263, 63, generator=gen) * 3.0  # odd last dim, final block of 57
    c.view(-1)[640:704] = 0.0  # one all-zero block
    scale = 10.0 ** torch.linspace(-3, 1, 263).unsqueeze(1)  # mixed scales across blocks
    c *= scale
    # Values on and a few ulps around the NF4 thresholds, one block per row (absmax in column 0):
    # where x * (1/absmax) and x / absmax round to different sides, and exact ties (rows with a
    # power-of-two absmax).
    code = bnbf.get_4bit_type("nf4", device="cpu")
    mids = ((code[:-1] + code[1:]) / 2).numpy()
    rng = np.random.default_rng(32)
    d = np.empty((260, 64), dtype=np.float32)
    for r in range(260):
        amax = np.float32(2.0 ** rng.integers(-2, 3)) if r % 4 == 0 else np.float32(rng.uniform(0.3, 3.0))
        k = rng.integers(0, 15, size=63)
        v = (mids[k].astype(np.float32) * amax).astype(np.float32)
        steps = rng.integers(-3, 4, size=63)
        v = np.array([np.nextafter(x, np.float32(np.inf) if s > 0 else np.float32(-np.inf)) if s else x
                      for x, s in zip(v, steps)], dtype=np.float32)
        for _ in range(2):
            v = np.array([np.nextafter(x, np.float32(np.inf) if s > 1 else (np.float32(-np.inf) if s < -1 else x))
                          for x, s in zip(v, steps)], dtype=np.float32)
        d[r, 0] = amax
        d[r, 1:] = np.clip(v, -amax, amax)
    d = torch.from_numpy(d)
    tensors = {}
    for name, x in [("a", a), ("b", b), ("c", c), ("d", d)]:
        x = x.contiguous()
        assert x.numel() > 256 * 64
        packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
        deq = bnbf.dequantize_4bit(packed, state)
        tensors[f"x.{name}"] = x
        tensors[f"deq.{name}"] = deq.float().contiguous()
    tensors["dynamic_map"] = bnbf.create_dynamic_map().float()
    tensors["nf4_code"] = bnbf.get_4bit_type("nf4", device="cpu").float()
    safetensors.torch.save_file(tensors, os.path.join(out, "quant_golden.safetensors"))


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "numpy": np.__version__,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    # One thread: torch's mean (bitsandbytes' absmax offset) is summed per thread.
    torch.set_num_threads(1)
    tmp = os.path.join(args.out, ".bnb-full-tmp")
    os.makedirs(tmp, exist_ok=True)
    try:
        t5_fixture(args.out, tmp)
        llama_fixture(args.out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    quant_fixture(args.out)
    write_json(os.path.join(args.out, "bnb-quant", "versions.json"), versions())
    print("wrote", ", ".join(os.path.join(args.out, d) for d in ("bnb-t5-tiny", "bnb-llama-tiny", "bnb-quant")))


if __name__ == "__main__":
    main()
