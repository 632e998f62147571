"""numba compilation on first use, shared by the numerical kernels (novelty.nn_novelty's neighbour
search, nab.sweep's refractory sweep). Django-free; numba is imported only when a kernel first runs."""
from __future__ import annotations

from functools import cache


@cache
def compiled(func):
    """func compiled by numba.njit (numba.pydata.org), once per process. No on-disk cache: the
    package directory may be read-only (containers); compiling takes about 1 s."""
    import numba

    return numba.njit(cache=False)(func)
