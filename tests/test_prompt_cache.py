"""Prompt embeddings cached by prompt and settings (vramwise/prompt_cache.py) and text encoders released between
prompts (vramwise/encoder_weights.py), on the tiny Wan model."""

from __future__ import annotations

import pytest
import torch

from vramwise.encoder_weights import ENCODER_WEIGHTS
from vramwise.prompt_cache import PROMPT_CACHE, PromptCache, PromptCacheConfig, PromptKey
from vramwise.sampling import generate

from engine_helpers import load_tiny, tiny_wan_request


@pytest.fixture(autouse=True)
def empty_cache():
    PROMPT_CACHE.clear()
    yield
    PROMPT_CACHE.clear()


class EncoderCalls:
    """Counts forward calls of a model's text encoder."""

    def __init__(self, model) -> None:
        self.n = 0
        model.loaded.pipe.text_encoder.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.n += 1


@pytest.fixture(scope="module")
def wan(tiny_models_root):
    return load_tiny(tiny_models_root / "tiny-wan21-i2v")


def test_rerunning_the_same_prompt_never_calls_the_text_encoder(wan):
    calls = EncoderCalls(wan)
    first = generate(wan, tiny_wan_request(seed=1)).samples
    assert calls.n >= 1
    seen = calls.n
    again = generate(wan, tiny_wan_request(seed=1)).samples
    other_seed = generate(wan, tiny_wan_request(seed=2, steps=3)).samples
    assert calls.n == seen  # seed and steps are not part of the prompt: both runs hit the cache
    assert torch.equal(first, again) and not torch.equal(first, other_seed)
    assert PROMPT_CACHE.hits >= 2


@pytest.mark.parametrize("change", [dict(prompt="a cat sleeps"), dict(negative_prompt="blurry"), dict(cfg=1.0)])
def test_a_changed_prompt_negative_prompt_or_cfg_switch_encodes_again(wan, change):
    calls = EncoderCalls(wan)
    generate(wan, tiny_wan_request())
    seen = calls.n
    generate(wan, tiny_wan_request(**change))
    assert calls.n > seen
    seen = calls.n
    generate(wan, tiny_wan_request(**change))
    assert calls.n == seen


def test_a_negative_prompt_without_cfg_is_not_part_of_the_key(wan):
    calls = EncoderCalls(wan)
    generate(wan, tiny_wan_request(cfg=1.0, negative_prompt="x"))
    seen = calls.n
    generate(wan, tiny_wan_request(cfg=1.0, negative_prompt="y"))
    assert calls.n == seen


def test_another_model_or_weight_dtype_does_not_reuse_the_embeddings(tiny_models_root, wan):
    generate(wan, tiny_wan_request())
    for other in (load_tiny(tiny_models_root / "tiny-wan21-i2v", dtype="fp8_e4m3fn"),
                  load_tiny(tiny_models_root / "tiny-wan22-i2v-a14b")):
        calls = EncoderCalls(other)
        generate(other, tiny_wan_request())
        assert calls.n >= 1


def test_text_encoder_is_released_after_encoding_and_reloads_identical_weights(tiny_models_root):
    model = load_tiny(tiny_models_root / "tiny-wan21-i2v")
    encoder = model.loaded.pipe.text_encoder
    original = {k: v.clone() for k, v in encoder.state_dict().items()}
    generate(model, tiny_wan_request())
    assert ENCODER_WEIGHTS.is_released(encoder)
    assert sum(p.numel() for p in encoder.parameters()) == 0
    reloads = ENCODER_WEIGHTS.reloads
    released_latents = generate(model, tiny_wan_request(prompt="a dog runs")).samples  # a miss: reloaded, released
    assert ENCODER_WEIGHTS.reloads == reloads + 1 and ENCODER_WEIGHTS.is_released(encoder)
    ENCODER_WEIGHTS.restore(encoder)
    assert encoder.state_dict().keys() == original.keys()
    for k, v in encoder.state_dict().items():
        assert v.dtype == original[k].dtype and torch.equal(v, original[k]), k
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight  # still tied
    # Same latents as a model whose encoder never left.
    fresh = load_tiny(tiny_models_root / "tiny-wan21-i2v")
    PROMPT_CACHE.clear()
    PROMPT_CACHE.config = PromptCacheConfig(release_encoders=False)
    try:
        kept = generate(fresh, tiny_wan_request(prompt="a dog runs")).samples
        assert not ENCODER_WEIGHTS.is_released(fresh.loaded.pipe.text_encoder)
    finally:
        PROMPT_CACHE.config = PromptCacheConfig()
    assert torch.equal(released_latents, kept)


def test_fp8_text_encoder_comes_back_in_fp8(tiny_models_root):
    model = load_tiny(tiny_models_root / "tiny-wan21-i2v", dtype="fp8_e4m3fn")
    encoder = model.loaded.pipe.text_encoder
    before = {k: (v.dtype, v.clone()) for k, v in encoder.state_dict().items()}
    assert torch.float8_e4m3fn in {d for d, _ in before.values()}
    generate(model, tiny_wan_request())
    assert ENCODER_WEIGHTS.is_released(encoder)
    ENCODER_WEIGHTS.restore(encoder)
    for k, v in encoder.state_dict().items():
        assert v.dtype == before[k][0] and torch.equal(v, before[k][1]), k


def test_sequentially_offloaded_encoder_is_kept_and_still_encodes(tiny_models_root):
    model = load_tiny(tiny_models_root / "tiny-wan21-i2v", mode="sequential")
    encoder = model.loaded.pipe.text_encoder
    generate(model, tiny_wan_request())
    assert not ENCODER_WEIGHTS.is_released(encoder)
    assert "sequential offload" in ENCODER_WEIGHTS.why_kept(encoder)
    generate(model, tiny_wan_request(prompt="another"))


def _key(prompt: str) -> PromptKey:
    return PromptKey(model=("m",), prompt=prompt, negative_prompt="", do_cfg=False, dtype="bf16", device="cpu",
                     max_length=8)


def test_cache_is_bounded_in_bytes_and_drops_the_least_recently_used():
    mib = torch.zeros(2**20, dtype=torch.uint8)
    cache = PromptCache(PromptCacheConfig(max_bytes=3 * 2**20))
    for p in "abc":
        cache.put(_key(p), (mib, None))
    assert cache.get(_key("a")) is not None  # a is now the most recent
    cache.put(_key("d"), (mib, None))
    assert len(cache) == 3 and cache.nbytes == 3 * 2**20
    assert cache.get(_key("b")) is None and cache.get(_key("a")) is not None
    cache.put(_key("huge"), (torch.zeros(4 * 2**20, dtype=torch.uint8),))
    assert cache.get(_key("huge")) is None and cache.nbytes <= 3 * 2**20


def test_cached_embeddings_cannot_be_changed_through_a_returned_copy():
    cache = PromptCache()
    cache.put(_key("a"), (torch.ones(4),))
    got = cache.get(_key("a"))[0]
    got.mul_(0)
    assert torch.equal(cache.get(_key("a"))[0], torch.ones(4))


def test_a_released_encoder_called_directly_reloads_itself(tiny_models_root):
    model = load_tiny(tiny_models_root / "tiny-wan21-i2v")
    encoder = model.loaded.pipe.text_encoder
    ids = model.loaded.pipe.tokenizer(["a ball"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state
    generate(model, tiny_wan_request())
    assert ENCODER_WEIGHTS.is_released(encoder)
    with torch.no_grad():
        got = encoder(ids).last_hidden_state
    assert not ENCODER_WEIGHTS.is_released(encoder) and torch.equal(got, expected)


def test_a_single_file_text_encoder_is_released_and_reloads_from_its_file(tiny_models_root, tmp_path):
    import single_file_helpers as sfh

    from vramwise.handles import VramwiseModel
    from vramwise.loader import LoadOptions, load_pipeline
    from vramwise.offload import OffloadMode
    from vramwise.precision import WeightDtype
    from vramwise.single_file import SingleFileSpec

    files = sfh.write_wan21_set(tiny_models_root / "tiny-wan21-i2v", tmp_path)
    spec = SingleFileSpec.create(**files)
    options = LoadOptions(folder=files["diffusion_model"], offload_mode=OffloadMode.NONE,
                          weight_dtype=WeightDtype.BF16, source=spec)
    model = VramwiseModel(load_pipeline(options, torch.device("cpu")))
    encoder = model.loaded.pipe.text_encoder
    original = {k: v.clone() for k, v in encoder.state_dict().items()}
    generate(model, tiny_wan_request())
    assert ENCODER_WEIGHTS.is_released(encoder)
    ENCODER_WEIGHTS.restore(encoder)
    for k, v in encoder.state_dict().items():
        assert v.dtype == original[k].dtype and torch.equal(v, original[k]), k


def test_an_encoder_whose_checkpoint_names_differ_is_released_and_reloaded_through_from_pretrained(tiny_models_root):
    # transformers 5 renames Qwen2-VL's checkpoint keys (model.* -> model.language_model.*) while loading.
    from vramwise.prompt_cache import encode_prompts

    model = load_tiny(tiny_models_root / "tiny-easyanimate-v51-inp")
    loaded, encoder = model.loaded, model.loaded.pipe.text_encoder
    original = {k: v.clone() for k, v in encoder.state_dict().items()}
    with torch.no_grad():
        direct = model.family._encode(loaded, ["a red kite"])[0]
    first = encode_prompts(loaded, "a red kite", "", False, 256, lambda: model.family._encode(loaded, ["a red kite"]))
    assert ENCODER_WEIGHTS.is_released(encoder) and torch.equal(first[0], direct)
    ENCODER_WEIGHTS.restore(encoder)
    for k, v in encoder.state_dict().items():
        assert v.dtype == original[k].dtype and torch.equal(v, original[k]), k
