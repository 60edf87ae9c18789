"""Packing of integer codes into int32 words: exact round trips, the documented bit layout, and
bit-identity with compressed-tensors' own packer (the format COMQ checkpoints are written in)."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from hf_comq.packing import pack_codes, pack_zero_points, packed_width, unpack_codes, unpack_zero_points


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [1, 31, 32, 33, 96, 100])
def test_round_trip_every_width(bits, length):
    generator = torch.Generator().manual_seed(bits * 1000 + length)
    codes = torch.randint(0, 2**bits, (6, length), generator=generator, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (6, packed_width(length, bits))
    assert torch.equal(unpack_codes(packed, bits, length), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_extreme_codes_survive(bits):
    """All-ones codes set the sign bit of int32 words; it must not leak into neighbours."""
    top = (1 << bits) - 1
    codes = torch.tensor([[top] * 40, [0, top] * 20], dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 40), codes)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_big_endian_hosts_read_the_same_codes(bits):
    """A big-endian host holds each int32 word most significant byte first; swapping
    the bytes of every word here gives the memory such a host would have, which the
    big-endian branch must read back to the same codes."""
    import sys

    from hf_comq.packing import _unpack_through_bytes

    codes = torch.randint(0, 2**bits, (4, 96), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    foreign = "big" if sys.byteorder == "little" else "little"
    swapped = packed.view(torch.uint8).reshape(*packed.shape, 4).flip(-1).contiguous().view(torch.int32).squeeze(-1)
    assert not torch.equal(swapped, packed)
    assert torch.equal(_unpack_through_bytes(swapped, bits, 96, byteorder=foreign), codes)


def test_packed_width_is_bits_over_32_of_the_codes():
    assert packed_width(4096, 4) * 32 == 4096 * 4
    assert packed_width(4096, 3) * 32 == 4096 * 3  # no padding waste for 3-bit codes
    assert packed_width(33, 4) == 5  # the last word is partly padding
    assert packed_width(0, 4) == 0


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [5, 32, 77, 96])
def test_words_are_those_of_compressed_tensors(bits, length):
    """The checkpoint format is compressed-tensors': same words, and its unpacker reads ours."""
    codes = torch.randint(0, 2**bits, (4, length), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, pack_to_int32(signed, bits))
    library = unpack_from_int32(packed, bits, torch.Size([4, length]))
    assert torch.equal(library.to(torch.int16) + 2 ** (bits - 1), codes.to(torch.int16))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dim", [-1, 0])
def test_packing_in_row_blocks_gives_the_words_of_compressed_tensors(monkeypatch, bits, dim):
    """Large layers are packed a block of rows at a time (bounded int64 work space)."""
    import hf_comq.packing as packing

    monkeypatch.setattr(packing, "PACK_BLOCK_BYTES", 2000)  # a few rows per block
    codes = torch.randint(0, 2**bits, (45, 77), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_codes(codes, bits, dim=dim), pack_to_int32(signed, bits, packed_dim=1 if dim == -1 else 0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_points_are_packed_along_the_output_dimension(bits):
    zero = torch.randint(0, 2**bits, (70, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_zero_points(zero, bits)
    assert packed.shape == (packed_width(70, bits), 3)
    signed = (zero.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(packed, pack_to_int32(signed, bits, packed_dim=0))
    assert torch.equal(unpack_zero_points(packed, bits, 70), zero)


def test_four_bit_layout_is_little_endian_within_a_word():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 0] = 1
    codes[0, 1] = 2
    codes[0, 8] = 15  # first code of the second word
    words = pack_codes(codes, 4)
    assert words.tolist() == [[1 | (2 << 4), 15, 0, 0]]


def test_three_bit_code_straddles_two_words():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111  # stream bits 30..32: two in word 0, one in word 1
    words = pack_codes(codes, 3)
    assert words[0, 0].item() == -(2**31) + 2**30  # bits 30 and 31 set
    assert words[0, 1].item() == 1
    assert words[0, 2].item() == 0


def test_rejects_codes_outside_the_range():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.tensor([[1.0]]), 4)


def test_rejects_bad_bits_and_widths():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="need 4"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 4, 32)
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(torch.zeros(2, 2, 4, dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="int32"):
        unpack_codes(torch.zeros(1, 4, dtype=torch.int64), 4, 32)
