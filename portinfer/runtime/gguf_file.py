"""A GGUF file reader: metadata and tensor views, with every offset checked against the file size.

Why not `gguf.GGUFReader`: it builds a numpy view per array element, which takes seconds for a
vocabulary of 50k strings; this reads the header sequentially (SmolLM2: ~0.2 s) and memory-maps
the tensor data. The `gguf` package still supplies the block sizes and the dequantizers.

Layout (little endian; GGUF v2/v3): magic "GGUF", version u32, tensor_count u64, kv_count u64;
kv_count x (key: string, type: u32, value); tensor_count x (name: string, n_dims: u32,
dims: u64[n_dims] fastest first, type: u32, offset: u64); padding to `general.alignment`
(default 32); the tensor data, each tensor at data_start + offset. A string is u64 length + UTF-8.

Every count, length, dimension and offset is checked against the bytes left in the file before
anything is allocated for it (llama.cpp's gguf.c checks the same things), so a corrupt or hostile
file ends in GGUFFormatError, never in a huge allocation, an overflow or a deep recursion.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import struct
import sys
import weakref
from dataclasses import dataclass

import numpy as np

MAGIC = b"GGUF"
# value type -> (struct format, size) for scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9
MAX_DIMS = 8  # ggml's GGML_MAX_DIMS is 4; 8 leaves room
MAX_NESTING = 8  # arrays of arrays: real files use none; bounded so a file cannot exhaust the stack
MAX_ALIGNMENT = 1 << 20
# the fewest bytes each record can occupy: a bound on the counts the header may claim
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims, type, offset


# address ranges [start, end) of the live file maps (removed when a map's last view is gone, before
# the kernel can hand the range to anything else): release_pages acts only inside them
_LIVE_MAPS = {}


def _register_map(array: np.ndarray):
    start = array.ctypes.data
    key = (start, start + array.nbytes)
    _LIVE_MAPS[key] = True
    weakref.finalize(array, _LIVE_MAPS.pop, key, None)


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()
_MADV_DONTNEED = 4


def release_pages(*tensors) -> int:
    """Drop this process's pages of file-map views that nothing will read again (the sources of a
    weight the loader concatenated into memory of its own): -> bytes released.

    Only whole pages inside a view are released, and only views into a live GGUF map (MAP_PRIVATE,
    never written): a later read of a released page faults it back from the file, so this changes
    what is resident, never what is read. Anything else (anonymous memory, other platforms) is left
    as it is."""
    if _MADVISE is None:
        return 0
    page, released = mmap.PAGESIZE, 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if nbytes == 0 or not t.is_contiguous():
            continue
        start = t.data_ptr()
        end = start + nbytes
        if not any(lo <= start and end <= hi for lo, hi in _LIVE_MAPS):
            continue
        first, last = -(-start // page) * page, end // page * page
        if last > first and _MADVISE(first, last - first, _MADV_DONTNEED) == 0:
            released += last - first
    return released


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file (truncated or corrupt)."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple  # torch order: slowest first ([N, K] for a matrix)
    type: int  # a gguf.GGMLQuantizationType value
    data: np.ndarray  # the tensor's raw bytes (uint8 view into the memory-mapped file)


class GGUFFile:
    def __init__(self, path):
        self.path = str(path)
        # copy-on-write (MAP_PRIVATE): tensors are zero-copy views that torch may treat as writable;
        # a write (none is made) would copy that page privately, never reach the file
        self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        _register_map(self._map)
        self._buf = memoryview(self._map)
        self._pos = 0
        if self._take(4) != MAGIC:
            raise GGUFFormatError("not a GGUF file (bad magic)")
        self.version = self._scalar(4)
        if self.version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {self.version} is not supported (2 or 3)")
        tensor_count, kv_count = self._scalar(10), self._scalar(10)
        self._count("kv_count", kv_count, _MIN_KV_BYTES)
        self._count("tensor_count", tensor_count, _MIN_TENSOR_BYTES)
        self.metadata = {}
        for _ in range(kv_count):
            key = self._string()
            if key in self.metadata:
                raise GGUFFormatError(f"metadata key {key!r} appears twice")
            self.metadata[key] = self._value(self._scalar(4), key)
        infos, names = [], set()
        for _ in range(tensor_count):
            name = self._string()
            if name in names:
                raise GGUFFormatError(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = self._scalar(4)
            if n_dims > MAX_DIMS:
                raise GGUFFormatError(f"tensor {name!r}: n_dims = {n_dims}, expected at most {MAX_DIMS}")
            dims = [self._scalar(10) for _ in range(n_dims)]
            if 0 in dims:
                raise GGUFFormatError(f"tensor {name!r}: dimension 0 in {dims}")
            infos.append((name, tuple(reversed(dims)), self._scalar(4), self._scalar(10)))
        alignment = self.metadata.get("general.alignment", 32)
        if (isinstance(alignment, bool) or not isinstance(alignment, int) or not 0 < alignment <= MAX_ALIGNMENT
                or alignment & (alignment - 1)):
            raise GGUFFormatError(f"general.alignment = {alignment!r}: expected a power of two in 1..{MAX_ALIGNMENT}")
        start = -(-self._pos // alignment) * alignment
        self.tensors = []
        for name, shape, kind, offset in infos:
            if offset % alignment:
                raise GGUFFormatError(f"tensor {name!r}: offset {offset} is not a multiple of general.alignment "
                                      f"= {alignment}")
            self.tensors.append(self._tensor(name, shape, kind, start + offset))

    # ------------------------------------------------------------------ sequential reads

    def _take(self, n):
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise GGUFFormatError(f"the header ends past the end of the file at byte {end} (truncated?)")
        data = self._buf[self._pos:end]
        self._pos = end
        return data

    def _count(self, what, count, min_bytes):
        """A count read from the header, bounded by the bytes left (each record takes >= min_bytes)."""
        left = len(self._buf) - self._pos
        if count * min_bytes > left:
            raise GGUFFormatError(f"{what} = {count} at byte {self._pos}: more than the {left} bytes left in the "
                                  f"file can hold (truncated or corrupt?)")

    def _scalar(self, kind):
        fmt, size = _SCALARS[kind]
        return struct.unpack(fmt, self._take(size))[0]

    def _string(self):
        n = self._scalar(10)
        try:
            return bytes(self._take(n)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFormatError(f"a string at byte {self._pos - n} is not UTF-8 ({exc})") from None

    def _value(self, kind, key, depth=0):
        if kind in _SCALARS:
            return self._scalar(kind)
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            if depth >= MAX_NESTING:
                raise GGUFFormatError(f"metadata {key!r}: arrays nested deeper than {MAX_NESTING}")
            item, count = self._scalar(4), self._scalar(10)
            if item == STRING:
                self._count(f"metadata {key!r}: array length", count, 8)
                return [self._string() for _ in range(count)]
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                self._count(f"metadata {key!r}: array length", count, dtype.itemsize)
                return np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype).tolist()
            if item == ARRAY:
                self._count(f"metadata {key!r}: array length", count, 4 + 8)
                return [self._value(ARRAY, key, depth + 1) for _ in range(count)]
            raise GGUFFormatError(f"metadata {key!r}: unknown array item type {item} at byte {self._pos}")
        raise GGUFFormatError(f"metadata {key!r}: unknown GGUF value type {kind} at byte {self._pos}")

    def _tensor(self, name, shape, kind, offset):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name!r}: unknown ggml type {kind}") from None
        count = math.prod(shape)  # Python integers: no overflow, compared with the file size below
        if count % block:
            raise GGUFFormatError(f"tensor {name!r}: {count} elements are not whole blocks of {block}")
        nbytes = count // block * block_bytes
        if offset + nbytes > len(self._map):
            raise GGUFFormatError(f"tensor {name!r} ends at byte {offset + nbytes}, past the end of the file "
                                  f"({len(self._map)} bytes; truncated?)")
        return TensorInfo(name, shape, kind, self._map[offset:offset + nbytes])
