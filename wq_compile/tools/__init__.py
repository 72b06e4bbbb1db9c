"""The commands: ``wq-tune``, ``wq-bench``, ``wq-eval`` (argument parsing in ``cli``), the benchmarks, the cache
evaluation and the method's analysis.

May import: every other part (it is the top layer).
"""
