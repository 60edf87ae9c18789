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
import sys

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
    if CHUNK % bits == 0:
        return _unpack_whole_codes_per_word(packed, bits, num_codes)
    return _unpack_through_bytes(packed, bits, num_codes)


def _unpack_whole_codes_per_word(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Unpacking when no code straddles two words (1, 2, 4 and 8 bits): word ``k``
    then holds codes ``k * 32 / bits`` onwards in order, so one broadcast shift and
    mask in int32 does it, with no gather.  ``COMQLinear`` unpacks on every
    forward, so this is on the inference path.  The arithmetic shift of a negative
    word only fills bits that the mask drops."""
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
    gathers and int32 shifts read every code, about 3x faster than 64-bit word
    arithmetic.  Where the window's second byte would be past the chunk, the code
    fits in the first byte and the clamped index only feeds masked-off bits.
    ``byteorder`` is the host's; it is a parameter so that a test can run the
    big-endian branch on a little-endian machine with byte-swapped words.
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
