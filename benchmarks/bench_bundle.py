"""An exported bundle (OpenVINO, no PyTorch) against the PyTorch path on real series.

Exports ``--weights`` (default: a random-weight r3d_18 at the standard input shape,
made here) with ``ctscreen export``, scores the inputs (default: the three real chest
series of ``data/dicom``) once through the Screener with the checkpoint (PyTorch
fp32) and once in a child Python that cannot import torch, with the bundle, and
prints the largest differences of probability, logit and per-slice score, and each
path's seconds per study.

    python benchmarks/bench_bundle.py --inputs /work/shared/data/dicom/chest-*
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = (
    "import importlib.abc, sys\n"
    "class B(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
    "            raise ModuleNotFoundError(name)\n"
    "sys.meta_path.insert(0, B())\n"
)
SCORE = """
import json, sys, time
from ctscreen import Screener
s = Screener(sys.argv[1], device="cpu", precision="fp32")
out = []
for r in s.score(sys.argv[2:]):
    out.append({"p": r.probability, "logit": r.logit, "slices": r.slice_scores.tolist(),
                "s": r.seconds, "status": r.status})
assert "torch" not in sys.modules
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="checkpoint (default: random, standard shape)")
    parser.add_argument("--inputs", type=Path, nargs="*", help="studies (default: real chest)")
    args = parser.parse_args()
    import torch

    from ctscreen import Screener
    from ctscreen.card import ModelCard
    from ctscreen.cli import main as cli
    from ctscreen.model import build_model
    from ctscreen.weights import save_checkpoint

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
    inputs = args.inputs or sorted(root.glob("chest-*"))
    with tempfile.TemporaryDirectory(prefix="ctscreen-bench-bundle-") as tmp:
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            weights = Path(tmp) / "model.pth"
            save_checkpoint(weights, build_model(), ModelCard())
        t0 = time.perf_counter()
        assert cli(["export", str(weights), "-o", f"{tmp}/bundle"]) == 0
        print(f"export: {time.perf_counter() - t0:.1f} s")
        screener = Screener(weights, device="cpu", backend="torch", precision="fp32")
        theirs = list(screener.score(inputs))
        Path(tmp, "sitecustomize.py").write_text(BLOCK)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(
            [sys.executable, "-c", SCORE, f"{tmp}/bundle", *map(str, inputs)],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode:
            sys.exit(done.stderr)
        ours = json.loads(done.stdout.splitlines()[-1])
    for path, a, b in zip(inputs, ours, theirs, strict=True):
        dp = abs(a["p"] - b.probability)
        dl = abs(a["logit"] - b.logit)
        ds = max(abs(x - y) for x, y in zip(a["slices"], b.slice_scores, strict=True))
        print(
            f"{path.name}: p torch {b.probability:.6f} bundle {a['p']:.6f} |dp| {dp:.2e} "
            f"|dlogit| {dl:.2e} max |d slice score| {ds:.2e}; "
            f"{b.seconds:.1f} s vs {a['s']:.1f} s per study"
        )


if __name__ == "__main__":
    main()
