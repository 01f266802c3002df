"""Exact resume, interrupted runs, atomic checkpoint files, divergence, and the bad-input sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_gpt_char.checkpoints import AtomicCheckpointIO
from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.policy import RunPolicy

from .conftest import ROOT, TINY, make_text, outputs_under, run_main
from .test_cli import read_events

# dropout and a warmup + cosine schedule make the global RNG and the scheduler matter to the result
RESUMABLE = [
    *TINY, "--model.config.dropout", "0.1", "--model.warmup_steps", "5", "--model.lr_schedule", "cosine",
    "--model.decay_steps", "60", "--trainer.log_every_n_steps", "1", "--sampling.final_max_new_tokens", "0",
]  # fmt: skip


def _losses(logdir: Path) -> dict[int, float]:
    return dict(read_events(logdir)[0]["train/loss"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_equals_an_unbroken_one(
    optimizer: str, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for d in (straight, broken):
        d.mkdir()
    common = ["fit", *RESUMABLE, "--data.path", str(corpus), "--model.optimizer", optimizer]
    monkeypatch.chdir(straight)
    assert run_main([*common, "--trainer.max_steps", "60"]) == 0
    monkeypatch.chdir(broken)
    assert run_main([*common, "--trainer.max_steps", "30"]) == 0
    assert run_main([*common, "--trainer.max_steps", "60", "--ckpt_path", "last"]) == 0

    expected, got = _losses(straight / "lightning_logs"), _losses(broken / "lightning_logs")
    assert sorted(expected) == sorted(got) == list(range(1, 61))
    assert [got[s] for s in range(1, 61)] == [expected[s] for s in range(1, 61)]  # every step, bitwise
    a = torch.load(straight / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)
    b = torch.load(broken / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 60
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # with Muon, one state dict holds both optimizers' state: AdamW's moments and Muon's momentum buffers
    kinds = {key for state in a["optimizer_states"][0]["state"].values() for key in state}
    assert kinds == (
        {"step", "exp_avg", "exp_avg_sq", "momentum_buffer"}
        if optimizer == "muon"
        else {"step", "exp_avg", "exp_avg_sq"}
    )


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lit_gpt_char", *args],
        cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_interrupt_saves_a_checkpoint_that_resumes(corpus: Path, tmp_path: Path, sig, code: int, name: str) -> None:
    args = ["fit", *TINY, "--data.path", str(corpus), "--trainer.max_steps", "100000"]
    proc = _start(args, tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoints" / "version_0" / "best.ckpt").exists():  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    line = next(line for line in err.splitlines() if line.startswith("interrupted"))
    step = int(line.split("after step ")[1].split(":")[0])
    assert f"interrupted by {name} after step {step}: saved checkpoints/version_0/last.ckpt; resume" in line
    assert "Traceback" not in err
    saved = torch.load(tmp_path / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == step >= 10
    # resuming continues from that very step
    resume = ["fit", *TINY, "--data.path", str(corpus), "--trainer.max_steps", str(step + 3), "--ckpt_path", "last"]
    assert run_main_in(tmp_path, resume) == 0
    assert (
        torch.load(tmp_path / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)["global_step"] == step + 3
    )


def run_main_in(cwd: Path, args: list[str]) -> int:
    result = subprocess.run(
        [sys.executable, "-m", "lit_gpt_char", *args], cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": ""},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return result.returncode


def test_periodic_checkpoints(corpus: Path, workdir: Path) -> None:
    args = ["fit", *TINY, "--data.path", str(corpus), "--periodic_checkpoint.every_n_train_steps", "7"]
    assert run_main(args) == 0
    names = sorted(p.name for p in (workdir / "checkpoints" / "version_0").iterdir())
    assert names == ["best.ckpt", "last.ckpt", "step-14.ckpt", "step-7.ckpt"]
    assert torch.load(workdir / "checkpoints" / "version_0" / "step-14.ckpt", weights_only=True)["global_step"] == 14
    assert torch.load(workdir / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)["global_step"] == 20


def test_a_crash_while_saving_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(LitGPTCharError, match="could not save .*last.ckpt at step None: disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def _can_mount() -> bool:
    return sys.platform == "linux" and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="needs root (unshare -m, mount -t tmpfs) for a real full filesystem")
def test_a_full_disk_while_saving_is_one_line(corpus: Path, tmp_path: Path) -> None:
    # checkpoints/ on a 1000 KiB tmpfs: step 10's best + last (2 x 391 KB) fit, step 20's new file does not
    args = [*TINY, "--data.path", str(corpus), "--sampling.every_n_steps", "0", "--sampling.final_max_new_tokens", "0"]
    (tmp_path / "checkpoints").mkdir()
    # the mount lives as long as the namespace: copy what it holds out before leaving
    script = (
        f'mount -t tmpfs -o size=1000k tmpfs checkpoints && {{ {sys.executable} -m lit_gpt_char fit "$@"; '
        "rc=$?; cp -r checkpoints kept; exit $rc; }"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *args],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and err[-1] == (
        "error: could not save checkpoints/version_0/best.ckpt at step 20: No space left on device. The checkpoints "
        "saved before are intact; the steps since checkpoints/version_0/last.ckpt (step 10) are lost: free space, "
        "then resume by running the same command with --ckpt_path checkpoints/version_0/last.ckpt"
    ), result.stderr
    assert sorted(p.name for p in (tmp_path / "kept" / "version_0").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "kept" / "version_0" / "last.ckpt", weights_only=True)["global_step"] == 10


def test_divergence_stops_with_the_step_and_keeps_checkpoints(
    corpus: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["fit", *TINY, "--data.path", str(corpus), "--trainer.callbacks+=tests.probes.InjectNaN"]
    assert run_main([*args, "--trainer.callbacks.at_step", "15"]) == 2
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: training diverged: the loss is nan at step 15")
    assert " done: " not in out  # no result line for a run that did not finish
    assert "last.ckpt" in err[0]
    best = torch.load(workdir / "checkpoints" / "version_0" / "best.ckpt", weights_only=True)
    last = torch.load(workdir / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)
    assert best["global_step"] == last["global_step"] == 10  # nothing written after the divergence
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


def test_divergence_on_an_accelerator_is_caught_without_a_per_step_sync(
    corpus: Path, workdir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the deferred path GPUs take (first bad step kept on the device), exercised on the CPU
    monkeypatch.setattr(RunPolicy, "_checks_on_host", staticmethod(lambda trainer, loss: False))
    args = ["fit", *TINY, "--data.path", str(corpus), "--trainer.callbacks+=tests.probes.InjectNaN"]
    assert run_main([*args, "--trainer.callbacks.at_step", "15"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: training diverged: the loss is not finite at step 15")
    last = torch.load(workdir / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10  # found before the evaluation at step 20 could save anything


def test_huge_learning_rate_diverges_cleanly(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["fit", *TINY, "--data.path", str(corpus), "--model.learning_rate", "1e6", "--trainer.max_steps", "200"]
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: training diverged")


# ---- the bad-input sweep: one line, exit 2, nothing written ----


def _write(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _empty_dir(tmp: Path) -> str:
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def _yaml_with_unknown_key(tmp: Path) -> list[str]:
    return ["--config", _write(tmp, "typo.yaml", b"model:\n  learning_rat: 0.01\n")]


SWEEP = {
    "binary-corpus": (lambda t: ["--data.path", _write(t, "b.bin", bytes(range(256)) * 40)], "is not UTF-8 text"),
    "corpus-is-an-empty-directory": (lambda t: ["--data.path", _empty_dir(t)], "has no files"),
    "train_fraction-1.5": (lambda t: ["--data.train_fraction", "1.5"], "strictly between 0 and 1"),
    "batch_size-0": (lambda t: ["--data.batch_size", "0"], "--data.batch_size must be at least 1"),
    "devices-more-than-cores": (
        lambda t: ["--trainer.accelerator", "cpu", "--trainer.devices", "4096"],
        "asks for that many CPU processes",
    ),
    "gpu-without-one": (
        lambda t: ["--trainer.accelerator", "gpu"],
        "no CUDA GPU is visible here; use --trainer.accelerator cpu",
    ),
    "unknown-precision": (lambda t: ["--trainer.precision", "bf17"], "--trainer.precision 'bf17' is not one of"),
    "yaml-unknown-key": (
        _yaml_with_unknown_key,
        "does not accept option 'model.learning_rat'; did you mean --model.learning_rate?",
    ),
    "not-a-number": (lambda t: ["--data.batch_size", "many"], 'key "data.batch_size"'),
    "missing-checkpoint": (
        lambda t: ["--ckpt_path", str(t / "nope.ckpt")],
        "does not exist; pass --ckpt_path last or best (the newest run's), or a file such as checkpoints/RUN/last.ckpt",
    ),
    # issue 20 item 7, issue 21 item 4: each said something wrong or nothing at all
    "path-with-option-words": (
        lambda t: ["--data.path", str(t / "init" / "dropout" / "input.txt")],
        "/init/dropout/input.txt does not exist",
    ),
    "missing-folder": (lambda t: ["--data.path", str(t / "nowhere")], "corpus path "),
    "decay-before-warmup": (
        lambda t: ["--model.lr_schedule", "cosine", "--model.warmup_steps", "10", "--model.decay_steps", "10"],
        "--model.decay_steps (10) must be greater than --model.warmup_steps (10)",
    ),
    "min_lr-above-learning_rate": (
        lambda t: ["--model.min_lr", "0.1"],
        "--model.min_lr (0.1) must be at most --model.learning_rate (0.001)",
    ),
    "cooldown_fraction-1.5": (
        lambda t: ["--model.cooldown_fraction", "1.5"],
        "--model.cooldown_fraction must be in [0, 1], got 1.5",
    ),
    "misspelled-option": (lambda t: ["--trainer.max_stepz", "3"], "did you mean --trainer.max_steps?"),
    "abbreviated-option": (lambda t: ["--trainer.max_step", "3"], "did you mean --trainer.max_steps?"),
    "missing-config": (
        lambda t: ["--config", "configs/smal.yaml"],
        "config file configs/smal.yaml does not exist; the configs in ",
    ),
    "config-as-checkpoint": (
        lambda t: ["--ckpt_path", str(ROOT / "configs" / "small.yaml")],
        "is a config: pass it with --config; --ckpt_path takes a checkpoint",
    ),
}


@pytest.mark.parametrize("case", list(SWEEP))
def test_bad_input_sweep(case: str, corpus: Path, workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if case == "gpu-without-one" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    make_args, message = SWEEP[case]
    assert run_main(["fit", *TINY, "--data.path", str(corpus), *make_args(tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert outputs_under(workdir) == []


def test_a_missing_checkpoint_names_the_runs_there(
    corpus: Path, workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for run in ("baseline", "version_0"):
        (workdir / "checkpoints" / run).mkdir(parents=True)
        (workdir / "checkpoints" / run / "last.ckpt").touch()
    assert run_main(["fit", *TINY, "--data.path", str(corpus), "--ckpt_path", "checkpoints/last.ckpt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("(runs in checkpoints/: baseline, version_0)"), err


def test_resume_with_another_vocabulary_says_so(
    tiny_checkpoint: Path, workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other.txt"
    other.write_text(make_text(30_000) + "~")  # one character more
    assert run_main(["fit", *TINY, "--data.path", str(other), "--ckpt_path", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the checkpoint's vocabulary" in err[0] and "differs from that of corpus" in err[0]
    assert "only in the corpus: '~'" in err[0]
    assert outputs_under(workdir) == []


def test_resume_with_another_block_size_says_so(
    tiny_checkpoint: Path, corpus: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    # the tiny checkpoint's corpus is make_text(30_000), as is `corpus`: same vocabulary
    args = ["fit", *TINY, "--data.path", str(corpus), "--data.block_size", "8", "--ckpt_path", str(tiny_checkpoint)]
    assert run_main(args) == 2
    assert "pass --data.block_size 16" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="needs root (unshare -m, mount -t tmpfs) for a real full filesystem")
def test_a_full_disk_while_tokenizing_leaves_no_partial_cache(tmp_path: Path) -> None:
    # the cache on a 64 KiB tmpfs, a 300 KB corpus: its ids (1 byte each) do not fit
    (tmp_path / "corpus.txt").write_text(make_text(300_000), encoding="utf-8")
    (tmp_path / "cache").mkdir()
    script = (
        f'mount -t tmpfs -o size=64k tmpfs cache && {{ {sys.executable} -m lit_gpt_char fit "$@"; '
        "rc=$?; find cache -type f > left.txt; exit $rc; }"
    )
    args = [*TINY, "--data.path", "corpus.txt", "--data.cache_dir", "cache"]
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *args],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot use the corpus cache"), result.stderr
    left = (tmp_path / "left.txt").read_text().split()
    assert not [name for name in left if ".tmp" in name], left  # no partial ids file fills the cache's disk


def test_a_bad_separator_is_one_line(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_main(["fit", *TINY, "--data.path", str(corpus), "--data.separator", "\\x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --data.separator '\\\\x'"), err


def test_a_run_monitoring_another_metric_ends_with_its_result_line(
    corpus: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["fit", *TINY, "--data.path", str(corpus), "--checkpoint.monitor", "val/bpc"]
    assert run_main(args) == 0
    assert "run version_0 done: 20 steps in " in capsys.readouterr().out


def test_a_checkpoint_with_the_older_single_rng_state_resumes(
    corpus: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    # checkpoints written before the states were kept per rank hold one dict, not a list
    assert run_main(["fit", *TINY, "--data.path", str(corpus), "--trainer.max_steps", "10"]) == 0
    path = workdir / "checkpoints" / "version_0" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["rng_states"] = checkpoint["rng_states"][0]
    torch.save(checkpoint, path)
    assert run_main(["fit", *TINY, "--data.path", str(corpus), "--ckpt_path", "last"]) == 0
    assert "steps 10 to 20" in capsys.readouterr().out
