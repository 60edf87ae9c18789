"""``python -m hf_comq.cli``, the same as ``python -m hf_comq`` and ``hf-comq``."""

import sys

from .main import main

sys.exit(main())
