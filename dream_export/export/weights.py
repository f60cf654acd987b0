"""Store each weight of a bundle once: its graphs share one external-data file.

``decoder.onnx`` and ``decoder_ort_cpu.onnx`` are two graphs over the same HF modules; the draft graphs
hold the target's embedding matrix and head; with a tied head, the LM head is the embedding matrix the
runtime gathers token embeddings from. Written independently, a 135M-parameter model took 1.2 GB.

After export and validation, ``share_weights`` moves every initializer (and Constant tensor) of at least
``MIN_BYTES`` out of the given graphs into one file, one copy per distinct content (sha256 and length),
each at a ``ALIGN``-byte aligned offset, and points the graphs' tensors there with ONNX external data
(location, offset, length), which ONNX Runtime and TensorRT's ONNX parser both read. Extra arrays (the
embedding matrix) go into the same file and come back as (offset, length). The graphs' bytes are not
changed, only where they live, so the validation done before still holds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

WEIGHTS_FILE = "weights.bin"
ALIGN = 4096          # page-aligned offsets: a reader can map each tensor straight from the file
MIN_BYTES = 1024      # smaller tensors (shapes, scalars) stay inside the graph

_DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


class WeightFile:
    """An append-only blob file with a content index. ``readonly`` files only answer for contents they hold."""

    def __init__(self, folder: Path, name: str, readonly: bool = False):
        self.folder, self.name, self.readonly = Path(folder), name, readonly
        self.index: dict[tuple[bytes, int], tuple[int, int]] = {}
        self._f = None if readonly else open(self.folder / name, "wb")

    @classmethod
    def indexed(cls, folder: Path, name: str, graph_files: list[str]) -> "WeightFile":
        """A read-only view of an existing blob, indexed by the tensors that the given graphs keep in it."""
        store = cls(folder, name, readonly=True)
        with open(store.folder / name, "rb") as f:
            for g in graph_files:
                model = onnx.load(str(store.folder / g), load_external_data=False)
                for t in _tensors(model.graph):
                    info = _external_info(t)
                    if info and info["location"] == name:
                        f.seek(info["offset"])
                        raw = f.read(info["length"])
                        store.index[(hashlib.sha256(raw).digest(), len(raw))] = (info["offset"], info["length"])
        return store

    def find(self, raw: bytes) -> tuple[int, int] | None:
        return self.index.get((hashlib.sha256(raw).digest(), len(raw)))

    def put(self, raw: bytes) -> tuple[int, int]:
        key = (hashlib.sha256(raw).digest(), len(raw))
        if key in self.index:
            return self.index[key]
        if self.readonly:
            raise KeyError(f"{self.name} is read-only and does not hold this tensor")
        pos = self._f.tell()
        pad = (-pos) % ALIGN
        self._f.write(b"\0" * pad)
        self._f.write(raw)
        self.index[key] = (pos + pad, len(raw))
        return self.index[key]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _tensors(graph):
    """Every TensorProto of a graph: initializers, Constant values, and those of subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors(g)


def _external_info(t) -> dict | None:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return {"location": info["location"], "offset": int(info.get("offset", 0)), "length": int(info.get("length", 0))}


def external_locations(path: Path) -> set[str]:
    """The external-data files a graph reads."""
    model = onnx.load(str(path), load_external_data=False)
    return {info["location"] for t in _tensors(model.graph) if (info := _external_info(t))}


def externalize(path: Path, stores: list[WeightFile], min_bytes: int = MIN_BYTES) -> set[str]:
    """Point every large tensor of the graph at ``path`` into the first store that holds (or takes) its bytes;
    rewrite the graph in place (temp file, then rename). Returns the blob files the graph now reads; external
    files it read before and no longer does are removed."""
    path = Path(path)
    before = external_locations(path)
    model = onnx.load(str(path), load_external_data=True)
    used = set()
    for t in _tensors(model.graph):
        raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).astype(
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).tobytes()
        if len(raw) < min_bytes:
            continue
        for store in stores:
            where = store.find(raw) if store.readonly else store.put(raw)
            if where is not None:
                break
        else:
            raise RuntimeError(f"{path.name}: no weight file takes tensor {t.name!r}")
        for field in _DATA_FIELDS:
            t.ClearField(field)
        del t.external_data[:]
        t.raw_data = raw  # set_external_data wants the raw_data field present
        set_external_data(t, store.name, offset=where[0], length=where[1])
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        used.add(store.name)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    for old in before - used:
        (path.parent / old).unlink(missing_ok=True)
    return used


def share_weights(folder: Path, graph_files: list[str], extra: dict[str, np.ndarray] | None = None,
                  name: str = WEIGHTS_FILE) -> tuple[dict[str, dict], dict[str, set[str]]]:
    """Move the weights of ``graph_files`` (in ``folder``) into one shared file; add ``extra`` arrays to it.
    Returns ({extra name: {"file", "offset", "shape", "dtype"}}, {graph file: the blob files it reads})."""
    store = WeightFile(folder, name)
    placed, used = {}, {}
    try:
        for key, arr in (extra or {}).items():
            arr = np.ascontiguousarray(arr)
            offset, _ = store.put(arr.tobytes())
            placed[key] = {"file": name, "offset": offset, "shape": list(arr.shape), "dtype": str(arr.dtype)}
        for g in graph_files:
            used[g] = externalize(Path(folder) / g, [store])
    finally:
        store.close()
    return placed, used
