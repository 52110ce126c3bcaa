"""Megatron-compatible indexed datasets: `<prefix>.bin` (tokens) + `<prefix>.idx` (index).

Index layout (little-endian), as Megatron-Core's `IndexedDataset` reads it:
  9 bytes magic `MMIDIDX\\0\\0` | u64 version (1) | u8 dtype code | u64 sequence count N |
  u64 document-index count M | i32 lengths[N] | i64 byte pointers[N] | i64 document indices[M]
Here every document is one sequence, so the document indices are 0, 1, …, N.
"""

from __future__ import annotations

import os
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8


def best_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65_500 else np.int32


class IndexedDatasetWriter:
    """Append documents, then `finalize()`: both files are written under temporary names and
    renamed at the end, so an interrupted run never leaves a half-written dataset."""

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"{prefix}: unsupported token dtype {self.dtype}")
        self._bin_tmp = prefix + ".bin.tmp"
        self._bin = open(self._bin_tmp, "wb")
        self.lengths: list[int] = []

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self.lengths.append(len(arr))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        idx_tmp = self.prefix + ".idx.tmp"
        with open(idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_index)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_index.tobytes())
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        for path in (self._bin_tmp, self.prefix + ".idx.tmp"):
            if os.path.exists(path):
                os.remove(path)


class IndexedDatasetReader:
    """Memory-mapped reader; every structural problem is one ValueError naming file and offset."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file (dataset prefix '{prefix}')")
        idx_size = os.path.getsize(idx_path)
        if idx_size < _HEADER:
            raise ValueError(f"{idx_path}: truncated index ({idx_size} bytes, header needs "
                             f"{_HEADER})")
        with open(idx_path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise ValueError(f"{idx_path}: offset 0: bad magic {magic!r}, expected {MAGIC!r} "
                                 "(not a Megatron indexed dataset)")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != VERSION:
                raise ValueError(f"{idx_path}: offset 9: unsupported version {version}")
            (code,) = struct.unpack("<B", f.read(1))
            if code not in DTYPES:
                raise ValueError(f"{idx_path}: offset 17: unknown dtype code {code}")
            n, m = struct.unpack("<QQ", f.read(16))
        self.dtype = np.dtype(DTYPES[code])
        need = _HEADER + n * 4 + n * 8 + m * 8
        if idx_size < need:
            raise ValueError(f"{idx_path}: truncated at offset {idx_size}: {n} sequences need "
                             f"{need} bytes")
        idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.doc_lengths = np.frombuffer(idx, np.int32, n, _HEADER)
        self.pointers = np.frombuffer(idx, np.int64, n, _HEADER + 4 * n)
        self.document_indices = np.frombuffer(idx, np.int64, m, _HEADER + 12 * n)
        bin_size = os.path.getsize(bin_path)
        end = int(self.pointers[-1]) + int(self.doc_lengths[-1]) * self.dtype.itemsize if n else 0
        if bin_size < end:
            raise ValueError(f"{bin_path}: truncated at offset {bin_size}: the index points to "
                             f"data up to byte {end}")
        self.bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        size = int(self.doc_lengths[doc])
        length = size - offset if length is None else length
        start = int(self.pointers[doc]) + offset * self.dtype.itemsize
        return np.frombuffer(self.bin, self.dtype, length, start)

    def __getitem__(self, doc: int) -> np.ndarray:
        return self.get(doc)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.astype(np.int64).sum())
