#!/usr/bin/env python3
"""Learning-rate schedule and step-count goldens from transformers for fastpt's schedules.

Writes tests/fixtures/schedules.json (read by tests/config_hf.rs):

  "schedules": for each (schedule, warmup, total) case, the learning rate (base lr 1.0) that
      the optimizer holds at each of its `total` optimizer.step() calls, as a transformers
      Trainer uses it: lr = param_groups[0]["lr"] read right before optimizer.step(), then
      scheduler.step(). Schedules from transformers.optimization: get_linear_schedule_with_warmup,
      get_cosine_schedule_with_warmup (num_cycles at its default 0.5),
      get_constant_schedule_with_warmup, get_constant_schedule.
  "steps": how a Trainer turns num_train_epochs / max_steps and a warmup ratio into optimizer
      steps and warmup steps for a training set of `examples` rows at
      per_device_train_batch_size × gradient_accumulation_steps: Trainer.set_initial_training_values
      (max_steps) and TrainingArguments.get_warmup_steps (warmup).

Nothing is downloaded. Usage: python tools/make_schedule_goldens.py [--out tests/fixtures/schedules.json]
"""

import argparse
import json
import tempfile
import types

import torch
import transformers
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.optimization import (
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

# (schedule, warmup, total): no warmup, warmup = total, a single step, odd numbers, a long one.
CASES = [
    ("linear", 0, 1),
    ("linear", 1, 1),
    ("linear", 0, 7),
    ("linear", 3, 10),
    ("linear", 10, 10),
    ("linear", 5, 13),
    ("linear", 50, 500),
    ("cosine", 0, 1),
    ("cosine", 1, 1),
    ("cosine", 0, 9),
    ("cosine", 3, 10),
    ("cosine", 7, 7),
    ("cosine", 4, 17),
    ("cosine", 50, 500),
    ("constant_with_warmup", 0, 5),
    ("constant_with_warmup", 1, 1),
    ("constant_with_warmup", 3, 8),
    ("constant_with_warmup", 9, 9),
    ("constant", 0, 5),
    ("constant", 4, 9),
]

# (examples, batch, accum, num_train_epochs, max_steps (-1: none), warmup ratio (0: none)).
STEP_CASES = [
    (2000, 16, 1, 3.0, -1, 0.0),
    (2000, 16, 1, 3.0, -1, 0.1),
    (2000, 16, 4, 1.0, -1, 0.06),
    (10, 4, 2, 1.0, -1, 0.0),
    (10, 4, 2, 2.5, -1, 0.5),
    (10, 4, 3, 1.0, -1, 0.0),
    (7, 16, 1, 5.0, -1, 0.0),
    (2490, 8, 1, 0.3, -1, 0.01),
    (100, 3, 1, 1.25, -1, 0.33),
    (100, 3, 1, 3.0, 40, 0.1),
    (100, 32, 2, 1.0, 5, 0.99),
    (1, 1, 1, 0.001, -1, 0.0),
]


def schedule_lrs(name, warmup, total):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    if name == "linear":
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
    elif name == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    elif name == "constant_with_warmup":
        sched = get_constant_schedule_with_warmup(opt, warmup)
    elif name == "constant":
        sched = get_constant_schedule(opt)
    else:
        raise ValueError(name)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def resolved_steps(examples, batch, accum, epochs, max_steps, ratio, tmp):
    args = TrainingArguments(
        output_dir=tmp,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        num_train_epochs=epochs,
        max_steps=max_steps,
        # transformers 5: a warmup_steps below 1 is the warmup ratio (4.x's warmup_ratio).
        warmup_steps=ratio,
        report_to=[],
        use_cpu=True,
    )
    loader = DataLoader(list(range(examples)), batch_size=batch)
    # The parts of a Trainer that set_initial_training_values reads (one process, no sequence
    # parallelism): building a real Trainer would need a model.
    stub = types.SimpleNamespace(
        get_total_train_batch_size=lambda a: a.per_device_train_batch_size * a.gradient_accumulation_steps,
        get_sp_size=lambda: 1,
        num_examples=lambda dl: len(dl.dataset),
    )
    values = Trainer.set_initial_training_values(stub, args, loader)
    steps = values[-1]
    return steps, args.get_warmup_steps(steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/schedules.json")
    a = ap.parse_args()
    schedules = [
        {"schedule": n, "warmup": w, "total": t, "lr": schedule_lrs(n, w, t)} for (n, w, t) in CASES
    ]
    steps = []
    with tempfile.TemporaryDirectory() as tmp:
        for examples, batch, accum, epochs, max_steps, ratio in STEP_CASES:
            total, warmup = resolved_steps(examples, batch, accum, epochs, max_steps, ratio, tmp)
            steps.append(
                {
                    "examples": examples,
                    "batch_size": batch,
                    "grad_accum": accum,
                    "num_train_epochs": epochs,
                    "max_steps": max_steps,
                    "warmup_ratio": ratio,
                    "steps": total,
                    "warmup_steps": warmup,
                }
            )
    out = {
        "what": "tools/make_schedule_goldens.py: lr at each optimizer step (base lr 1) and Trainer step counts",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "schedules": schedules,
        "steps": steps,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}: {len(schedules)} schedules, {len(steps)} step cases")


if __name__ == "__main__":
    main()
