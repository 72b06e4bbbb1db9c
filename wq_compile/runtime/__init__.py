"""What a cache calls at run time: the kernel library (compiled kernels per target, shared per process), the
decoder (one fused launch per layer on CPUs, split-KV + merge on GPUs) and the backend (compiled or reference).

May import: ``compiler``, ``kernels``, ``core``. Not ``tuning``: the runtime only reads what tuning wrote.
"""
