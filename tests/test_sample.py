"""`lit-gpt-char sample`: from the checkpoint alone, streamed, reproducible; bad input is one clear line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from lit_gpt_char.checkpoints import load_checkpoint
from lit_gpt_char.module import LitGPT
from lit_gpt_char.sampling import SampleTextCallback, sample

from .conftest import TINY, run_main


def sample_output(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert run_main(["sample", *args]) == 0
    return capsys.readouterr().out


def test_same_seed_same_text(tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--ckpt_path", str(tiny_checkpoint), "--prompt", "ROMEO:", "--max_new_tokens", "60", "--top_k", "10"]
    first = sample_output(capsys, *args, "--seed", "1")
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 60 + 1
    assert sample_output(capsys, *args, "--seed", "1") == first
    assert sample_output(capsys, *args, "--seed", "2") != first


def test_streams_each_character_as_it_is_made(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    monkeypatch.setattr("sys.stdout", Recorder())
    texts = sample(str(tiny_checkpoint), prompt="KING", max_new_tokens=50, seed=3)
    assert writes[0] == "KING" and all(len(w) == 1 for w in writes[1:51])  # one write per new character
    assert "".join(writes[:51]) == texts[0]


def test_several_samples_as_one_batch(tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    out = sample_output(capsys, "--ckpt_path", str(tiny_checkpoint), "--num_samples", "3", "--max_new_tokens", "40")
    parts = out.split("===== sample ")
    assert [p[:1] for p in parts[1:]] == ["1", "2", "3"]
    bodies = [p.split("=====\n", 1)[1] for p in parts[1:]]
    assert len(set(bodies)) == 3  # independent samples


def test_greedy_empty_prompt_and_prompt_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    texts = sample(str(tiny_checkpoint), temperature=0.0, max_new_tokens=30, num_samples=2)
    assert texts[0] == texts[1]  # greedy: no randomness
    assert texts[0][0] == tokenizer.vocab[0] == "\n"  # empty prompt: token 0, as the lecture
    expected = model.generate(torch.zeros(1, 1, dtype=torch.long), 30, temperature=0.0)
    assert texts[0] == tokenizer.decode(expected[0])
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:\n")
    assert sample(str(tiny_checkpoint), prompt_file=str(prompt), max_new_tokens=5)[0].startswith("JULIET:\n")


def test_uncached_option_and_refill(tiny_checkpoint: Path) -> None:
    # the tiny model's block_size is 16: 40 new characters go past the window
    exact = sample(str(tiny_checkpoint), prompt="KING", max_new_tokens=40, refill=16, seed=5)
    assert sample(str(tiny_checkpoint), prompt="KING", max_new_tokens=40, use_cache=False, seed=5) == exact


def test_callback_uses_the_same_generator(tiny_checkpoint: Path) -> None:
    lit = LitGPT.load_from_checkpoint(tiny_checkpoint)
    callback = SampleTextCallback(prompt="ROMEO:", temperature=0.8, top_k=5, seed=11)
    expected = sample(str(tiny_checkpoint), prompt="ROMEO:", max_new_tokens=40, temperature=0.8, top_k=5, seed=11)
    assert callback.sample(lit, 40) == expected[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "ROMEO€ü"], "2 character(s) not in the model's vocabulary"),
        (["--top_k", "0"], "top_k must be >= 1"),
        (["--temperature", "-0.5"], "temperature must be >= 0"),
        (["--max_new_tokens", "-1"], "max_new_tokens must be >= 0"),
        (["--num_samples", "0"], "num_samples must be at least 1"),
    ],
)
def test_bad_options(tiny_checkpoint: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    assert run_main(["sample", "--ckpt_path", str(tiny_checkpoint), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def _truncated(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    path = tmp_path / "cut.ckpt"
    path.write_bytes(tiny_checkpoint.read_bytes()[:4000])
    return path


def _foreign(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    return path


def _text(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda ckpt, tmp: tmp / "missing.ckpt", "does not exist"),
        (lambda ckpt, tmp: tmp, "is a directory"),
        (_truncated, "not a PyTorch checkpoint, or it is truncated or damaged"),
        (_text, "not a PyTorch checkpoint, or it is truncated or damaged"),
        (_foreign, "not a lit_gpt_char checkpoint"),
    ],
    ids=["missing", "directory", "truncated", "text-file", "foreign"],
)
def test_bad_checkpoints(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, make, message) -> None:
    assert run_main(["sample", "--ckpt_path", str(make(tiny_checkpoint, tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_block_size_1_trains_and_samples(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    # a context of one character: the cache is full after every token, and refills from that one token
    assert (
        run_main(["fit", *TINY, "--data.path", str(corpus), "--data.block_size", "1", "--trainer.max_steps", "10"]) == 0
    )
    capsys.readouterr()
    ckpt = str(workdir / "checkpoints" / "version_0" / "last.ckpt")
    assert len(sample(ckpt, prompt="KING", max_new_tokens=30, seed=3)[0]) == 34
    assert sample(ckpt, max_new_tokens=30, seed=3) == sample(ckpt, max_new_tokens=30, seed=3, use_cache=False)


def test_last_and_best_name_the_newest_runs_files(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tiny_checkpoint.parents[2])  # where its run's checkpoints/ folder is
    for name in ("last", "best"):
        expected = sample_output(
            capsys, "--ckpt_path", str(tiny_checkpoint.with_name(f"{name}.ckpt")), "--max_new_tokens", "20"
        )
        assert sample_output(capsys, "--ckpt_path", name, "--max_new_tokens", "20") == expected
