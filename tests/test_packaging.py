"""What pip installs: every subpackage, and the model-card template from the repository's model_cards/."""

import tomllib
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(path.parent.relative_to(REPO_ROOT).parts)
        for path in (REPO_ROOT / "hf_comq").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_the_packaged_card_template_is_the_repository_one():
    packaged = resources.files("hf_comq.model_cards").joinpath("comq_model_card.md").read_text(encoding="utf-8")
    assert packaged == (REPO_ROOT / "model_cards" / "comq_model_card.md").read_text(encoding="utf-8")


def test_the_compressed_tensors_range_cards_advise_is_the_one_pip_installs():
    from hf_comq.checkpoint import SUPPORTED_COMPRESSED_TENSORS

    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"compressed-tensors{SUPPORTED_COMPRESSED_TENSORS}" in dependencies
