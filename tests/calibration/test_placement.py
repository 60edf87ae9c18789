"""Placement: a model offloaded to disk by ``from_pretrained`` quantizes into the in-memory checkpoint,
and replaced weights read from a mapped checkpoint leave resident memory."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from hf_comq import COMQConfig, calibration_summary
from hf_comq.calibration.placement import (
    check_device_map,
    free_memory,
    offloads_to_disk,
    release_file_mappings,
    release_file_pages,
    swap_layer,
)
from hf_comq.calibration.sequential import check_finite_weights
from hf_comq.nn import COMQLinear

from tests.tiny import sentences, tiny_model, word_tokenizer


BLOCK_0_IN_MEMORY_BLOCK_1_ON_DISK = {
    "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
    "model.rotary_emb": "cpu", "lm_head": "cpu",
}  # fmt: skip
"""A two-block Llama's device map: block 0 kept in CPU memory, block 1 offloaded to disk."""


def _config(bits: int = 4, fp_target: bool | None = None) -> COMQConfig:
    return COMQConfig(
        dataset=sentences(8), processor=word_tokenizer(), num_samples=8, batch_size=4, group_size=16, bits=bits,
        fp_target=fp_target,
    )


def _saved(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors, json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("fp_target", [None, False], ids=["aimed", "plain"])  # None: the default aims, a second stream
def test_disk_offloaded_from_pretrained_saves_the_in_memory_checkpoint(tmp_path, fp_target):
    checkpoint = tmp_path / "llama"
    tiny_model("llama").save_pretrained(checkpoint)
    in_memory = T.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=_config(fp_target=fp_target))
    in_memory.save_pretrained(tmp_path / "memory")

    device_map = BLOCK_0_IN_MEMORY_BLOCK_1_ON_DISK
    offloaded = T.AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=_config(fp_target=fp_target), device_map=device_map,
        offload_folder=str(tmp_path / "offload"),
    )
    assert calibration_summary(offloaded)["fp_target"] is (fp_target is None)
    layer = offloaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, COMQLinear) and offloads_to_disk(layer) and layer.weight_packed.device.type == "meta"
    assert not offloads_to_disk(offloaded.model.layers[0].mlp.down_proj)
    offloaded.save_pretrained(tmp_path / "disk")

    (expected, expected_config), (got, got_config) = _saved(tmp_path / "memory"), _saved(tmp_path / "disk")
    assert sorted(got) == sorted(expected)
    assert "model.layers.1.mlp.down_proj.weight_packed" in got
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert got_config == expected_config
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("budget", [True, False], ids=["device-map", "in-memory"])
def test_under_a_device_map_a_down_projections_target_product_is_handed_over_before_its_gram_sum_begins(
    tmp_path, monkeypatch, budget
):
    """The two largest sums of an aimed run never side by side under a memory budget (one more pass); the
    checkpoint is the in-memory one all the same (test_disk_offloaded_from_pretrained_saves_the_in_memory_checkpoint)."""
    from hf_comq.solver import hessian

    summing: list[hessian.TargetProductAccumulator] = []  # products that took a batch and were not handed over yet
    beside: list[bool] = []  # per batch a down projection's Gram sum took: whether such a product was alive
    add_product, hand_over, add_gram = (
        hessian.TargetProductAccumulator.add, hessian.TargetProductAccumulator.result, hessian.HessianAccumulator.add
    )

    def product_added(self, *args, **kwargs):
        if self not in summing:
            summing.append(self)
        return add_product(self, *args, **kwargs)

    def handed_over(self, *args, **kwargs):
        if self in summing:
            summing.remove(self)
        return hand_over(self, *args, **kwargs)

    def gram_added(self, *args, **kwargs):
        if self.in_features == model_config.intermediate_size:
            beside.append(bool(summing))
        return add_gram(self, *args, **kwargs)

    monkeypatch.setattr(hessian.TargetProductAccumulator, "add", product_added)
    monkeypatch.setattr(hessian.TargetProductAccumulator, "result", handed_over)
    monkeypatch.setattr(hessian.HessianAccumulator, "add", gram_added)
    checkpoint = tmp_path / "llama"
    tiny = tiny_model("llama")
    model_config = tiny.config
    tiny.save_pretrained(checkpoint)
    device_map = BLOCK_0_IN_MEMORY_BLOCK_1_ON_DISK
    placement = dict(device_map=device_map, offload_folder=str(tmp_path / "offload")) if budget else {}
    model = T.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=_config(), **placement)
    assert calibration_summary(model)["fp_target"] and isinstance(model.model.layers[1].mlp.down_proj, COMQLinear)
    assert beside  # down projections' Gram sums were taken
    assert not any(beside) if budget else all(beside)


def test_dequantize_of_a_disk_offloaded_model_gives_the_in_memory_dense_model(tmp_path):
    """An offloaded packed layer keeps its tensors on the meta device between forwards: a dense
    layer built from those held uninitialised memory, and its hook was dropped with it."""
    checkpoint = tmp_path / "llama"
    tiny_model("llama").save_pretrained(checkpoint)
    in_memory = T.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=_config())
    device_map = BLOCK_0_IN_MEMORY_BLOCK_1_ON_DISK
    offloaded = T.AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=_config(), device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    in_memory.dequantize()
    offloaded.dequantize()
    layer = offloaded.model.layers[1].mlp.down_proj
    assert type(layer) is torch.nn.Linear and offloads_to_disk(layer)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits, rtol=0, atol=0)


def test_a_disk_offloaded_model_with_tied_embeddings_saves_them_once_as_in_memory(tmp_path):
    """accelerate's hooks swap an offloaded module's parameters as the forward passes: after calibration
    lm_head and the embedding were two tensors, and the save wrote a full-precision copy of the embedding."""
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True)
                       ).save_pretrained(tmp_path / "fp")  # fmt: skip
    in_memory = T.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=_config())
    in_memory.save_pretrained(tmp_path / "memory")
    offloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=_config(),
                                                       device_map={"": "disk"}, offload_folder=str(tmp_path / "offload"))  # fmt: skip
    assert offloaded.lm_head.weight is offloaded.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():  # a forward before the save splits them again; the save ties them back
        torch.testing.assert_close(offloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits, rtol=0, atol=0)
    offloaded.save_pretrained(tmp_path / "disk")
    (expected, _), (got, _) = _saved(tmp_path / "memory"), _saved(tmp_path / "disk")
    assert sorted(got) == sorted(expected) and "lm_head.weight" not in got


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self are Linux's")


def _resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def _skip_on_memory_file_system(path: Path) -> None:
    """A file on tmpfs lives in memory itself: its pages cannot leave resident memory without swap."""
    path = path.resolve()
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    point, kind = max(((m[1], m[2]) for m in mounts if path.is_relative_to(m[1])), key=lambda m: len(m[0]))
    if kind in ("tmpfs", "ramfs"):
        pytest.skip(f"{point} is {kind}")


def _write_back(path: Path) -> None:
    """Flush a just-written file: the kernel reclaims clean pages at once, dirty ones only after writeback.

    A checkpoint being quantized was usually written long before; a test's was not.
    """
    with open(path, "rb") as file:
        os.fsync(file.fileno())


@linux_only
def test_release_file_pages_drops_a_mapped_tensor_from_resident_memory_and_keeps_its_values(tmp_path):
    _skip_on_memory_file_system(tmp_path)
    file = tmp_path / "weights.safetensors"
    save_file({"weight": torch.randn(2048, 1024), "bias": torch.randn(1024)}, file)
    _write_back(file)
    tensors = load_file(file)  # views of one mapping of the file
    weight = tensors["weight"]
    expected = weight.clone()
    assert float(weight.sum()) == float(expected.sum())  # every page read in
    before = _resident_kib(file.resolve())
    assert before >= 8 * 1024 - 8

    assert release_file_pages(weight)
    assert before - _resident_kib(file.resolve()) >= 8 * 1024 - 8
    assert torch.equal(weight, expected)  # faulted back in from the file


MAP_AND_WAIT = """
import sys
from safetensors.torch import load_file
tensors = load_file(sys.argv[1])
assert all(bool(tensor.isfinite().all()) for tensor in tensors.values())  # every page read in: mapped here too
print("mapped", flush=True)
sys.stdin.read()
"""


@linux_only
def test_release_file_pages_drops_pages_another_process_maps_too_from_this_ones_resident_memory(tmp_path):
    """The kernel pages out no page another process maps (ranks on one machine map one checkpoint): those
    pages leave this process's resident memory all the same, and read again they hold the file's values."""
    _skip_on_memory_file_system(tmp_path)
    file = tmp_path / "weights.safetensors"
    save_file({"weight": torch.randn(2048, 1024)}, file)
    _write_back(file)
    other = subprocess.Popen([sys.executable, "-c", MAP_AND_WAIT, str(file)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        weight = load_file(file)["weight"]
        assert other.stdout.readline() == "mapped\n"
        expected = weight.clone()
        before = _resident_kib(file.resolve())
        assert before >= 8 * 1024 - 8
        assert release_file_pages(weight)
        assert before - _resident_kib(file.resolve()) >= 8 * 1024 - 8
        assert torch.equal(weight, expected)
    finally:
        other.communicate("")


@linux_only
def test_release_file_pages_keeps_what_this_process_wrote_into_a_mapped_tensor(tmp_path):
    """A page written to in the checkpoint's private mapping is a copy of this process's own: releasing the
    tensor's pages must not hand it back to the file's values."""
    file = tmp_path / "weights.safetensors"
    save_file({"weight": torch.randn(2048, 1024)}, file)
    _write_back(file)
    weight = load_file(file)["weight"]
    float(weight.sum())
    weight[100:200] = 5.0  # a few pages become this process's copies
    expected = weight.clone()
    release_file_pages(weight)
    assert torch.equal(weight, expected)


def test_release_file_pages_leaves_memory_that_is_not_a_file_alone():
    assert not release_file_pages(torch.randn(2048, 1024))  # anonymous: freed with the tensor, never paged out
    assert not release_file_pages(torch.randn(8))  # no whole page inside
    assert not release_file_pages(torch.randn(1024, 2048).t())  # not one contiguous range
    assert not release_file_pages(torch.empty(2048, 1024, device="meta"))


@linux_only
def test_release_file_mappings_drops_the_whole_mapping_but_the_kept_tensors(tmp_path):
    _skip_on_memory_file_system(tmp_path)
    file = tmp_path / "weights.safetensors"
    save_file({"a": torch.randn(1024, 1024), "b": torch.randn(1024, 1024), "c": torch.randn(1024, 1024)}, file)
    _write_back(file)
    tensors = load_file(file)  # views of one mapping of the file
    expected = {name: tensor.clone() for name, tensor in tensors.items()}
    assert sum(float(tensor.sum()) for tensor in tensors.values()) != 0.0  # every page read in
    assert _resident_kib(file.resolve()) >= 12 * 1024 - 12

    # handed only "a", it reaches "c" too, which no tensor it was given points at; "b" is kept
    assert release_file_mappings([tensors["a"]], keep=[tensors["b"]]) > 0
    resident = _resident_kib(file.resolve())
    assert 4 * 1024 - 4 <= resident <= 4 * 1024 + 8  # b's pages, and the two it shares with its neighbours
    for name, tensor in tensors.items():
        assert torch.equal(tensor, expected[name])  # faulted back in from the file


def test_release_file_mappings_leaves_memory_that_is_not_a_file_alone():
    assert release_file_mappings([torch.randn(2048, 1024), torch.empty(8, device="meta")]) == 0


def _mapped_llama(folder: Path, vocab_size: int = 64, layers: int = 2) -> Path:
    """A Llama checkpoint, written back to disk; returns the file.  At the default vocabulary
    the file is mostly linear weights."""
    _skip_on_memory_file_system(folder.parent)
    config = T.LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    T.LlamaForCausalLM(config).save_pretrained(folder)
    file = (folder / "model.safetensors").resolve()
    _write_back(file)
    return file


@linux_only
def test_the_finite_weight_check_of_a_dispatched_model_leaves_its_weights_unmapped(tmp_path):
    file = _mapped_llama(tmp_path / "llama")
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", device_map={"": "cpu"})
    layers = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    layers.pop("lm_head")
    linear_bytes = sum(module.weight.numel() * 4 for module in layers.values())

    check_finite_weights(layers, torch.device("cpu"))
    assert _resident_kib(file) * 1024 >= linear_bytes  # read, and kept

    check_finite_weights(layers, torch.device("cpu"), release_pages=True)
    assert _resident_kib(file) * 1024 <= file.stat().st_size - linear_bytes + 64 * 4096
    ids = torch.randint(0, 64, (1, 5))
    reference = T.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    with torch.no_grad():  # the weights read back from the file are the same
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


@linux_only
def test_the_ranks_digests_of_a_dispatched_models_parameters_leave_them_unmapped(tmp_path):
    """Ranks compare a few hundred values of every parameter held in memory; read from a mapped checkpoint,
    those would map in most of the file (the kernel maps a faulting page's neighbours), embeddings included,
    and keep it resident to the end of calibration."""
    from hf_comq.calibration.sequential import _resident_parameter_digests

    file = _mapped_llama(tmp_path / "llama", vocab_size=4096)  # embeddings and lm_head 2 MiB each
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", device_map={"": "cpu"})
    kept = _resident_parameter_digests(model)
    assert _resident_kib(file) * 1024 >= file.stat().st_size // 2  # read, and kept
    assert _resident_parameter_digests(model, release_pages=True) == kept
    assert _resident_kib(file) <= 64 * 4


@linux_only
def test_quantizing_a_mapped_checkpoint_releases_the_replaced_weights(tmp_path):
    file = _mapped_llama(tmp_path / "llama")
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", quantization_config=_config())
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, COMQLinear))
    kept = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    assert quantized * 4 > 4 * kept  # most of the file is the replaced weights
    # Whatever of the file is still resident is at most the unquantized tensors' pages (+ edges).
    assert _resident_kib(file) * 1024 <= kept * 4 + 64 * 4096


@pytest.mark.parametrize("offloaded", [False, True], ids=["dispatched", "cpu-offloaded"])
def test_a_replaced_layer_under_accelerate_hooks_is_freed_without_the_cyclic_collector(offloaded):
    from accelerate import cpu_offload
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_model("llama")
    name = "model.layers.0.mlp.down_proj"
    if offloaded:
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        add_hook_to_module(model.get_submodule(name), AlignDevicesHook(execution_device=torch.device("cpu")))
    replaced = weakref.ref(model.get_submodule(name))
    gc.disable()  # a layer kept alive by a reference cycle would wait for it
    try:
        swap_layer(model, name, lambda layer: torch.nn.Linear(layer.in_features, layer.out_features, bias=False))
        assert replaced() is None
    finally:
        gc.enable()
    assert isinstance(model.get_submodule(name), torch.nn.Linear)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (1, 5)))


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None,
    reason="glibc's heap on Linux, with its default mmap threshold (32 KiB buffers come from the heap)",
)
def test_trim_heap_gives_freed_buffers_inside_the_heap_back():
    """In a process of its own: where the buffers land depends on what the heap went through before
    (the earlier tests' frees and trims), which made this fail now and then in the test process."""
    script = """
import torch
from hf_comq.calibration.placement import trim_heap

def resident_anonymous_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024

freed, kept = [], []
for _ in range(2048):  # 64 MiB of 32 KiB buffers, each followed by a small one that stays
    freed.append(torch.ones(8192))
    kept.append(torch.ones(16))
del freed  # free inside the heap, not at its top: glibc keeps it resident
before = resident_anonymous_mib()
assert trim_heap()
print(before - resident_anonymous_mib(), all(float(tensor.sum()) == 16 for tensor in kept))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    given_back, intact = done.stdout.split()
    assert int(given_back) >= 32 and intact == "True"


def test_a_dispatched_or_disk_offloaded_mixture_of_experts_saves_the_in_memory_checkpoint(tmp_path):
    checkpoint = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(checkpoint)
    in_memory = T.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=_config())
    dispatched = T.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=_config(), device_map={"": "cpu"})
    for model in (in_memory, dispatched):
        assert isinstance(model.model.layers[1].mlp.experts[3].w2, COMQLinear)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(dispatched.state_dict()[name], tensor), name
    device_map = BLOCK_0_IN_MEMORY_BLOCK_1_ON_DISK
    offloaded = T.AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=_config(), device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    expert = offloaded.model.layers[1].mlp.experts[2].w1
    assert isinstance(expert, COMQLinear) and offloads_to_disk(expert) and expert.weight_packed.device.type == "meta"
    in_memory.save_pretrained(tmp_path / "memory")
    offloaded.save_pretrained(tmp_path / "disk")
    (expected, expected_config), (got, got_config) = _saved(tmp_path / "memory"), _saved(tmp_path / "disk")
    assert sorted(got) == sorted(expected) and got_config == expected_config
    assert "model.layers.1.block_sparse_moe.experts.2.w1.weight_packed" in got
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@linux_only
def test_calibrating_a_dispatched_model_leaves_none_of_its_checkpoint_resident(tmp_path):
    """Under a ``device_map`` that offloads, the embedding rows the capture looked up are given back too:
    nothing reads them again until the model is used or saved (then they come back from the file)."""
    file = _mapped_llama(tmp_path / "llama", vocab_size=8192)  # an 8 MiB embedding
    ids = torch.randint(0, 8192, (8, 64), generator=torch.Generator().manual_seed(0))
    config = COMQConfig(dataset=ids, num_samples=8, batch_size=4, group_size=16)
    device_map = BLOCK_0_IN_MEMORY_BLOCK_1_ON_DISK
    dispatched = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama", quantization_config=config, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )

    # What may stay: the norms, which their blocks read after the capture, with the pages the
    # kernel maps around each fault (64 KiB of fault-around): far below the 8 MiB embedding.
    assert _resident_kib(file) <= 1024
    in_memory = T.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", quantization_config=config)
    with torch.no_grad():  # the same quantized model, its embedding read back from the file
        expected = in_memory(input_ids=ids[:2]).logits
        torch.testing.assert_close(dispatched(input_ids=ids[:2]).logits, expected, rtol=0, atol=0)


@linux_only
def test_calibrating_a_disk_offloaded_model_gives_back_what_loading_read_of_its_offloaded_weights(tmp_path):
    """Loading under a ``device_map`` leaves pages mapped around the boundary of every weight, also of
    those it sends to disk, and no tensor points at those pages afterwards: they are given back with
    the rest of the checkpoint's mapping after the capture."""
    file = _mapped_llama(tmp_path / "llama", layers=6)  # 6 x 7 disk-offloaded weights of 256 or 512 KiB
    ids = torch.randint(0, 64, (8, 64), generator=torch.Generator().manual_seed(0))
    config = COMQConfig(dataset=ids, num_samples=8, batch_size=4, group_size=16)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}  # fmt: skip
    T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama", quantization_config=config, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )

    # What may stay: the CPU weights outside the blocks read after the capture (none are) and the
    # edge pages they share; well under one page per offloaded weight
    assert _resident_kib(file) < 6 * 7 * 4


@linux_only
def test_a_blocks_solved_weights_leave_resident_memory_before_the_solve_of_its_last_stage(tmp_path, monkeypatch):
    """A block kept in CPU memory under a budget is pages of the mapped checkpoint; its last full-precision
    pass over, the weights of its solved layers are given back before the down projection's solve."""
    from hf_comq.calibration import sequential

    file = _mapped_llama(tmp_path / "llama")  # per block: q/k/v/o 256 KiB each, gate/up/down 512 KiB each
    ids = torch.randint(0, 64, (8, 64), generator=torch.Generator().manual_seed(0))
    config = COMQConfig(dataset=ids, num_samples=8, batch_size=4, group_size=16)  # 4 bits: aimed, stage by stage
    resident_at_down_projection: list[int] = []
    aim = sequential.fp_target_weight

    def aimed(weight, *args, **kwargs):
        if tuple(weight.shape) == (256, 512):
            resident_at_down_projection.append(_resident_kib(file))
        return aim(weight, *args, **kwargs)

    monkeypatch.setattr(sequential, "fp_target_weight", aimed)
    device_map = BLOCK_0_IN_MEMORY_BLOCK_1_ON_DISK
    model = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama", quantization_config=config, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert calibration_summary(model)["true_sequential"] and isinstance(model.model.layers[0].mlp.down_proj, COMQLinear)
    # block 0's down projection (512 KiB, read by its solve), lm_head (64 KiB) and the edges of their neighbours
    # may stay; its solved q/k/v/o/gate/up (2 MiB) may not
    assert len(resident_at_down_projection) == 2 and resident_at_down_projection[0] < 1024


@linux_only
@pytest.mark.parametrize("budget", [True, False], ids=["device-map", "in-memory"])
def test_the_plain_calibration_under_a_device_map_installs_each_layer_before_the_next_solve(tmp_path, monkeypatch, budget):
    """Without aiming a block's layers are solved from one pass, its down projection last: under a budget the
    others are installed as each is solved, so neither their codes nor their checkpoint pages stay through the
    block's widest solve; in memory they go in together after it (the solves may run side by side there)."""
    from hf_comq.calibration import sequential

    file = _mapped_llama(tmp_path / "llama")  # per block: q/k/v/o 256 KiB each, gate/up/down 512 KiB each
    ids = torch.randint(0, 64, (8, 64), generator=torch.Generator().manual_seed(0))
    config = COMQConfig(dataset=ids, num_samples=8, batch_size=4, group_size=16, fp_target=False)
    at_down_projection: list[tuple[list[bool], int]] = []  # block 0's other layers installed?, resident KiB
    solve = sequential._Calibrator._solve

    def solved(self, name, *args, **kwargs):
        if name == "model.layers.0.mlp.down_proj":
            block = self.model.model.layers[0]
            others = [block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj]
            at_down_projection.append(([isinstance(layer, COMQLinear) for layer in others], _resident_kib(file)))
        return solve(self, name, *args, **kwargs)

    monkeypatch.setattr(sequential._Calibrator, "_solve", solved)
    placement = dict(device_map=BLOCK_0_IN_MEMORY_BLOCK_1_ON_DISK, offload_folder=str(tmp_path / "offload"))
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", quantization_config=config,
                                                   **(placement if budget else {}))  # fmt: skip
    assert not calibration_summary(model)["fp_target"] and isinstance(model.model.layers[0].mlp.down_proj, COMQLinear)
    [(installed, resident_kib)] = at_down_projection
    assert installed == [budget] * 4
    if budget:  # as in the staged run's test above: the down projection, lm_head and edge pages may stay
        assert resident_kib < 1024


def test_free_memory_reads_the_hosts_available_ram_and_nothing_for_a_device_without_a_count():
    import psutil

    free = free_memory(torch.device("cpu"))
    assert 0 < free and abs(free - psutil.virtual_memory().available) < 2**30  # other processes move it meanwhile
    assert free_memory(torch.device("meta")) == 0


@pytest.mark.parametrize(
    "device_map", [None, "auto", "balanced", "sequential", "cpu", torch.device("cpu"), {"": "cpu"}, {"a": "cpu", "b": "disk"}]
)
def test_check_device_map_accepts_strategies_the_cpu_and_disk(device_map) -> None:
    check_device_map(device_map)


def test_check_device_map_names_a_value_that_is_no_device() -> None:
    with pytest.raises(ValueError, match="'gpu0' is not a device name"):
        check_device_map({"encoder": "cpu", "decoder": "gpu0"})


@pytest.fixture
def accelerator(monkeypatch):
    """Stand in for torch.accelerator: set ``kind`` (``None``: none) and ``count``, on any machine."""

    class Accelerator:
        kind: str | None = None
        count = 0

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: Accelerator.kind is not None)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device(Accelerator.kind))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: Accelerator.count)
    return Accelerator


@pytest.mark.parametrize("device_map", ["cuda", {"": torch.device("cuda", 0)}, {"head": 1}, "mps"])
def test_check_device_map_refuses_an_accelerator_this_torch_lacks(accelerator, device_map) -> None:
    with pytest.raises(ValueError, match="sees no accelerator; use device_map='cpu'"):
        check_device_map(device_map)


def test_check_device_map_takes_the_accelerators_there_are_and_names_the_rest(accelerator) -> None:
    accelerator.kind, accelerator.count = "cuda", 2
    for usable in ("cuda", "cuda:1", 0, 1, {"a": "cuda:0", "b": "cpu", "c": "disk"}):
        check_device_map(usable)
    with pytest.raises(ValueError, match=r"'cuda:2', but this machine has 2 cuda device\(s\), indices 0 to 1"):
        check_device_map({"a": "cuda:0", "b": "cuda:2"})
    with pytest.raises(ValueError, match=r"puts weights on 2, but this machine has 2 cuda device"):
        check_device_map({"a": 2})
    with pytest.raises(ValueError, match="'mps', but this torch's accelerator is cuda, not mps"):
        check_device_map("mps")
