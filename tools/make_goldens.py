#!/usr/bin/env python3
"""Golden generator for fastpt's CPU reference implementation.

Builds two tiny *random* T5 models entirely from code (nothing is downloaded),
saves them as ordinary Hugging Face model folders (config.json, safetensors
weights, tokenizer.json) and records float64 reference outputs computed with
PyTorch + transformers, so the Rust implementation can be checked against
them without network access:

    tests/fixtures/t5-v1_0-tiny/   T5 v1.0 style: ReLU FFN, tied lm_head (decoder
                                   output scaled by d_model**-0.5), one f32
                                   model.safetensors
    tests/fixtures/t5-v1_1-tiny/   T5 v1.1 style: gated-GELU FFN, separate
                                   lm_head.weight (no scaling), bf16 weights
                                   sharded into several files + index.json

Each folder gets:
    config.json, generation_config.json         (written by transformers)
    model.safetensors | model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json
    tokenizer.json                              (tiny Unigram tokenizer, built here)
    tokenizer_golden.json                       (text -> ids, with </s> appended)
    golden.safetensors                          (float64 / int64 reference tensors)
    golden_meta.json                            (versions, lengths, seeds, notes)

Usage:
    python tools/make_goldens.py [--out tests/fixtures]

Everything is deterministic (fixed seeds); running the script twice produces
byte-identical files with the same library versions.  See tools/README.md.
"""

import argparse
import json
import math
import os
import platform
import sys

import numpy as np
import safetensors
import safetensors.torch
import tokenizers
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import T5Config, T5ForConditionalGeneration

# --------------------------------------------------------------------------
# Shared settings
# --------------------------------------------------------------------------

VOCAB_SIZE = 160

# Model hyper-parameters common to both variants.  Chosen to exercise the
# tricky parts of T5:
#   * num_heads * d_kv = 30 != d_model = 36  (inner dim differs from model dim)
#   * num_decoder_layers (3) != num_layers (2)
#   * relative_attention_num_buckets = 8 with max_distance = 16, so that with
#     the sequence lengths below both the exact buckets, the logarithmic
#     buckets AND the clamp to the last bucket (distance >= max_distance) are
#     used, in the bidirectional encoder and in the causal decoder.
COMMON_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    d_model=36,
    d_kv=10,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    initializer_factor=1.0,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
DECODER_START_ID = 0
LABEL_IGNORE = -100

# Real (unpadded) lengths of the 3 rows of the golden batch.  All different;
# the longest encoder row (19) and decoder row (18) reach relative distances
# >= relative_attention_max_distance (16), so the bucket clamp is exercised.
ENC_LENGTHS = [7, 19, 4]  # -> T  = 19
DEC_LENGTHS = [5, 3, 18]  # -> Td = 18

# Seeds (one per purpose so that changing one thing does not reshuffle the rest).
SEED_V10_WEIGHTS = 1234
SEED_V11_WEIGHTS = 5678
SEED_BATCH = 42

# max_shard_size for the v1.1 folder: the bf16 model is ~145 kB, so this
# yields a handful of shards (must be >= 2).
V11_MAX_SHARD_SIZE = "50KB"


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

# A small built-in English corpus for training the Unigram tokenizer.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model can still learn a useful prompt.",
    "Prompt tuning keeps the language model frozen.",
    "Only the soft prompt embeddings are trained.",
    "The encoder reads the input and the decoder writes the answer.",
    "Translate English to German: the house is wonderful.",
    "Summarize: the meeting was long but the decisions were clear.",
    "The cat sat on the mat and looked at the window.",
    "She reads a book every night before she sleeps.",
    "We walked to the river and watched the boats.",
    "He wrote a short letter to his old friend.",
    "The weather today is sunny with a light wind.",
    "Children play in the park after school.",
    "The train leaves the station at seven in the morning.",
    "Please answer the question in one sentence.",
    "What is the capital of France? Paris is the capital.",
    "The teacher asked the students to open their books.",
    "Water boils at one hundred degrees.",
    "A good test checks one thing at a time.",
    "The results of the experiment were surprising.",
    "They built a new bridge across the valley.",
    "Music and art make the city more lively.",
    "The garden is full of red and yellow flowers.",
    "My brother likes to cook pasta on Sundays.",
    "The computer was slow, so we bought more memory.",
    "Numbers like one, two, three and four are easy.",
    "The story ends with a happy surprise.",
    "Birds sing in the trees early in the morning.",
    "Learning a language takes patience and practice.",
    "The doctor told him to rest for a few days.",
    "Our team won the game in the last minute.",
    "The library opens at nine and closes at five.",
    "Fresh bread smells wonderful in the morning.",
    "Is this sentence positive or negative? It is positive.",
    "The answer is yes, but the reason is not clear.",
    "Rain fell all night and the streets were wet.",
]

# Sentences whose ids are recorded in tokenizer_golden.json.  The last one
# has words that are not in the corpus, and a character ("ü") that is not in
# the tokenizer's alphabet at all, so it maps to <unk>.
TOKENIZER_TEST_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Prompt tuning keeps the model frozen.",
    "Summarize:  the  results  were clear.",  # double spaces: normalizer collapses them
    "A zebra visited Zürich yesterday.",
]


def _empty_t5_like_tokenizer(model) -> Tokenizer:
    """Tokenizer around `model` with T5-like normalizer / pre-tokenizer / decoder."""
    tok = Tokenizer(model)
    # T5's real tokenizer.json uses a SentencePiece "Precompiled" normalizer
    # followed by collapsing runs of spaces; NFKC + the same collapse is a
    # close, small stand-in.
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tok


def _train_unigram_pieces() -> list:
    """Train a Unigram model on CORPUS and return its pieces (specials first)."""
    tok = _empty_t5_like_tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE,
        # Order matters: gives <pad>=0, </s>=1, <unk>=2 as in T5.
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
        max_piece_length=8,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return [piece for piece, _score in json.loads(tok.to_str())["model"]["vocab"]]


def build_tokenizer() -> Tokenizer:
    """A tiny T5-like tokenizer: Unigram + Metaspace + '$A </s>' post-processor.

    The piece inventory comes from `tokenizers`' UnigramTrainer.  Its EM
    scores, however, are not reproducible from run to run (they wobble by
    ~1e-3 because the Rust trainer iterates hash maps in a random order), so
    the scores are recomputed here by a deterministic rule: the log relative
    frequency of each piece as a substring of the pre-tokenized corpus words.
    That keeps tokenizer.json byte-identical across runs.
    """
    specials = ["<pad>", "</s>", "<unk>"]
    pieces = _train_unigram_pieces()
    # The trained piece *set* has been stable; make sure of it.
    for _ in range(2):
        assert set(_train_unigram_pieces()) == set(pieces), "UnigramTrainer piece set is not deterministic"
    assert pieces[:3] == specials, pieces[:3]
    assert len(pieces) <= VOCAB_SIZE, len(pieces)

    # Word frequencies of the normalized, pre-tokenized corpus ("▁The", ...).
    probe = _empty_t5_like_tokenizer(models.Unigram())
    words = {}
    for line in CORPUS:
        for w, _span in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(line)):
            words[w] = words.get(w, 0) + 1

    def substring_count(piece: str) -> int:
        total = 0
        for w, f in words.items():
            start = w.find(piece)
            while start != -1:
                total += f
                start = w.find(piece, start + 1)
        return total

    counts = {p: substring_count(p) for p in pieces[3:]}
    assert all(c > 0 for c in counts.values())
    total = sum(counts.values())
    scored = sorted(((p, math.log(c / total)) for p, c in counts.items()), key=lambda ps: (-ps[1], ps[0]))
    vocab = [(s, 0.0) for s in specials] + scored

    tok = _empty_t5_like_tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
    tok.add_special_tokens(specials)
    # T5 appends </s> to every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>",
        pair="$A </s> $B </s>",
        special_tokens=[("</s>", EOS_ID)],
    )
    # Sanity checks on the special ids and vocabulary size.
    assert tok.token_to_id("<pad>") == PAD_ID
    assert tok.token_to_id("</s>") == EOS_ID
    assert tok.token_to_id("<unk>") == UNK_ID
    assert tok.get_vocab_size() <= VOCAB_SIZE, tok.get_vocab_size()
    return tok


def write_tokenizer(tok: Tokenizer, folder: str) -> None:
    tok.save(os.path.join(folder, "tokenizer.json"))
    golden = []
    for text in TOKENIZER_TEST_SENTENCES:
        ids = tok.encode(text, add_special_tokens=True).ids
        assert ids[-1] == EOS_ID
        golden.append({"text": text, "ids": ids})
    # The out-of-corpus sentence must produce at least one <unk>.
    assert UNK_ID in golden[-1]["ids"], golden[-1]
    # Re-load from disk and check the ids round-trip.
    reloaded = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    for g in golden:
        assert reloaded.encode(g["text"]).ids == g["ids"]
    with open(os.path.join(folder, "tokenizer_golden.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)
        f.write("\n")


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def make_config(v11: bool) -> T5Config:
    return T5Config(
        **COMMON_CONFIG,
        feed_forward_proj="gated-gelu" if v11 else "relu",
        tie_word_embeddings=not v11,
    )


def build_model(v11: bool, seed: int) -> T5ForConditionalGeneration:
    """Random tiny T5 in float32, eval mode, with a few extra randomisations."""
    torch.manual_seed(seed)
    config = make_config(v11)
    model = T5ForConditionalGeneration(config)
    # Compute the goldens with the plain eager attention (softmax(QK^T + bias)V
    # written out).  transformers 5 defaults to SDPA for T5; check_reload()
    # below reloads with that default, which cross-checks the two paths.
    model.set_attn_implementation("eager")
    assert model.encoder.block[0].layer[0].SelfAttention.config._attn_implementation == "eager"
    assert model.decoder.block[0].layer[1].EncDecAttention.config._attn_implementation == "eager"

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # HF initialises every RMSNorm weight to exactly 1.0, which would hide
        # a loader that forgets to apply (or mixes up) layer_norm weights.
        # Perturb them: w = 1 + 0.2 * N(0, 1).
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))

    if v11:
        # transformers 5 always ties lm_head.weight to shared.weight for T5
        # (T5Config forces tie_word_embeddings=True and turns the user's
        # tie_word_embeddings=False into scale_decoder_outputs=False).  Real
        # T5 v1.1 checkpoints have a separate lm_head, so untie it by hand
        # with its own N(0, 1) weights (the same init HF uses for it).
        assert model.lm_head.weight is model.shared.weight
        lm = torch.randn(model.lm_head.weight.shape, generator=gen)
        model.lm_head.weight = torch.nn.Parameter(lm)
        assert model.lm_head.weight is not model.shared.weight
        assert model.config.scale_decoder_outputs is False
    else:
        assert model.lm_head.weight is model.shared.weight
        assert model.config.scale_decoder_outputs is True

    model.eval()
    return model


def round_to_bf16_(model: torch.nn.Module) -> None:
    """Round every parameter to the nearest bf16 value (kept as float32).

    The goldens are then computed from exactly the values that the bf16
    checkpoint stores, so an exact bf16 -> f32 conversion in the loader
    reproduces them.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())


def patch_config_json(folder: str, v11: bool) -> dict:
    """Make config.json look like the configs of real hub checkpoints.

    transformers 5 writes `"tie_word_embeddings": true` for *every* T5 and
    stores the real switch as `"scale_decoder_outputs"`.  Real configs on the
    hub (t5-small, google/t5-v1_1-*) have no scale_decoder_outputs and, for
    v1.1, `"tie_word_embeddings": false`.  We write the hub-style form (which
    transformers 5 itself reads back correctly, checked below), so the Rust
    loader is tested against what it will meet in practice.
    """
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop("scale_decoder_outputs", None)
    cfg["tie_word_embeddings"] = not v11
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return cfg


# --------------------------------------------------------------------------
# Golden batch
# --------------------------------------------------------------------------


def make_batch():
    """Padded batch of 3 rows with different lengths (numpy PCG64: stable)."""
    rng = np.random.default_rng(SEED_BATCH)
    B, T, Td = len(ENC_LENGTHS), max(ENC_LENGTHS), max(DEC_LENGTHS)

    input_ids = np.full((B, T), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    for b, n in enumerate(ENC_LENGTHS):
        input_ids[b, : n - 1] = rng.integers(3, VOCAB_SIZE, size=n - 1)
        input_ids[b, n - 1] = EOS_ID
        attention_mask[b, :n] = 1

    labels = np.full((B, Td), LABEL_IGNORE, dtype=np.int64)
    for b, n in enumerate(DEC_LENGTHS):
        labels[b, : n - 1] = rng.integers(3, VOCAB_SIZE, size=n - 1)
        labels[b, n - 1] = EOS_ID

    # HF's T5 _shift_right: prepend decoder_start_token_id, drop the last
    # column, then replace -100 by pad_token_id.
    decoder_input_ids = np.empty_like(labels)
    decoder_input_ids[:, 0] = DECODER_START_ID
    decoder_input_ids[:, 1:] = labels[:, :-1]
    decoder_input_ids[decoder_input_ids == LABEL_IGNORE] = PAD_ID

    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "decoder_input_ids": torch.from_numpy(decoder_input_ids),
    }


def check_buckets_exercised(model: T5ForConditionalGeneration, batch) -> None:
    """Assert the batch reaches exact, logarithmic and clamped buckets."""
    cfg = model.config
    T, Td = batch["input_ids"].shape[1], batch["decoder_input_ids"].shape[1]
    attn_cls = type(model.encoder.block[0].layer[0].SelfAttention)
    nb, md = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    for bidirectional, n, name in [(True, T, "encoder"), (False, Td, "decoder")]:
        pos = torch.arange(n)
        rel = pos[None, :] - pos[:, None]  # memory - query
        buckets = attn_cls._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
        used = sorted(set(buckets.flatten().tolist()))
        half = nb // 2 if bidirectional else nb
        max_exact = half // 2
        # Every bucket is used (exact ones below max_exact, logarithmic ones
        # above).  In the bidirectional case bucket `half` ("forward",
        # distance 0) cannot occur: distance 0 always lands in bucket 0.
        # Distances >= max_distance must also occur: without the clamp to
        # the last bucket they would index past the bias table.
        expected = [b for b in range(nb) if b != half] if bidirectional else list(range(nb))
        assert used == expected, (name, used, expected)
        assert max(abs(rel.min().item()), rel.max().item()) >= md, name
        assert max_exact < half - 1
        print(f"  {name}: relative buckets used {used}")


def compute_goldens(model: T5ForConditionalGeneration, batch):
    """Forward + backward in float64 through inputs_embeds."""
    model = model.double()
    inputs_embeds = model.shared(batch["input_ids"]).detach().clone().requires_grad_()
    out = model(
        inputs_embeds=inputs_embeds,
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        labels=batch["labels"],
        return_dict=True,
    )
    out.loss.backward()

    # Cross-check the HF loss against a hand-written masked mean CE.
    logits = out.logits.detach()
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=LABEL_IGNORE, reduction="sum"
    ) / (batch["labels"] != LABEL_IGNORE).sum()
    assert torch.allclose(ce, out.loss.detach(), rtol=0, atol=1e-12)

    # Same batch through input_ids instead of inputs_embeds: must agree.
    with torch.no_grad():
        out_ids = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            labels=batch["labels"],
            return_dict=True,
        )
    diff = (out_ids.logits - logits).abs().max().item()
    assert diff <= 1e-12, f"input_ids vs inputs_embeds logits differ by {diff}"
    assert abs(out_ids.loss.item() - out.loss.item()) <= 1e-12

    # HF's decoder has no padding mask in this call (causal mask only); we
    # rely on labels=-100 for the padded target positions.  Check HF did
    # shift the labels the same way we did.
    assert torch.equal(model._shift_right(batch["labels"]), batch["decoder_input_ids"])

    goldens = {
        "input_ids": batch["input_ids"].contiguous(),
        "attention_mask": batch["attention_mask"].contiguous(),
        "decoder_input_ids": batch["decoder_input_ids"].contiguous(),
        "labels": batch["labels"].contiguous(),
        "inputs_embeds": inputs_embeds.detach().contiguous(),
        "encoder_last_hidden_state": out.encoder_last_hidden_state.detach().contiguous(),
        "logits": logits.contiguous(),
        "loss": out.loss.detach().reshape(()).contiguous(),  # shape [] (scalar)
        "d_inputs_embeds": inputs_embeds.grad.detach().contiguous(),
    }
    for k, v in goldens.items():
        want = torch.int64 if k in ("input_ids", "attention_mask", "decoder_input_ids", "labels") else torch.float64
        assert v.dtype == want, (k, v.dtype)
    return goldens


def check_reload(folder: str, goldens, v11: bool) -> None:
    """Load the saved folder back with transformers and reproduce the logits."""
    m = T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float64)
    m.eval()
    # Default attention implementation (SDPA in transformers 5), while the
    # goldens used eager: this also cross-checks the two.
    print(f"  reload check with attn_implementation={m.config._attn_implementation!r}")
    assert m.config.scale_decoder_outputs is (not v11)
    assert (m.lm_head.weight is m.shared.weight) is (not v11)
    with torch.no_grad():
        out = m(
            inputs_embeds=goldens["inputs_embeds"],
            attention_mask=goldens["attention_mask"],
            decoder_input_ids=goldens["decoder_input_ids"],
            labels=goldens["labels"],
        )
    diff = (out.logits - goldens["logits"]).abs().max().item()
    assert diff <= 1e-12, f"{folder}: reloaded model logits differ by {diff}"
    assert abs(out.loss.item() - goldens["loss"].item()) <= 1e-12


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


def make_variant(out_root: str, v11: bool, tok: Tokenizer, batch) -> None:
    name = "t5-v1_1-tiny" if v11 else "t5-v1_0-tiny"
    folder = os.path.join(out_root, name)
    os.makedirs(folder, exist_ok=True)
    # Remove stale weight files from earlier runs (shard count may change).
    for f in os.listdir(folder):
        if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".json")):
            os.remove(os.path.join(folder, f))
    print(f"[{name}]")

    model = build_model(v11, SEED_V11_WEIGHTS if v11 else SEED_V10_WEIGHTS)
    check_buckets_exercised(model, batch)

    if v11:
        round_to_bf16_(model)
        model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size=V11_MAX_SHARD_SIZE)
        with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
            n_shards = len(set(json.load(f)["weight_map"].values()))
        assert n_shards >= 2, n_shards
    else:
        model.save_pretrained(folder, safe_serialization=True)
        assert os.path.exists(os.path.join(folder, "model.safetensors"))
    patch_config_json(folder, v11)

    # bf16 -> float64 and f32 -> float64 are both exact, so the goldens are
    # computed from exactly the stored weight values.
    goldens = compute_goldens(model, batch)
    check_reload(folder, goldens, v11)
    safetensors.torch.save_file(goldens, os.path.join(folder, "golden.safetensors"), metadata={"format": "pt"})

    write_tokenizer(tok, folder)

    meta = {
        "variant": "t5 v1.1 (gated-gelu, untied lm_head, bf16 sharded)" if v11 else "t5 v1.0 (relu, tied lm_head, f32)",
        "versions": versions(),
        "golden_dtype": "float64 (ids int64)",
        "weights_dtype_on_disk": "bfloat16" if v11 else "float32",
        "weights_rounded_to_bf16_before_goldens": v11,
        "encoder_lengths": ENC_LENGTHS,
        "decoder_lengths": DEC_LENGTHS,
        "loss_shape": [],
        "loss": goldens["loss"].item(),
        "seeds": {"weights": SEED_V11_WEIGHTS if v11 else SEED_V10_WEIGHTS, "batch": SEED_BATCH},
        "notes": [
            "logits/encoder_last_hidden_state also cover padded positions; compare all of them "
            "(HF computes padded positions too) or only the real ones.",
            "decoder padding is handled only through labels=-100 (no decoder attention mask).",
            "layer_norm weights are 1 + 0.2*N(0,1) (not HF's all-ones init).",
        ],
    }
    with open(os.path.join(folder, "golden_meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")

    logit_std = goldens["logits"].std().item()
    print(f"  loss={goldens['loss'].item():.6f} logits std={logit_std:.4f}")
    assert logit_std > 0.1, "logits are nearly constant"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("tests", "fixtures"), help="output folder (default tests/fixtures)")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print("versions:", json.dumps(versions()))

    tok = build_tokenizer()
    batch = make_batch()
    for v11 in (False, True):
        make_variant(args.out, v11, tok, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
