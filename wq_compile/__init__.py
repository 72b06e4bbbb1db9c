"""WindowQuant: window-level mixed-precision KV-cache quantization with TVM-compiled, autotuned kernels.

``import wq_compile`` imports nothing heavy and registers nothing. The names of the transformers integration
(``ATTN_IMPLEMENTATION``, ``WindowQuantCache``, ``windowquant_attention``, ``register``) load it on first access and
register the ``"windowquant"`` attention implementation then, so the README's usage
(``from wq_compile import ATTN_IMPLEMENTATION`` before ``from_pretrained``) still needs one import. MetaSchedule
build workers, which import this package, pay for neither transformers nor the registration.
"""

from __future__ import annotations

from typing import Any

from .core.config import WindowQuantConfig

__version__ = "0.1.0"

_INTEGRATION = ("ATTN_IMPLEMENTATION", "WindowQuantCache", "register", "windowquant_attention")

__all__ = ["ATTN_IMPLEMENTATION", "WindowQuantCache", "WindowQuantConfig", "register", "windowquant_attention"]


def __getattr__(name: str) -> Any:
    if name in _INTEGRATION:
        from .integrations import attention

        attention.register()
        if name == "WindowQuantCache":
            from .integrations.transformers import WindowQuantCache

            return WindowQuantCache
        return getattr(attention, name)
    raise AttributeError(f"module 'wq_compile' has no attribute {name!r}")
