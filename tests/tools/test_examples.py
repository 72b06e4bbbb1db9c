"""The README's main job: the video-QA example runs on CPU with no download and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_example(cache_dir: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "video_qa.py"), "--frames", "2", "--layers", "2",
         "--new-tokens", "4"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "WQ_CACHE_DIR": str(cache_dir)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_video_qa_example_runs_and_a_second_run_compiles_nothing(tmp_path: Path) -> None:
    _run_example(tmp_path)
    out = _run_example(tmp_path)  # a new process on a warm module cache
    kernels = next(line for line in out.splitlines() if line.startswith("kernels: "))
    assert "modules: 0 compiled, 6 from the module cache" in kernels, kernels  # fused, multi, quantize x 3, recode
    for how in ("tuned here", "tuned on ", "untuned"):
        if how in kernels:
            break
    else:
        raise AssertionError(f"the example does not say where its kernels come from: {kernels}")
    assert "(2 frames, 392 visual tokens), 2 layers, random weights; 4 new tokens" in out
    assert "speedup " in out and "fidelity vs dense" in out and "agree" not in out  # no agreement on random weights
    assert "KV memory: dense fp16" in out and "WindowQuant" in out
    assert "decode kernel calls 6, reference calls 0" in out  # 2 layers x 3 decode steps, compiled path
    assert "plan (effective" in out and "layer  1:" in out
