"""The device decoder's lifetime and CUDA-graph keying, on the host stand-in (host memory that counts what is live
and how often a caller waits; ``HostGraphs``, which replays the bindings a graph was captured with, as a CUDA
graph does) over ONNX Runtime's CPU provider: the same decoder code the GPU backends run."""

import gc

import numpy as np
import pytest

from runtime.backends.device import DecoderPool, DeviceDecoder, GraphRunner, HostGraphs
from runtime.backends.memory import HostMemory
from runtime.backends.engine_plan import Plan
from runtime.pipeline import Pipeline

from tests.helpers import run_decoder_calls




def _decoder(pipe, execute, memory, capacity, pool=None, bucket=16):
    m = pipe.bundle.manifest
    n = int(m["tree"]["total_tokens"])
    return DeviceDecoder(execute, memory, pipe.bundle.graph("decoder"), m["text"], capacity,
                         Plan.from_manifest(m).logits_rows, bucket=bucket, fixed_q=n,
                         max_past=int(m["text"]["max_positions"]) - 1, pool=pool)


def _same(a_outs, b_outs):
    return all(np.allclose(a[k], b[k], rtol=0, atol=2e-5) for a, b in zip(a_outs, b_outs) for k in a)


@pytest.fixture(scope="module")
def setup(tiny):
    _, bundle = tiny
    pipe = Pipeline.from_bundle(bundle, fused=False, warm=False)
    n = int(pipe.bundle.manifest["tree"]["total_tokens"])
    calls = [(30, None, None)] + [(1, None, None)] * 3 + [(n, [0, 1], None), (1, None, None), (n, [0], None)] + \
            [(1, None, None)] * 4
    return pipe, calls, pipe.new_decoder().capacity


class _OldKeys(HostGraphs):
    """The keying this replaces: one graph per (profile, caller's key), whoever's buffers it bound (a control:
    it shows the stand-in catches a replay of another decoder's addresses)."""

    @staticmethod
    def key(profile, inputs, outputs):
        return (profile, tuple(sorted((n, tuple(s)) for n, (_, s, _) in {**inputs, **outputs}.items())))


def test_two_decoders_in_one_process_replay_only_their_own_graphs(setup):
    pipe, calls, cap = setup
    sess = pipe.backend.session("decoder")
    mem = HostMemory()
    ref = [run_decoder_calls(_decoder(pipe, HostGraphs(sess, mem, enabled=False), mem, cap, bucket=16), pipe, calls, seed)
           for seed in (1, 2)]
    graphs = HostGraphs(sess, mem)
    a, b = _decoder(pipe, graphs, mem, cap), _decoder(pipe, graphs, mem, cap)  # one engine, two decoders
    got_a, got_b = run_decoder_calls(a, pipe, calls, 1), run_decoder_calls(b, pipe, calls, 2)
    assert _same(ref[0], got_a) and _same(ref[1], got_b)
    assert graphs.replays > 0 and graphs.captures > 0  # graphs did replay, each decoder its own
    for i in range(2 * int(pipe.text["num_layers"])):
        assert not np.allclose(a.read_kv(i), b.read_kv(i))
    # the control: keyed without addresses, decoder b replays a's graphs and gets a's results
    old = _OldKeys(sess, mem)
    a2, b2 = _decoder(pipe, old, mem, cap), _decoder(pipe, old, mem, cap)
    run_decoder_calls(a2, pipe, calls, 1)
    assert not _same(ref[1], run_decoder_calls(b2, pipe, calls, 2))


def test_pooled_decoders_reuse_buffers_and_graphs_across_requests(setup):
    pipe, calls, cap = setup
    sess = pipe.backend.session("decoder")
    mem, pool = HostMemory(), DecoderPool()
    graphs = HostGraphs(sess, mem)
    ref = run_decoder_calls(_decoder(pipe, HostGraphs(sess, mem, enabled=False), mem, cap), pipe, calls, 3)
    first = _decoder(pipe, graphs, mem, cap, pool=pool)
    assert _same(ref, run_decoder_calls(first, pipe, calls, 3))
    held, captured = mem.live_bytes, graphs.captures
    addresses = [b.ptr for b in first.cache]
    first.close()
    first.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        run_decoder_calls(first, pipe, calls[:1], 3)
    with _decoder(pipe, graphs, mem, cap, pool=pool) as second:  # the next request: the same buffers
        assert [b.ptr for b in second.cache] == addresses
        assert _same(ref, run_decoder_calls(second, pipe, calls, 3))
        assert graphs.captures == captured  # every step and verify replayed a graph of the first request
        assert mem.live_bytes == held
        third = _decoder(pipe, graphs, mem, cap, pool=pool)  # alive at once: a set of its own
        assert set(b.ptr for b in third.cache).isdisjoint(addresses)
    del third
    gc.collect()
    assert not pool.in_use
    pool.close()
    assert mem.live_bytes == 0 and not mem.live


def test_graphs_are_bounded_and_a_failed_capture_turns_them_off(setup):
    pipe, calls, cap = setup
    sess = pipe.backend.session("decoder")
    mem = HostMemory()
    destroyed = []

    class Small(HostGraphs):
        def destroy(self, handle):
            destroyed.append(handle)

    graphs = Small(sess, mem, limit=2)
    ref = run_decoder_calls(_decoder(pipe, HostGraphs(sess, mem, enabled=False), mem, cap), pipe, calls, 4)
    assert _same(ref, run_decoder_calls(_decoder(pipe, graphs, mem, cap), pipe, calls, 4))
    assert len(graphs.graphs) == 2 and len(destroyed) == graphs.captures - 2 > 0

    class Failing(HostGraphs):
        def capture(self, profile, inputs, outputs):
            raise RuntimeError("capture refused")

    lines = []
    failing = Failing(sess, mem)
    failing.log = lines.append
    assert _same(ref, run_decoder_calls(_decoder(pipe, failing, mem, cap), pipe, calls, 4))
    assert not failing.enabled and len(lines) == 1 and "CUDA graphs off" in lines[0]


def test_device_memory_returns_to_zero_after_each_generate(tiny, images):
    """Plain, speculative, and a session: nothing stays allocated once the request (or the session) is over."""
    _, bundle = tiny
    pipe = Pipeline.from_bundle(bundle, fused="device")
    mem = pipe.backend.memory()
    assert isinstance(mem, HostMemory)
    want = None
    for speculative in (False, True, False):
        out = pipe.generate([images["coffee"]], "Describe the image.", max_new_tokens=12, speculative=speculative)
        want = want or out.token_ids
        assert out.token_ids == want
        assert mem.live_bytes == 0, f"{mem.live_bytes} bytes still allocated after a generate"
    s = pipe.session([images["coffee"]])
    s.ask("How many shapes are there?", keep=True, max_new_tokens=8)
    assert mem.live_bytes > 0  # the session keeps its K/V between turns
    del s
    gc.collect()
    assert mem.live_bytes == 0


def test_one_wait_for_a_decoder_calls_downloads(setup):
    """A decoder call's logits, hidden states and attention rows come back after one wait (the executor's own
    wait before ONNX Runtime reads is the other)."""
    pipe, calls, cap = setup
    mem = HostMemory()
    dec = _decoder(pipe, HostGraphs(pipe.backend.session("decoder"), mem, enabled=False), mem, cap)
    for q, _, _ in calls[:3]:
        before = mem.syncs
        run_decoder_calls(dec, pipe, [(q, None, None)], 5)
        assert mem.syncs - before == 2


def test_graph_runner_keys_on_addresses_and_shapes():
    a = {"x": (256, (1, 4), np.float32)}
    assert GraphRunner.key("step", a, {}) == GraphRunner.key("step", dict(a), {})
    assert GraphRunner.key("step", a, {}) != GraphRunner.key("step", {"x": (512, (1, 4), np.float32)}, {})
    assert GraphRunner.key("step", a, {}) != GraphRunner.key("step", {"x": (256, (1, 5), np.float32)}, {})
    assert GraphRunner.key("step", a, {}) != GraphRunner.key("verify", a, {})
