"""`adamba export hf CKPT OUT`: a checkpoint as a Hugging Face model folder (model/pretrained.py has the format),
with a model card built only from what was measured, and `push_to_hub` to publish it (huggingface_hub, optional).

The card's numbers come from three places and nowhere else: the config (sizes, compute modes), the one FLOP
counter (forward FLOPs per token at each mode: a count, not a quality claim), and the run's own records -- its
metrics.jsonl (steps, tokens, held-out val bpb as training measured it) and the Markdown reports under
$ADAMBA_HOME/reports/<run>/, copied verbatim with their file names. A checkpoint with no recorded evaluation gets a
card that says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch

from .checkpoint import Checkpoint, load_checkpoint, resolve_run
from .common import adamba_home, atomic_directory, file_sha256
from .model.calibration_file import write_calibration
from .model.compute import Compute
from .model.pretrained import CONFIG_FILE, WEIGHTS_FILE, hf_config

CARD_FILE = "README.md"


def _training_records(ckpt: Checkpoint) -> list[dict]:
    """The run's metrics.jsonl records up to the checkpoint's step (checkpoints/<run>/metrics.jsonl)."""
    path = ckpt.path.parent / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest of the log still counts
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= ckpt.step:
            records.append(record)
    return records


def _reports(run: str) -> dict[str, str]:
    folder = adamba_home() / "reports" / run
    return {p.name: p.read_text() for p in sorted(folder.glob("*.md"))} if folder.is_dir() else {}


def _calibration_section(calibration: dict | None) -> list[str]:
    """The calibration's own measured numbers (calibration.json, shipped with the weights), or nothing."""
    if calibration is None:
        return []
    lines = ["", "## Early exit", "", f"Calibrated with Learn-then-Test on {calibration['tokens']:,} held-out tokens "
             f"(calibration.json): exits may disagree with the full model on at most delta = {calibration['delta']} "
             f"of tokens, with probability at least 1 - epsilon = {1 - calibration['epsilon']:g}."]
    if calibration.get("threshold") is None:
        return lines + ["", "No threshold met that bound on the calibration tokens, so early exit stays off."]
    return lines + ["", "| threshold | measured disagreement | exit rate | forward FLOPs saved | mean exit layer |",
                    "|---:|---:|---:|---:|---:|",
                    f"| {calibration['threshold']:g} | {calibration['risk']:.4f} | {calibration['exit_rate']:.1%} "
                    f"| {calibration['flops_saved']:.1%} | {calibration['mean_exit']:.2f} |"]


def model_card(ckpt: Checkpoint, name: str, license: str | None = None) -> str:
    """README.md with the hub's YAML header; every number in it measured or counted (module docstring)."""
    config, run = ckpt.model.config, ckpt.path.parent.name
    header = ["---", "library_name: adamba", "pipeline_tag: text-generation",
              "tags: [adamba, " + ", ".join(sorted({"mamba" if k != "T" else "transformer"
                                                    for k in config.block_pattern})) + "]"]
    header += [f"license: {license}"] if license else []
    lines = [*header, "---", "", f"# {name}", "",
             f"An adamba language model: `{config.describe()}`, "
             f"{ckpt.model.num_params():,} parameters, exported from `{ckpt.path}` (step {ckpt.step}).", "",
             "## Compute modes", "", "One set of weights runs at each Matryoshka width (counted forward FLOPs per "
             f"token at a {config.sequence_len}-token context, by adamba's FLOP counter):", "",
             "| mode | width | forward FLOPs/token |", "|---|---:|---:|"]
    for mode, width in config.compute_modes.items():
        lines.append(f"| {mode} | {width} | {ckpt.model.count_flops(compute=Compute(mode)).forward:.4g} |")
    records = _training_records(ckpt)
    evaluated = [r for r in records if "val_bpb" in r]
    lines += ["", "## Training", ""]
    if records:
        tokens = max((r.get("tokens", 0) for r in records if "loss" in r), default=0)  # cumulative per record
        lines.append(f"{ckpt.step} steps" + (f", {tokens:,} tokens" if tokens else "") + " (the run's metrics.jsonl).")
        if evaluated:
            lines.append(f"Held-out val bpb at step {evaluated[-1]['step']}: {evaluated[-1]['val_bpb']:.4f} "
                         f"(at step {evaluated[0]['step']}: {evaluated[0]['val_bpb']:.4f}).")
    else:
        lines.append("No training log was found beside the checkpoint, so no training numbers are given.")
    lines += _calibration_section(ckpt.calibration)
    lines += ["", "## Evaluations", ""]
    reports = _reports(run)
    if reports:
        lines.append(f"The reports adamba wrote for run `{run}`, as they are:")
        for file, text in reports.items():
            lines += ["", f"### {file}", "", text.strip().replace("\n# ", "\n#### ")]
    else:
        lines.append("No evaluation was recorded for this checkpoint (none under reports/).")
    lines += ["", "## Use", "", "```python", "from adamba import AdambaLM",
              f'model = AdambaLM.from_pretrained("{name}")   # a local folder or a hub repository id', "```", ""]
    return "\n".join(lines)


def export_hf(checkpoint: str | Path, out: str | Path, name: str | None = None, license: str | None = None) -> Path:
    """Write `out` (atomically): config.json, model.safetensors, tokenizer.pkl (if any), README.md."""
    ckpt = load_checkpoint(resolve_run(str(checkpoint)))
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(ckpt.model.config), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in ckpt.model.state_dict().items()}
        safetensors.torch.save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if ckpt.tokenizer is not None:
            ckpt.tokenizer.save(tmp)
        if ckpt.calibration is not None:  # re-bound to the file written here (the checkpoint's weights, re-saved)
            write_calibration(tmp, file_sha256(tmp / WEIGHTS_FILE), ckpt.calibration)
        (tmp / CARD_FILE).write_text(model_card(ckpt, name or out.name, license))
    return out


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to the hub repository `repo_id` (created if needed); returns the commit URL."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not an exported model folder (run adamba export hf first)")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("push_to_hub needs huggingface_hub: pip install 'adamba[hub]'") from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="adamba export hf"))
