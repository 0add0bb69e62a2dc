"""A GGUF file reader: metadata and tensor views, with every offset checked against the file size.

Why not `gguf.GGUFReader`: it builds a numpy view per array element, which takes seconds for a
vocabulary of 50k strings; this reads the header sequentially (SmolLM2: ~0.2 s) and memory-maps
the tensor data. The `gguf` package still supplies the block sizes and the dequantizers.

Layout (little endian; GGUF v2/v3): magic "GGUF", version u32, tensor_count u64, kv_count u64;
kv_count x (key: string, type: u32, value); tensor_count x (name: string, n_dims: u32,
dims: u64[n_dims] fastest first, type: u32, offset: u64); padding to `general.alignment`
(default 32); the tensor data, each tensor at data_start + offset. A string is u64 length + UTF-8.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"GGUF"
# value type -> (struct format, size) for scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9


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
        self._buf = memoryview(self._map)
        self._pos = 0
        if self._take(4) != MAGIC:
            raise GGUFFormatError("not a GGUF file (bad magic)")
        self.version = self._scalar(4)
        if self.version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {self.version} is not supported (2 or 3)")
        tensor_count, kv_count = self._scalar(10), self._scalar(10)
        self.metadata = {}
        for _ in range(kv_count):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            n_dims = self._scalar(4)
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name!r}: {n_dims} dimensions")
            dims = [self._scalar(10) for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), self._scalar(4), self._scalar(10)))
        alignment = int(self.metadata.get("general.alignment", 32))
        start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(name, shape, kind, start + offset) for name, shape, kind, offset in infos]

    # ------------------------------------------------------------------ sequential reads

    def _take(self, n):
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise GGUFFormatError(f"the header ends past the end of the file at byte {end} (truncated?)")
        data = self._buf[self._pos:end]
        self._pos = end
        return data

    def _scalar(self, kind):
        fmt, size = _SCALARS[kind]
        return struct.unpack(fmt, self._take(size))[0]

    def _string(self):
        n = self._scalar(10)
        try:
            return bytes(self._take(n)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFormatError(f"a string at byte {self._pos - n} is not UTF-8 ({exc})") from None

    def _value(self, kind):
        if kind in _SCALARS:
            return self._scalar(kind)
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            item, count = self._scalar(4), self._scalar(10)
            if item == STRING:
                return [self._string() for _ in range(count)]
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                return np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype).tolist()
            if item == ARRAY:
                return [self._value(ARRAY) for _ in range(count)]
        raise GGUFFormatError(f"unknown GGUF value type {kind} at byte {self._pos}")

    def _tensor(self, name, shape, kind, offset):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name!r}: unknown ggml type {kind}") from None
        count = int(np.prod(shape)) if shape else 1
        if count % block:
            raise GGUFFormatError(f"tensor {name!r}: {count} elements are not whole blocks of {block}")
        nbytes = count // block * block_bytes
        if offset + nbytes > len(self._map):
            raise GGUFFormatError(f"tensor {name!r} ends at byte {offset + nbytes}, past the end of the file "
                                  f"({len(self._map)} bytes; truncated?)")
        return TensorInfo(name, shape, kind, self._map[offset:offset + nbytes])
