"""calibration.json: the early-exit thresholds `adamba calibrate` chose (eval/calibrate.py), a sidecar bound to the
weights they were calibrated for -- beside a checkpoint's weights (checkpoint.py) and beside an exported Hugging
Face folder's model.safetensors (pretrained.py). It carries its own checksum and the weights file's sha256, so a
file edited or corrupted after saving, or thresholds meant for other weights, are refused rather than applied."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..common import write_atomic

CALIBRATION, CALIBRATION_FORMAT = "calibration.json", "adamba-calibration"
ENVELOPE = ("format", "weights_sha256", "sha256")  # the file's own fields around the calibration's


def _payload_sha256(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def write_calibration(folder: Path, weights_sha256: str, calibration: dict) -> Path:
    """Write `calibration` (JSON-able; `thresholds` maps exit layer -> threshold or None = never exit) into `folder`,
    atomically, bound to the weights whose file has `weights_sha256`."""
    data = {"format": CALIBRATION_FORMAT, "weights_sha256": weights_sha256,
            **{k: v for k, v in calibration.items() if k not in ENVELOPE}}
    data["sha256"] = _payload_sha256(data)
    return write_atomic(Path(folder) / CALIBRATION, json.dumps(data, indent=2))


def read_calibration(folder: Path, weights_sha256: str, weights_name: str, model) -> dict | None:
    """calibration.json of `folder` if there is one, verified, its thresholds given to the model's exit gates;
    ValueError naming the file and what is wrong."""
    file = Path(folder) / CALIBRATION
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err}); the file is corrupt") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{file}: not an adamba calibration file")
    if data.get("sha256") != _payload_sha256({k: v for k, v in data.items() if k != "sha256"}):
        raise ValueError(f"{file}: contents do not match their checksum (corrupted after saving)")
    if data.get("weights_sha256") != weights_sha256:
        raise ValueError(f"{file}: calibrated for other weights than {Path(folder) / weights_name}; run `adamba "
                         "calibrate` again")
    heads = model.adaptive_heads
    layers = {int(k): v for k, v in data.get("thresholds", {}).items()}
    if heads is None or sorted(layers) != model.config.exit_layers:
        raise ValueError(f"{file}: thresholds for layers {sorted(layers)}, but the model's exit layers are "
                         f"{model.config.exit_layers}")
    heads.thresholds = {k: float("inf") if v is None else float(v) for k, v in layers.items()}
    return data
