"""Report publishing shared by every stage that writes a report: figures, step series, PNG rendering, the
report manifest.

matplotlib (about 0.5 s to import) is loaded by ``new_figure`` on the first figure, so a stage that writes no
plot (or ``kdpipe verify``/``status``, which import this module's neighbours) never pays for it. A stage that
will plot after a long numpy/Arrow phase calls ``preload`` first: the import then runs on a thread while that
phase, which mostly releases the GIL, runs on the others (``kdpipe select`` of 2M images: -0.3 s).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import manifest as mf
from pipeline.atomic import write_atomic
from pipeline.errors import ManifestError

if TYPE_CHECKING:  # annotations only: matplotlib loads with the first figure
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


_AGG = "matplotlib.backends.backend_agg"  # what ``png_bytes`` needs (it imports matplotlib.figure)


def preload() -> None:
    """Start importing matplotlib's Agg backend and drawing a first, throwaway figure (fonts, artist setup: ~0.2 s
    of the first real one) on a daemon thread, unless loaded or loading (Python's import lock makes a figure made
    meanwhile wait for the import)."""
    if _AGG not in sys.modules and not any(t.name == "preload-matplotlib" for t in threading.enumerate()):
        threading.Thread(target=_warm_up, name="preload-matplotlib", daemon=True).start()


def _warm_up() -> None:
    importlib.import_module(_AGG)
    fig = new_figure(figsize=(1, 1))
    ax = fig.add_subplot()
    step_fill(ax, np.arange(3.0), np.ones(2), color="tab:blue")
    ax.set_title("warm-up", fontsize=6)
    png_bytes(fig, dpi=20)


def new_figure(**kwargs) -> Figure:
    """A matplotlib ``Figure`` (no pyplot state); ``kwargs`` go to its constructor (``figsize``, ``dpi``)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes (Agg canvas, no pyplot state, no ``Software`` stamp: equal figures, equal bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def step_fill(ax: Axes, edges: np.ndarray, top: np.ndarray, bottom: np.ndarray | float = 0.0, **kwargs):
    """One filled step series between ``bottom`` and ``top`` (a value per bin of ``edges``), as a single
    ``fill_between``: ``ax.stairs`` adds a patch whose data limits matplotlib updates segment by segment in
    Python (about 0.06 s per 1000 bins). NaN values leave a gap."""
    x, bottom = np.repeat(edges, 2)[1:-1], np.broadcast_to(bottom, np.shape(top))
    return ax.fill_between(x, np.repeat(bottom, 2), np.repeat(top, 2), linewidth=0, **kwargs)


def step_line(ax: Axes, edges: np.ndarray, values: np.ndarray, **kwargs):
    """One step line through ``values`` (a value per bin of ``edges``), a single ``Line2D``; NaN leaves a gap."""
    return ax.plot(np.repeat(edges, 2)[1:-1], np.repeat(values, 2), **kwargs)[0]


def report_manifest(files: dict[str, bytes], *, stage: str, params: dict, totals: dict, inputs: list[dict]) -> dict:
    """The report manifest's content listing ``files`` (name -> bytes)."""
    entries = [{"path": name, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
               for name, body in sorted(files.items())]
    return mf.build("report", stage=stage, params=params, files=entries, totals=totals, inputs=inputs)


def publish_report(out: Path, files: dict[str, bytes], *, stage: str, params: dict, totals: dict,
                   inputs: list[dict]) -> Path:
    """Write ``files`` (name -> bytes) and the report manifest in ``out``; keep an identical existing report.

    Raises:
        ManifestError: ``out`` already holds a different report.
    """
    out = Path(out)
    data = report_manifest(files, stage=stage, params=params, totals=totals, inputs=inputs)
    target = out / mf.MANIFEST_NAME
    if target.exists():
        existing = mf.load(target, kind="report")
        if existing.id == data["id"]:
            _repair(out, files)
            return target
        raise ManifestError(f"{target} holds another report (id {existing.id[:12]} vs {data['id'][:12]}); "
                            "write to a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    for name, body in sorted(files.items()):
        write_atomic(out / name, body)
    try:
        return mf.write(data, out)
    except ManifestError:  # a concurrent writer of the same report published it meanwhile: one commit wins
        if target.is_file() and mf.load(target, kind="report").id == data["id"]:
            return target
        raise


def _repair(out: Path, files: dict[str, bytes]) -> None:
    """Rewrite the files of an existing, identical report that are missing or damaged (others are untouched)."""
    for name, body in sorted(files.items()):
        path = out / name
        if not path.is_file() or path.stat().st_size != len(body) or path.read_bytes() != body:
            write_atomic(path, body)
