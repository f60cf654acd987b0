"""The device-resident decoder: K/V preallocated in backend memory, the past bound in place by pointer,
new rows copied (and an accepted draft path compacted) memory to memory, only logits / hidden rows / attention
scores copied back. Here it runs over ONNX Runtime's IOBinding with host memory: the same code the GPU backends
run, minus the CUDA calls (those run in the gpu/trt-marked tests: pytest -m "gpu or trt" on an NVIDIA machine)."""

import json

import numpy as np
import pytest

from runtime.backends.device import DeviceDecoder
from runtime.backends.memory import ALIGN, HostMemory
from runtime.backends.engine_plan import Plan, graph_digest, kv_row_copies
from runtime.bundle import Bundle
from runtime.kv import KVCache
from runtime.pipeline import Pipeline
from tests.helpers import hf_generate, run_decoder_calls


def test_kv_row_copies_merge_runs_and_reject_bad_rows():
    assert kv_row_copies(10, 4) == [(10, 0, 4)]
    assert kv_row_copies(10, 0) == []
    assert kv_row_copies(7, 6, [0, 1, 2]) == [(7, 0, 3)]
    assert kv_row_copies(7, 6, [0, 2, 3, 5]) == [(7, 0, 1), (8, 2, 2), (10, 5, 1)]
    with pytest.raises(ValueError, match="outside"):
        kv_row_copies(0, 3, [0, 3])


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_row_copies_do_what_the_host_cache_does(layout):
    """Applying the copy plan to a [1, cap, kvh, hd] buffer == KVCache.append with the same rows."""
    rng = np.random.default_rng(0)
    cache = KVCache(1, 3, 4, 40, layout)
    buf = np.zeros((1, 40, 3, 4), np.float32)
    length = 0
    for q, rows in ((5, None), (6, [0, 2, 3]), (4, [1]), (6, [0, 1, 2, 4, 5])):
        new = rng.standard_normal((1, q, 3, 4)).astype(np.float32)
        stored = new if layout == "bshd" else new.transpose(0, 2, 1, 3)
        cache.append([stored], [stored], rows)
        for dst, src, n in kv_row_copies(length, q, rows):
            buf[:, dst:dst + n] = new[:, src:src + n]
        length += q if rows is None else len(rows)
        k, _ = cache.past(0)
        assert np.array_equal(k if layout == "bshd" else k.transpose(0, 2, 1, 3), buf[:, :length])
    if layout == "bshd":
        assert np.shares_memory(cache.past(0)[0], cache.keys[0].data)  # the past is a view: no copy per call


def test_host_memory_is_aligned_as_tensorrt_requires():
    mem = HostMemory()
    bufs = [mem.alloc(n) for n in (1, 100, 384, 4097)]
    assert all(b.ptr % ALIGN == 0 for b in bufs)
    a = np.arange(10, dtype=np.float32)
    mem.upload(bufs[1].ptr, a)
    mem.copy(bufs[2].ptr, bufs[1].ptr, 40)
    assert np.array_equal(mem.download(bufs[2].ptr, (10,), np.float32), a)


def test_device_decoder_equals_the_host_decoder(tiny):
    """Prefill, steps, a verify with an accepted subset, a rollback: the same logits, hidden states, attention
    scores and K/V as the host-cache decoder."""
    _, bundle = tiny
    pipe = Pipeline.from_bundle(bundle, fused=False, warm=False)
    host = pipe.new_decoder()
    dev = pipe.backend.device_decoder(host.capacity)
    assert isinstance(dev, DeviceDecoder) and dev.names["layout"] == "bshd"
    rng = np.random.default_rng(1)
    H = int(pipe.text["hidden_size"])
    plan = Plan.from_manifest(pipe.bundle.manifest)
    n_tree = int(pipe.bundle.manifest["tree"]["total_tokens"])
    for q, rows, cut in ((37, None, None), (1, None, None), (n_tree, [0, 2, 3], None), (1, None, 30), (n_tree, [1], None)):
        p = host.length
        emb = (rng.standard_normal((1, q, H)) * 0.5).astype(np.float32)
        mask = np.zeros((1, 1, q, p + q), np.float32)
        mask[0, 0, :, p:] = np.triu(np.full((q, q), pipe.mask_min, np.float32), 1)
        pos = np.arange(p, p + q)
        a, b = host.run(emb, mask, pos), dev.run(emb, mask, pos)
        k = plan.logits_rows(q)
        assert b["logits"].shape == (1, k, a["logits"].shape[-1])
        np.testing.assert_allclose(b["logits"], a["logits"][:, q - k:], rtol=0, atol=1e-5)
        np.testing.assert_allclose(b["hidden_states"], a["hidden_states"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(b["attention_received"], a["attention_received"], rtol=0, atol=1e-6)
        host.commit(rows)
        dev.commit(rows)
        if cut is not None:
            host.truncate(cut)
            dev.truncate(cut)
        assert dev.length == host.length
        for i in (0, 1, 2 * int(pipe.text["num_layers"]) - 1):
            layer, which = divmod(i, 2)
            ref = host.cache.past(layer)[which]
            np.testing.assert_allclose(dev.read_kv(i), ref, rtol=0, atol=1e-5)


def test_device_decoder_generation_is_lossless_and_equals_transformers(zoo, images):
    """Plain and speculative through the device decoder == the default runtime == transformers ``generate``."""
    model_dir, bundle = zoo.with_drafter("gqa_nosplit", "copy")
    dev = Pipeline.from_bundle(bundle, fused="device")
    ref = Pipeline.from_bundle(bundle)
    assert type(dev.new_decoder()).__name__ == "DeviceDecoder"
    for name, prompt in (("coffee", "What is in the image?"), ("astronaut", "Describe it.")):
        want = hf_generate(str(model_dir), [images[name]], prompt, 12)
        for speculative in (False, True):
            got = dev.generate([images[name]], prompt, max_new_tokens=12, speculative=speculative).token_ids
            assert got == ref.generate([images[name]], prompt, max_new_tokens=12, speculative=speculative).token_ids
            assert got == want[: len(got)] and len(got) >= min(len(want), 1)


def test_device_decoder_on_the_shipped_model_with_its_drafter(tiny, images):
    _, bundle = tiny
    dev = Pipeline.from_bundle(bundle, fused="device")
    plain = dev.generate([images["coffee"]], "Describe the image.", max_new_tokens=40, speculative=False)
    spec = dev.generate([images["coffee"]], "Describe the image.", max_new_tokens=40, speculative=True)
    assert spec.token_ids == plain.token_ids and np.mean(spec.accept_lengths) > 1.0
    s = dev.session([images["coffee"]])
    first = s.ask("How many shapes are there?", keep=True, max_new_tokens=40)
    assert first.token_ids == dev.generate([images["coffee"]], "How many shapes are there?", max_new_tokens=40).token_ids


def test_graph_digest_follows_the_graph_and_its_weights(tiny):
    _, bundle = tiny
    m = json.loads((bundle / "manifest.json").read_text())
    d = graph_digest(m, "decoder")
    assert d == graph_digest(json.loads(json.dumps(m)), "decoder")
    for changed in ("decoder.onnx", *m["graphs"]["decoder"]["external_data"]):
        m2 = json.loads(json.dumps(m))
        m2["files"][changed] = "0" * 64
        assert graph_digest(m2, "decoder") != d, changed


def test_device_decoder_refuses_an_old_layout(tiny):
    _, bundle = tiny
    b = Bundle.load(bundle)
    graph = json.loads(json.dumps(b.graph("decoder")))
    graph["kv"]["layout"] = "bhsd"
    with pytest.raises(Exception, match="re-export"):
        DeviceDecoder(None, HostMemory(), graph, b.manifest["text"], 64, lambda q: q)


def test_build_engines_without_tensorrt_exits_2_and_writes_nothing(tiny, capsys):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("this machine has TensorRT")  # the point is the machine without it
    except ImportError:
        pass
    from runtime.engines import main

    _, bundle = tiny
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    capsys.readouterr()
    assert main(["--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dream-build-engines: error:") and "TensorRT" in err and "\n" not in err
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before
    assert main(["--bundle", str(bundle / "nope")]) == 2
    assert "not a bundle folder" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.trt
def test_tensorrt_backend_builds_engines_and_is_lossless(tiny, images, tmp_path):
    """On an NVIDIA GPU with TensorRT >= 10.3 and cuda-python: pytest -m "gpu and trt" tests/test_device.py."""
    import shutil

    from runtime.engines import main

    _, bundle = tiny
    b = tmp_path / "bundle"
    shutil.copytree(bundle, b)
    assert main(["--bundle", str(b)]) == 0
    trt = Pipeline.from_bundle(b, backend="trt")
    cpu = Pipeline.from_bundle(b, backend="ort-cpu")
    for speculative in (False, True):
        got = trt.generate([images["coffee"]], "Describe the image.", max_new_tokens=40, speculative=speculative)
        want = cpu.generate([images["coffee"]], "Describe the image.", max_new_tokens=40, speculative=False)
        assert got.token_ids[:10] == want.token_ids[:10]
    assert (trt.generate([images["coffee"]], "Describe the image.", max_new_tokens=40, speculative=True).token_ids
            == trt.generate([images["coffee"]], "Describe the image.", max_new_tokens=40, speculative=False).token_ids)


def test_bucketed_past_for_cuda_graphs_changes_nothing_but_shapes(tiny):
    """What the TensorRT backend does for CUDA graphs, run here: steps and verifies bind their past padded to a
    bucket (the padding masked out) from buffers allocated once, so every call of one (q, bucket) has the same
    shapes and addresses (its graph key); the outputs equal the unpadded decoder's."""
    _, bundle = tiny
    pipe = Pipeline.from_bundle(bundle, fused=False, warm=False)
    n = int(pipe.bundle.manifest["tree"]["total_tokens"])
    cap = pipe.new_decoder().capacity
    plain = pipe.backend.device_decoder(cap)
    bucketed = pipe.backend.device_decoder(cap, bucket=16)
    seen = {}
    inner = bucketed.execute

    def recording(inputs, outputs, graph_key=None):
        if graph_key is not None:
            addresses = tuple(sorted((k, v[0], tuple(v[1])) for k, v in {**inputs, **outputs}.items()))
            assert seen.setdefault(graph_key, addresses) == addresses, "a graph key must mean fixed shapes and addresses"
        return inner(inputs, outputs, graph_key)

    bucketed.execute = recording
    calls = [(40, None, None)] + [(1, None, None)] * 5 + [(n, [0, 1], None), (1, None, None), (n, [0], 44),
                                                          (1, None, None), (n, list(range(n)), None)] + [(1, None, None)] * 9
    for a, b in zip(run_decoder_calls(plain, pipe, calls), run_decoder_calls(bucketed, pipe, calls)):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=2e-5)
        assert np.array_equal(a["logits"].argmax(-1), b["logits"].argmax(-1))
    assert bucketed.length == plain.length
    np.testing.assert_allclose(bucketed.read_kv(0), plain.read_kv(0), rtol=0, atol=1e-5)
    # the prefill (40 > n) ran unpadded without a key; the 16 step/verify calls share few keys
    assert seen and all(q <= n and pb % 16 == 0 for q, pb in seen)
    assert len(seen) <= 6 and bucketed.padded_past(40, 1) == 48 and bucketed.padded_past(40, 41) == 40


def test_bucketed_decoder_is_lossless_in_generation(tiny, images):
    _, bundle = tiny
    pipe = Pipeline.from_bundle(bundle, fused="device")
    pipe.backend.device_decoder = lambda capacity, _d=pipe.backend.device_decoder: _d(capacity, bucket=32)
    ref = Pipeline.from_bundle(bundle)
    for prompt in ("Describe the image.", "How many shapes are there?"):
        want = ref.generate([images["coffee"]], prompt, max_new_tokens=40, speculative=False).token_ids
        for speculative in (False, True):
            assert pipe.generate([images["coffee"]], prompt, max_new_tokens=40, speculative=speculative).token_ids == want
