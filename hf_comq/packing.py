"""Sub-byte packing of integer codes into ``int32`` words (pure torch).

Layout (the on-disk format of ``COMQLinear.qweight``; changing it breaks checkpoints):

* Codes are packed along the **last** dimension (the input dimension of a weight in
  ``(out, in)`` layout), row by row, so every output row is self-contained.
* The last dimension is split into *chunks of 32 codes* (the tail chunk is padded with
  zeros).  A chunk of 32 ``bits``-bit codes is exactly ``bits`` 32-bit words, for every
  ``bits`` from 1 to 8 -- so 3-, 5-, 6- and 7-bit codes waste no space and 2-, 4- and
  8-bit codes need no special case.
* Inside a chunk, the ``bits`` words form one little-endian bit stream: word ``k``
  holds stream bits ``[32k, 32k + 32)`` with bit 0 the least significant, and code
  ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``, least significant bit
  first.  A code may straddle two words when ``32 % bits != 0``.
* Words are stored as ``torch.int32`` (safetensors has no uint32 in every consumer);
  the sign bit is simply bit 31 of the stream.

The packed shape of ``(..., n)`` codes is ``(..., packed_width(n, bits))`` with
``packed_width(n, bits) == ceil(n / 32) * bits``: at 4 bits, 1/8 of the fp32 bytes.
"""

from __future__ import annotations

import math

import torch

CHUNK = 32
MIN_BITS = 1
MAX_BITS = 8
_WORD_MASK = (1 << 32) - 1


def packed_width(num_codes: int, bits: int) -> int:
    """Number of ``int32`` words that hold ``num_codes`` codes of ``bits`` bits."""
    _check_bits(bits)
    if num_codes < 0:
        raise ValueError(f"num_codes must be non-negative, got {num_codes}")
    return math.ceil(num_codes / CHUNK) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits - 1]`` along the last dim into ``int32`` words.

    Raises ``ValueError`` for codes outside the range rather than silently masking
    them: a wrong code would only show up later as a subtly wrong model.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > (1 << bits) - 1):
        raise ValueError(
            f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}; "
            f"got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    *lead, n = codes.shape
    num_chunks = math.ceil(n / CHUNK)
    values = torch.zeros(*lead, num_chunks * CHUNK, dtype=torch.int64, device=codes.device)
    values[..., :n] = codes.to(torch.int64)
    values = values.reshape(*lead, num_chunks, CHUNK)

    word, shift, spill = _positions(bits, codes.device)
    # Bits of different codes never overlap, so adding is the same as OR-ing them in.
    words = torch.zeros(*lead, num_chunks, bits, dtype=torch.int64, device=codes.device)
    words.index_add_(-1, word, (values << shift) & _WORD_MASK)
    straddle = spill > 0
    if bool(straddle.any()):
        high = values[..., straddle] >> (bits - spill[straddle])
        words.index_add_(-1, word[straddle] + 1, high)
    return _to_int32(words.reshape(*lead, num_chunks * bits))


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` codes of shape ``(..., num_codes)``."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed codes must be torch.int32, got {packed.dtype}")
    *lead, width = packed.shape
    expected = packed_width(num_codes, bits)
    if width != expected:
        raise ValueError(
            f"packed last dimension is {width} words, but {num_codes} codes at {bits} bits need {expected}"
        )
    num_chunks = width // bits
    words = packed.to(torch.int64).reshape(*lead, num_chunks, bits) & _WORD_MASK
    word, shift, spill = _positions(bits, packed.device)
    values = words[..., word] >> shift
    straddle = spill > 0
    if bool(straddle.any()):
        high = words[..., word[straddle] + 1] << (bits - spill[straddle])
        values[..., straddle] |= high
    values = values & ((1 << bits) - 1)
    return values.reshape(*lead, num_chunks * CHUNK)[..., :num_codes].to(torch.uint8)


def _positions(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of the 32 codes of a chunk: its word, bit shift, and bits spilling into the next word."""
    start = torch.arange(CHUNK, device=device, dtype=torch.int64) * bits
    word = start // 32
    shift = start % 32
    spill = (shift + bits - 32).clamp(min=0)
    return word, shift, spill


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    signed = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return signed.to(torch.int32)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer between {MIN_BITS} and {MAX_BITS}, got {bits!r}")
