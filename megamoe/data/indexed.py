"""Megatron-compatible indexed datasets: `<prefix>.bin` (tokens) + `<prefix>.idx` (index).

`.idx` layout (little-endian), the "MMIDIDX" format of Megatron-Core's `IndexedDataset`:

  offset 0   9 bytes   magic b"MMIDIDX\\0\\0"
  offset 9   u64       version (1)
  offset 17  u8        token dtype code (see DTYPES)
  offset 18  u64       N, the number of sequences
  offset 26  u64       M, the number of document indices
  offset 34  i32[N]    sequence lengths (tokens)
             i64[N]    sequence byte offsets into `.bin`
             i64[M]    document indices: sequence ids where documents start, 0 … N
             (i8[N]    sequence modes, multimodal datasets only; ignored here)

`.bin` is the sequences' tokens back to back. The writer stores one sequence per document, so the
document indices are 0, 1, …, N; "document" below means a sequence of the index.
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
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8          # 34


def best_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype Megatron uses for this vocabulary (uint16 below 65,500)."""
    return np.dtype(np.uint16 if vocab_size < 65_500 else np.int32)


class IndexedDatasetWriter:
    """Append documents, then `finalize()`.

    Both files are written under temporary names (`<prefix>.bin.tmp`, `<prefix>.idx.tmp`) and
    renamed at the end, so an interrupted run never leaves a half-written dataset under the final
    name. As a context manager it finalizes on success and `abort()`s on an exception.
    """

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix, self.dtype = str(prefix), np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"{self.prefix}: unsupported token dtype {self.dtype} "
                             f"(one of {sorted(str(d) for d in CODES)})")
        self._bin_tmp, self._idx_tmp = self.prefix + ".bin.tmp", self.prefix + ".idx.tmp"
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"{self.prefix}: document {len(self._lengths)} must be 1-D, got "
                             f"shape {arr.shape}")
        if arr.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise ValueError(f"{self.prefix}: document {len(self._lengths)} has token ids "
                                 f"[{lo}, {hi}] outside {self.dtype} [{info.min}, {info.max}]")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(arr.size))

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<QBQQ", VERSION, CODES[self.dtype], len(lengths), len(doc_index)))
            for arr in (lengths, pointers, doc_index):
                f.write(arr.tobytes(order="C"))
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(self._idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        """Close and delete the temporary files; the final names are left untouched."""
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _fail(path: str, offset: int, what: str):
    raise ValueError(f"{path}: offset {offset}: {what}")


class IndexedDatasetReader:
    """Memory-mapped reader. Every structural problem found on open is one ValueError naming the
    file and the byte offset where it is."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self.idx_path, self.bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file (dataset prefix '{self.prefix}')")
        idx_size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if header[:len(MAGIC)] != MAGIC:
            _fail(self.idx_path, 0, f"bad magic {header[:len(MAGIC)]!r}, expected {MAGIC!r} "
                  "(not a Megatron indexed dataset)")
        if len(header) < HEADER_BYTES:
            _fail(self.idx_path, len(header), f"truncated header (needs {HEADER_BYTES} bytes)")
        version, code, n, m = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            _fail(self.idx_path, 9, f"unsupported version {version} (expected {VERSION})")
        if code not in DTYPES:
            _fail(self.idx_path, 17, f"unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        need = HEADER_BYTES + 12 * n + 8 * m
        if idx_size < need:
            _fail(self.idx_path, idx_size, f"truncated index: {n} sequences and {m} document "
                  f"indices need {need} bytes")
        idx = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        self.doc_lengths = np.frombuffer(idx, np.int32, n, HEADER_BYTES)
        self.pointers = np.frombuffer(idx, np.int64, n, HEADER_BYTES + 4 * n)
        self.document_indices = np.frombuffer(idx, np.int64, m, HEADER_BYTES + 12 * n)
        self._check_index(n, m)
        end = int(self.doc_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        bin_size = os.path.getsize(self.bin_path)
        if bin_size < end:
            raise ValueError(f"{self.bin_path}: truncated at offset {bin_size}: the index "
                             f"({self.idx_path}) describes {end} bytes of tokens")
        if bin_size > end:
            _fail(self.bin_path, end, f"{bin_size - end} unexpected trailing bytes: the index "
                  f"({self.idx_path}) describes {end} bytes of tokens")
        self._bin = (np.memmap(self.bin_path, mode="r", dtype=np.uint8) if bin_size
                     else np.zeros(0, np.uint8))

    def _check_index(self, n: int, m: int) -> None:
        lengths_at, pointers_at = HEADER_BYTES, HEADER_BYTES + 4 * n
        bad = np.flatnonzero(self.doc_lengths < 0)
        if bad.size:
            _fail(self.idx_path, lengths_at + 4 * int(bad[0]),
                  f"negative length of sequence {bad[0]}")
        expect = np.zeros(n, dtype=np.int64)
        np.cumsum(self.doc_lengths[:-1], dtype=np.int64, out=expect[1:])
        bad = np.flatnonzero(self.pointers != expect * self.dtype.itemsize)
        if bad.size:
            k = int(bad[0])
            _fail(self.idx_path, pointers_at + 8 * k, f"pointer of sequence {k} is "
                  f"{self.pointers[k]}, expected {expect[k] * self.dtype.itemsize} (sequences "
                  "must be stored back to back)")
        docs = self.document_indices
        if m == 0 or docs[0] != 0 or docs[-1] != n or (np.diff(docs) < 0).any():
            _fail(self.idx_path, HEADER_BYTES + 12 * n, f"document indices must rise from 0 to "
                  f"{n}")

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset … offset + length` of document `doc` (a read-only view)."""
        size = int(self.doc_lengths[doc])
        length = size - offset if length is None else length
        if not (0 <= offset and 0 <= length and offset + length <= size):
            raise IndexError(f"{self.prefix}: tokens [{offset}, {offset + length}) outside "
                             f"document {doc} of {size} tokens")
        start = int(self.pointers[doc]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    def __getitem__(self, doc: int) -> np.ndarray:
        return self.get(doc)

    @property
    def tokens(self) -> np.ndarray:
        """All documents back to back as one read-only token array (a view of `.bin`)."""
        return np.frombuffer(self._bin, self.dtype, self.num_tokens, 0)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum(dtype=np.int64))
