"""The written ORT-CPU decoder (dream_export/export/cpu_decoder.py, runtime/chains.py): every row of a draft-tree
verify is bit-identical to plain decoding of the same tokens, the chain layout of a tree, the quantized token
rows against ONNX Runtime's own dequantization, and the process-wide thread pool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_tree_rows_are_plain_steps

ROOT = Path(__file__).resolve().parents[1]


TREES = [
    ([-1], "one node"),
    ([-1, 0, 1, 2, 3], "one chain (a prompt-lookup run)"),
    ([-1, 0, 0, 1, 2, 3], "two chains of different lengths"),
    ([-1, 0, 1, 1, 2], "two chains sharing a two-node prefix"),
    ([-1, 0, 0, 1, 2], "two chains sharing the root, leaves at the same depth"),
]


@pytest.fixture(scope="module")
def written_bundles(zoo, tmp_path_factory):
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target

    model_dir, _ = zoo.get("gqa_nosplit")
    out = {}
    for precision in ("int4", "int8"):
        model, processor = load_target(str(model_dir))
        out[precision] = export_bundle(model, processor, {"model": "tiny"},
                                       ExportOptions(out=tmp_path_factory.mktemp(precision) / "b", cpu_precision=precision),
                                       quiet=True)
    return out


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_verify_rows_equal_plain_steps_bitwise(precision, written_bundles):
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(written_bundles[precision])
    vocab = pipe.text["vocab_size"]
    rng = np.random.default_rng(7)
    for parents, what in TREES:
        tokens = rng.integers(0, vocab, len(parents))
        assert_tree_rows_are_plain_steps(pipe, "Describe a red square.", tokens, parents)


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_lone_rows_run_beside_a_copy_where_this_cpu_needs_it(precision, written_bundles):
    """The load-time question (does this CPU compute a 1-row MatMulNBits call its own way?) is asked once per pipeline
    and leaves the decoder empty. Padded lone rows (forced here, whatever this CPU answered) equal the same rows of
    wider calls bit for bit, the LM head included, and return the unpadded shapes."""
    from runtime.chains import ChainDecoder
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(written_bundles[precision])
    dec = pipe.new_decoder()
    assert isinstance(dec, ChainDecoder) and dec.length == 0
    assert isinstance(pipe.pad_lone_rows, bool) and dec.pad_single == pipe.pad_lone_rows
    again = pipe.new_decoder()
    assert again.pad_single == pipe.pad_lone_rows
    prefix = pipe.prompt_embeds(pipe.prepare([], "Describe a red square."))
    x = pipe.embed(np.array([5, 9, 11]))

    def call(pad, embeds, rows, slots, logit_rows):
        d = pipe.new_decoder()
        pipe.step(d, prefix)
        d.pad_single = pad
        return d._call(embeds, np.array(rows), np.array(slots), np.array(logit_rows))

    wide = call(False, x, [[0, 1, 2]], [0, 1, 2], [0, 1, 2])
    lone = call(True, x[:1], [[0]], [0], [0])
    assert lone["logits"].shape == (1, 1, wide["logits"].shape[-1]) and lone["hidden_states"].shape == (1, 1, x.shape[1])
    np.testing.assert_array_equal(lone["logits"][0, 0], wide["logits"][0, 0])
    np.testing.assert_array_equal(lone["hidden_states"][0, 0], wide["hidden_states"][0, 0])
    last = call(True, x, [[0, 1, 2]], [0, 1, 2], [2])  # three rows, one logits row: the head runs on two
    assert last["logits"].shape[1] == 1
    np.testing.assert_array_equal(last["logits"][0, 0], wide["logits"][0, 2])


def test_a_tree_with_more_chains_than_the_graph_holds_is_refused(written_bundles):
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(written_bundles["int4"])
    dec = pipe.new_decoder()
    pipe.step(dec, pipe.prompt_embeds(pipe.prepare([], "Hi")))
    with pytest.raises(ValueError, match="3 chains in one call; this graph holds at most 2"):
        dec.run_tree(pipe.embed(np.array([1, 2, 3, 4]))[None], np.array([-1, 0, 0, 0]))


def test_cpu_only_bundle_names_the_backend_it_needs(written_bundles):
    from runtime.errors import BundleError
    from runtime.pipeline import Pipeline

    manifest = json.loads((Path(written_bundles["int4"]) / "manifest.json").read_text())
    assert "decoder" not in manifest["graphs"] and manifest["embeddings"] is None
    with pytest.raises(BundleError, match="CPU-only bundle.*--backend ort-cpu"):
        Pipeline.from_bundle(written_bundles["int4"], fused=False).new_decoder()


@pytest.mark.parametrize("parents,chains,slots,depth", [
    ([-1], [[0, 0]], [0], [0]),
    ([-1, 0, 1, 2], [[0, 1, 2, 3]], [0, 1, 2, 3], [0, 1, 2, 3]),
    ([-1, 0, 0], [[0, 1], [0, 2]], [0, 1, 3], [0, 1, 1]),
    ([-1, 0, 0, 1, 1, 2], [[0, 1, 3], [0, 1, 4], [0, 2, 5]], [0, 1, 7, 2, 5, 8], [0, 1, 1, 2, 2, 2]),
    ([-1, 0, 0, 1], [[0, 2, 2], [0, 1, 3]], [0, 4, 1, 5], [0, 1, 1, 2]),
])
def test_chains_of(parents, chains, slots, depth):
    from runtime.chains import chains_of

    rows, got_slots, got_depth = chains_of(np.array(parents))
    assert rows.tolist() == chains and got_slots.tolist() == slots and got_depth.tolist() == depth
    flat = rows.reshape(-1)
    assert all(flat[s] == n for n, s in enumerate(got_slots))  # every node is read back from a chain holding it


def test_chains_of_refuses_a_parent_after_its_child():
    from runtime.chains import chains_of

    with pytest.raises(ValueError, match=r"parents\[1\] = 2"):
        chains_of(np.array([-1, 2, 0]))


@pytest.mark.parametrize("bits,symmetric,k", [(4, False, 64), (4, True, 48), (8, True, 64), (8, False, 40)])
def test_token_rows_equal_matmulnbits_dequantization(bits, symmetric, k, tmp_path):
    """The runtime's numpy dequantization of MatMulNBits-layout rows equals ONNX Runtime's own (identity @ W at
    fp32 accuracy), K not a multiple of the block included."""
    import onnxruntime as ort

    from dream_export.export.cpu_decoder import BLOCK, quantize_blocks
    from runtime.token_rows import dequantize_rows

    n = 24
    w = np.random.default_rng(bits + k).standard_normal((k, n)).astype(np.float32)
    packed, scales, zp = quantize_blocks(w, bits, symmetric)
    inits = [numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scales, "s")]
    ins = ["a", "q", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "z"))
        ins.append("z")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=BLOCK,
                            accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ort_rows = sess.run(None, {"a": np.eye(k, dtype=np.float32)})[0].T           # [N, K]: W dequantized, transposed
    ids = np.array([3, 0, 23, 3])
    ours = dequantize_rows(packed, scales, zp, bits, ids, k)
    np.testing.assert_array_equal(ours, ort_rows[ids])
    assert np.abs(ours - w.T[ids]).max() < np.abs(w).max() / (2 ** (bits - 2))  # and it is W, roughly


_POOL = """
import sys
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
from runtime import ort_threads
if sys.argv[1] == "global":
    ort_threads.use_global_pool()
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
a = ort.InferenceSession(m, ort_threads.session_options(2), providers=["CPUExecutionProvider"])
b = ort.InferenceSession(m, ort_threads.session_options(1), providers=["CPUExecutionProvider"])
assert (b.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0] == [0, 2]).all()
print(ort_threads.pool_threads())
try:   # a library's own session with default options
    ort.InferenceSession(m, ort.SessionOptions(), providers=["CPUExecutionProvider"])
    print("others ok")
except Exception as exc:
    print("others refused:", "use_per_session_threads" in str(exc))
"""


@pytest.mark.parametrize("mode,pool,others", [("per-session", "None", "others ok"),
                                              ("global", "2", "others refused: True")])
def test_thread_pool_modes(mode, pool, others):
    """The library default keeps per-session pools (other ONNX Runtime users in the process are unaffected);
    the commands opt into one global pool, sized by the first session's request."""
    proc = subprocess.run([sys.executable, "-c", _POOL, mode], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()  # (ONNX Runtime may print its own error report in between)
    assert (lines[0], lines[-1]) == (pool, others)
