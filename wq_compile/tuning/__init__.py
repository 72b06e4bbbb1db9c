"""Making kernels fast for a target: the MetaSchedule driver and knob sweeps, writing tuning logs, the RPC fleet,
offline tuning (export candidates, measure elsewhere with the runtime only, import the results) and the GPU visit.

May import: ``compiler``, ``kernels`` (and ``schedules``), ``core``. Not ``runtime``: tuning sits beside it.
"""
