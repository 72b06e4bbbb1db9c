"""WindowQuant: window-level mixed-precision KV-cache quantization with TVM-compiled, autotuned kernels.

Importing the package registers the ``"windowquant"`` attention implementation with ``transformers`` (the one
deliberate import-time effect, so ``from_pretrained(..., attn_implementation=...)`` finds it). The compiler path
(``kernels``, ``tune``, ``build``, ``runtime``) imports TVM only when first used.
"""

from .integrations.transformers import (
    ATTN_IMPLEMENTATION,
    WindowQuantCache,
    WindowQuantConfig,
    register,
    windowquant_attention,
)

__version__ = "0.1.0"

register()

__all__ = ["ATTN_IMPLEMENTATION", "WindowQuantCache", "WindowQuantConfig", "register", "windowquant_attention"]
