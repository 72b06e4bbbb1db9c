"""``python -m wq_compile.tools.cli``: ``wq-tune``."""

from . import main_tune

raise SystemExit(main_tune())
