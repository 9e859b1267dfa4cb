"""Real chat data for GPU users, through the `hf:` parquet downloader (data/download.py: resumable, retried,
validated), cached under $ADAMBA_HOME/datasets: SmolTalk (smol-smoltalk: nanochat's general chat data), MMLU's
auxiliary_train, GSM8K and ARC train splits -- nanochat's SFT mixture."""

from __future__ import annotations

from pathlib import PurePosixPath

import pyarrow.parquet as pq

from ..common import adamba_home
from ..data.download import download_hf_dataset
from .base import Items, NumericAnswers
from .bundled import ARC, ARC_SUBSETS, MMLU, gsm8k_conversation


def hf_rows(repo: str, folder: str, split: str) -> list[dict]:
    """The rows of `repo`'s parquet files under `folder` whose name starts with `split`."""
    dest = adamba_home() / "datasets" / repo.replace("/", "__")
    paths = [p for p in download_hf_dataset(repo, dest)
             if PurePosixPath(p.relative_to(dest).as_posix()).parent.as_posix().endswith(folder)
             and p.name.startswith(f"{split}-")]
    if not paths:
        raise ValueError(f"{repo}: no parquet file for split {split!r} under {folder!r}")
    return [row for p in paths for row in pq.read_table(p).to_pylist()]


def smoltalk(split: str = "train") -> Items:
    """Conversations as they are (system, user, assistant messages)."""
    rows = hf_rows("HuggingFaceTB/smol-smoltalk", "data", split)
    return Items(f"smoltalk-{split}", "generative", [{"messages": row["messages"]} for row in rows])


def gsm8k_hf(split: str = "train") -> NumericAnswers:
    """Judged by the final number, so it serves RL (train/rl.py) as well as fine-tuning."""
    rows = hf_rows("openai/gsm8k", "main", split)
    return NumericAnswers(f"gsm8k-{split}", [gsm8k_conversation(r["question"], r["answer"]) for r in rows])


def arc_hf(subset: str = "easy", split: str = "train") -> Items:
    rows = hf_rows("allenai/ai2_arc", ARC_SUBSETS[subset], split)
    return Items(f"arc-{subset}-{split}", "categorical", [ARC.conversation(r) for r in rows])


def mmlu_auxiliary_train() -> Items:
    rows = hf_rows("cais/mmlu", "auxiliary_train", "train")
    # the parquet conversion nests each row under "train"
    return Items("mmlu-aux-train", "categorical", [MMLU.conversation(r.get("train", r)) for r in rows])
