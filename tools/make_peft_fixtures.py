"""Builds the PEFT-made adapters that `fastpt run --init-from` must read, and PEFT's own outputs
with them (goldens), on the tiny T5 fixture (tests/fixtures/t5-v1_0-tiny; nothing downloaded):

    python tools/make_peft_fixtures.py      # needs torch, transformers, peft, safetensors

Writes under tests/fixtures/peft/:

  t5-pt-seq2seq/     PEFT's DEFAULT seq2seq prompt tuning: `PromptTuningConfig(task_type=
                     "SEQ_2_SEQ_LM", num_virtual_tokens=5)` leaves num_transformer_submodules null,
                     PEFT makes it 2 and saves 2 x 5 rows: rows 0..5 prompt the encoder, rows 5..10
                     the decoder input (prepended only in PEFT's training forward; generate uses
                     the encoder half alone). The prompt is random (seeded), saved as PEFT saves it.
  t5-pt-seq2seq/golden.json
                     PEFT's greedy generation (`model.generate`, 6 new tokens) for two inputs, with the
                     log-probability of each generated token.
  t5-ptuning/        a P_TUNING adapter (MLP reparameterisation, encoder_hidden_size = d_model,
                     so it is fastpt's `ptuning` method): PEFT's adapter_model.safetensors holds
                     only the computed rows `prompt_embeddings`; `prompt_encoder.safetensors`
                     holds the trainable state under PEFT's own names
                     (`prompt_encoder.default.embedding.weight`, `...mlp_head.{0,2,4}.{weight,bias}`),
                     as `model.state_dict()` of the PeftModel names them.
"""

import json
from pathlib import Path

import peft
import torch
import transformers
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "tests" / "fixtures" / "t5-v1_0-tiny"
OUT = ROOT / "tests" / "fixtures" / "peft"


def base_model():
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(BASE), dtype=torch.float32)
    model.eval()
    return model


def relative_base(adapter: Path) -> None:
    """The adapter names its base model relative to the repository root, as a user's would."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "tests/fixtures/t5-v1_0-tiny"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def seq2seq_prompt_tuning() -> None:
    torch.manual_seed(20)
    config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=5)
    model = peft.get_peft_model(base_model(), config)
    with torch.no_grad():
        weight = model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn_like(weight) * 2.0)
    model.eval()
    out = OUT / "t5-pt-seq2seq"
    model.save_pretrained(str(out))
    relative_base(out)
    assert json.loads((out / "adapter_config.json").read_text())["num_transformer_submodules"] == 2

    inputs = [[5, 17, 42, 99, 3, 1], [120, 8, 1]]
    golden = []
    for ids in inputs:
        ids_t = torch.tensor([ids])
        gen = model.generate(
            input_ids=ids_t,
            attention_mask=torch.ones_like(ids_t),
            max_new_tokens=6,
            do_sample=False,
            num_beams=1,
            # transformers 5.24's cache has num_layers (2) entries, but this decoder has 3 layers
            # (num_decoder_layers): generate fails with the cache, and greedy search is the same
            # without it.
            use_cache=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        tokens = gen.sequences[0].tolist()  # decoder_start, then the new tokens
        logprobs = [
            torch.log_softmax(step[0].double(), dim=-1)[tok].item()
            for step, tok in zip(gen.scores, tokens[1:])
        ]
        golden.append({"input_ids": ids, "generated": tokens, "token_logprobs": logprobs})
    doc = {
        "what": "PEFT greedy generation with this adapter (encoder prompt = rows 0..5): the tokens and the log-probability of each",
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "max_new_tokens": 6,
        "cases": golden,
    }
    (out / "golden.json").write_text(json.dumps(doc, indent=2) + "\n")


def p_tuning() -> None:
    torch.manual_seed(21)
    base = base_model()
    config = peft.PromptEncoderConfig(
        task_type="SEQ_2_SEQ_LM",
        num_virtual_tokens=4,
        num_transformer_submodules=1,
        encoder_hidden_size=base.config.d_model,
        encoder_reparameterization_type="MLP",
    )
    model = peft.get_peft_model(base, config)
    model.eval()
    out = OUT / "t5-ptuning"
    model.save_pretrained(str(out))
    relative_base(out)
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith("prompt_encoder.")
    }
    save_file(state, str(out / "prompt_encoder.safetensors"))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    seq2seq_prompt_tuning()
    p_tuning()
    print("wrote", OUT)
