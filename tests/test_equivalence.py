"""dream-run --json greedy token ids == transformers generate(do_sample=False): 20 pairs x 2 configs, and
the vision layouts of SmolVLM-2B and -256M on the hardest inputs."""

import pytest

from helpers import PAIRS, PROMPTS, hf_generate, run_cli_json

MAX_NEW = 24


@pytest.mark.parametrize("config", ["split_mha", "gqa_nosplit"])
@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_greedy_tokens_equal_transformers(zoo, images, capsys, config, pair):
    model_dir, bundle = zoo.get(config)
    names, prompt_idx = PAIRS[pair]
    paths = [images[n] for n in names]
    prompt = PROMPTS[prompt_idx]
    got = run_cli_json(capsys, [*map(str, paths), prompt, "--bundle", str(bundle), "--max-new-tokens", str(MAX_NEW), "--json"])
    want = hf_generate(str(model_dir), paths, prompt, MAX_NEW)
    assert got["token_ids"] == want
    assert got["num_new_tokens"] == len(want)
    assert got["stop_reason"] in ("max_new_tokens", "stop_token")
    assert set(got) >= {"text", "token_ids", "num_new_tokens", "stop_reason", "ttft_ms", "tokens_per_s"}


# odd sizes, grayscale, EXIF, a 1-pixel image, a huge one and two images in one prompt
LAYOUT_PAIRS = [0, 6, 7, 11, 12, 13, 14]


@pytest.mark.parametrize("config", ["layout_2b", "layout_256m"])
@pytest.mark.parametrize("pair", LAYOUT_PAIRS)
def test_real_checkpoint_vision_layouts_equal_transformers(zoo, images, capsys, config, pair):
    model_dir, bundle = zoo.get(config)
    names, prompt_idx = PAIRS[pair]
    paths = [images[n] for n in names]
    got = run_cli_json(capsys, [*map(str, paths), PROMPTS[prompt_idx], "--bundle", str(bundle),
                                "--max-new-tokens", "12", "--json"])
    assert got["token_ids"] == hf_generate(str(model_dir), paths, PROMPTS[prompt_idx], 12)
