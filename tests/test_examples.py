"""The README's main job: the video-QA example runs on CPU with no download and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_video_qa_example_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "video_qa.py"), "--frames", "2", "--new-tokens", "4"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "generated 4 tokens" in out
    assert "KV memory: dense fp16" in out and "WindowQuant" in out
    assert "decode kernel calls 6, reference calls 0" in out  # 2 layers x 3 decode steps, compiled path
    assert "plan (effective" in out and "layer  1:" in out
