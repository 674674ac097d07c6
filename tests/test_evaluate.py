import math

import torch

from compactmind.evaluate import perplexity

from conftest import tiny_model


def plain_loop(model, windows):
    with torch.no_grad():
        losses = [model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss for w in windows]
    return math.exp(torch.stack(losses).mean().item())


def test_chunked_loss_equals_the_plain_labels_loop_for_any_batch_size():
    model = tiny_model()
    windows = torch.randint(0, 320, (5, 96), generator=torch.Generator().manual_seed(3))
    expected = plain_loop(model, windows)
    for batch in (1, 2, 5):
        result = perplexity(model, windows, batch_size=batch)
        assert math.isclose(result.perplexity, expected, rel_tol=1e-5)
        assert result.windows == 5 and result.tokens == 5 * 96 and result.stopped is None


def test_early_stop_records_partial_figures():
    model = tiny_model()
    windows = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(3))
    result = perplexity(model, windows, stop=lambda ppl, done: "too high" if done >= 2 else None)
    assert result.stopped == "too high" and result.windows == 2 and result.tokens == 64


def test_non_finite_weights_give_non_finite_perplexity():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    result = perplexity(model, torch.randint(0, 320, (2, 16)))
    assert not math.isfinite(result.perplexity)
