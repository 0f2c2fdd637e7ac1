"""``python -m gpuloss.bench``: the benchmark runner (see runner.py)."""
from .runner import main

raise SystemExit(main())
