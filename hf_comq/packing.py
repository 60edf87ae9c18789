"""Sub-byte packing of integer codes into ``int32`` words: compressed-tensors' ``pack-quantized`` layout.

COMQ checkpoints are compressed-tensors ``pack-quantized`` checkpoints, so the bit layout
is that library's (dense cross-word packing, compressed-tensors >= 0.18):

* Codes are packed along one dimension (the input dimension of a weight, the output
  dimension of zero points), row by row, so every row is self-contained.
* Per row, the codes form one little-endian bit stream over consecutive words: code
  ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``, least significant bit
  first, and word ``k`` holds stream bits ``[32k, 32k + 32)``.  A code may straddle two
  words when ``32 % bits != 0``; 32 codes fill exactly ``bits`` words, so 3-, 5-, 6- and
  7-bit codes waste no space.
* A row of ``n`` codes takes ``ceil(n * bits / 32)`` words (the last one zero-padded).
* compressed-tensors stores signed codes ``q - 2**(bits-1)`` and packs them with that
  offset added back, so the bits on disk are exactly the unsigned codes
  ``0 .. 2**bits - 1`` that COMQ's grid uses.

Both directions are implemented here, in plain torch: the packed module unpacks on its
exact (fallback) forward, and packing must not depend on which compressed-tensors release
is installed (releases before 0.18 packed 3/5/6/7-bit codes differently, with no version
marker).  ``tests/test_packing.py`` checks both directions against the library's own packer.
"""

from __future__ import annotations

import math
import sys

import torch

from .solver.options import check_bits
from .solver.spans import rows_fitting, spans

CHUNK = 32
PACK_BLOCK_BYTES = 2 * 1024 * 1024
"""Bytes of ``int64`` work space per block of rows while packing: a whole layer's codes
widened to ``int64`` three times over would be 24 bytes per code, several times the
layer's bf16 weight, at the moment a quantized layer is installed (under a memory
budget, the moment of a run's peak)."""
MIN_PACKED_BITS = 1  # the layout also holds 1-bit codes; the upper bound is the solver's MAX_BITS


def packed_width(num_codes: int, bits: int) -> int:
    """Number of ``int32`` words that hold ``num_codes`` codes of ``bits`` bits."""
    check_packable_bits(bits)
    if num_codes < 0:
        raise ValueError(f"num_codes must be non-negative, got {num_codes}")
    return math.ceil(num_codes * bits / 32)


def pack_codes(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack a 2-D tensor of codes in ``[0, 2**bits - 1]`` along ``dim`` into ``int32`` words.

    Raises ``ValueError`` for codes outside the range rather than silently masking
    them: a wrong code would only show up later as a subtly wrong model.
    """
    check_packable_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > (1 << bits) - 1):
        raise ValueError(
            f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}; "
            f"got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    rows = codes if dim % 2 == 1 else codes.t()
    count, n = rows.shape
    packed = torch.empty(count, packed_width(n, bits), dtype=torch.int32, device=rows.device)
    for block in spans(count, rows_fitting(PACK_BLOCK_BYTES, 3 * 8 * max(n, 1))):
        packed[block] = _pack_rows(rows[block], bits)
    return packed if dim % 2 == 1 else packed.t().contiguous()


def _pack_rows(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` of checked codes along the last dimension."""
    count, n = rows.shape
    chunks = math.ceil(n / CHUNK)
    values = torch.zeros(count, chunks * CHUNK, dtype=torch.int64, device=rows.device)
    values[:, :n] = rows.to(torch.int64)
    values = values.view(count, chunks, CHUNK)
    start = torch.arange(CHUNK, device=rows.device) * bits
    word, shift = start // 32, start % 32
    # Bits of different codes never overlap, so adding is the same as OR-ing them in.
    words = torch.zeros(count, chunks, bits, dtype=torch.int64, device=rows.device)
    words.index_add_(-1, word, (values << shift) & 0xFFFFFFFF)
    spill = shift + bits - 32
    straddle = spill > 0  # the code's high bits continue in the next word
    if bool(straddle.any()):
        words.index_add_(-1, word[straddle] + 1, values[..., straddle] >> (bits - spill[straddle]))
    words = words.view(count, chunks * bits)[:, : packed_width(n, bits)]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` along the last dimension: ``uint8`` codes ``(..., num_codes)``."""
    check_packable_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed codes must be torch.int32, got {packed.dtype}")
    *lead, width = packed.shape
    expected = packed_width(num_codes, bits)
    if width != expected:
        raise ValueError(
            f"packed last dimension is {width} words, but {num_codes} codes at {bits} bits need {expected}"
        )
    chunked = math.ceil(num_codes / CHUNK) * bits  # whole chunks of 32 codes
    if chunked != width:
        packed = torch.nn.functional.pad(packed, (0, chunked - width))
    if CHUNK % bits == 0:
        return _unpack_whole_codes_per_word(packed, bits, num_codes)
    return _unpack_through_bytes(packed, bits, num_codes)


def pack_zero_points(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``(out, n_groups)`` packed along the output dimension, as compressed-tensors stores them."""
    return pack_codes(zero_point, bits, dim=0)


def unpack_zero_points(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_zero_points`: ``uint8`` zero points ``(out_features, n_groups)``."""
    return unpack_codes(packed.t().contiguous(), bits, out_features).t().contiguous()


def _unpack_whole_codes_per_word(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Unpacking when no code straddles two words (1, 2, 4 and 8 bits): word ``k``
    then holds codes ``k * 32 / bits`` onwards in order, so one broadcast shift and
    mask in int32 does it, with no gather.  The arithmetic shift of a negative word
    only fills bits that the mask drops."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)[..., :num_codes].to(torch.uint8)


def _unpack_through_bytes(
    packed: torch.Tensor, bits: int, num_codes: int, byteorder: str = sys.byteorder
) -> torch.Tensor:
    """Unpacking for widths whose codes may straddle words (3, 5, 6, 7 bits).

    The packed stream is little-endian, so its bytes in order are the words' bytes
    least significant first.  A code of at most 8 bits starting at stream bit ``p``
    lies within the 16-bit window of bytes ``p // 8`` and ``p // 8 + 1``; two byte
    gathers and int32 shifts read every code without 64-bit arithmetic.  Where the
    window's second byte would be past the chunk, the code fits in the first byte and
    the clamped index only feeds masked-off bits.  ``byteorder`` is the host's; it is
    a parameter so that a test can run the big-endian branch on a little-endian
    machine with byte-swapped words.
    """
    *lead, width = packed.shape
    num_chunks, chunk_bytes = width // bits, 4 * bits
    data = packed.contiguous().view(torch.uint8).reshape(*lead, width, 4)
    if byteorder == "big":  # memory holds each word most significant byte first
        data = data.flip(-1)
    data = data.reshape(*lead, num_chunks, chunk_bytes)
    start = torch.arange(CHUNK, device=packed.device) * bits
    first = start // 8
    second = (first + 1).clamp(max=chunk_bytes - 1)
    offset = (start % 8).to(torch.int32)
    window = data.index_select(-1, first).to(torch.int32) | (data.index_select(-1, second).to(torch.int32) << 8)
    values = (window >> offset) & ((1 << bits) - 1)
    return values.reshape(*lead, num_chunks * CHUNK)[..., :num_codes].to(torch.uint8)


def check_packable_bits(bits: int) -> None:
    """The packed layout holds 1 bit per code up to the solver's ``MAX_BITS``."""
    check_bits(bits, low=MIN_PACKED_BITS)
