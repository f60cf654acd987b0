"""The external-data files an ONNX model refers to, read from its protobuf without the ``onnx`` package.

The runtime depends on onnxruntime only, and ONNX Runtime opens whatever file an initializer's
``external_data.location`` names inside the model's folder. A bundle is a trust boundary: before a session is
created, every such location must be a file the manifest lists (and so verifies). This walks the protobuf wire
format over the few message types that can hold a tensor: model -> graph / functions -> nodes -> attributes
(tensors, sparse tensors, subgraphs) and the graph's initializers. Field numbers are those of onnx.proto3.
"""

from __future__ import annotations

from pathlib import Path

# message -> {field number: message type of that (length-delimited) field}
_SCHEMA = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}


class ProtobufError(ValueError):
    pass


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ProtobufError("varint too long")


def _fields(buf: memoryview):
    """(field number, wire type, value) for each field; value is a memoryview for length-delimited fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ProtobufError("truncated length-delimited field")
            value, i = buf[i:i + n], i + n
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        yield field, wire, value


def _walk(buf: memoryview, kind: str, out: set[str], depth: int = 0) -> None:
    if depth > 64:
        raise ProtobufError("messages nested too deeply")
    schema = _SCHEMA[kind]
    if kind == "entry":
        key = value = None
        for field, wire, v in _fields(buf):
            if wire == 2 and field == 1:
                key = bytes(v).decode("utf-8", "replace")
            elif wire == 2 and field == 2:
                value = bytes(v).decode("utf-8", "replace")
        if key == "location" and value is not None:
            out.add(value)
        return
    for field, wire, v in _fields(buf):
        if wire == 2 and field in schema:
            _walk(v, schema[field], out, depth + 1)


def external_data_locations(path: Path) -> set[str]:
    """Every ``external_data`` location the model at ``path`` names (empty when its weights are inline)."""
    out: set[str] = set()
    _walk(memoryview(Path(path).read_bytes()), "model", out)
    return out
