"""``python -m wq_compile.gpu_visit``: the stable name of the prepared GPU visit (the standing order names it);
the command lives in :mod:`wq_compile.tuning.gpu_visit`."""

from __future__ import annotations

if __name__ == "__main__":
    from wq_compile.tuning.gpu_visit import main

    raise SystemExit(main())
