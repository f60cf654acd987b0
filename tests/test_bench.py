"""dream-bench's arithmetic: ratios to the runtime without speculation, and the end-to-end ceiling
that the non-decode share of the time puts on any speculative speedup (Amdahl)."""

import pytest

from dream_export.bench import summarize


def _row(tokens, seconds, decode_tokens, decode_seconds, accept=()):
    return {"tokens": tokens, "seconds": seconds, "decode_tokens": decode_tokens, "decode_seconds": decode_seconds,
            "accept": list(accept), "ids": []}


def test_summarize_ratios_and_ceiling():
    results = {
        "runtime, no speculation": {"caption": _row(100, 1.0, 90, 0.6), "yesno": _row(20, 0.5, 10, 0.1)},
        "DREAM": {"caption": _row(100, 0.7, 90, 0.3, [4, 5]), "yesno": _row(20, 0.5, 10, 0.1, [3])},
    }
    t = summarize(results)
    base, dream = t["runtime, no speculation"], t["DREAM"]
    assert dream["caption"]["vs_no_speculation"] == pytest.approx(1.0 / 0.7, abs=1e-3)
    assert dream["caption"]["decode_vs_no_speculation"] == pytest.approx(2.0, abs=1e-3)
    assert dream["caption"]["mean_accept_length"] == 4.5
    assert base["caption"]["decode_share"] == 0.6
    assert base["caption"]["end_to_end_ceiling"] == pytest.approx(2.5)
    assert base["all"]["decode_share"] == pytest.approx(0.7 / 1.5, abs=1e-3)
    assert "decode_share" not in dream["caption"]
    # a measured speedup can never pass the ceiling that the same baseline implies
    for q in ("caption", "yesno", "all"):
        assert dream[q]["vs_no_speculation"] <= base[q]["end_to_end_ceiling"] + 1e-9
