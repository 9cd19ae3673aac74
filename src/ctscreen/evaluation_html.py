"""``report.html`` of an evaluation: the metrics with their CIs, the shortcut baseline, the plots.

One self-contained page (plots embedded as base64) that a person can open from
the evaluation folder; it says the same as ``metrics.json``. The shortcut
baseline's section states its ROC-AUC beside the model's and, when the model
does not beat it by more than its interval, the warning in a red box.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .fileio import write_text_atomic
from .train import metrics as metrics_lib

#: Plots of an evaluation folder shown on the page, in order, with captions.
PLOTS: tuple[tuple[str, str], ...] = (
    ("roc.png", "ROC curve"),
    ("pr.png", "Precision-recall curve"),
    ("calibration.png", "Calibration"),
    ("confusion_matrix.png", "Confusion matrix"),
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.warning { background: #fde8e8; border: 1px solid #c53030; padding: 0.8em; }
.ok { background: #e6f4ea; border: 1px solid #2f855a; padding: 0.8em; }
.plots img { width: 22em; margin: 0.3em; border: 1px solid #ddd; }
.muted { color: #666; }
"""


def _number(value: Any, digits: int = 4) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    return "nan" if not math.isfinite(v) else f"{v:.{digits}f}"


def baseline_section(entry: Mapping[str, Any]) -> str:
    """The HTML of the shortcut baseline's section (pure, for tests)."""
    title = "<h2>Shortcut baseline: HU statistics alone</h2>"
    method = f"<p class='muted'>{html.escape(str(entry.get('method', '')))}</p>"
    if "skipped" in entry:
        return f"{title}{method}<p>Not computed: {html.escape(str(entry['skipped']))}</p>"
    auc = entry["roc_auc"]
    ci = metrics_lib.format_interval(float(auc["ci_low"]), float(auc["ci_high"]), 3)
    table = (
        "<table><tr><th></th><th>ROC-AUC</th><th>95% CI</th></tr>"
        f"<tr><td>model</td><td>{_number(entry['model_roc_auc'], 3)}</td><td></td></tr>"
        f"<tr><td>HU-histogram baseline ({int(entry['folds'])}-fold CV)</td>"
        f"<td>{_number(auc['value'], 3)}</td><td>{html.escape(ci)}</td></tr></table>"
    )
    warning = entry.get("warning")
    if warning:
        verdict = f"<p class='warning'><b>Warning:</b> {html.escape(str(warning))}</p>"
    else:
        verdict = (
            "<p class='ok'>The model's ROC-AUC exceeds the upper end of the baseline's 95% "
            "interval: it separates these studies better than their intensity statistics "
            "alone.</p>"
        )
    return f"{title}{method}{table}{verdict}"


def render_report(summary: Mapping[str, Any], out_dir: Path) -> str:
    """The page for one evaluation folder (``summary`` is ``metrics.json``'s content)."""
    rows = []
    for name, m in summary["metrics"].items():
        label = metrics_lib.METRIC_LABELS.get(name, name)
        ci = metrics_lib.format_interval(float(m["ci_low"]), float(m["ci_high"]))
        rows.append(
            f"<tr><td>{html.escape(label)}</td><td>{_number(m['value'])}</td>"
            f"<td>{html.escape(ci)}</td></tr>"
        )
    images = []
    for name, caption in PLOTS:
        path = out_dir / name
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            images.append(
                f"<img src='data:image/png;base64,{data}' alt='{caption}' title='{caption}'>"
            )
    note = summary.get("note")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>ctscreen evaluation</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>ctscreen evaluation</h1>",
        f"<p>{int(summary['n'])} studies ({int(summary['n_with_pathology'])} with pathology, "
        f"{int(summary['n_failed'])} unreadable); threshold {_number(summary['threshold'])} "
        f"({html.escape(str(summary['threshold_rule']))}).</p>",
        f"<p class='muted'>weights {html.escape(str(summary['weights']))}, sha256 "
        f"{html.escape(str(summary['sha256'])[:16])}…; {html.escape(str(summary['ci_method']))}"
        f", {int(summary['n_boot'])} resamples.</p>",
        f"<p><b>Note:</b> {html.escape(str(note))}</p>" if note else "",
        "<h2>Metrics with 95% confidence intervals</h2>",
        "<table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>",
        *rows,
        "</table>",
        baseline_section(summary["shortcut_baseline"]) if "shortcut_baseline" in summary else "",
        "<h2>Plots</h2><div class='plots'>",
        *images,
        "</div></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write_report(summary: Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.html``; returns its path."""
    path = Path(out_dir) / "report.html"
    write_text_atomic(path, render_report(summary, Path(out_dir)))
    return path
