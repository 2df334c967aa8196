"""Builds the Parquet and `save_to_disk` data fixtures from the committed RTE JSONL fixture.

The layouts are made by Hugging Face `datasets` itself (and pyarrow under it), so the Rust
readers are tested on files as the Hub and `datasets` write them:

  tests/fixtures/data/glue/rte_parquet/      train.parquet, validation.parquet (Dataset.to_parquet)
  tests/fixtures/data/glue/rte_sharded/data/ train-00000-of-00002.parquet, train-00001-of-00002.parquet,
                                             validation-00000-of-00001.parquet (the Hub's layout)
  tests/fixtures/data/glue/rte_disk/         DatasetDict.save_to_disk: dataset_dict.json and
                                             train/ (2 Arrow shards), validation/ (1), each with
                                             state.json and dataset_info.json

Every split holds the rows of tests/fixtures/data/glue/rte_hf/{train,validation}.jsonl, with the
features of GLUE RTE on the Hub (label a ClassLabel, idx int32).

Rerun (from the repository root, with the project's Python environment):

    /work/pyenv/bin/python tools/make_data_fixtures.py

The output is deterministic apart from the random fingerprints in state.json.
"""

import json
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
GLUE = ROOT / "tests" / "fixtures" / "data" / "glue"
SOURCE = GLUE / "rte_hf"

FEATURES = datasets.Features(
    {
        "sentence1": datasets.Value("string"),
        "sentence2": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
        "idx": datasets.Value("int32"),
    }
)


def load(split: str) -> datasets.Dataset:
    rows = [json.loads(l) for l in (SOURCE / f"{split}.jsonl").read_text().splitlines() if l.strip()]
    cols = {k: [r[k] for r in rows] for k in FEATURES}
    return datasets.Dataset.from_dict(cols, features=FEATURES, split=split)


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def main() -> None:
    train, validation = load("train"), load("validation")

    out = fresh(GLUE / "rte_parquet")
    train.to_parquet(out / "train.parquet")
    validation.to_parquet(out / "validation.parquet")

    out = fresh(GLUE / "rte_sharded" / "data")
    n = 2
    for i in range(n):
        train.shard(num_shards=n, index=i, contiguous=True).to_parquet(
            out / f"train-{i:05d}-of-{n:05d}.parquet"
        )
    validation.to_parquet(out / "validation-00000-of-00001.parquet")

    out = GLUE / "rte_disk"
    if out.exists():
        shutil.rmtree(out)
    dd = datasets.DatasetDict({"train": train, "validation": validation})
    dd.save_to_disk(str(out), num_shards={"train": 2, "validation": 1})

    # Checks of the layout the Rust tests rely on.
    for f in sorted((GLUE / "rte_sharded" / "data").glob("*.parquet")):
        meta = pq.read_metadata(f)
        assert meta.row_group(0).column(0).compression == "SNAPPY", (f, meta)
    state = json.loads((out / "train" / "state.json").read_text())
    assert [d["filename"] for d in state["_data_files"]] == [
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
    ], state
    with open(out / "train" / "data-00000-of-00002.arrow", "rb") as f:
        # The IPC stream format (a continuation marker), not the file format ("ARROW1").
        assert f.read(4) == b"\xff\xff\xff\xff"
    print("wrote", GLUE / "rte_parquet", GLUE / "rte_sharded", GLUE / "rte_disk")


if __name__ == "__main__":
    main()
