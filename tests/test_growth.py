"""Depthwise growth (Gstack): grown block i is trained block (i mod L), or (i // g) interpolated."""
import pytest
import torch

from models.growth import grow
from models.registry import build_model, model_config


@pytest.mark.parametrize("size", ["micro", "neox-micro"])
@pytest.mark.parametrize("order, source", [("stack", lambda i, L, g: i % L), ("interpolate", lambda i, L, g: i // g)])
def test_grown_block_i_copies_the_chosen_trained_block(size, order, source):
    torch.manual_seed(0)
    config = model_config(size, n_layer=3, vocab_size=64, block_size=16)
    small = build_model(config).state_dict()
    grown_state, grown_config = grow(small, config, factor=4, order=order)
    assert grown_config.n_layer == 12 and grown_config.n_embd == config.n_embd
    for i in range(12):
        j = source(i, 3, 4)
        for name, tensor in small.items():
            if name.startswith(f"blocks.{j}."):
                assert torch.equal(grown_state[f"blocks.{i}." + name[len(f'blocks.{j}.'):]], tensor)
    for name in small:
        if not name.startswith("blocks."):
            assert torch.equal(grown_state[name], small[name])  # embeddings, final norm, head
    model = build_model(grown_config)
    model.load_state_dict(grown_state)  # strict: every parameter of the deeper model, nothing else
    with torch.no_grad():
        logits, _ = model(torch.randint(0, 64, (2, 16)))
    assert torch.isfinite(logits).all()


def test_growth_refuses_a_state_dict_of_another_depth():
    config = model_config("micro", vocab_size=64, block_size=16)
    state = build_model(config).state_dict()
    deeper = model_config("micro", n_layer=3, vocab_size=64, block_size=16)
    with pytest.raises(ValueError, match="its config says 3"):
        grow(state, deeper, 2)
    with pytest.raises(ValueError, match="growth order"):
        grow(state, config, 2, order="random")
