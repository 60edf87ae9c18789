"""Packing of integer codes into int32 words: exact round trips and the documented bit layout."""

import pytest
import torch

from hf_comq.packing import pack_codes, packed_width, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [1, 31, 32, 33, 96, 100])
def test_round_trip_every_width(bits, length):
    generator = torch.Generator().manual_seed(bits * 1000 + length)
    codes = torch.randint(0, 2**bits, (3, 2, length), generator=generator, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, 2, packed_width(length, bits))
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

    codes = torch.randint(0, 2**bits, (4, 70), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    foreign = "big" if sys.byteorder == "little" else "little"
    swapped = packed.view(torch.uint8).reshape(*packed.shape, 4).flip(-1).contiguous().view(torch.int32).squeeze(-1)
    assert not torch.equal(swapped, packed)
    assert torch.equal(_unpack_through_bytes(swapped, bits, 70, byteorder=foreign), codes)


def test_packed_width_is_bits_over_32_of_the_codes():
    assert packed_width(4096, 4) * 32 == 4096 * 4
    assert packed_width(4096, 3) * 32 == 4096 * 3  # no padding waste for 3-bit codes
    assert packed_width(33, 4) == 8  # tail chunk padded to 32 codes
    assert packed_width(0, 4) == 0


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
    with pytest.raises(TypeError, match="int32"):
        unpack_codes(torch.zeros(1, 4, dtype=torch.int64), 4, 32)
