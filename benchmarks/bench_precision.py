"""How far reduced precision moves a trained model's probabilities, per backend.

For each demo folder (what ``ctscreen demo --out DIR`` leaves: ``model.pth`` and
the preprocessed studies under ``cache/``; ``model-int8.pth`` beside it, made by
``ctscreen quantize``, adds OpenVINO INT8), scores every cached study with
PyTorch fp32 and with each other backend/precision installed here, then prints
the largest |p - p_fp32|, the decisions that flip at the model card's threshold
and the fp32 probability of each flipped study (a flip of a study that sits on
the threshold is expected; one far from it is not).

    python benchmarks/bench_precision.py DEMO_DIR [DEMO_DIR ...] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import installed_configs  # noqa: E402

CONFIGS = (
    ("torch", "bf16"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
)


def _probabilities(scorer, arrays: np.ndarray) -> np.ndarray:  # noqa: ANN001
    logits = np.concatenate([scorer.forward(a[None])[0] for a in arrays]).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-logits))


def compare(folder: Path, limit: int | None) -> None:
    import torch

    from ctscreen.data.cache import load_entry
    from ctscreen.screener import Screener

    quantized = folder / "model-int8.pth"
    weights = quantized if quantized.exists() else folder / "model.pth"
    entries = sorted((folder / "cache").glob("*/*.npy"))[:limit]
    arrays = np.stack([load_entry(f) for f in entries])
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:

        def scorer(backend: str, precision: str) -> Screener:
            return Screener(
                weights, device=cpu, precision=precision, backend=backend, cache_dir=Path(tmp)
            )

        base = scorer("torch", "fp32")
        threshold = base.loaded.card.threshold
        ref = _probabilities(base, arrays)
        print(
            f"{folder}: {len(arrays)} studies {tuple(arrays.shape[1:])}, fp32 p "
            f"{ref.min():.3f}-{ref.max():.3f}, threshold {threshold:.3f}"
        )
        int8 = base.loaded.int8_graph is not None
        for backend, precision in installed_configs(CONFIGS, int8=int8):
            s = scorer(backend, precision)
            p = _probabilities(s, arrays)
            flipped = np.flatnonzero((p >= threshold) != (ref >= threshold))
            shown = ", ".join(f"{ref[i]:.6f}->{p[i]:.6f}" for i in flipped) or "-"
            print(
                f"  {s.engine.name + '/' + s.engine.precision:<18} max|dp| "
                f"{np.abs(p - ref).max():.4f}  flips {len(flipped)} ({shown})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("demo_dirs", nargs="+", type=Path, metavar="DEMO_DIR")
    parser.add_argument("--limit", type=int, help="score at most this many cached studies")
    args = parser.parse_args()
    for folder in args.demo_dirs:
        compare(folder, args.limit)


if __name__ == "__main__":
    main()
