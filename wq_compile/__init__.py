"""WindowQuant: window-level mixed-precision KV-cache quantization with TVM-compiled, autotuned kernels.

The torch reference path (``quant``, ``search``, ``layout``, ``reference``) imports nothing heavy; the compiler
path (``kernels``, ``tune``, ``build``, ``runtime``) imports TVM when first used.
"""

__version__ = "0.1.0"
