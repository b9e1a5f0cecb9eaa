"""The sampler's cheaper modes draw what the full sampler draws for parameters that need no more."""

import torch

from moeshare.engine.sampling import FILTERED, GREEDY, PLAIN, SamplingBatch, mode_for, sample


def _batch(n: int, temperature: float, top_p: float = 1.0, top_k: int = 0) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.full((n,), temperature),
        top_p=torch.full((n,), top_p),
        top_k=torch.full((n,), top_k, dtype=torch.int64),
        seeds=torch.arange(n, dtype=torch.int64) * 7919 + 3,
        steps=torch.arange(n, dtype=torch.int64),
    )


def test_mode_is_the_cheapest_that_serves_every_row():
    assert mode_for([0.0, 0.0], [0.5, 1.0], [0, 40]) == GREEDY  # greedy rows ignore their cuts
    assert mode_for([0.0, 0.8], [0.5, 1.0], [0, 0]) == PLAIN
    assert mode_for([0.7, 0.8], [1.0, 0.9], [0, 0]) == FILTERED
    assert mode_for([0.7], [1.0], [50]) == FILTERED


def test_greedy_and_plain_modes_draw_the_filtered_samplers_tokens():
    logits = torch.randn(64, 5000, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, mode in ((0.0, GREEDY), (0.8, PLAIN), (1.3, PLAIN)):
        batch = _batch(64, temperature)
        fast, fast_lp = sample(logits, batch, mode)
        full, full_lp = sample(logits, batch, FILTERED)
        assert torch.equal(fast, full) and torch.equal(fast_lp, full_lp), (temperature, mode)
    assert not torch.equal(sample(logits, _batch(64, 0.8), PLAIN)[0], logits.argmax(dim=-1))  # it does sample


def test_bf16_logits_sample_what_their_float32_copy_samples_in_every_mode():
    logits = (torch.randn(32, 4000, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    cases = ((0.0, 1.0, 0, GREEDY), (0.8, 1.0, 0, PLAIN), (0.9, 0.8, 0, FILTERED), (1.1, 1.0, 40, FILTERED))
    for temperature, top_p, top_k, mode in cases:
        batch = _batch(32, temperature, top_p, top_k)
        chosen, lp = sample(logits, batch, mode)
        assert lp.dtype == torch.float32
        want, want_lp = sample(logits.float(), batch, mode)
        assert torch.equal(chosen, want) and torch.equal(lp, want_lp), mode
    x = logits.float()  # the greedy mode is the argmax and its log_softmax, as before
    chosen, lp = sample(logits, _batch(32, 0.0), GREEDY)
    assert torch.equal(chosen, x.argmax(-1))
    assert torch.equal(lp, torch.log_softmax(x, -1).gather(1, chosen[:, None]).squeeze(1))
