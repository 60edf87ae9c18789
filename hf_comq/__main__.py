"""``python -m hf_comq``: the ``hf-comq`` command line (see :mod:`hf_comq.cli`)."""

import sys

from .cli import main

sys.exit(main())
