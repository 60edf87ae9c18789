"""The model-card template of hf_comq (``comq_model_card.md``), shipped as package data ``hf_comq.model_cards``.

pyproject.toml maps this folder to the package ``hf_comq.model_cards`` so that the one
template in the repository's ``model_cards/`` is also the one inside installed wheels.
"""
