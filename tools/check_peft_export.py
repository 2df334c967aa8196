"""Manual check (not part of CI) that fastpt's PEFT adapter export loads in PEFT and reproduces
fastpt's model: for every case folder the ignored test `write_adapters_for_the_peft_check` wrote,

    FASTPT_EXPORT_DIR=/tmp/fastpt-peft cargo test --release --test export -- --ignored
    python tools/check_peft_export.py /tmp/fastpt-peft

it loads the fixture model named in check.json (tests/fixtures/t5-v1_0-tiny, llama-gqa-tiny, ...)
with transformers, wraps it with `PeftModel.from_pretrained(model, CASE/adapter)`, and checks

1. PEFT parsed adapter_config.json as a PROMPT_TUNING config with fastpt's values;
2. the prompt encoder's embedding equals `prompt_embeddings` of adapter_model.safetensors and the
   `prompt` tensor of CASE/prompt.safetensors bit for bit;
3. PEFT's loss on the batch in check.json (model and prompt in float64) equals the loss fastpt
   computed with the method (CPU, f64) — i.e. PEFT puts the rows where fastpt does;
4. the folder holds what PEFT's own save_pretrained writes besides the weights: the model card
   README.md (with its `library_name: peft` front matter and PEFT's version) and
   `peft_version` in adapter_config.json.

Needs torch, transformers, peft and safetensors. Exit status 1 on any mismatch.
"""

import json
import sys
from pathlib import Path


def check_case(case: Path) -> list[str]:
    import peft
    import torch
    import transformers
    from safetensors.torch import load_file

    errors = []
    meta = json.loads((case / "check.json").read_text())
    adapter = case / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    seq2seq = config["task_type"] == "SEQ_2_SEQ_LM"
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    base = auto.from_pretrained(meta["model"], dtype=torch.float64)
    base.eval()
    model = peft.PeftModel.from_pretrained(base, str(adapter))
    model.eval()

    pc = model.peft_config["default"]
    want = {
        "peft_type": "PROMPT_TUNING",
        "task_type": config["task_type"],
        "num_virtual_tokens": config["num_virtual_tokens"],
        "token_dim": config["token_dim"],
        "num_transformer_submodules": 1,
        "inference_mode": True,
    }
    for key, value in want.items():
        got = getattr(pc, key)
        got = getattr(got, "value", got)  # enums
        if got != value:
            errors.append(f"{case.name}: PEFT config {key} = {got!r}, want {value!r}")

    card = adapter / "README.md"
    if not card.is_file():
        errors.append(f"{case.name}: no model card README.md in the adapter folder")
    else:
        text = card.read_text()
        if not text.startswith("---\n") or "library_name: peft" not in text:
            errors.append(f"{case.name}: README.md lacks PEFT's front matter (library_name: peft)")
        if f"PEFT {config.get('peft_version')}" not in text:
            errors.append(f"{case.name}: README.md does not name PEFT {config.get('peft_version')}")
    if not config.get("peft_version"):
        errors.append(f"{case.name}: adapter_config.json has no peft_version")

    weight = model.prompt_encoder["default"].embedding.weight.detach().cpu()
    file_rows = load_file(str(adapter / "adapter_model.safetensors"))["prompt_embeddings"]
    own_rows = load_file(str(case / "prompt.safetensors"))["prompt"]
    # PEFT keeps the adapter in f32 (autocast_adapter_dtype); compare in the file's dtype.
    if not torch.equal(weight.to(file_rows.dtype), file_rows):
        errors.append(f"{case.name}: PEFT's prompt embedding differs from adapter_model.safetensors")
    if not torch.equal(file_rows, own_rows):
        errors.append(f"{case.name}: adapter rows differ from prompt.safetensors")

    model.double()
    batch = {
        "input_ids": torch.tensor(meta["input_ids"]),
        "attention_mask": torch.tensor(meta["attention_mask"]),
        "labels": torch.tensor(meta["labels"]),
    }
    if seq2seq:
        batch["decoder_input_ids"] = torch.tensor(meta["decoder_input_ids"])
    with torch.no_grad():
        loss = model(**batch).loss.item()
    fastpt = meta["fastpt_loss"]
    rel = abs(loss - fastpt) / max(abs(fastpt), 1e-30)
    # The rows go through f32 (the file); PT's parameters are f32 already, computed prompts
    # (LAMP, DPT) are rounded, hence the tolerance.
    status = "ok" if rel < 1e-6 else "MISMATCH"
    print(
        f"{case.name:12} {meta['method']:8} rows {tuple(file_rows.shape)} "
        f"PEFT loss {loss:.12f} fastpt {fastpt:.12f} rel {rel:.1e} {status}"
    )
    if rel >= 1e-6:
        errors.append(f"{case.name}: PEFT loss {loss} vs fastpt {fastpt} (rel {rel:.2e})")
    return errors


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    root = Path(sys.argv[1])
    cases = sorted(p.parent for p in root.glob("*/check.json"))
    if not cases:
        print(f"{root}: no case folder with check.json; run the ignored test first (see --help)")
        return 2
    import peft
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    errors = []
    for case in cases:
        errors += check_case(case)
    for e in errors:
        print("error:", e)
    print(f"{len(cases) - len({e.split(':')[0] for e in errors})} of {len(cases)} cases ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
