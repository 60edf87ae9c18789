"""Data-parallel calibration on two CPU ranks (gloo over loopback): primitives, the checkpoint, failures."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from hf_comq import COMQConfig, HessianAccumulator, calibration_summary
from hf_comq.calibration.distributed import (
    CalibrationGroupError,
    Group,
    all_reduce_hessians,
    balanced_owners,
    current_group,
    is_saving_rank,
    join_launcher_group,
    leave_launcher_group,
)

from tests.ranks import launch_ranks
from tests.tiny import sentences, tiny_model, word_tokenizer

PRIMITIVES = """
import json, sys
import torch
from hf_comq import HessianAccumulator, QuantizedWeight
from hf_comq.calibration.distributed import (
    agree_on, all_reduce_hessians, current_group, is_saving_rank, share_solutions, sum_over_ranks,
)

group = current_group()
rank = group.rank
agree_on(group, "same settings")
accumulator = HessianAccumulator(3)
accumulator.add(torch.full((rank + 1, 3), float(rank + 1), dtype=torch.float64))
def batch(of_rank):  # a wide one: its row panels fill several packed buffers
    return torch.randn(5 + of_rank, 1500, generator=torch.Generator().manual_seed(of_rank), dtype=torch.float64)
wide = HessianAccumulator(1500)
wide.add(batch(rank))
all_reduce_hessians(group, [accumulator, wide])
expected = HessianAccumulator(1500)
for other in range(group.size):
    expected.add(batch(other))
def solved(value):
    return QuantizedWeight(codes=torch.full((2, 4), value, dtype=torch.uint8), scale=torch.full((2, 1), value / 8),
                           zero_point=torch.ones(2, 1), bits=4, group_size=None, stats={"relative_error": value / 10})
mine = {"a": solved(1)} if rank == 1 else {"b": solved(2)}
shared = share_solutions(group, mine, {"a": 1, "b": 0})
saving = sum_over_ranks(group, [float(is_saving_rank()), float(is_saving_rank(is_main_process=False))])
result = {
    "size": group.size, "saving": saving, "hessian": accumulator.result().tolist(), "tokens": accumulator.num_tokens,
    "counts": sum_over_ranks(group, [rank, 1]),
    "wide": [float((wide.result() - expected.result()).abs().max() / expected.result().abs().max()), wide.num_tokens],
    "shared": {name: [q.codes.tolist(), q.scale.tolist(), q.stats] for name, q in shared.items()},
}
json.dump(result, open(sys.argv[1], "w"))
"""

QUANTIZE = """
import json, os, sys
import torch
import transformers as T
from hf_comq.calibration.distributed import CalibrationGroupError
from tests.calibration.test_distributed import MODES, calibration_config, summary_of

scenario, checkpoint, out = sys.argv[1:4]
rank = int(os.environ["RANK"])
if scenario == "other-weights" and rank == 1:
    checkpoint += "-other"
torch.set_num_threads(1)
import hf_comq.calibration.sequential as sequential
if scenario == "dies" and rank == 1:
    sequential._Calibrator._solve = lambda *args: os._exit(3)
gram_passes = []  # the stages whose Gram matrices took a pass of their own (summed apart)
gram_pass = sequential._Calibrator._gram_pass_after_products
def counted_gram_pass(self, block_name, stage, *args):
    gram_passes.append(stage)
    return gram_pass(self, block_name, stage, *args)
sequential._Calibrator._gram_pass_after_products = counted_gram_pass
solved_in_shares = []  # the layers whose rows the ranks shared
solve_shares = sequential._Calibrator._solve_shares
def counted_solve_shares(self, names, *args, **kwargs):
    solved_in_shares.extend(names)
    return solve_shares(self, names, *args, **kwargs)
sequential._Calibrator._solve_shares = counted_solve_shares
placement = {}
if scenario == "offloaded" or (scenario == "other-placement" and rank == 1):  # last block and final norm on disk
    placement = dict(device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                                 "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "cpu"},
                     offload_folder=os.path.join(out, f"offload{rank}"))
result = {}
try:
    for mode in ["sequential", "true-sequential"] if scenario in ("other-placement", "offloaded") else MODES:
        gram_passes.clear()
        solved_in_shares.clear()
        bits = 5 if scenario == "different" and rank == 1 else 4
        config = calibration_config(mode, bits, data_seed=1 if scenario == "other-data" and rank == 1 else 0)
        model = T.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, **placement)
        model.save_pretrained(os.path.join(out, mode))
        model.save_pretrained(os.path.join(out, f"rank{rank}-{mode}"))  # a folder of its own: only rank 0 writes
        result[mode] = {**summary_of(model), "gram passes": list(gram_passes), "shared": sorted(solved_in_shares)}
except CalibrationGroupError as error:
    result["error"] = str(error)
json.dump(result, open(os.path.join(out, f"rank{rank}.json"), "w"))
"""


MODES = {
    "sequential": dict(sequential=True),
    "fp-inputs": dict(sequential=False),
    "fp-target": dict(fp_target=True),
    "true-sequential": dict(fp_target=True, true_sequential=True),
}
"""The calibration modes: the quantized prefix's inputs, full-precision ones, the
quantized prefix's aimed at full-precision outputs (two streams of block inputs per rank),
and that solved stage by stage inside each block (a reduction and a solve per stage)."""


def calibration_config(mode: str, bits: int = 4, data_seed: int = 0) -> COMQConfig:
    """11 texts in batches of 3: rank 0 runs batches 0 and 2, rank 1 batches 1 and 3 (of 2 texts)."""
    return COMQConfig(dataset=sentences(11, seed=data_seed), processor=word_tokenizer(), num_samples=11, batch_size=3,
                      bits=bits, group_size=16, **MODES[mode])  # fmt: skip


def summary_of(model) -> dict:
    """What must not depend on the number of ranks (but ``ranks``): samples, layers, tokens per layer."""
    summary = calibration_summary(model)
    tokens = sorted({layer["num_tokens"] for layer in summary["layers"].values()})
    return {**{key: summary[key] for key in ("num_samples", "ranks", "layers_quantized")}, "tokens": tokens}


def run_two_ranks(tmp_path: Path, source: str, *args: str) -> None:
    """Run ``source`` as two gloo ranks on loopback, started as ``torchrun`` starts them."""
    script = tmp_path / "worker.py"
    script.write_text("from hf_comq.calibration import join_launcher_group, leave_launcher_group\n"
                      "assert join_launcher_group(timeout_s=30).size == 2\n"
                      + textwrap.dedent(source) + "\nleave_launcher_group()\n", encoding="utf-8")  # fmt: skip
    launch_ranks([sys.executable, str(script), *args])


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _tiny_checkpoint(tmp_path: Path, kind: str = "llama") -> Path:
    path = tmp_path / kind
    tiny_model(kind).save_pretrained(path)
    return path


# ---------------------------------------------------------------- primitives


def test_leaving_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    leave_launcher_group()  # no group: nothing to do
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    leave_launcher_group()
    assert not torch.distributed.is_initialized() and current_group() == Group()


GLOO_THREADS_AFTER_LEAVING = """
import json, os, sys
import torch.distributed.nn.functional  # as transformers' model loading imports it, after the group exists

leave_launcher_group()
names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
json.dump([name for name in names if "gloo" in name], open(sys.argv[1] + os.environ["RANK"], "w"))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_leaving_stops_the_groups_threads_even_after_torch_imported_its_world_defaults(tmp_path):
    """No gloo thread may outlive the Python code: one that does can abort the rank at exit (-6)."""
    run_two_ranks(tmp_path, GLOO_THREADS_AFTER_LEAVING, str(tmp_path / "threads-of-rank-"))
    assert [_read(tmp_path / f"threads-of-rank-{rank}") for rank in (0, 1)] == [[], []]


def test_a_single_process_is_a_group_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert join_launcher_group() == Group()  # not started by a launcher: nothing to join
    group = current_group()
    assert group == Group() and not group.is_parallel and group.is_main
    assert is_saving_rank() and not is_saving_rank(is_main_process=False)


def test_a_failed_sum_of_gram_matrices_and_token_counts_is_one_line_naming_both(monkeypatch):
    """The token counts ride in the Gram matrices' buffer, so a failed sum names both."""

    def broken(tensor, *args, **kwargs):
        raise RuntimeError("Connection closed by peer\n[../gloo/transport/tcp/pair.cc:534]")

    monkeypatch.setattr(torch.distributed, "all_reduce", broken)
    accumulator = HessianAccumulator(4)
    accumulator.add(torch.randn(3, 4))
    with pytest.raises(CalibrationGroupError) as failure:
        all_reduce_hessians(Group(rank=1, size=2), [accumulator])
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("rank 1: could not sum the Gram matrices and token counts with the other ranks")
    assert "Connection closed by peer" in message and message.endswith("nothing was saved")


def test_layers_go_to_the_least_loaded_rank_longest_first():
    # a block: q, k, v, o, gate, up, down (widths of a Llama MLP three times the attention's)
    costs = [1, 0.25, 0.25, 1, 3, 3, 3]
    owners = balanced_owners(costs, 2)
    loads = [sum(cost for cost, owner in zip(costs, owners) if owner == rank) for rank in range(2)]
    assert owners == [1, 1, 1, 1, 0, 1, 0] and loads == [6, 5.5]
    assert balanced_owners(costs, 1) == [0] * 7
    assert balanced_owners(costs, 2, [True] * 7) == owners  # no layer is more than half the block


def test_a_layer_that_would_keep_the_other_ranks_waiting_is_shared_by_all_of_them():
    """``None``: every rank solves a share of its rows; the others then go to the least loaded rank."""
    assert balanced_owners([3], 2, [True]) == [None]  # a stage of one layer (a down projection)
    assert balanced_owners([1, 0.25, 0.25], 2, [True] * 3) == [None, 0, 1]  # q, k, v of grouped-query attention
    assert balanced_owners([1, 0.25, 0.25], 2, [False, True, True]) == [0, 1, 1]  # q too narrow to share
    assert balanced_owners([3], 1, [True]) == [0]


def test_two_ranks_sum_gram_matrices_and_share_solutions(tmp_path):
    run_two_ranks(tmp_path, PRIMITIVES, str(tmp_path / "out.json"))
    result = _read(tmp_path / "out.json")  # both ranks write the same file; the content must not depend on the rank
    expected_hessian = 1 * 1 * 1 + 2 * 2 * 2  # rank 0: one row of ones; rank 1: two rows of twos
    assert result["size"] == 2 and result["hessian"] == [[expected_hessian] * 3] * 3 and result["tokens"] == 3
    assert result["counts"] == [1, 2]
    # sums packed into several all-reduces come back where they belong (to float64 rounding: one
    # accumulator adds each batch's product into its sum inside the GEMM, in another order)
    assert result["wide"][0] < 1e-12 and result["wide"][1] == 11
    assert result["saving"] == [1, 0]  # exactly one rank writes files
    assert result["shared"] == {
        "a": [[[1] * 4] * 2, [[0.125]] * 2, {"relative_error": 0.1}],
        "b": [[[2] * 4] * 2, [[0.25]] * 2, {"relative_error": 0.2}],
    }


# ---------------------------------------------------------------- the driver


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_two_ranks_write_the_checkpoint_of_one_process(tmp_path, kind):
    """Identical codes, not just a close objective: each rank's Gram matrix is a float64 sum of
    float32 batch products, and float64 holds such sums of a few batches exactly, so the
    all-reduce's other summation order gives the very same H (and the same solve).  A mixture
    of experts too: an expert may get tokens on one rank only, and its sharing of one Gram
    matrix between gate and up must still pair the ranks' sums.  Solved stage by stage, a
    stage of one layer (attention output, the dense MLP's down projection) is solved by both
    ranks, half its rows each, and its codes are still those of one process."""
    checkpoint = _tiny_checkpoint(tmp_path, kind)
    run_two_ranks(tmp_path, QUANTIZE, "ok", str(checkpoint), str(tmp_path))
    ranks = [_read(tmp_path / f"rank{rank}.json") for rank in range(2)]
    assert all(result[mode]["gram passes"] == [] for result in ranks for mode in MODES)  # in memory: one pass
    shared = [f"model.layers.{block}.self_attn.o_proj" for block in range(2)]
    if kind == "llama":
        shared += [f"model.layers.{block}.mlp.down_proj" for block in range(2)]
    for result in ranks:  # the modes that solve in stages (at 4 bits all but full-precision inputs)
        assert {mode: sorted(result[mode]["shared"]) for mode in MODES} == {
            mode: [] if mode == "fp-inputs" else sorted(shared) for mode in MODES
        }
    _assert_the_checkpoints_of_one_process(tmp_path, checkpoint, ranks, list(MODES))


def _assert_the_checkpoints_of_one_process(tmp_path: Path, checkpoint: Path, ranks: list[dict], modes: list[str]) -> None:
    """The two ranks' checkpoint of each mode has the codes of one process in memory on the same samples,
    and each rank counted every sample's tokens (the summary but ``ranks`` and the gram passes it took)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same float32 products
    try:
        for mode in modes:
            config = calibration_config(mode)
            model = T.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config)
            model.save_pretrained(tmp_path / f"single-{mode}")
            for result in ranks:  # the same tokens per layer: every rank's count
                assert {key: value for key, value in result[mode].items() if key not in ("gram passes", "shared")} == {
                    **summary_of(model), "ranks": 2
                }
            expected, got = _tensors(tmp_path / f"single-{mode}"), _tensors(tmp_path / mode)
            assert sorted(got) == sorted(expected) and any(name.endswith("weight_packed") for name in got)
            for name, tensor in expected.items():
                assert torch.equal(got[name], tensor), (mode, name)
            saved = json.loads((tmp_path / mode / "config.json").read_text())
            single = json.loads((tmp_path / f"single-{mode}" / "config.json").read_text())
            assert saved["quantization_config"] == single["quantization_config"]
            assert (tmp_path / f"rank0-{mode}" / "README.md").is_file()  # weights, config and card
            assert (tmp_path / f"rank0-{mode}" / "model.safetensors").is_file()
            rank1 = tmp_path / f"rank1-{mode}"
            assert not rank1.exists() or not any(rank1.iterdir()), sorted(rank1.iterdir())  # no half checkpoint
    finally:
        torch.set_num_threads(previous)


def test_ranks_started_with_different_settings_stop_before_calibrating(tmp_path):
    run_two_ranks(tmp_path, QUANTIZE, "different", str(_tiny_checkpoint(tmp_path)), str(tmp_path))
    for rank in range(2):
        error = _read(tmp_path / f"rank{rank}.json")["error"]
        assert "different calibration settings" in error and "\n" not in error
        assert re.search(r"differ from rank 0 in fp_target, settings\.bits, (settings\.\w+, )*true_sequential\)", error), error
        # what differs is named down to the setting: bits=5 on rank 1, and what its defaults resolve to at 5 bits
    assert not (tmp_path / "sequential").exists()


def test_ranks_started_with_other_in_memory_data_of_the_same_kind_stop_before_calibrating(tmp_path):
    """Two lists of 11 texts describe alike ("list of text, 11 samples"): their first batch tells them apart."""
    run_two_ranks(tmp_path, QUANTIZE, "other-data", str(_tiny_checkpoint(tmp_path)), str(tmp_path))
    for rank in range(2):
        error = _read(tmp_path / f"rank{rank}.json")["error"]
        assert "different calibration settings" in error and "calibration data" in error
    assert not (tmp_path / "sequential").exists()


def test_ranks_that_loaded_other_weights_of_the_same_architecture_stop_before_calibrating(tmp_path):
    """Same class, layers and shapes: only the weights tell the checkpoints apart, and summing their
    Gram matrices would mix two models into one checkpoint."""
    checkpoint = _tiny_checkpoint(tmp_path)
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.norm.weight.add_(1.0)  # a norm only: no layer COMQ quantizes differs
    other.save_pretrained(f"{checkpoint}-other")
    run_two_ranks(tmp_path, QUANTIZE, "other-weights", str(checkpoint), str(tmp_path))
    for rank in range(2):
        error = _read(tmp_path / f"rank{rank}.json")["error"]
        assert "the ranks loaded different weights (ranks [1] differ from rank 0, e.g. rank 1 in model.norm.weight)" in error
        assert "\n" not in error
    assert not (tmp_path / "sequential").exists()


def test_ranks_that_placed_the_same_weights_differently_calibrate_together(tmp_path):
    """Which weights a rank offloads to disk is no difference between the ranks: comparing the weights
    each held in memory stopped them, saying they had loaded different weights.  Stage by stage, the rank
    under a device map runs each stage pass by pass where the one in memory may hold one pass for all; with
    one rank in memory neither sums a down projection's sums apart (their collectives would not pair)."""
    checkpoint = _tiny_checkpoint(tmp_path)
    run_two_ranks(tmp_path, QUANTIZE, "other-placement", str(checkpoint), str(tmp_path))
    ranks = [_read(tmp_path / f"rank{rank}.json") for rank in range(2)]
    for result in ranks:
        assert "error" not in result, result
        assert result["sequential"]["gram passes"] == result["true-sequential"]["gram passes"] == []
    _assert_the_checkpoints_of_one_process(tmp_path, checkpoint, ranks, ["sequential", "true-sequential"])


def test_ranks_all_under_a_device_map_sum_a_down_projections_sums_apart_with_the_codes_of_one_process(tmp_path):
    """Under a budget on every rank, each sums a down projection's target product, all-reduces it and
    hands it over before its Gram matrix's pass, as one process does: the collectives pair and the codes
    are those of one process in memory."""
    checkpoint = _tiny_checkpoint(tmp_path)
    run_two_ranks(tmp_path, QUANTIZE, "offloaded", str(checkpoint), str(tmp_path))
    ranks = [_read(tmp_path / f"rank{rank}.json") for rank in range(2)]
    for result in ranks:
        assert "error" not in result, result
        for mode in ("sequential", "true-sequential"):  # at 4 bits both aim stage by stage (the default)
            assert result[mode]["gram passes"] == [[f"model.layers.{i}.mlp.down_proj"] for i in range(2)]
    _assert_the_checkpoints_of_one_process(tmp_path, checkpoint, ranks, ["sequential", "true-sequential"])


def test_a_rank_dying_mid_calibration_stops_the_others_and_nothing_is_saved(tmp_path):
    run_two_ranks(tmp_path, QUANTIZE, "dies", str(_tiny_checkpoint(tmp_path)), str(tmp_path))
    survivor, dead = _read(tmp_path / "rank0.json"), _read(tmp_path / "rank1.json")
    assert dead is None
    assert "one of them failed or left" in survivor["error"] and "\n" not in survivor["error"]
    assert "nothing was saved" in survivor["error"]
    assert not (tmp_path / "sequential").exists()


FEWER_BATCHES_THAN_RANKS = """
import os, sys
import torch
import transformers as T
from tests.calibration.test_distributed import one_batch_config
torch.set_num_threads(1)
checkpoint, out = sys.argv[1:3]
T.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=one_batch_config()).save_pretrained(out)
"""


def one_batch_config() -> COMQConfig:
    """4 texts in one batch: rank 0 runs it, rank 1 none; at 3 bits each block is solved stage by stage."""
    return COMQConfig(dataset=sentences(4), processor=word_tokenizer(), num_samples=4, batch_size=4, bits=3,
                      group_size=16)  # fmt: skip


def test_ranks_that_hold_a_stages_layers_in_other_orders_pair_their_solutions_by_layer(tmp_path):
    """OPT creates its attention's k, v, q projections in that order and calls q, k, v: the rank that
    runs a batch solves a stage in call order (a held pass), the rank without one in creation order.
    Owners and broadcasts paired by position then put v_proj's codes in k_proj, with no error."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "opt"
    T.OPTForCausalLM(
        T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                    word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    ).save_pretrained(checkpoint)  # fmt: skip
    run_two_ranks(tmp_path, FEWER_BATCHES_THAN_RANKS, str(checkpoint), str(tmp_path / "ranks"))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = T.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=one_batch_config())
    finally:
        torch.set_num_threads(previous)
    single.save_pretrained(tmp_path / "single")
    expected, got = _tensors(tmp_path / "single"), _tensors(tmp_path / "ranks")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
