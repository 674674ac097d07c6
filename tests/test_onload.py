"""Sequential onloading: a model whose blocks live in host memory, each brought to the device only while it is in
use, gives the logits and the compressed weights of the model held whole (here host and device are both the CPU,
through the same code path that moves blocks)."""

import torch

from compactmind import pipeline as pl
from compactmind.calibration import Calibration
from compactmind.models import Onloader, decoder_layers

from conftest import tiny_model

IDS = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 320, (3, 32), generator=torch.Generator().manual_seed(2))


def test_an_onloaded_model_gives_the_logits_of_the_model_held_whole():
    whole, onloaded = tiny_model(), tiny_model()
    onloader = Onloader(onloaded, torch.device("cpu"))
    host = [p.data for p in decoder_layers(onloaded)[0].parameters()]
    seen = []
    handle = decoder_layers(onloaded)[0].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: seen.append(m.weight.data.data_ptr()))
    with torch.no_grad():
        assert torch.equal(onloaded(IDS).logits, whole(IDS).logits)
    handle.remove()
    # during its forward the block computed on a copy brought to the device, and holds its host tensors after it
    q_host = decoder_layers(onloaded)[0].self_attn.q_proj.weight.data_ptr()
    assert seen and seen[0] not in [h.data_ptr() for h in host]
    assert [p.data_ptr() for p in decoder_layers(onloaded)[0].parameters()] == [h.data_ptr() for h in host]
    assert q_host in [h.data_ptr() for h in host]
    onloader.remove()


def test_compressing_an_onloaded_model_writes_the_same_weights_back_to_the_host():
    for text in ("gptq(bits=4, group_size=32)", "sparsegpt(sparsity=0.5)", "l2_pruning(sparsity=0.5, scope=both)"):
        whole, onloaded = tiny_model(), tiny_model()
        Onloader(onloaded, torch.device("cpu"))
        pl.apply_(whole, pl.parse(text), Calibration(CALIB), 0)
        pl.apply_(onloaded, pl.parse(text), Calibration(CALIB), 0)
        for (name, a), (_, b) in zip(whole.named_parameters(), onloaded.named_parameters()):
            assert torch.equal(a, b), (text, name)
        with torch.no_grad():
            assert torch.equal(onloaded(IDS).logits, whole(IDS).logits), text
