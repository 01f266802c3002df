"""``lit-gpt-char sample``: text from a checkpoint alone — no corpus, no config."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Literal, Optional

import torch

from lit_gpt_char.checkpoint import load_checkpoint
from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.parser import CLIParser
from lit_gpt_char.runs import plan_run


def sample(
    ckpt_path: str,
    prompt: str = "",
    prompt_file: Optional[str] = None,
    max_new_tokens: int = 500,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    num_samples: int = 1,
    seed: int = 1337,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    use_cache: bool = True,
    refill: Optional[int] = None,
) -> list[str]:
    """Generate text from a checkpoint, streaming the first sample to stdout as it is produced.

    Args:
        ckpt_path: A checkpoint written by `fit` (e.g. checkpoints/RUN/last.ckpt), or last or best: that file of
            the newest run.
        prompt: Text to continue. Empty: start from token 0, the vocabulary's first character (a
            newline for Tiny Shakespeare), as the lecture does.
        prompt_file: Read the prompt from this UTF-8 file instead.
        max_new_tokens: Characters to generate per sample.
        temperature: Softmax temperature; 0 = greedy (always the most likely character).
        top_k: Sample only among the k most likely characters (unset: all).
        num_samples: Independent samples, generated together as one batch.
        seed: Random seed: the same seed, checkpoint and options give the same text.
        device: Where to run: auto (cuda if available), cpu or cuda.
        use_cache: Use the KV cache (fast). Off: re-run the last block_size characters for every
            new one, exactly as the lecture's generate.
        refill: With the cache, how many of the latest characters are re-encoded when the context
            window is full (1..block_size; default block_size // 2, at least 1).

    Returns:
        The samples, each the prompt followed by the new text.
    """
    if num_samples < 1:
        raise LitGPTCharError(f"--num_samples must be at least 1, got {num_samples}")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise LitGPTCharError(f"cannot read --prompt_file {prompt_file}: {err}") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise LitGPTCharError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if ckpt_path in ("last", "best"):  # as fit and validate read them: the newest run's
        found = plan_run(ckpt_path, None).resume_from
        if found is None:
            raise LitGPTCharError(f"--ckpt_path {ckpt_path}: there is no run in checkpoints/; pass a checkpoint file")
        ckpt_path = str(found)
    model, tokenizer = load_checkpoint(ckpt_path, device)
    ids = tokenizer.encode(prompt) if prompt else torch.zeros(1, dtype=torch.long)
    idx = ids.to(device)[None].repeat(num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = model.stream(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        generator=generator,
        use_cache=use_cache,
        refill=refill,
    )
    try:  # the generator checks its options when it starts: before anything is written
        first = next(tokens, None)
    except LitGPTCharError as err:
        raise LitGPTCharError(f"--{err}") from None  # its messages begin with the option's name
    start = tokenizer.decode(ids)
    out = sys.stdout
    if num_samples > 1:
        out.write("===== sample 1 =====\n")
    out.write(start)
    new: list[torch.Tensor] = []
    for token in itertools.chain([first] if first is not None else [], tokens):
        new.append(token)
        out.write(tokenizer.decode([int(token[0])]))
        out.flush()
    out.write("\n")
    texts = [start + tokenizer.decode(row) for row in torch.stack(new, 1)] if new else [start] * num_samples
    for i, text in enumerate(texts[1:], start=2):
        out.write(f"===== sample {i} =====\n{text}\n")
    out.flush()
    return texts


def sample_cli(args: list[str], prog: str = "lit-gpt-char") -> None:
    """Parse ``PROG sample`` options (PROG: the command the user typed) and run :func:`sample`."""
    parser = CLIParser(prog=f"{prog} sample", description=sample.__doc__.split("\n\n")[0])
    parser.add_function_arguments(sample, as_group=False)
    cfg = parser.parse_args(args)
    sample(**cfg.as_dict())
