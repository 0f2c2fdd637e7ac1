"""Backend implementations (numpy, triton, cupy) behind :mod:`gpuloss.dispatch`.

Each module is imported lazily by the dispatcher; see :mod:`.base` for the
contract they implement.
"""
