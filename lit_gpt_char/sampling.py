"""Text from the model: while training (SampleTextCallback) and from a checkpoint alone, no corpus or config
(``lit-gpt-char sample``)."""

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lit_gpt_char.checkpoints import load_checkpoint
from lit_gpt_char.data import CharTokenizer
from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.internals import accumulating
from lit_gpt_char.parser import CLIParser
from lit_gpt_char.policy import RunPolicy
from lit_gpt_char.runs import plan_run


@dataclass(eq=False)  # eq would make it unhashable
class SampleTextCallback(Callback):
    """Every ``every_n_steps`` optimizer steps, rank 0 samples text from the model, prints it and logs it.

    Sampling uses its own seeded generator (the same seed each time, so samples from different
    steps differ only by what the model learned) and the KV-cache generator; the training RNG is
    untouched. At the end of fit a longer sample is printed and logged, like the lecture's final
    ``generate``.

    Args:
        every_n_steps: Steps between samples; 0 disables the periodic samples.
        prompt: Text the samples continue; every character must be in the vocabulary
            ("\\n" by default: the lecture starts from token 0, which is the newline).
        max_new_tokens: Characters per periodic sample.
        final_max_new_tokens: Characters of the sample at the end of fit; 0 disables it.
        temperature: Softmax temperature; 0 picks the most likely character.
        top_k: Sample only among the k most likely characters (unset: all).
        seed: Seed of the sampling generator.
    """

    every_n_steps: int = 1000
    prompt: str = "\n"
    max_new_tokens: int = 200
    final_max_new_tokens: int = 2000
    temperature: float = 1.0
    top_k: Optional[int] = None
    seed: int = 1337

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "max_new_tokens", "final_max_new_tokens", "temperature"):
            if getattr(self, name) < 0:
                raise LitGPTCharError(f"--sampling.{name} must be >= 0, got {getattr(self, name)}")
        if self.top_k is not None and self.top_k < 1:
            raise LitGPTCharError(f"--sampling.top_k must be >= 1 (or null: no cut), got {self.top_k}")
        if not self.prompt:
            raise LitGPTCharError('--sampling.prompt is empty; use "\\n" to start from a new line')

    def check_prompt(self, tokenizer: CharTokenizer) -> None:
        """Fail now, not at step N, if the prompt has a character outside the vocabulary (the CLI calls it once the
        model is built, before anything is printed)."""
        try:
            tokenizer.encode(self.prompt)
        except LitGPTCharError as err:
            raise LitGPTCharError(f"--sampling.prompt: {err}") from None

    def sample(self, pl_module: LightningModule, max_new_tokens: int) -> str:
        """The prompt followed by ``max_new_tokens`` sampled characters."""
        model, training = pl_module.model, pl_module.model.training
        idx = pl_module.tokenizer.encode(self.prompt)[None].to(pl_module.device)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        out = model.eval().generate(
            idx, max_new_tokens, temperature=self.temperature, top_k=self.top_k, generator=generator
        )
        model.train(training)  # eval: no dropout while sampling
        return pl_module.tokenizer.decode(out[0])

    def _publish(self, trainer: Trainer, text: str, tag: str) -> None:
        show = getattr(trainer.progress_bar_callback, "print", print)  # the tqdm bar's print keeps the bar intact
        show(f"\n----- {tag} at step {trainer.global_step} -----\n{text}\n-----")
        markdown = "\n".join("    " + line for line in text.splitlines())  # indented: shown verbatim
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(tag, markdown, global_step=trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if not self.every_n_steps or trainer.global_step % self.every_n_steps or accumulating(trainer):
            return  # due at the batch that stepped the optimizer: once per step, none at the step resumed from
        _check_finite(trainer)
        if trainer.is_global_zero:
            self._publish(trainer, self.sample(pl_module, self.max_new_tokens), "samples")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.final_max_new_tokens:
            _check_finite(trainer)
            if trainer.is_global_zero:
                self._publish(trainer, self.sample(pl_module, self.final_max_new_tokens), "samples/final")


def _check_finite(trainer: Trainer) -> None:
    """A diverged model is not sampled: where RunPolicy checks only at log steps (under DDP, on an accelerator),
    another rank's bad step may have made this rank's weights NaN already. Every rank calls it (a collective)."""
    for policy in trainer.callbacks:
        if isinstance(policy, RunPolicy):
            policy.check_finite(trainer)


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
    rows = ids.to(device)[None].repeat(num_samples, 1)  # each sample's prompt and, as they come, its new characters
    generator = torch.Generator(device=device).manual_seed(seed)
    options = dict(temperature=temperature, top_k=top_k, generator=generator, use_cache=use_cache, refill=refill)
    tokens = model.stream(rows, max_new_tokens, **options)
    try:  # the generator checks its options when it starts: before anything is written
        first = next(tokens, None)
    except LitGPTCharError as err:
        raise LitGPTCharError(f"--{err}") from None  # its messages begin with the option's name
    sys.stdout.write(("===== sample 1 =====\n" if num_samples > 1 else "") + tokenizer.decode(ids))
    for token in itertools.chain([first] if first is not None else [], tokens):
        rows = torch.cat((rows, token[:, None]), dim=1)
        sys.stdout.write(tokenizer.decode([int(token[0])]))
        sys.stdout.flush()
    texts = [tokenizer.decode(row) for row in rows]
    sys.stdout.write("\n" + "".join(f"===== sample {i} =====\n{text}\n" for i, text in enumerate(texts[1:], start=2)))
    sys.stdout.flush()
    return texts


def sample_cli(args: list[str], prog: str = "lit-gpt-char") -> None:
    """Parse ``PROG sample`` options (PROG: the command the user typed) and run :func:`sample`."""
    parser = CLIParser(prog=f"{prog} sample", description=sample.__doc__.split("\n\n")[0])
    parser.add_function_arguments(sample, as_group=False)
    sample(**parser.parse_args(args).as_dict())
