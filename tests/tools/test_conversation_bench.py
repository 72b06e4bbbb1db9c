"""Issue 19 item 6: the conversation rows of ``wq-bench --e2e --conversation`` (tiny sizes: seconds)."""

from __future__ import annotations

import math

import pytest


@pytest.mark.filterwarnings("ignore")
def test_conversation_rows_cover_every_cache_and_turn(tmp_path) -> None:
    import torch

    from wq_compile.tools.bench import conversation

    torch.set_num_threads(1)
    rows = conversation.measure("tiny", layers=1, frames=1, second_frames=1, question=8, new_tokens=3)
    assert [(r.cache, r.turn[0]) for r in rows] == [(c, t) for c in ("dynamic", "static", "windowquant")
                                                      for t in "123"]
    for r in rows:
        assert r.note == "" and math.isfinite(r.ttft_ms) and r.ttft_ms > 0 and r.decode_ms > 0, r
    wq = {r.turn[0]: r for r in rows if r.cache == "windowquant"}
    assert wq["2"].turn_tokens == 9 and wq["3"].turn_tokens == 196 + 3 + 8 + 1
    # every several-token step, the new clip's 208-token one (stored by extend) included, runs the multi-token kernel
    assert all(r.reference_calls == 0 for r in wq.values())
    conversation.write_csv(rows, tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_text().count("\n") == 10
    assert "| windowquant | 3: second clip + question |" in conversation.format_table(rows)
