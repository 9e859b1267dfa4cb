"""Where reports go and how their files are written: Markdown and PNGs under $ADAMBA_HOME/reports/<name>/, each
file atomically (common.write_atomic). Report writers import pyplot from here, so the backend is chosen first."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI; the one place the backend is set
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..common import adamba_home, atomic_writer  # noqa: E402

__all__ = ["plt", "report_dir", "save_figure"]

DPI = 110


def report_dir(name: str) -> Path:
    """$ADAMBA_HOME/reports/<name>/, created if needed."""
    out = adamba_home() / "reports" / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig: Figure, path: Path) -> Path:
    """Write `fig` to `path` (its suffix names the format) and close it, so report loops do not leak figures."""
    try:
        with atomic_writer(path) as f:
            fig.savefig(f, format=path.suffix.lstrip("."), dpi=DPI)
    finally:
        plt.close(fig)
    return path
