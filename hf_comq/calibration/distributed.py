"""Data-parallel calibration over ``torch.distributed``: what every rank must agree on and exchange.

COMQ needs each layer's Gram matrix ``H = X^T X``, a plain sum over calibration
samples.  Under an initialised process group (``torchrun --nproc-per-node N``, gloo on
CPU, NCCL on GPU) every rank therefore runs the model on its own share of the
calibration *batches* (rank ``r`` takes batches ``r, r + N, ...``, so each batch, its
padding included, is exactly the batch a single process would run), the per-rank sums
are all-reduced, and each layer is solved once, by one rank (the layers of a step are
spread over the ranks by size, :func:`balanced_owners`), whose result every rank
installs; each rank then computes the next block's inputs for its own batches.  A
layer that would keep the others waiting (a step of one layer) is solved by every rank
together instead, a share of its rows each (:class:`hf_comq.solver.shares.RowShare`),
and the shares are gathered (:func:`gather_row_shares`).
Without a process group everything here is a no-op and calibration runs as a single
process.

Sums are accumulated in float64 (:class:`hf_comq.HessianAccumulator`); an all-reduce only
changes the order in which the batches' float64 contributions are added, which the
solver's float32 copy of ``H`` rounds away, so in practice the codes are those of a
single process on the same samples (the tests compare them).  A layer solved in shares
has those codes too; its objective, and the scales a refit makes, can differ from one
process's in the last float32 bits (per-row sums over blocks of another width).

A rank that fails, or settings that differ between ranks, must not leave the others
waiting or a checkpoint half-written: collectives raise :class:`CalibrationGroupError`,
one line naming the cause, on every rank that notices.

Usage, one process per rank (``torchrun --nproc-per-node 2 quantize.py``)::

    from hf_comq.calibration import join_launcher_group
    join_launcher_group()  # gloo on CPUs, NCCL with one GPU per rank; no-op without torchrun
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=COMQConfig(dataset=...))
    model.save_pretrained(out)  # rank 0 writes the checkpoint
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..solver import HessianAccumulator, QuantizedWeight, TargetProductAccumulator, joined_shares
from .hooks import HessianRecorder


class CalibrationGroupError(RuntimeError):
    """The ranks of a data-parallel calibration cannot go on together."""


@dataclass(frozen=True)
class Group:
    """This process's place in the calibration: rank ``rank`` of ``size`` (``size == 1``: no process group)."""

    rank: int = 0
    size: int = 1

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_group() -> Group:
    """The group of an initialised ``torch.distributed`` default process group, else a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return Group()
    return Group(torch.distributed.get_rank(), torch.distributed.get_world_size())


def join_launcher_group(timeout_s: float = 1800.0, backend: str | None = None) -> Group:
    """Join the process group a launcher (``torchrun``) describes in the environment; else a single process.

    ``backend=None``: NCCL (each rank on GPU ``LOCAL_RANK``) when CUDA is available,
    gloo otherwise; ``"gloo"`` runs CPU ranks on a machine with GPUs too.
    ``timeout_s`` bounds how long a rank waits for the others at each collective: long
    enough for the slowest layer solve, short enough that a hung peer is reported.
    Prefer it to calling ``init_process_group`` yourself: it first makes sure torch
    cannot keep the group alive past :func:`leave_launcher_group`.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return current_group()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Group()
    _import_world_defaults_before_the_group_exists()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current_group()


def _import_world_defaults_before_the_group_exists() -> None:
    """Import ``torch.distributed.nn.functional`` while no process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated when the
    module is first imported, and transformers imports it (through torch's sharded-tensor
    code) while loading a model.  Imported after the group is created, those defaults keep
    the group alive past ``destroy_process_group``; its gloo threads then outlive the
    Python code and now and then abort the rank at interpreter exit ("terminate called
    without an active exception", exit code -6) although its work succeeded.  Imported
    first, the defaults are ``None``, which torch reads as the default group.
    """
    import torch.distributed.nn.functional  # noqa: F401


def leave_launcher_group() -> None:
    """Destroy the default process group once this rank's work is done; nothing without one.

    A rank that exits with its gloo group still alive can abort in the group's teardown
    at interpreter exit ("terminate called without an active exception", exit code -6)
    while a peer is still finishing, which fails a run that wrote its checkpoint.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_saving_rank(is_main_process: bool = True) -> bool:
    """Whether this process writes checkpoint files: ``is_main_process``, and rank 0 of a process group.

    transformers' ``save_pretrained`` applies the same rule to the files it writes;
    whatever is written or uploaded around it (model card, staging folder, Hub upload)
    must follow it too, or the other ranks leave half a checkpoint next to rank 0's.
    """
    return is_main_process and current_group().is_main


def agree_on(group: Group, settings: str, what: str = "calibration settings") -> None:
    """Fail on every rank unless all ranks pass the same ``settings`` (a canonical string; a JSON
    object's differing top-level keys are named in the message)."""
    if not group.is_parallel:
        return
    everyone: list[Any] = [None] * group.size
    _collective(group, "compare the ranks' settings", torch.distributed.all_gather_object, everyone, settings)
    differing = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
    if differing:
        keys = _differing_keys(everyone[0], everyone[differing[0]])
        named = f" in {', '.join(keys)}" if keys else ""
        raise CalibrationGroupError(
            f"rank {group.rank}: the ranks were started with different {what} (ranks {differing} differ from rank 0"
            f"{named}); start every rank with the same model, COMQConfig and calibration data"
        )


def agree_on_values(group: Group, digests: Mapping[str, str], what: str = "weights") -> None:
    """Fail on every rank unless the tensors that ranks both hold have the same digests (name -> digest).

    Only names held by both ranks are compared: a tensor one rank offloaded to disk and another
    keeps in memory is digested by the one that holds it, so placement alone is no difference."""
    if not group.is_parallel:
        return
    everyone: list[Any] = [None] * group.size
    _collective(group, f"compare the ranks' {what}", torch.distributed.all_gather_object, everyone, dict(digests))
    first = everyone[0]
    differing = {
        rank: names for rank, other in enumerate(everyone)
        if (names := [name for name, digest in other.items() if name in first and first[name] != digest])
    }  # fmt: skip
    if differing:
        rank, names = next(iter(differing.items()))
        raise CalibrationGroupError(
            f"rank {group.rank}: the ranks loaded different {what} (ranks {sorted(differing)} differ from rank 0, "
            f"e.g. rank {rank} in {', '.join(names[:3])}); start every rank with the same model, COMQConfig and "
            "calibration data"
        )


def _differing_keys(first: str, second: str) -> list[str]:
    """The keys whose values differ between two JSON objects, down to the setting (``settings.bits``,
    not ``settings``); none when either is not an object."""
    try:
        mine, theirs = json.loads(first), json.loads(second)
    except ValueError:
        return []
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        return []
    return _differing_paths(mine, theirs, "")


def _differing_paths(mine: dict, theirs: dict, prefix: str) -> list[str]:
    """Dotted paths (under ``prefix``) of the values that differ, descending where both sides nest."""
    paths = []
    for key in sorted(mine.keys() | theirs.keys()):
        one, other = mine.get(key), theirs.get(key)
        if one == other:
            continue
        if isinstance(one, dict) and isinstance(other, dict):
            paths.extend(_differing_paths(one, other, f"{prefix}{key}."))
        else:
            paths.append(f"{prefix}{key}")
    return paths


def first_failure(group: Group, message: str | None) -> tuple[int, str] | None:
    """``(rank, message)`` of the lowest rank whose step failed (``message`` is this rank's, ``None`` if it
    succeeded), the same on every rank, so that all of them stop together with the same one line
    instead of the healthy ones waiting at their next collective for a peer that has given up."""
    if not group.is_parallel:
        return None if message is None else (group.rank, message)
    messages: list[Any] = [None] * group.size
    _collective(group, "share whether a step succeeded", torch.distributed.all_gather_object, messages, message)
    return next(((rank, text) for rank, text in enumerate(messages) if text is not None), None)


def agree_on_shared_inputs(group: Group, recorder: HessianRecorder) -> None:
    """Make every rank's recorder group its layers by shared input the same way, before their sums are reduced.

    A rank that ran no batch found no sharing; it takes what the others found.
    """
    if not group.is_parallel:
        return
    found: list[Any] = [None] * group.size
    purpose = "agree which layers share an input"
    _collective(group, purpose, torch.distributed.all_gather_object, found, recorder.shared_inputs())
    recorder.adopt_shared_inputs({name: owner for owners in found for name, owner in owners.items()})


def agree_on_stages(group: Group, stages: list[list[str]] | None) -> list[list[str]]:
    """The stages of a block (``true_sequential``) as the lowest rank that ran a batch found them, on every rank.

    Each rank finds them on its own first batch; a rank without batches found none
    (``None``).  Taking one rank's keeps every rank's per-stage collectives paired.
    """
    if not group.is_parallel:
        if stages is None:
            raise ValueError("no calibration batch reached this block, so its layers' stages are unknown")
        return stages
    found: list[Any] = [None] * group.size
    _collective(group, "agree on the stages of a block", torch.distributed.all_gather_object, found, stages)
    first = next((stages for stages in found if stages is not None), None)
    if first is None:
        raise ValueError("no calibration batch reached this block on any rank, so its layers' stages are unknown")
    return first


REDUCE_BUCKET_BYTES = 16 * 1024 * 1024
"""Largest buffer into which :func:`all_reduce_hessians` packs small sums for one all-reduce.  Every
collective costs a fixed delay (on loopback gloo about what moving a MiB costs), and a stage's
sums are many row panels of its Gram matrices: packed, they move at the link's speed.  Larger
sums are reduced in place, on their own, so the buffer bounds what packing adds to memory."""


def all_reduce_hessians(group: Group, accumulators: Sequence[HessianAccumulator | TargetProductAccumulator]) -> None:
    """Sum every rank's Gram matrices (and target products) and token counts in place, so each rank holds the totals."""
    if not group.is_parallel or not accumulators:
        return
    parts = [part for accumulator in accumulators for part in accumulator.partial_sums()]
    tokens = torch.tensor([accumulator.num_tokens for accumulator in accumulators], dtype=torch.float64,
                          device=parts[0].device if parts else _collective_device())  # fmt: skip
    for bucket in _buckets([*parts, tokens], REDUCE_BUCKET_BYTES):
        _all_reduce_packed(group, bucket, "sum the Gram matrices and token counts")
    for accumulator, count in zip(accumulators, tokens.tolist()):
        accumulator.num_tokens = int(count)


def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """``tensors`` in order, cut into runs of one dtype and device of at most ``limit`` bytes in all
    (a tensor of that size or more is a run of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        last = buckets[-1] if buckets else None
        if last is None or (last[0].dtype, last[0].device) != (tensor.dtype, tensor.device) or size + nbytes > limit:
            buckets.append([tensor])
            size = nbytes
        else:
            last.append(tensor)
            size += nbytes
    return buckets


def _all_reduce_packed(group: Group, tensors: list[torch.Tensor], purpose: str) -> None:
    """Sum ``tensors`` over the ranks in place: one alone as it is, several through one packed buffer;
    ``purpose`` names the sum in the line a failed collective raises."""
    if len(tensors) == 1:
        _collective(group, purpose, torch.distributed.all_reduce, tensors[0])
        return
    packed = torch.cat([tensor.reshape(-1) for tensor in tensors])
    _collective(group, purpose, torch.distributed.all_reduce, packed)
    start = 0
    for tensor in tensors:
        tensor.copy_(packed[start : start + tensor.numel()].view_as(tensor))
        start += tensor.numel()


def sum_over_ranks(group: Group, values: Sequence[float], purpose: str = "sum counts") -> list[float]:
    """Element-wise sums of ``values`` over all ranks (counts of batches, tokens, flags; a shared layer's objective);
    ``purpose`` names the sum in the line a failed collective raises."""
    if not group.is_parallel:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    _collective(group, purpose, torch.distributed.all_reduce, tensor)
    return tensor.tolist()


def balanced_owners(costs: Sequence[float], size: int, shareable: Sequence[bool] | None = None) -> list[int | None]:
    """The rank that solves each of a step's layers: the longest first, each to the least loaded rank;
    ``None`` for a layer that every rank solves part of, a share of its rows each (:class:`~hf_comq.solver.shares.RowShare`).

    A layer that costs more than an equal share of the step's work, and whose rows can be
    shared (``shareable``), is shared: given whole to one rank, it would keep the others
    waiting (a step of one layer, such as an attention output or an MLP down projection).
    Depends only on ``costs`` (from layer shapes, equal on every rank), so every rank
    computes the same assignment without talking.  Round robin in layer order would
    give one rank all the wide MLP layers of a block whenever their count is even.
    """
    shareable = [False] * len(costs) if shareable is None or size < 2 else list(shareable)
    fair = sum(costs) / size
    owners: list[int | None] = [None] * len(costs)
    loads = [0.0] * size
    for index, cost in enumerate(costs):
        if shareable[index] and cost > fair:
            loads = [load + cost / size for load in loads]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        if shareable[index] and costs[index] > fair:
            continue
        rank = min(range(size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def gather_row_shares(
    group: Group, solved: dict[str, QuantizedWeight], rows_of: Callable[[str, int], list[slice]]
) -> dict[str, QuantizedWeight]:
    """Every rank's copy of every layer whose rows the ranks solved in shares (``solved``: this rank's share of each,
    the same names on every rank, its rows ``rows_of(name, rank)`` of the layer's, in that order).

    Each rank broadcasts its share's codes, scales and zero points in turn; the layer's ``stats`` are
    every rank's already (a share's are the whole layer's).
    """
    whole: dict[str, QuantizedWeight] = {}
    if not solved:
        return whole
    device = _collective_device()
    for name in sorted(solved):
        mine = solved[name]
        rows_by_rank = [rows_of(name, rank) for rank in range(group.size)]
        shares = []
        for rank, rows in enumerate(rows_by_rank):
            count = sum(span.stop - span.start for span in rows)
            template = mine if rank == group.rank else dataclasses.replace(mine, **{
                field: torch.empty((count, *table.shape[1:]), dtype=table.dtype, device=device)
                for field, table in _tables(mine).items()
            })  # fmt: skip
            shares.append(_broadcast_tables(group, template, rank, "share a layer solved in shares"))
        whole[name] = joined_shares(shares, rows_by_rank)
    return whole


def share_solutions(
    group: Group, solved: dict[str, QuantizedWeight], owners: dict[str, int]
) -> dict[str, QuantizedWeight]:
    """Every rank's copy of every layer of a step, each solved by its owner (``solved`` holds this rank's share).

    The owner first broadcasts the layer's shapes and grid (so receivers need no
    template), then the tensors; layers go in ``owners``' order on every rank.
    Receivers allocate on the process group's device (a GPU for NCCL, which moves only GPU tensors).
    """
    if not group.is_parallel:
        return dict(solved)
    shared: dict[str, QuantizedWeight] = {}
    device = _collective_device()
    for name, owner in owners.items():
        mine = solved.get(name) if group.rank == owner else None
        header = [_header(mine) if mine is not None else None]
        _collective(group, "share a solved layer's shape", torch.distributed.broadcast_object_list, header, src=owner)
        shapes = header[0]
        template = mine if mine is not None else QuantizedWeight(
            codes=torch.empty(shapes["codes"], dtype=shapes["codes_dtype"], device=device),
            scale=torch.empty(shapes["scale"], dtype=shapes["scale_dtype"], device=device),
            zero_point=torch.empty(shapes["zero_point"], dtype=shapes["zero_point_dtype"], device=device),
            bits=shapes["bits"], group_size=shapes["group_size"], dtype=shapes["dtype"],
        )  # fmt: skip
        shared[name] = dataclasses.replace(
            _broadcast_tables(group, template, owner, "share a solved layer"), stats=shapes["stats"]
        )
    return shared


def _tables(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A solution's tensors, by field: what ranks send each other of it."""
    return {"codes": qweight.codes, "scale": qweight.scale, "zero_point": qweight.zero_point}


def _broadcast_tables(group: Group, template: QuantizedWeight, src: int, purpose: str) -> QuantizedWeight:
    """``template`` with rank ``src``'s codes, scales and zero points (on the other ranks, ``template``'s tensors
    only give the shapes received into), on the process group's device."""
    device = _collective_device()
    tables = {field: table.to(device).contiguous() for field, table in _tables(template).items()}
    for table in tables.values():
        _collective(group, purpose, torch.distributed.broadcast, table, src=src)
    return dataclasses.replace(template, **tables)


def _header(qweight: QuantizedWeight) -> dict[str, Any]:
    return {
        "codes": tuple(qweight.codes.shape), "scale": tuple(qweight.scale.shape),
        "zero_point": tuple(qweight.zero_point.shape), "codes_dtype": qweight.codes.dtype,
        "scale_dtype": qweight.scale.dtype,
        "zero_point_dtype": qweight.zero_point.dtype, "bits": qweight.bits, "group_size": qweight.group_size,
        "dtype": qweight.dtype, "stats": qweight.stats,
    }  # fmt: skip


def _collective_device() -> torch.device:
    """Where collective buffers must live: the current GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(group: Group, purpose: str, operation: Any, *args: Any, **kwargs: Any) -> None:
    """Run one collective; a peer that died or a broken connection becomes one line on this rank."""
    try:
        operation(*args, **kwargs)
    except Exception as error:  # gloo/NCCL raise RuntimeError subclasses with multi-line reports
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise CalibrationGroupError(
            f"rank {group.rank}: could not {purpose} with the other ranks, one of them failed or left ({reason}); "
            "nothing was saved"
        ) from error
