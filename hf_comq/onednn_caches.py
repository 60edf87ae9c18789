"""How many compiled products oneDNN keeps, for runs under a memory budget.

oneDNN, which runs hf_comq's float32 products on CPUs with AVX-512 (:mod:`hf_comq.kernels.gemm`),
keeps a primitive with kernels compiled for each product shape it meets, in two caches
of 1,024 entries by default: its own primitive cache and the computation cache of ideep,
the layer torch reaches it through.  A calibration run meets a great many shapes (the
solver's panels of every width, each layer's sums and batches), and on a 1.1 B model those
caches kept a few hundred MiB to the end of the process, a large share of a memory budget.
Small caches rebuild entries instead, at some cost in time (the products and the codes are
the same), which is the right trade only where memory is the point: quantizing with a
``device_map`` (``from_pretrained``'s, or ``hf-comq quantize --device-map``) caps them
before the weights load (:meth:`hf_comq.quantizer.COMQHfQuantizer.validate_environment`).

The capacities are read once, when oneDNN first runs in a process, so they must be set
before that; a process that ran oneDNN earlier keeps the ones it started with.
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
