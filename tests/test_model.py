"""GPT model: named shapes, output shapes, tied head, and a loss that falls on a tiny batch."""
import pytest
import torch

from models.gpt import GPT, GPT_SIZES
from models.registry import count_parameters, flops_per_token, model_config


def test_named_sizes_have_the_nanogpt_shapes():
    assert GPT_SIZES["gpt2-125m"] == dict(n_layer=12, n_head=12, n_embd=768)
    assert GPT_SIZES["gpt2-350m"] == dict(n_layer=24, n_head=16, n_embd=1024)
    assert GPT_SIZES["gpt2-770m"] == dict(n_layer=36, n_head=20, n_embd=1280)
    # nanoGPT's GPT-2 small with the padded vocabulary: 124.48M including positions.
    assert count_parameters(model_config("gpt2-125m")) == 124_475_904
    assert 350e6 < count_parameters(model_config("gpt2-350m")) < 360e6
    assert 770e6 < count_parameters(model_config("gpt2-770m")) < 780e6


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_matches_the_module(bias):
    config = model_config("micro", vocab_size=320, block_size=48, bias=bias)
    model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config)
    assert flops_per_token(config, 48) == 6 * count_parameters(config) + 12 * 2 * 32 * 48


def test_shapes_and_tied_head():
    config = model_config("micro", vocab_size=320, block_size=48)
    model = GPT(config)
    idx = torch.randint(8, 320, (3, 40))  # token 7 never appears in the input
    logits, loss = model(idx)
    assert logits.shape == (3, 40, 320) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    # The output head is the embedding: changing the row of a token absent from the input changes
    # that token's logits and nothing else.
    with torch.no_grad():
        model.wte.weight[7] += 1.0
    changed = (model(idx)[0] - logits).abs().amax(dim=(0, 1))
    assert changed[7] > 0 and changed[8:].max() == 0 and changed[:7].max() == 0


def test_causal_attention_does_not_look_ahead():
    model = GPT(model_config("micro", vocab_size=64, block_size=16)).eval()
    a = torch.randint(0, 64, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 64
    la, lb = model(a)[0], model(b)[0]
    assert torch.equal(la[:, :10], lb[:, :10]) and not torch.equal(la[:, 10:], lb[:, 10:])


def test_sequence_longer_than_block_size_is_refused():
    model = GPT(model_config("micro", vocab_size=64, block_size=8))
    with pytest.raises(ValueError, match="longer than block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_loss_falls_on_a_tiny_batch():
    torch.manual_seed(0)
    model = GPT(model_config("micro", vocab_size=128, block_size=32))
    batch = torch.randint(0, 128, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(128.0)).item(), rel=0.05)  # uniform at init
    assert losses[-1] < 0.5 * losses[0]


def test_same_seed_same_model():
    config = model_config("micro", vocab_size=64, block_size=8)
    torch.manual_seed(3)
    a = GPT(config).state_dict()
    torch.manual_seed(3)
    b = GPT(config).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
