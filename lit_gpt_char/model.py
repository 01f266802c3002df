"""The GPT of "Let's build GPT", as one readable plain-PyTorch module (no Lightning here).

    idx (B, T) ─wte─┐
                    + ─▶ n_layer × Block ─▶ ln_f ─▶ lm_head ─▶ logits (B, T, vocab_size)
    arange(T) ─wpe──┘    Block: x + attn(ln_1(x)), then x + mlp(ln_2(x))   (pre-LayerNorm)

The defaults reproduce the lecture's model: learned absolute positions, ReLU MLP of width 4·n_embd,
biases everywhere except the query/key/value projections, PyTorch's default initialisation and an
untied head. Where it departs it says why: the heads are computed together (one matmul for
q, k, v of all heads) and attention goes through ``scaled_dot_product_attention`` with the standard
1/sqrt(head_size) scale (the lecture's code scales by 1/sqrt(n_embd), which shrinks the logits
and slows learning).

Options, each off by default: GELU or ReLU² activations, no biases, a tied head, GPT-2's init,
rotary positions, QK-norm and zero-initialised output projections. They exist for the GPU recipes
(configs/speedrun.yaml, configs/best.yaml); the configs say what each one buys.

Generation has two paths that share the sampling rule:
- uncached (the lecture's semantics): every step runs the model on the last ``block_size``
  tokens;
- cached (default): the prompt is encoded once, then each new token costs one position,
  reusing stored keys and values. Learned absolute positions stop at ``block_size - 1``, so when
  the cache is full the last ``refill`` tokens are encoded again from position 0 and generation
  goes on from there: the model always sees between ``refill`` and ``block_size`` tokens of
  context, never more than ``block_size`` positions. With ``refill=block_size`` every token past
  the window costs a full re-encode, and the result is the uncached path's exactly.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from lit_gpt_char.errors import LitGPTCharError


@dataclass
class GPTConfig:
    """The model's shape and architecture: the single source for both.

    Args:
        vocab_size: Number of distinct tokens (characters). Set from the data, never by hand.
        block_size: Context length in tokens: the most positions the model ever sees.
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block; must divide n_embd.
        n_embd: Width of the residual stream (embedding size).
        dropout: Dropout probability on attention weights, attention output and MLP output.
        bias: Biases in the linear layers and LayerNorms (the q/k/v projection never has one,
            as in the lecture).
        activation: MLP non-linearity: "relu" (the lecture), "gelu" (GPT-2) or "relu2" (ReLU
            squared).
        tie_weights: Share the token embedding matrix with the output head.
        init: "pytorch" (the lecture: PyTorch's default initialisation) or "gpt2" (normal
            std 0.02, residual projections scaled by 1/sqrt(2·n_layer), zero biases).
        positions: "learned" absolute position embeddings (the lecture) or "rotary" (RoPE on
            queries and keys; no position table).
        qk_norm: RMS-normalise queries and keys per head before attention.
        zero_init_proj: Start every residual-branch output projection at zero, so each block
            begins as the identity.
    """

    vocab_size: int
    block_size: int = 32
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True
    activation: Literal["relu", "gelu", "relu2"] = "relu"
    tie_weights: bool = False
    init: Literal["pytorch", "gpt2"] = "pytorch"
    positions: Literal["learned", "rotary"] = "learned"
    qk_norm: bool = False
    zero_init_proj: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise LitGPTCharError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise LitGPTCharError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): equal heads")
        if self.positions == "rotary" and self.head_size % 2:
            raise LitGPTCharError(f"rotary positions need an even head size, got n_embd // n_head = {self.head_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise LitGPTCharError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


class KVCache:
    """Keys and values of every layer for positions ``0 .. pos-1``, preallocated to block_size."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far, shared by all layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values at ``pos`` and return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


Rotary = Optional[tuple[torch.Tensor, torch.Tensor]]  # cos and sin of RoPE's angles at the positions run, or None


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate each (first half, second half) channel pair by its position's angle, in float32 for bf16 runs
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    """All heads at once: one projection to q, k, v, then SDPA (flash/efficient kernels where available)."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rotary: Rotary, cache: Optional[KVCache]) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.config.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.config.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotary is not None:
            q, k = _apply_rotary(q, *rotary), _apply_rotary(k, *rotary)
        start = 0 if cache is None else cache.pos
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # the new tokens attend causally among themselves and to every cached position before them
        mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(start) if start and T > 1 else None
        dropout = self.config.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=not start and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "relu2": lambda x: F.relu(x).square()}


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.activation = config.activation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x))))


class Block(nn.Module):
    """Communication (attention) then computation (MLP), each on a LayerNorm-ed residual branch."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary: Rotary, cache: Optional[KVCache]) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Character-level GPT. ``forward(idx, targets)`` returns ``(logits, loss)`` like the lecture's model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        if config.positions == "rotary":  # RoPE's angles (block_size, head_size/2), base 10000 as in RoFormer
            channels = torch.arange(0, config.head_size, 2, dtype=torch.float32) / config.head_size
            angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), 1.0 / (10000**channels))
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        if config.init == "gpt2":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and config.init == "gpt2":
                # each block adds two residual branches: scale their projections so the stream's
                # variance does not grow with depth (GPT-2 paper, section 2.3)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            if ".c_proj." in name and config.zero_init_proj:  # every block starts as the identity
                nn.init.zeros_(p)

    def num_params(self) -> int:
        """Trainable parameters, the tied head counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token, forward + backward: 6·N + 12·n_layer·n_embd·block_size.

        6·N: each weight of a matrix product does one multiply-add (2 FLOPs) in the forward pass and
        two in the backward; N leaves out the embedding tables, which are lookups (a tied token table
        counts, as the head). The second term is attention's q·k and weights·v, 2·T·C multiply-adds
        per layer and token forward, times 3 with the backward, over the full context as PaLM's
        appendix B counts it (no discount for the causal mask), so MFU compares with nanoGPT's and PaLM's.
        """
        weights = self.named_parameters(remove_duplicate=False)  # a tied table under both names: counted as lm_head
        n = sum(p.numel() for name, p in weights if not name.startswith(("wte.", "wpe.")))
        return 6 * n + 12 * self.config.n_layer * self.config.n_embd * self.config.block_size

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits for every position of ``idx`` (B, T) and, given ``targets`` (B, T), the mean cross-entropy.

        With a ``cache``, ``idx`` holds the tokens at positions ``cache.pos ..`` and the cache advances.
        """
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise LitGPTCharError(f"cannot run {start + T} positions: block_size is {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        rotary = None if self.wpe is not None else (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.drop(x)
        for block in self.h:
            x = block(x, rotary, cache)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.inference_mode()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
        refill: Optional[int] = None,
    ) -> Iterator[torch.Tensor]:
        """Yield ``max_new_tokens`` next tokens, each a (B,) tensor, continuing the contexts ``idx`` (B, T).

        temperature 0 picks the most likely token (greedy); otherwise logits are divided by
        ``temperature``, cut to the ``top_k`` largest if given, and sampled with ``generator``.
        ``use_cache=False`` is the lecture's path (re-run the last block_size tokens each step).
        ``refill`` (default block_size // 2, at least 1; 1..block_size): how many of the latest tokens are
        re-encoded when the cache is full; see the module docstring.
        """
        block_size = self.config.block_size
        refill = max(1, block_size // 2) if refill is None else refill
        for ok, message in (  # each message begins with the option's name: `sample` prefixes it with --
            (max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {max_new_tokens}"),
            (temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
            (top_k is None or top_k >= 1, f"top_k must be >= 1 (or unset for no cut), got {top_k}"),
            (idx.size(1) >= 1, "generation needs a context of at least one token"),
            (1 <= refill <= block_size, f"refill must be in 1..block_size ({block_size}), got {refill}"),
        ):
            if not ok:
                raise LitGPTCharError(message)
        cache = KVCache(self.config, idx.size(0), idx.device, self.lm_head.weight.dtype) if use_cache else None
        context = idx[:, -block_size:]  # what the next forward pass encodes
        for _ in range(max_new_tokens):
            if cache is not None and cache.pos == block_size:  # full: start again from the latest `refill` tokens
                cache.pos, context = 0, idx[:, -refill:]
            logits = self(context, cache=cache)[0][:, -1, :]
            if temperature == 0:
                next_token = logits.argmax(dim=-1)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
            yield next_token
            idx = torch.cat((idx, next_token[:, None]), dim=1)
            context = next_token[:, None] if cache is not None else idx[:, -block_size:]

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """``idx`` (B, T) extended by ``max_new_tokens`` sampled tokens; options as in :meth:`stream`."""
        new = list(self.stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
