"""Benchmark suite, installed as ``gpuloss.bench``.

``python -m gpuloss.bench`` (or ``gpuloss bench``) runs every op over shapes x
dtypes x implementations (each gpuloss backend and kernel variant, torch eager,
torch.compile, Liger-Kernel, cupyx.scipy.special, scipy.special), checks each
result against the float64 reference before timing it, and reports median
time, GB/s, the fraction of the copy-bandwidth floor, peak extra memory and
speedups, as a table, CSV, JSON and plots.

* :mod:`.ops`     what is measured: inputs, byte floors, reference checks
  (``register_op`` adds rows for later ops)
* :mod:`.impls`   who is measured (``register_impl``, ``register_impl_op``)
* :mod:`.timing`  clocks, memory meters, the copy bandwidth
* :mod:`.runner`  the command line and the loop
* :mod:`.report`  table, CSV, JSON, plots
"""
