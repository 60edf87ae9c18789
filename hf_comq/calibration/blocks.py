"""Find a model's repeated transformer blocks, the unit of block-sequential calibration.

Block-sequential COMQ runs one block at a time on cached inputs, so it must know
which modules are "the blocks" and in which order they run.  Transformers models
keep them in ``nn.ModuleList``s (``vit.layers``, ``encoder.layer``, ``model.layers``,
``transformer.h``), and hierarchical models such as Swin nest one list of blocks per
stage inside a list of stages.  We therefore return *groups*: each group is one
leaf ``ModuleList`` whose blocks run back to back (output of block ``i`` is the
hidden-state input of block ``i + 1``), in forward order.  Between two groups the
model may transform the hidden states (Swin's patch merging), so the caller must
re-capture the inputs of each group's first block instead of chaining groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..nn import UnfusedExperts, is_linear_like

__all__ = ["BlockGroup", "find_block_groups"]


@dataclass(frozen=True)
class BlockGroup:
    """One ``nn.ModuleList`` of blocks that run back to back.

    ``name`` is the dotted path of the list; ``block_names`` the dotted paths of its
    children in forward order.
    """

    name: str
    block_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.block_names)


def find_block_groups(model: nn.Module, block_name: str | None = None) -> list[BlockGroup]:
    """Return the model's block groups in forward (registration) order.

    With ``block_name`` (a dotted path to an ``nn.ModuleList``, e.g.
    ``"model.layers"``) that list is used and nothing is guessed; with a path to a
    container of lists (e.g. ``"swin.encoder.layers"``) its leaf block lists are used.
    Otherwise all *leaf block lists* are returned: ``ModuleList``s whose children are
    composite modules containing a Linear and which hold no further such list (a list
    of unlike sublayers inside a block, as T5's, is not one).  An
    empty result means the model has no repeated blocks; the caller then treats
    every layer as a stand-alone layer.
    """
    if block_name is not None:
        return _groups_under(model, block_name)
    return [_group(name, module) for name, module in _leaf_block_lists(model)]


def _groups_under(model: nn.Module, block_name: str) -> list[BlockGroup]:
    try:
        root = model.get_submodule(block_name)
    except AttributeError as error:
        raise ValueError(f"block_name={block_name!r} does not name a submodule of {type(model).__name__}") from error
    if not isinstance(root, nn.ModuleList) or len(root) == 0:
        raise ValueError(
            f"block_name={block_name!r} must name a non-empty nn.ModuleList of blocks, "
            f"got {type(root).__name__}"
        )
    nested = [(f"{block_name}.{name}", module) for name, module in _leaf_block_lists(root) if name]
    if nested:
        return [_group(name, module) for name, module in nested]
    return [_group(block_name, root)]


def _group(name: str, module_list: nn.ModuleList) -> BlockGroup:
    prefix = f"{name}." if name else ""
    return BlockGroup(name=name, block_names=tuple(f"{prefix}{child}" for child, _ in module_list.named_children()))


def _leaf_block_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    candidates = [(name, module) for name, module in root.named_modules() if _is_block_list(module)]
    candidates = [(name, module) for name, module in candidates if not _is_sublayer_list(name, module, candidates)]
    names = [name for name, _ in candidates]
    return [
        (name, module) for name, module in candidates if not any(_is_strict_ancestor(name, other) for other in names)
    ]


def _is_block_list(module: nn.Module) -> bool:
    """A ``ModuleList`` of composite blocks, each holding at least one Linear.

    A MoE layer's experts (:class:`~hf_comq.nn.UnfusedExperts`) are a list too, but
    they run side by side on the tokens routed to each, inside their block.
    """
    if not isinstance(module, nn.ModuleList) or isinstance(module, UnfusedExperts) or len(module) == 0:
        return False
    return all(not is_linear_like(child) and _contains_linear(child) for child in module)


def _is_sublayer_list(name: str, module: nn.ModuleList, candidates: list[tuple[str, nn.ModuleList]]) -> bool:
    """A list of unlike modules inside a block of another list: the block's sublayers, not blocks.

    T5 keeps each block's self-attention, cross-attention and feed-forward parts in a
    ``ModuleList`` (``encoder.block.0.layer``); they take different inputs and do not
    run back to back, so the blocks are the outer list's.  Stages holding lists of like
    blocks (Swin) keep their inner lists.
    """
    if len({type(child) for child in module}) == 1:
        return False
    return any(_is_strict_ancestor(other, name) for other, _ in candidates)


def _contains_linear(module: nn.Module) -> bool:
    return any(is_linear_like(sub) for sub in module.modules())


def _is_strict_ancestor(name: str, other: str) -> bool:
    if name == other:
        return False
    return name == "" or other.startswith(f"{name}.")
