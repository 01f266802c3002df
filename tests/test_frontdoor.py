"""The front door: every documented error and an interrupt are one line through the real CLI, --help is whole."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, TINY, make_text, outputs_under, printed, run_main, run_subprocess

FIT = ["fit", *TINY, "--sampling.final_max_new_tokens", "0", "--sampling.every_n_steps", "0"]


def _error_cases(tmp: Path, corpus: Path, ckpt: Path) -> dict[str, tuple[list[str], str]]:
    """Each documented mistake: (command line, what its one line must say)."""
    (tmp / "empty.txt").write_text("")
    (tmp / "typo.yaml").write_text("model:\n  learning_rat: 0.01\n")
    (tmp / "truncated.ckpt").write_bytes(ckpt.read_bytes()[:5000])
    torch.save({"weights": torch.ones(2)}, tmp / "foreign.ckpt")
    (tmp / "other.txt").write_text(make_text(30_000) + "~")
    empty_dir = tmp / "empty_dir"
    empty_dir.mkdir()
    data = ["--data.path", str(corpus)]
    fit = [*FIT, *data]
    resume = [*fit, "--ckpt_path", str(ckpt)]
    sample = ["sample", "--ckpt_path", str(ckpt)]
    cases = {
        "no-subcommand": ([], "error: give a subcommand: fit, validate, test or sample"),
        "missing-corpus": ([*FIT, "--data.path", str(tmp / "missing.txt")], "does not exist"),
        "empty-corpus": ([*FIT, "--data.path", str(tmp / "empty.txt")], "empty"),
        "empty-corpus-directory": ([*FIT, "--data.path", str(empty_dir)], "has no files"),
        "not-a-number": ([*fit, "--data.batch_size", "many"], 'key "data.batch_size"'),
        "unknown-precision": ([*fit, "--trainer.precision", "bf17"], "--trainer.precision 'bf17' is not one of"),
        "unknown-activation": (
            [*fit, "--model.config.activation", "tanh"],
            "--model.config.activation 'tanh' is not one of: 'relu', 'gelu', 'relu2'",
        ),
        "yaml-unknown-key": ([*fit, "--config", str(tmp / "typo.yaml")], "model.learning_rat"),
        "n_embd-n_head": ([*fit, "--model.config.n_head", "5"], "--model.config.n_embd (32) must be divisible by"),
        "learning-rate-0": ([*fit, "--model.learning_rate", "0"], "--model.learning_rate must be > 0"),
        "block_size-0": ([*fit, "--data.block_size", "0"], "block_size must be at least 1"),
        "prompt-not-in-vocab": ([*fit, "--sampling.prompt", "Zoë"], "--sampling.prompt: "),
        "sampling-temperature": ([*fit, "--sampling.temperature", "-1"], "--sampling.temperature must be >= 0"),
        "too-many-cpu-processes": (
            [*fit, "--trainer.accelerator", "cpu", "--trainer.devices", "4096", "--trainer.strategy", "ddp"],
            "asks for that many CPU processes",
        ),
        "devices-0": ([*fit, "--trainer.devices", "0"], "--trainer.devices 0: use at least 1"),
        "cosine-without-end": (
            [*fit, "--model.lr_schedule", "cosine", "--trainer.max_steps", "-1"],
            "--model.lr_schedule cosine needs to know where it ends",
        ),
        "missing-checkpoint": ([*fit, "--ckpt_path", str(tmp / "nope.ckpt")], "does not exist"),
        "truncated-checkpoint": ([*fit, "--ckpt_path", str(tmp / "truncated.ckpt")], "truncated or damaged"),
        "foreign-checkpoint": ([*fit, "--ckpt_path", str(tmp / "foreign.ckpt")], "not a lit_gpt_char checkpoint"),
        "resume-other-vocabulary": (
            [*FIT, "--data.path", str(tmp / "other.txt"), "--ckpt_path", str(ckpt)],
            "the checkpoint's vocabulary",
        ),
        "resume-other-block_size": ([*resume, "--data.block_size", "8"], "--data.block_size 8 conflicts"),
        "resume-other-shape": ([*resume, "--model.config.n_layer", "3"], "--model.config.n_layer 3 conflicts"),
        "run-name-taken": ([*fit, "--run_name", "taken"], "run taken exists already"),
        "validate-without-checkpoint": (["validate", *TINY, *data], "validate evaluates a checkpoint"),
        "sample-without-checkpoint": (["sample"], "error: missing --ckpt_path (options: python -m lit_gpt_char sample"),
        "sample-refill-0": ([*sample, "--refill", "0"], "--refill must be in 1..block_size (16), got 0"),
        "sample-temperature": ([*sample, "--temperature", "-1"], "--temperature must be >= 0"),
        "sample-top_k-0": ([*sample, "--top_k", "0"], "--top_k must be >= 1"),
        "sample-max_new_tokens": ([*sample, "--max_new_tokens", "-5"], "--max_new_tokens must be >= 0"),
    }
    if not torch.cuda.is_available():
        cases["gpu-without-one"] = ([*fit, "--trainer.accelerator", "gpu"], "no CUDA GPU is visible here")
    return cases


@pytest.mark.slow
def test_every_documented_error_is_one_line_and_writes_nothing(
    tiny_checkpoint: Path, corpus: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = _error_cases(inputs, corpus, tiny_checkpoint)

    def run(name: str) -> tuple[str, subprocess.CompletedProcess, list[str], list[str]]:
        work = tmp_path / name
        (work / "checkpoints" / "taken").mkdir(parents=True)  # another run's folder, for run-name-taken
        before = outputs_under(work)
        result = run_subprocess(cases[name][0], cwd=work, timeout=300)
        return name, result, before, outputs_under(work)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: this machine has two cores
        for name, result, before, after in pool.map(run, cases):
            output = printed(result.stdout + result.stderr)
            assert result.returncode == 2 and len(output) == 1, (name, result.stdout + result.stderr)
            assert output[0].startswith("error: ") and cases[name][1] in output[0], (name, output[0])
            assert after == before, name


def _interrupted(corpus: Path, work: Path, sig: signal.Signals) -> tuple[list[str], list[str]]:
    """stdout and stderr lines of a fit stopped by ``sig`` once training is under way."""
    args = [sys.executable, "-m", "lit_gpt_char", *FIT, "--data.path", str(corpus), "--trainer.max_steps", "100000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (work / "checkpoints" / "version_0" / "best.ckpt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return printed(out), printed(err)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "name"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_an_interrupt_is_one_line(corpus: Path, tmp_path: Path, sig: signal.Signals, name: str) -> None:
    out, err = _interrupted(corpus, tmp_path, sig)
    assert out == ["run version_0: checkpoints in checkpoints/version_0/, logs in lightning_logs/version_0/"]
    startup = ("Seed set to 1337", "GPU available: ", "TPU available: ")
    *before, last = err
    assert all(line.startswith(startup) for line in before), err  # the lines every run starts with, nothing more
    assert re.fullmatch(
        rf"interrupted by {name} after step \d+: saved checkpoints/version_0/last.ckpt; resume by running the same "
        r"command with --ckpt_path checkpoints/version_0/last.ckpt",
        last,
    )


def test_help_lists_every_subcommand_and_cuts_no_line(capsys: pytest.CaptureFixture) -> None:
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,sample}" in out.split("\n\n")[0]  # the usage line
    listed = out.split("Available subcommands:")[1]
    entries = re.findall(r"^    (\w+) +(.*(?:\n {24}.*)*)", listed, flags=re.M)
    assert [name for name, _ in entries] == ["fit", "validate", "test"]
    for _, text in entries:
        assert " ".join(text.split()).endswith("."), text  # whole sentences
    assert "sample (text from a checkpoint: " in " ".join(out.split())
    assert "separated from fit" not in out

    assert run_main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "best checkpoint:" in out and "periodic and last checkpoints:" in out
    ckpt_help = " ".join(out.split("--ckpt_path CKPT_PATH\n")[-1].split("(type:")[0].split())
    assert ckpt_help.endswith(".") and "registry" not in ckpt_help  # whole sentences, not Lightning's generic text
    assert all(word in ckpt_help for word in ("resumes", "evaluate", "last", "best", "run"))
    assert "(type: str, default: '\\n', a newline)" in " ".join(out.split("--sampling.prompt PROMPT\n")[1].split())
    assert "--checkpoint.dirpath" not in out  # the run decides the folder: no option to disagree with it
