"""The method in plain torch: the part every other part builds on.

Config (:class:`WindowQuantConfig`), specs (:class:`QuantSpec`, :class:`KernelSpec` and their URIs), the reference
quantization format (quantize / pack / dequantize), windows, scorers and the budgeted allocation (search, policy),
the bucketed per-layer layout, the reference attention every kernel is checked against, and model presets.

May import: nothing else of ``wq_compile`` (torch and the standard library only).
"""
