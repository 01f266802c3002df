"""GPT: shapes, the lecture's parameter count, causality, initial loss, learning, options, generation."""

from __future__ import annotations

import math

import pytest
import torch

from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.model import GPT, GPTConfig

VARIANTS = [
    {},
    {"activation": "gelu", "bias": False, "tie_weights": True, "init": "gpt2"},
    {"positions": "rotary", "qk_norm": True, "activation": "relu2", "zero_init_proj": True},
    {"n_layer": 3, "n_head": 8, "n_embd": 64, "dropout": 0.1},
]


def make(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"vocab_size": 65, "block_size": 32, **overrides}))


def test_shapes_and_loss() -> None:
    model = make()
    idx = torch.randint(65, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 65) and loss is None
    _, loss = model(idx, torch.randint(65, (3, 17)))
    assert loss.shape == () and torch.isfinite(loss)


def test_parameter_count_matches_the_lecture() -> None:
    # the lecture's script prints 0.209729 M parameters for its small configuration
    assert make().num_params() == 209_729


@pytest.mark.parametrize("overrides", VARIANTS)
def test_causality(overrides: dict) -> None:
    model = make(**overrides).eval()
    idx = torch.randint(65, (2, 32))
    base, _ = model(idx)
    for t in (0, 5, 31):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 65
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(logits[:, t], base[:, t])  # the changed position does matter


@pytest.mark.parametrize("init", ["pytorch", "gpt2"])
def test_initial_loss_is_near_uniform(init: str) -> None:
    model = make(init=init)
    _, loss = model(torch.randint(65, (8, 32)), torch.randint(65, (8, 32)))
    assert abs(loss.item() - math.log(65)) < 0.3


def test_overfits_a_tiny_corpus() -> None:
    torch.manual_seed(0)
    text = "to be or not to be, that is the question.\n" * 4
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.stack([data[i : i + 16] for i in range(0, len(data) - 17, 3)])
    y = torch.stack([data[i + 1 : i + 17] for i in range(0, len(data) - 17, 3)])
    for _ in range(300):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_options_take_effect() -> None:
    tied = make(tie_weights=True)
    assert tied.lm_head.weight is tied.wte.weight
    assert make(positions="rotary").wpe is None
    no_bias = make(bias=False)
    assert all(m.bias is None for m in no_bias.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))
    zero = make(zero_init_proj=True)
    assert all(not b.attn.c_proj.weight.any() and not b.mlp.c_proj.weight.any() for b in zero.h)
    gpt2 = make(init="gpt2", n_embd=256, n_head=4)
    assert abs(gpt2.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(gpt2.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    x = torch.randn(5, 7)
    relu2 = make(activation="relu2").h[0].mlp
    assert relu2.activation == "relu2"
    torch.testing.assert_close(
        relu2(x.new_ones(1, 64)), relu2.c_proj(torch.relu(relu2.c_fc(x.new_ones(1, 64))).square())
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_embd": 64, "n_head": 5}, "divisible by n_head"),
        ({"block_size": 0}, "block_size must be at least 1"),
        ({"n_layer": 0}, "n_layer must be at least 1"),
        ({"positions": "rotary", "n_embd": 12, "n_head": 4}, "even head size"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_shapes_are_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(LitGPTCharError, match=message):
        GPTConfig(**{"vocab_size": 65, **overrides})


def test_longer_input_than_block_size_is_a_clear_error() -> None:
    with pytest.raises(LitGPTCharError, match="block_size is 32"):
        make()(torch.zeros(1, 33, dtype=torch.long))


# ---- generation: the KV cache against the lecture's uncached path ----

SHAPES = [
    {"n_layer": 1, "n_head": 1, "n_embd": 16, "block_size": 8},
    {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 24},
    {"n_layer": 3, "n_head": 2, "n_embd": 48, "block_size": 40, "positions": "rotary", "qk_norm": True},
    {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32, "bias": False, "activation": "gelu"},
]


@pytest.mark.parametrize("shape", SHAPES)
def test_cached_logits_equal_uncached_within_the_window(shape: dict) -> None:
    model = make(**shape).eval()
    idx = torch.randint(65, (3, shape["block_size"]))
    full, _ = model(idx)
    from lit_gpt_char.model import KVCache

    cache = KVCache(model.config, 3, idx.device, torch.float32)
    prefill, _ = model(idx[:, :5], cache=cache)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, idx.size(1))]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (0.8, 5), (0.0, None)])
def test_cached_and_uncached_generation_give_the_same_tokens(shape: dict, temperature: float, top_k) -> None:
    model = make(**shape).eval()
    prompt = torch.randint(65, (2, 3))
    new = shape["block_size"] - 3  # stays within the window: both paths see identical contexts
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(7)
        outs.append(
            model.generate(prompt, new, temperature=temperature, top_k=top_k, generator=gen, use_cache=use_cache)
        )
    assert outs[0].shape == (2, shape["block_size"])
    assert torch.equal(outs[0], outs[1])


class _PositionSpy:
    """Records how many positions each forward pass covers (start + length)."""

    def __init__(self, model: GPT) -> None:
        self.ends: list[int] = []
        original = model.forward

        def forward(idx, targets=None, cache=None):
            self.ends.append((cache.pos if cache is not None else 0) + idx.size(1))
            return original(idx, targets, cache)

        model.forward = forward


@pytest.mark.parametrize("refill", [None, 1, 5, 16])
def test_past_the_window_the_cache_refills_and_never_exceeds_block_size(refill) -> None:
    model = make(block_size=16, n_layer=2, n_head=2, n_embd=32).eval()
    spy = _PositionSpy(model)
    gen = torch.Generator().manual_seed(0)
    out = model.generate(torch.randint(65, (1, 4)), 60, generator=gen, refill=refill)
    assert out.shape == (1, 64)
    # the documented schedule: prefill the prompt; one position per token; when all 16 positions are
    # used, re-encode the latest `keep` tokens from position 0
    keep = 8 if refill is None else refill
    expected, pos = [4], 4
    for _ in range(59):
        pos = keep if pos == 16 else pos + 1
        expected.append(pos)
    assert spy.ends == expected
    assert max(spy.ends) == 16 and expected.count(keep) >= 3


def test_refill_block_size_reproduces_the_uncached_path_exactly() -> None:
    model = make(block_size=12, n_layer=2, n_head=2, n_embd=32).eval()
    prompt = torch.randint(65, (2, 5))
    outs = [
        model.generate(prompt, 40, generator=torch.Generator().manual_seed(3), use_cache=c, refill=12)
        for c in (True, False)
    ]
    assert torch.equal(outs[0], outs[1])


def test_uncached_path_crops_to_block_size() -> None:
    model = make(block_size=8, n_layer=1, n_head=1, n_embd=16).eval()
    spy = _PositionSpy(model)
    model.generate(torch.randint(65, (1, 20)), 5, use_cache=False, generator=torch.Generator().manual_seed(0))
    assert spy.ends == [8] * 5


def test_greedy_is_argmax_and_deterministic() -> None:
    model = make().eval()
    prompt = torch.randint(65, (1, 4))
    a = model.generate(prompt, 10, temperature=0.0)
    b = model.generate(prompt, 10, temperature=0.0, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    logits, _ = model(a[:, :-1])
    assert torch.equal(logits[0, 3:].argmax(-1), a[0, 4:])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"refill": 0}, "refill"),
    ],
)
def test_bad_generation_options(kwargs: dict, message: str) -> None:
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(LitGPTCharError, match=message):
        make().generate(torch.zeros(1, 1, dtype=torch.long), **args)
