"""TFRecord framing: CRC-32C and records, for TFDS files read and TensorBoard files written.

A record is its length (uint64), the length's masked CRC-32C, the data and the data's
masked CRC-32C, all little-endian.
"""

import functools
import os
import struct

import numpy as np

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), bit-reversed
_LANE = 64  # bytes per lane of the vectorised CRC


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()
_CRC32C_NP = np.asarray(_CRC32C, np.uint32)


@functools.cache
def _zero_bytes_matrix(n: int) -> np.ndarray:
    """The linear map "feed n zero bytes" on the CRC register, as its 32 columns: column i
    is where the register 1 << i goes (n a power-of-two multiple of _LANE)."""
    if n > _LANE:
        half = _zero_bytes_matrix(n // 2)
        return _apply(half, half)
    v = np.uint32(1) << np.arange(32, dtype=np.uint32)
    for _ in range(n):
        v = _CRC32C_NP[v & 0xFF] ^ (v >> 8)
    return v


def _apply(columns: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The GF(2) matrix with these columns applied to each value in `v`."""
    bits = (v[..., None] >> np.arange(len(columns), dtype=np.uint32)) & 1
    return np.bitwise_xor.reduce(np.where(bits == 1, columns, np.uint32(0)), axis=-1)


@functools.cache
def _zero_bytes_tables(n: int) -> np.ndarray:
    """[4, 256]: the map of `_zero_bytes_matrix(n)` on each byte of the register."""
    columns, byte = _zero_bytes_matrix(n), np.arange(256, dtype=np.uint32)
    return np.stack([_apply(columns[8 * i:8 * i + 8], byte) for i in range(4)])


def _crc32c_lanes(data: bytes) -> int:
    """CRC-32C with NumPy: the data cut into lanes of _LANE bytes, all lanes' registers
    advanced together from zero, then folded pairwise by the zero-bytes map (a CRC is
    linear: crc(A B) = shift(crc(A), len B) ^ crc(B) for a zero start)."""
    x = np.frombuffer(data, np.uint8)
    lanes = -(-len(x) // _LANE)
    count = 1 << (lanes - 1).bit_length()  # a power of two, for the pairwise fold
    buf = np.zeros(count * _LANE, np.uint32)
    # Leading zero bytes leave a zero register as it is; the start value 0xFFFFFFFF is the
    # same as complementing the first four data bytes.
    start = len(buf) - len(x)
    buf[start:] = x
    buf[start:start + 4] ^= 0xFF
    columns_TL = buf.reshape(count, _LANE).T.copy()
    r = np.zeros(count, np.uint32)
    for col in columns_TL:
        r = _CRC32C_NP[(r ^ col) & 0xFF] ^ (r >> 8)
    n = _LANE
    while len(r) > 1:
        t = _zero_bytes_tables(n)
        a, b = r[0::2], r[1::2]
        r = t[0][a & 0xFF] ^ t[1][(a >> 8) & 0xFF] ^ t[2][(a >> 16) & 0xFF] ^ t[3][a >> 24] ^ b
        n *= 2
    return int(r[0]) ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses it."""
    if len(data) >= 32 * _LANE:  # below this the byte loop is faster
        return _crc32c_lanes(data)
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One framed record: length, its masked CRC, the data, its masked CRC."""
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


def offsets(path: str) -> list[tuple[int, int]]:
    """(offset, length) of each record's data in a TFRecord file, from its framing alone;
    a broken length header raises ValueError (the records after it cannot be found)."""
    out = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        position = 0
        while position < size:
            header = f.read(12)
            if len(header) < 12:
                raise ValueError(f"TFRecord file {path!r} ends inside a record header.")
            (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if crc != masked_crc32c(header[:8]):
                raise ValueError(f"TFRecord file {path!r} is corrupt at byte {position}.")
            out.append((position + 12, length))
            position += 12 + length + 4
            f.seek(position)
    return out


def read(fd: int, offset: int, length: int) -> bytes:
    """The data of the record at `offset` (from `offsets`) in the open file `fd`; ValueError
    when the data do not match their CRC."""
    data = os.pread(fd, length + 4, offset)
    if len(data) < length + 4:
        raise ValueError(f"the record at byte {offset} is cut off")
    (crc,) = struct.unpack("<I", data[length:])
    if crc != masked_crc32c(data[:length]):
        raise ValueError(f"the record at byte {offset} does not match its CRC-32C")
    return data[:length]
