"""The lecture's training script, restated here as the baseline the CPU benchmark runs beside the project.

    python benchmarks/lecture_reference.py --data data/tinyshakespeare/input.txt [--max_iters 5000]

Same semantics as the script in ../shared/seed.txt (Karpathy, "Let's build GPT"): one nn.Module per
attention head with its own key/query/value projections and causal mask, scores scaled by
1/sqrt(n_embd), concatenated heads and a projection; ReLU MLP; pre-LayerNorm blocks; learned
positions; AdamW(lr=1e-3) with PyTorch's defaults; random windows via torch.randint; every 100 steps
(and at the last) the mean loss over 200 random batches of train and of val; then 2000 generated
characters. Prints `step N: train loss X, val loss Y` lines, the training time, and the sample.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

BATCH, BLOCK, EVAL_INTERVAL, EVAL_ITERS, LR = 16, 32, 100, 200, 1e-3
N_EMBD, N_HEAD, N_LAYER, DROPOUT = 64, 4, 4, 0.0


class Head(nn.Module):
    def __init__(self, head_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(N_EMBD, head_size, bias=False)
        self.query = nn.Linear(N_EMBD, head_size, bias=False)
        self.value = nn.Linear(N_EMBD, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(BLOCK, BLOCK)))
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, T, C = x.shape
        scores = self.query(x) @ self.key(x).transpose(-2, -1) * C**-0.5  # C = n_embd, as in the lecture
        scores = scores.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        return self.dropout(F.softmax(scores, dim=-1)) @ self.value(x)


class MultiHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(Head(N_EMBD // N_HEAD) for _ in range(N_HEAD))
        self.proj = nn.Linear(N_EMBD, N_EMBD)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(torch.cat([h(x) for h in self.heads], dim=-1)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sa = MultiHead()
        self.ffwd = nn.Sequential(
            nn.Linear(N_EMBD, 4 * N_EMBD), nn.ReLU(), nn.Linear(4 * N_EMBD, N_EMBD), nn.Dropout(DROPOUT)
        )
        self.ln1, self.ln2 = nn.LayerNorm(N_EMBD), nn.LayerNorm(N_EMBD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class LectureGPT(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, N_EMBD)
        self.position_embedding_table = nn.Embedding(BLOCK, N_EMBD)
        self.blocks = nn.Sequential(*[Block() for _ in range(N_LAYER)])
        self.ln_f = nn.LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        _, T = idx.shape
        x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T))
        logits = self.lm_head(self.ln_f(self.blocks(x)))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -BLOCK:])
            probs = F.softmax(logits[:, -1, :], dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/tinyshakespeare/input.txt")
    parser.add_argument("--max_iters", type=int, default=5000)
    args = parser.parse_args()
    torch.manual_seed(1337)
    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = splits[split]
        ix = torch.randint(len(d) - BLOCK, (BATCH,))
        return torch.stack([d[i : i + BLOCK] for i in ix]), torch.stack([d[i + 1 : i + BLOCK + 1] for i in ix])

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {split: torch.tensor([model(*get_batch(split))[1].item() for _ in range(EVAL_ITERS)]).mean().item()
               for split in ("train", "val")}  # fmt: skip
        model.train()
        return out

    model = LectureGPT(len(chars))
    print(sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    start = time.perf_counter()
    for it in range(args.max_iters):
        if it % EVAL_INTERVAL == 0 or it == args.max_iters - 1:
            losses = estimate_loss()
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
        xb, yb = get_batch("train")
        _, loss = model(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"training time: {time.perf_counter() - start:.1f} s", flush=True)
    out = model.generate(torch.zeros((1, 1), dtype=torch.long), max_new_tokens=2000)[0].tolist()
    print("".join(chars[i] for i in out))


if __name__ == "__main__":
    main()
