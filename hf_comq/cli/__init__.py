"""``hf-comq``: quantize, evaluate and demo COMQ from the command line.

Why a CLI: the Python API (``from_pretrained(..., quantization_config=COMQConfig(...))``)
is the integration point, but most people first want to *see* what COMQ does to a
model they have, without writing a script.  Three sub-commands cover that:

* ``quantize``: load a full-precision checkpoint with the right Auto class,
  calibrate and quantize it, save it (atomically) and optionally push it.
* ``evaluate``: the metric that fits the model: top-1 accuracy for image
  classifiers, perplexity for causal LMs, embedding cosine to a reference model
  for text encoders.
* ``demo``: the download-free first run on the shipped Fashion-MNIST ViT,
  comparing FP, COMQ and round-to-nearest at 4, 3 and 2 bits: top-1 and fidelity
  to the full-precision model.

Errors a user can fix (a missing path, an unknown column, an unsupported model)
end the program with exit code 1 and one line on stderr; ``--debug`` shows the
traceback instead.  Everything that can be checked without the model (output
folder, Hub repository id, data paths, Hub availability) is checked first, and
nothing heavy is imported before the arguments are parsed.

One module per command (:mod:`.quantize`, :mod:`.evaluate`, :mod:`.demo`); :mod:`.models` and
:mod:`.data` read what a command is given, :mod:`.output` writes folders and tables, :mod:`.main`
parses and dispatches.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
