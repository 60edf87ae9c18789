"""How many compiled products oneDNN keeps, for runs under a memory budget.

oneDNN, which runs hf_comq's float32 products on the CPU (:mod:`hf_comq.kernels.gemm`),
keeps a primitive with kernels compiled for each product shape it meets, in two caches
of 1,024 entries by default: its own primitive cache and the computation cache of ideep,
the layer torch reaches it through.  A calibration run meets a great many shapes (the
solver's panels of every width, each layer's sums and batches), and on a 1.1 B model those
caches kept a few hundred MiB to the end of the process, a large share of a memory budget.
Small caches rebuild entries instead, at some cost in time (the products and the codes are
the same), which is the right trade only where memory is the point: ``hf-comq quantize
--device-map`` caps them; a Python program quantizing under a ``max_memory`` budget calls
:func:`cap_onednn_caches` first, or sets the variables in its environment.

This module imports neither torch nor anything else: the capacities are read once, when
oneDNN first runs in a process, so they must be set before that.
"""

from __future__ import annotations

import os

ONEDNN_CACHE_CAPACITY = 16
"""Entries each cache keeps under a memory budget: enough for the few shapes a step uses at once."""

ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
"""The environment variables oneDNN and ideep read their cache capacities from."""


def cap_onednn_caches() -> None:
    """Set each cache's capacity to :data:`ONEDNN_CACHE_CAPACITY` where the environment leaves it unset.

    Effective only before oneDNN first runs in the process (a process that ran it already
    keeps the capacities it started with); a value the environment sets is kept.
    """
    for variable in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(variable, str(ONEDNN_CACHE_CAPACITY))
