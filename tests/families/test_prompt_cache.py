"""The prompt cache: each prompt through the text encoders once per run, the least recently used
dropped first, the same conditioning as encoding without it."""

import pytest
import torch

from rlfuse.errors import UserError
from rlfuse.families.common import PromptCache
from rlfuse.families.flux import Flux
from rlfuse.families.sd3 import StableDiffusion3


class CountingEncoder:
    """A stand-in text encoder: the prompt's length as its embedding; counts the prompts it encodes."""

    def __init__(self):
        self.encoded: list[str] = []

    def __call__(self, prompts, device):
        self.encoded += prompts
        return {"embeds": torch.tensor([[float(len(p)), 1.0] for p in prompts], device=device)}


def test_each_prompt_is_encoded_once_and_rows_follow_the_prompts():
    encoder, cache = CountingEncoder(), PromptCache(8)
    out = cache.encode(["ab", "abc", "ab"], torch.device("cpu"), encoder)
    torch.testing.assert_close(out["embeds"][:, 0], torch.tensor([2.0, 3.0, 2.0]))
    cache.encode(["abc", "ab", "abcd"], torch.device("cpu"), encoder)
    assert encoder.encoded == ["ab", "abc", "abcd"]


def test_the_least_recently_used_prompt_is_dropped_first():
    encoder, cache = CountingEncoder(), PromptCache(2)
    device = torch.device("cpu")
    cache.encode(["a"], device, encoder)
    cache.encode(["bb"], device, encoder)
    cache.encode(["a"], device, encoder)      # "a" is now the most recent
    cache.encode(["ccc"], device, encoder)    # drops "bb"
    cache.encode(["a", "bb"], device, encoder)
    assert encoder.encoded == ["a", "bb", "ccc", "bb"]
    # a batch with more distinct prompts than the cache holds is still whole
    out = cache.encode(["x", "yy", "zzz", "x"], device, encoder)
    torch.testing.assert_close(out["embeds"][:, 0], torch.tensor([1.0, 2.0, 3.0, 1.0]))


def test_size_0_encodes_every_batch_and_a_negative_size_is_refused():
    encoder, cache = CountingEncoder(), PromptCache(0)
    cache.encode(["a", "a", "b"], torch.device("cpu"), encoder)
    cache.encode(["a"], torch.device("cpu"), encoder)
    assert encoder.encoded == ["a", "b", "a"]
    with pytest.raises(UserError, match="model.prompt_cache=-1"):
        PromptCache(-1)


@pytest.mark.parametrize("family_class, options", [(StableDiffusion3, {"max_sequence_length": 16}),
                                                    (Flux, {"max_sequence_length": 16})])
def test_the_families_conditioning_is_the_same_with_the_cache(family_class, options):
    prompts = ["a cat", "a dog", "a cat", "a red circle"]
    cached = family_class.load(None, prompt_cache=16, **options)
    plain = family_class.load(None, prompt_cache=0, **options)
    device = torch.device("cpu")
    first, again = cached.encode_prompts(prompts, device), cached.encode_prompts(prompts[::-1], device)
    reference = plain.encode_prompts(prompts, device)
    for name, value in reference.tensors.items():
        torch.testing.assert_close(first[name], value, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(again[name], value.flip(0), atol=1e-6, rtol=1e-5)
