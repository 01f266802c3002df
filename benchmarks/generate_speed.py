"""KV-cache generation against the lecture's uncached path, in one run.

    python benchmarks/generate_speed.py [--new 2000] [--device cpu]

The large config's shape (block 256, n_embd 384, 6 heads, 6 layers, 65 characters; random
weights), batch 1, sampling at temperature 1 with the same seed for both paths. Prints a table with
tokens per second and the speed-up of the cache.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lit_gpt_char.model import GPT, GPTConfig


def tokens_per_second(model: GPT, new: int, device: str, **kwargs) -> tuple[float, torch.Tensor]:
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    model.generate(prompt, 20, generator=torch.Generator(device).manual_seed(0), **kwargs)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, new, generator=torch.Generator(device).manual_seed(0), **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    return new / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=2000, help="characters to generate per path")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)
    model = GPT(config).to(args.device).eval()
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# GPT {model.num_params() / 1e6:.2f}M parameters, block_size 256, {args.new} new characters, batch 1\n")
    rows = []
    for name, kwargs in [("uncached (lecture: re-run last 256)", {"use_cache": False}), ("KV cache", {})]:
        rate, _ = tokens_per_second(model, args.new, args.device, **kwargs)
        rows.append((name, rate))
    base = rows[0][1]
    print(f"| {'path':<36} | {'tokens/s':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 10}|")
    for name, rate in rows:
        print(f"| {name:<36} | {rate:>9.1f} | {rate / base:>7.1f}x |")


if __name__ == "__main__":
    main()
