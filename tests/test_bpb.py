"""Bits per byte with its uncertainty (eval/bpb.py), and the reports that draw it (eval/plots.py,
eval/elastic_report.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from adamba import AdambaLM
from adamba.data.corpus import local_corpus
from adamba.data.dataset import TokenizedCorpus
from adamba.data.loader import DataLoader
from adamba.eval import elastic_report
from adamba.eval.bpb import BpbEstimate, measure_bpb


def test_per_batch_sums_equal_a_recompute_of_each_batch(corpus_dir, tokenizer):
    data = TokenizedCorpus(local_corpus(corpus_dir), tokenizer, val_fraction=0.2, progress=False)
    model = AdambaLM(tiny_config()).eval()
    estimate = measure_bpb(model, data, batch_size=2, seq_len=32, max_tokens=4 * 64, device=torch.device("cpu"))
    loader = DataLoader(data, "val", 2, 32, shuffle=False, device=torch.device("cpu"))
    nats, n_bytes = [], []
    with torch.no_grad():
        for _ in range(4):
            x, y = next(loader)
            loss = F.cross_entropy(model(x).flatten(0, 1).double(), y.flatten(), reduction="none")
            counted = tokenizer.token_bytes[y.flatten()]
            nats.append(float(loss[counted > 0].sum()))
            n_bytes.append(int(counted.sum()))
    np.testing.assert_allclose(estimate.nats, nats, rtol=1e-5)
    assert estimate.bytes.tolist() == n_bytes
    assert estimate.bpb == pytest.approx(sum(nats) / (math.log(2) * sum(n_bytes)), rel=1e-5)


def _batches(rng, true_bpb: float, n: int, noise: float = 0.3):
    """Per-batch sums whose ratio has a known value: bytes vary, nats = bytes * ln2 * bpb * (1 + noise)."""
    n_bytes = rng.integers(500, 1500, n).astype(float)
    return n_bytes * math.log(2) * true_bpb * (1 + noise * rng.standard_normal(n)), n_bytes


def test_the_interval_covers_a_known_bpb_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = []
    for trial in range(200):
        low, high = BpbEstimate(*_batches(rng, 2.0, 24)).interval(seed=trial)
        covered.append(low <= 2.0 <= high)
    assert 0.88 <= np.mean(covered) <= 0.99


def test_the_paired_difference_sees_what_overlapping_intervals_hide():
    rng = np.random.default_rng(1)
    nats, n_bytes = _batches(rng, 2.0, 32)
    shift = 0.004  # a real but small difference, far below the batch-to-batch spread
    worse = BpbEstimate(nats + n_bytes * math.log(2) * shift * (1 + 0.05 * rng.standard_normal(32)), n_bytes)
    control = BpbEstimate(nats, n_bytes)
    (low_w, high_w), (low_c, high_c) = worse.interval(), control.interval()
    assert low_w < high_c and low_c < high_w  # side by side the two intervals overlap...
    delta, low, high = worse.difference(control)
    assert delta == pytest.approx(worse.bpb - control.bpb)
    assert 0 < low <= shift <= high and high - low < 0.1 * (high_c - low_c)  # ...the paired one does not
    assert control.difference(control) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same batches"):
        worse.difference(BpbEstimate(nats[:4], n_bytes[:4]))


def test_modes_of_identical_widths_are_one_row_measured_once(corpus_dir, tokenizer, monkeypatch):
    config = tiny_config(block_pattern="TM", compute_modes={"ghost": 16, "whisper": 16, "normal": 32, "think": 64})
    model = AdambaLM(config)
    data = TokenizedCorpus(local_corpus(corpus_dir), tokenizer, val_fraction=0.2, progress=False)
    measured = []
    real = elastic_report.measure_bpb
    monkeypatch.setattr(elastic_report, "measure_bpb",
                        lambda *args, compute, **kwargs: measured.append(compute.width) or real(*args, compute=compute,
                                                                                                **kwargs))
    rows = elastic_report.mode_rows(model, data, tokens=128, batch_size=2)
    assert [r.mode for r in rows] == ["ghost = whisper", "normal", "think"] and measured == [None, "ghost", "normal"]
    assert rows[0].widths == [16, "full"] and rows[2].estimate is rows[2].full
    table = elastic_report.markdown_table(rows)
    assert table.count("ghost") == 1 and "| think | 64 full |" in table and "(control)" in table


def test_labels_of_nearby_points_do_not_overlap(tmp_path):
    import matplotlib.pyplot as plt

    from adamba.eval.plots import plot_intervals

    rng = np.random.default_rng(2)
    estimates = [BpbEstimate(*_batches(rng, 1.96 + 0.001 * i, 16, noise=0.01)) for i in range(4)]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["ghost = whisper", "normal", "think", "think harder"]
    plot_intervals(ax, [1.0, 1.001, 1.002, 1.03], estimates, labels, marker="o")  # labels far wider than the gaps
    fig.savefig(tmp_path / "labels.png")
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert [t.get_text() for t in ax.texts] == labels
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= box.x0 and box.x1 <= frame.x1 for box in boxes)  # none sticks out over the ticks
    plt.close(fig)


def test_batches_without_spread_give_a_zero_width_interval_not_nan():
    same = BpbEstimate(np.full(4, 100.0), np.full(4, 50))
    want = 100 / (math.log(2) * 50)
    assert same.interval() == pytest.approx((want, want)) and same.describe() == f"{want:.4f} ({want:.4f}-{want:.4f})"
    delta, low, high = same.difference(BpbEstimate(np.full(4, 101.0), np.full(4, 50)))
    assert delta == pytest.approx(-1 / (math.log(2) * 50)) and low == pytest.approx(delta) == high
