"""One table of tolerances per bit width, used by every kernel-vs-reference test.

Kernel vs reference over the *same* quantized data differ only by fp32 summation order: the bound is absolute on
attention outputs (values are O(1)) and does not grow with width. Reference vs the unquantized original is what
quantization costs, bounded separately in ``test_quant`` by half a step per group.
"""

ATOL: dict[int, float] = {1: 2e-4, 2: 2e-4, 4: 2e-4, 8: 2e-4, 16: 2e-4}
RTOL: dict[int, float] = {1: 1e-4, 2: 1e-4, 4: 1e-4, 8: 1e-4, 16: 1e-4}
#: fp16 inputs/outputs round to 11 bits of mantissa.
ATOL_F16: float = 2e-3
#: bf16 inputs/outputs round to 8 bits of mantissa (half an ulp of values ~1 is 2**-9).
ATOL_BF16: float = 8e-3
