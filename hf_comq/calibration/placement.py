"""Where calibration computes and where weights live: devices, accelerate dispatch, CPU and disk offload.

Block-sequential COMQ touches one block at a time, so a model that does not fit in
memory can still be quantized: accelerate's hooks (``device_map`` / ``max_memory``
in ``from_pretrained``, or ``cpu_offload`` / ``disk_offload``) bring a layer's weights
in for its forward pass and drop them afterwards.  This module keeps that true while
layers are being replaced: a new :class:`~hf_comq.nn.COMQLinear` goes where the layer it
replaces lived (on its device, in CPU offload, or written to disk next to the model's
own offloaded weights), so peak memory stays about one block whatever the model size,
and the saved checkpoint is the one an in-memory run writes.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import functools
import itertools
import mmap
import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..nn import COMQLinear
from ..solver import QuantizedWeight

logger = logging.get_logger(__name__)

__all__ = [
    "OFFLOAD_SUBFOLDER",
    "Placement",
    "block_on_compute",
    "check_device_map",
    "free_memory",
    "install_built_layer",
    "install_quantized_layer",
    "install_unfused_experts",
    "materialized",
    "module_devices",
    "offloads_to_disk",
    "release_file_mappings",
    "release_file_pages",
    "resolve_placement",
    "retie_offloaded_weights",
    "send_to_device",
    "trim_heap",
]

OFFLOAD_SUBFOLDER = "comq-quantized"
"""Folder (inside the model's own offload folder when it has one) holding quantized layers of disk-offloaded blocks."""

MADV_PAGEOUT = 21
"""Linux's ``madvise`` advice (since 5.4) to reclaim a range's pages now; Python's ``mmap`` module does not name it."""
PAGEMAP_FILE_PAGE = 1 << 61
"""The bit of a page's ``/proc/self/pagemap`` entry that says it is a page of the file itself (one written to in a
private mapping is an anonymous copy instead); the top bit, an int64's sign, says it is mapped in."""


def send_to_device(value: Any, device: torch.device) -> Any:
    """Tensors inside nested tuples/lists/dicts moved to ``device`` (accelerate's rule); other objects unchanged."""
    from accelerate.utils import send_to_device as accelerate_send

    return accelerate_send(value, device)


@dataclass(frozen=True)
class Placement:
    """Where calibration runs: ``compute`` device, whether accelerate hooks move weights, where inputs start."""

    compute: torch.device
    dispatched: bool
    input_device: torch.device


def resolve_placement(model: nn.Module) -> Placement:
    """Pick the compute device and check that every weight is reachable (in memory or through offload hooks).

    The compute device is the current CUDA device (``torch.cuda.set_device(local_rank)``
    gives each rank of a ``torchrun`` its own GPU), else the CPU.
    """
    compute = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dispatched = any(hasattr(module, "_hf_hook") for module in model.modules())
    if dispatched:
        return Placement(compute, True, compute)
    devices = {p.device for p in model.parameters()}
    if any(device.type == "meta" for device in devices):
        raise ValueError("the model has weights on the meta device and no accelerate offload hooks to load them")
    input_device = next(iter(devices)) if len(devices) == 1 else compute
    return Placement(compute, False, input_device)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""``device_map`` strings that ask accelerate to place the weights, rather than name a device."""


def retie_offloaded_weights(model: nn.Module) -> None:
    """Tie the weights the config ties (an embedding and ``lm_head``) again in a dispatched model.

    accelerate's offload hooks swap an offloaded module's parameters for new objects as a forward
    passes, so after calibration, or any forward, the two were separate and a save wrote a
    full-precision copy of the embedding that the same model in memory does not have.  Each
    module still reads its own offloaded copy, of equal values.
    """
    tie = getattr(model, "tie_weights", None)
    if getattr(model, "hf_device_map", None) and callable(tie):
        tie()


def check_device_map(device_map: Any) -> None:
    """Raise ``ValueError`` (one line) where ``device_map`` names a device this torch cannot use.

    Loading would otherwise stop deep inside ``from_pretrained`` (torch's own assertion,
    e.g. "Torch not compiled with CUDA enabled", which says nothing of the argument that
    asked for it), or only after calibration reaches the first weight there.  Takes what
    ``from_pretrained`` takes: a strategy string, a device, an accelerator index, or a dict
    of those per module (``"disk"`` offloads).
    """
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    for place in places:
        problem = _unusable_place(place)
        if problem is not None:
            name = str(place) if isinstance(place, torch.device) else place
            raise ValueError(
                f"device_map puts weights on {name!r}, but {problem}; use device_map='cpu' (or leave it out) "
                "or run on a machine and torch build with that device"
            )


def _unusable_place(place: Any) -> str | None:
    """Why ``place`` (one ``device_map`` value) cannot hold weights here; ``None`` if it can."""
    if place is None or (isinstance(place, str) and place in (*DEVICE_MAP_STRATEGIES, "disk")):
        return None
    if isinstance(place, int) and not isinstance(place, bool):
        kind, index = None, place  # an index into the machine's accelerators
    else:
        try:
            device = torch.device(place)
        except (RuntimeError, TypeError):
            return f"{place!r} is not a device name (e.g. 'cpu', 'cuda:0', 'disk') nor one of {DEVICE_MAP_STRATEGIES}"
        if device.type in ("cpu", "meta"):
            return None
        kind, index = device.type, device.index
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None:
        return f"this torch ({torch.__version__}) sees no accelerator"
    if kind is not None and kind != accelerator.type:
        return f"this torch's accelerator is {accelerator.type}, not {kind}"
    count = torch.accelerator.device_count()
    if index is not None and not 0 <= index < count:
        return f"this machine has {count} {accelerator.type} device(s), indices 0 to {count - 1}"
    return None


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: available RAM for the CPU (and MPS, which shares it), the
    accelerator's own count elsewhere (``torch.cuda.mem_get_info`` and its twins), 0 where none is kept.

    Asks ``device`` alone: accelerate's ``get_max_memory`` would open a context on every GPU, which
    on a rank of a multi-GPU run holds memory on the other ranks' devices.
    """
    if device.type in ("cpu", "mps"):
        import psutil

        return int(psutil.virtual_memory().available)
    mem_get_info = getattr(getattr(torch, device.type, None), "mem_get_info", None)
    return int(mem_get_info(device)[0]) if mem_get_info is not None else 0


@contextlib.contextmanager
def materialized(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Make an offloaded layer's weights real on ``device`` for the duration (no-op otherwise)."""
    from accelerate.utils import align_module_device, has_offloaded_params

    if has_offloaded_params(module):
        with align_module_device(module, device):
            yield
    else:
        yield


def module_devices(module: nn.Module) -> set[torch.device]:
    """The devices ``module``'s parameters and buffers are on."""
    return {tensor.device for tensor in itertools.chain(module.parameters(), module.buffers())}


@contextlib.contextmanager
def block_on_compute(block: nn.Module, placement: Placement) -> Iterator[None]:
    """Move an undispatched block to the compute device for the duration (accelerate moves dispatched ones)."""
    devices = module_devices(block)
    if placement.dispatched or len(devices) != 1 or devices == {placement.compute}:
        yield
        return
    original = devices.pop()
    block.to(placement.compute)
    try:
        yield
    finally:
        block.to(original)


def offloads_to_disk(module: nn.Module) -> bool:
    """True when ``module``'s weights are read from files on disk by its accelerate hook."""
    return _disk_loader(align_hook(module)) is not None


def align_hook(module: nn.Module) -> Any:
    """The module's accelerate ``AlignDevicesHook`` (also inside a ``SequentialHook``), or ``None``."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, SequentialHook):
        hook = next((h for h in hook.hooks if isinstance(h, AlignDevicesHook)), None)
    return hook if isinstance(hook, AlignDevicesHook) else None


def install_quantized_layer(
    model: nn.Module, name: str, qweight: QuantizedWeight, *, symmetric: bool, compute: torch.device
) -> nn.Module:
    """Swap layer ``name`` for a ``COMQLinear`` that lives where the old layer lived.

    An undispatched layer is simply replaced.  A dispatched one gets a new accelerate
    hook with the old hook's execution device; an offloaded one is offloaded again,
    to CPU memory or, when the old layer was read from disk, to files on disk: keeping
    quantized layers in memory would make peak memory grow with the model after all.
    For the same reason the old weight's pages are handed back when it is a view of a
    memory-mapped checkpoint (:func:`release_file_pages`).
    """
    return install_built_layer(model, name, lambda module: COMQLinear.from_quantized(module, qweight, symmetric), compute)


def install_built_layer(
    model: nn.Module, name: str, build: Callable[[nn.Module], nn.Module], compute: torch.device
) -> nn.Module:
    """:func:`install_quantized_layer` for a layer ``build(layer)`` makes (one built from the codes before, such as
    a stage's stand-in): swapped in, placed as the old one was, and the old weight's mapped pages handed back."""
    replaced = []

    def built(module: nn.Module) -> nn.Module:
        replaced.append(module.weight)  # the real weight: offloaded, it is real only while materialized
        return build(module)

    layer = swap_layer(model, name, built, compute)
    release_file_pages(replaced.pop())
    return layer


def swap_layer(
    model: nn.Module, name: str, build: Callable[[nn.Module], nn.Module], device: torch.device | None = None
) -> nn.Module:
    """Replace layer ``name`` by ``build(layer)``, the new layer living where the old one lived.

    ``build`` sees the old layer's tensors real, on ``device`` (default the CPU) if they were
    offloaded (an offloaded layer keeps them on the meta device between forwards, and a layer
    built from those would hold garbage).  An undispatched layer is simply replaced; a
    dispatched one's replacement gets a hook with its execution device, and an offloaded one's
    is offloaded again, to CPU memory or to files on disk, as the old layer was.
    """
    from accelerate.utils import has_offloaded_params

    module = model.get_submodule(name)
    hook = align_hook(module)
    offloaded = has_offloaded_params(module)
    disk = _disk_loader(hook) if offloaded else None
    with materialized(module, device or torch.device("cpu")):
        layer = build(module)
    model.set_submodule(name, layer)
    _unhook_replaced(module)
    del module
    _place_like(model, name, layer, hook, offloaded, disk)
    return layer


def install_unfused_experts(model: nn.Module, name: str, build: Callable[[nn.Module], nn.Module]) -> None:
    """Replace the batched experts module ``name`` by ``build(module)`` (its per-expert layers), placed as it was.

    An offloaded module's batched weights are brought into CPU memory one module at a
    time, split, and each per-expert layer is offloaded again the way the module was
    (to CPU memory, or to files on disk): the per-expert layers are then quantized and
    re-offloaded like any other layer, and peak memory stays about one MoE layer's
    experts.  A dispatched module kept on a device gives its per-expert layers its hook.
    """
    from accelerate.utils import has_offloaded_params

    module = model.get_submodule(name)
    hook = align_hook(module)
    offloaded = has_offloaded_params(module)
    disk = _disk_loader(hook) if offloaded else None
    with materialized(module, torch.device("cpu")) if offloaded else contextlib.nullcontext():
        unfused = build(module)
        for param in module.parameters(recurse=False):  # read from a mapped offload file: its pages would stay
            release_file_pages(param)
    model.set_submodule(name, unfused)
    _unhook_replaced(module)
    del module
    for child, layer in unfused.named_modules():
        if isinstance(layer, nn.Linear):
            _place_like(model, f"{name}.{child}", layer, hook, offloaded, disk)


def _unhook_replaced(module: nn.Module) -> None:
    """Break the reference cycle accelerate's hook makes through a module that was just replaced.

    ``add_hook_to_module`` sets the module's ``forward`` to a partial of the module itself
    and keeps its own bound forward beside it, so a replaced layer is cyclic garbage: its
    weights (on a GPU, or in CPU memory) would stay until Python's cyclic collector happens
    to run, as many layers' worth as were replaced since.  Dropping those two instance
    attributes (the class's ``forward`` is what remains) lets the layer go the moment the
    last reference does.  ``remove_hook_from_module`` would do it too, but first loads an
    offloaded layer's weights back onto their original device.
    """
    for attribute in ("forward", "_old_forward"):
        vars(module).pop(attribute, None)


def _place_like(model: nn.Module, name: str, layer: nn.Module, hook: Any, offloaded: bool, disk: Any) -> None:
    """Give the new ``layer`` at ``name`` the place of the module it replaces (``hook``: that module's
    accelerate hook): its execution device, and, when that was offloaded, CPU offload or files on disk."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    if hook is None:
        return
    if not offloaded:
        new_hook = AlignDevicesHook(execution_device=hook.execution_device, io_same_device=hook.io_same_device)
        add_hook_to_module(layer, new_hook)
        return
    layer.to("cpu")
    weights_map = None if disk is None else _offload_to_disk(model, name, layer, disk)
    new_hook = AlignDevicesHook(
        execution_device=hook.execution_device,
        offload=True,
        offload_buffers=True,
        io_same_device=hook.io_same_device,
        weights_map=weights_map,
    )
    add_hook_to_module(layer, new_hook)


def release_file_pages(tensor: torch.Tensor) -> bool:
    """Let the kernel reclaim the pages of a CPU tensor that is a view of a memory-mapped file.

    safetensors maps a checkpoint file once and hands out every tensor of it as a view
    of that one mapping, so a weight that was replaced keeps its pages mapped, and
    counted in resident memory, for as long as any other tensor of the same file is
    alive: to the end of calibration, which defeats a ``max_memory`` budget.
    ``MADV_PAGEOUT`` never changes what the memory holds (a page still read is faulted
    back in from the file), so this is safe even where the tensor is shared.  Only
    whole pages inside the tensor are advised (its neighbours in the file may share the
    edge pages), and only file-backed ones: anonymous memory is freed with the tensor,
    and paging it out would write it to swap.  Pages of a file written moments ago are
    reclaimed once the kernel has written them back.  The kernel pages out no page that
    another process maps too (the ranks of a data-parallel run on one machine map the
    same checkpoint), so those are then unmapped from this process alone
    (:func:`_reclaim`).  Returns whether any pages were advised;
    ``False`` off Linux, on kernels without the advice, and for any other tensor.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or not sys.platform.startswith("linux"):
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first or not _file_backed(first, last):
        return False
    return _reclaim(first, last)


def release_file_mappings(tensors: Iterable[torch.Tensor], keep: Iterable[torch.Tensor] = ()) -> int:
    """Let the kernel reclaim every page of the file mappings that hold any of ``tensors``, except ``keep``'s.

    :func:`release_file_pages` reaches only the pages of live tensors, but loading a
    checkpoint under a ``device_map`` leaves pages mapped around the boundary of every
    weight, also of the weights it offloads to disk (a read near the boundary, and the
    kernel maps the pages around each fault, 64 KiB by default), and afterwards no
    tensor points at those pages: they stay resident for as long as the mapping lives,
    that is for as long as any weight of the file does.  Advising the whole mapping
    reaches them.  ``keep`` are weights still to be read (blocks whose turn has not
    come): their pages, including the ones whose edges they share with a neighbour, are
    left alone, so they are not read from the file twice.  Returns the number of bytes
    advised; 0 off Linux.
    """
    if not sys.platform.startswith("linux"):
        return 0
    mappings = _file_mappings()
    lows = [low for low, _ in mappings]
    held = {span for tensor in tensors if (span := _mapping_holding(tensor, mappings, lows)) is not None}
    kept = sorted(_page_span(tensor) for tensor in keep if _is_cpu_data(tensor))
    advised = 0
    for low, high in sorted(held):
        for start, end in _uncovered(low, high, kept):
            if _reclaim(start, end):
                advised += end - start
    return advised


def _reclaim(start: int, end: int) -> bool:
    """Page out the file pages of ``[start, end)`` (page-aligned), and unmap from this process those the kernel
    kept because another process maps them too; returns whether the page-out advice was taken.

    ``MADV_DONTNEED`` on a page of the file only drops this process's mapping of it (the
    page stays in the page cache, where the other process reads it, and a later read here
    maps it again); on a page this process wrote to in a private mapping it would discard
    the writes, so only pages still the file's own are unmapped (:func:`_file_page_runs`).
    """
    libc = _libc()
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT) != 0:
        return False
    for low, high in _file_page_runs(start, end):
        libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), mmap.MADV_DONTNEED)
    return True


def _file_page_runs(start: int, end: int) -> list[tuple[int, int]]:
    """The runs of pages of ``[start, end)`` (page-aligned) that are mapped in and are pages of the file itself
    (``/proc/self/pagemap``); none where it cannot be read."""
    count = (end - start) // mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(start // mmap.PAGESIZE * 8)
            entries = pagemap.read(count * 8)
    except OSError:
        return []
    if len(entries) != count * 8:
        return []
    flags = torch.frombuffer(bytearray(entries), dtype=torch.int64)
    wanted = (flags < 0) & (flags & PAGEMAP_FILE_PAGE != 0)
    edges = torch.diff(wanted.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8), append=torch.zeros(1, dtype=torch.int8))
    starts, ends = torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()
    return [(start + low * mmap.PAGESIZE, start + high * mmap.PAGESIZE) for low, high in zip(starts, ends)]


def _file_mappings() -> list[tuple[int, int]]:
    """This process's file mappings as ``[low, high)`` address ranges, ascending (``/proc/self/maps``, inode not 0)."""
    spans = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[4] != "0":
                    low, high = (int(bound, 16) for bound in fields[0].split("-"))
                    spans.append((low, high))
    except OSError:
        return []
    return sorted(spans)


def _mapping_holding(
    tensor: torch.Tensor, mappings: list[tuple[int, int]], lows: list[int]
) -> tuple[int, int] | None:
    """The file mapping (of :func:`_file_mappings`; ``lows`` their starts) that holds ``tensor``'s first byte."""
    if not _is_cpu_data(tensor):
        return None
    at = bisect.bisect_right(lows, tensor.data_ptr()) - 1
    if at < 0 or tensor.data_ptr() >= mappings[at][1]:
        return None
    return mappings[at]


def _is_cpu_data(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.numel() > 0


def _page_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The pages ``tensor``'s elements lie on, edge pages included: ``[first, end)`` on page boundaries."""
    start = tensor.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    end = start + (last + 1) * tensor.element_size()
    return start // mmap.PAGESIZE * mmap.PAGESIZE, -(-end // mmap.PAGESIZE) * mmap.PAGESIZE


def _uncovered(low: int, high: int, covered: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The parts of ``[low, high)`` outside every span of ``covered`` (sorted by start)."""
    for start, end in covered:
        if end <= low or start >= high:
            continue
        if start > low:
            yield low, start
        low = max(low, end)
    if low < high:
        yield low, high


def _file_backed(start: int, end: int) -> bool:
    """True when ``[start, end)`` lies inside one mapping of a file (``/proc/self/maps``, inode not 0)."""
    return any(low <= start and end <= high for low, high in _file_mappings())


def trim_heap() -> bool:
    """Give the free pages inside the C library's heap back to the kernel (glibc's ``malloc_trim(0)``).

    A block-by-block run frees and makes many small buffers per block (hooks, zero
    points, shape-sized tensors); glibc keeps freed memory in its arenas and on its
    own returns only the top of the heap, so without this resident memory creeps up
    block after block although nothing the run holds grows.  Returns ``False`` where
    there is no ``malloc_trim`` (not Linux, or not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def _disk_loader(hook: Any) -> Any:
    """The ``OffloadedWeightsLoader`` behind a hook that reads weights from disk, else ``None``."""
    if hook is None or not hook.offload or hook.weights_map is None:
        return None
    loader = getattr(hook.weights_map, "dataset", hook.weights_map)
    return loader if getattr(loader, "index", None) else None


def _offload_to_disk(model: nn.Module, name: str, layer: nn.Module, loader: Any) -> Any:
    """Write ``layer``'s tensors as accelerate offload files and return the mapping that reads them back."""
    from accelerate.utils import OffloadedWeightsLoader, offload_state_dict

    folder = os.path.join(_quantized_offload_folder(model, loader), name)
    offload_state_dict(folder, {key: value.detach() for key, value in layer.state_dict().items()})
    return OffloadedWeightsLoader(save_folder=folder)


def _quantized_offload_folder(model: nn.Module, loader: Any) -> str:
    """One folder per model for its quantized offloaded layers: inside the offload folder, else a temporary one.

    A temporary folder lives as long as the model object (the layers are read from it
    until the model is saved or dropped).
    """
    existing = getattr(model, "_comq_offload_folder", None)
    if existing is not None and os.path.isdir(existing):
        return existing
    base = getattr(loader, "save_folder", None)
    if base is not None and os.path.isdir(base) and os.access(base, os.W_OK):
        folder = tempfile.mkdtemp(prefix=f"{OFFLOAD_SUBFOLDER}-", dir=base)
    else:
        folder = tempfile.mkdtemp(prefix=f"hf-{OFFLOAD_SUBFOLDER}-")
        if base is not None:  # the user chose where offloaded weights go: say that these go elsewhere
            logger.warning(
                "the offload folder %s is not a writable folder, so the quantized offloaded layers go to %s "
                "(the system's temporary folder); make %s a writable folder to keep them there",
                base, folder, base,
            )
    weakref.finalize(model, shutil.rmtree, folder, ignore_errors=True)
    model._comq_offload_folder = folder
    return folder
