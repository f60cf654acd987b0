"""The token-embedding table the runtime gathers from: a float matrix, or (the written ORT-CPU decoder's bundles)
the LM head's blockwise-quantized rows, dequantized per gathered row (numpy; a tied head is stored once)."""

from __future__ import annotations

import numpy as np

from .errors import BundleError


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                    rows: np.ndarray, columns: int) -> np.ndarray:
    """Rows ``rows`` of an ``[N, K]`` matrix in ONNX Runtime's MatMulNBits layout (``packed [N, K/block, block*bits/8]``
    uint8, ``scales [N, K/block]``, optional packed zero points), in fp32: values low bits first within a byte, a
    missing zero point is the middle of the range (MatMulNBits' own rule)."""
    p = np.asarray(packed[rows])
    n, blocks = p.shape[0], p.shape[1]
    if bits == 4:
        q = np.empty((n, blocks, 2 * p.shape[2]), np.float32)
        q[..., 0::2] = p & 0x0F
        q[..., 1::2] = p >> 4
    elif bits == 8:
        q = p.astype(np.float32)
    else:
        raise BundleError(f"quantized token rows of {bits} bits: expected 4 or 8")
    if zero_points is None:
        q -= np.float32(1 << (bits - 1))
    else:
        z = np.asarray(zero_points[rows])
        if bits == 4:
            zp = np.empty((n, 2 * z.shape[1]), np.float32)
            zp[:, 0::2] = z & 0x0F
            zp[:, 1::2] = z >> 4
        else:
            zp = z.astype(np.float32)
        q -= zp[:, :blocks, None]
    q *= np.asarray(scales[rows], np.float32).reshape(n, blocks, 1)
    return q.reshape(n, -1)[:, :columns]


class TokenRows:
    """``rows[ids]`` -> float32 ``[len(ids), hidden]`` from the manifest entry ``entry``."""

    def __init__(self, bundle, entry: dict | None):
        if not entry:
            raise BundleError(f"{bundle.path}: the manifest has no token embeddings for this decoder")
        q = entry.get("quantized")
        self.bits = None
        if q is None:
            self.matrix = bundle.array(entry)
            return
        self.bits, self.columns = int(q["bits"]), int(q["columns"])
        # plain views of the mapped file: numpy's memmap subclass costs more per gathered row than the rows do
        self.packed, self.scales = np.asarray(bundle.array(q["data"])), np.asarray(bundle.array(q["scales"]))
        self.zero_points = np.asarray(bundle.array(q["zero_points"])) if q.get("zero_points") else None
        if self.packed.shape[0] != self.scales.shape[0]:
            raise BundleError(f"{bundle.path}: quantized token rows: {self.packed.shape[0]} rows of data but "
                              f"{self.scales.shape[0]} of scales")

    def __len__(self) -> int:
        return (self.matrix if self.bits is None else self.packed).shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.atleast_1d(np.asarray(ids, np.int64))
        if self.bits is None:
            return np.asarray(self.matrix[ids], dtype=np.float32)
        return dequantize_rows(self.packed, self.scales, self.zero_points, self.bits, ids, self.columns)
