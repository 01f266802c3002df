"""Runs: one identity names a run's checkpoint and log folders; a new run never touches another's files; a resumed
run continues its own folders and one TensorBoard series; the checkpoint decides the model on resume."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision

from lit_gpt_char.checkpoints import AtomicCheckpointIO
from lit_gpt_char.precision import allow_clipping_with_fused_optimizers

from .conftest import ROOT, TINY, make_text, outputs_under, printed, run_main, run_subprocess
from .test_cli import read_events

FAST = [*TINY, "--trainer.max_steps", "10", "--sampling.final_max_new_tokens", "0", "--sampling.every_n_steps", "0"]


def _fit(corpus: Path, *extra: str) -> int:
    return run_main(["fit", *FAST, "--data.path", str(corpus), *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(logdir: Path) -> dict[str, list[int]]:
    return {tag: [step for step, _ in points] for tag, points in read_events(logdir)[0].items()}


def test_a_second_run_leaves_the_first_untouched(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert _fit(corpus) == 0
    first_line = printed(capsys.readouterr().out)[0]
    assert first_line == "run version_0: checkpoints in checkpoints/version_0/, logs in lightning_logs/version_0/"
    first = _snapshot(workdir / "checkpoints" / "version_0")
    assert sorted(first) == ["best.ckpt", "last.ckpt"]
    first_logs = _snapshot(workdir / "lightning_logs" / "version_0")

    assert _fit(corpus, "--model.config.n_layer", "1") == 0  # another experiment in the same folder
    assert printed(capsys.readouterr().out)[0].startswith("run version_1: checkpoints in checkpoints/version_1/")
    assert _snapshot(workdir / "checkpoints" / "version_0") == first  # bit for bit
    assert _snapshot(workdir / "lightning_logs" / "version_0") == first_logs
    second = torch.load(workdir / "checkpoints" / "version_1" / "last.ckpt", weights_only=True)
    assert second["hyper_parameters"]["config"]["n_layer"] == 1
    assert sorted(os.listdir(workdir / "lightning_logs")) == ["version_0", "version_1"]


def test_a_new_run_never_takes_an_old_log_folder(corpus: Path, workdir: Path) -> None:
    (workdir / "lightning_logs" / "version_4").mkdir(parents=True)  # e.g. logs of a run whose checkpoints were deleted
    assert _fit(corpus) == 0
    assert os.listdir(workdir / "checkpoints") == ["version_5"]
    assert sorted(os.listdir(workdir / "lightning_logs")) == ["version_4", "version_5"]
    assert os.listdir(workdir / "lightning_logs" / "version_4") == []


def test_checkpoint_files_follow_the_umask(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    previous = os.umask(0o027)
    try:
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
        os.umask(0o002)
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "b.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.ckpt").stat().st_mode & 0o777 == 0o664


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_folders(corpus: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "lit_gpt_char", "fit", *FAST, "--data.path", str(corpus)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outs]
    names = sorted(printed(out)[0].split(":")[0] for out, _ in outs)
    assert names == ["run version_0", "run version_1"]
    for version in ("version_0", "version_1"):
        assert sorted(os.listdir(tmp_path / "checkpoints" / version)) == ["best.ckpt", "last.ckpt"]
        assert _steps(tmp_path / "lightning_logs" / version)["val/loss"] == [10]
    assert sorted(os.listdir(tmp_path / "lightning_logs")) == ["version_0", "version_1"]


@pytest.mark.parametrize("form", ["last", "path"])
def test_resume_continues_the_same_run_as_one_series(
    corpus: Path, workdir: Path, capsys: pytest.CaptureFixture, form: str
) -> None:
    every_5 = ["--periodic_checkpoint.every_n_train_steps", "5"]
    assert _fit(corpus, *every_5, "--trainer.max_steps", "25") == 0
    assert _fit(corpus) == 0  # another run, newer: "last" must still find the run asked for, or the newest
    capsys.readouterr()
    if form == "last":
        # the newest run is version_1: resume it, then check version_0 resumed by its path separately
        assert _fit(corpus, "--trainer.max_steps", "20", "--ckpt_path", "last") == 0
        line = printed(capsys.readouterr().out)[0]
        assert line.startswith("run version_1, resumed from checkpoints/version_1/last.ckpt at step 10 (the newest")
        assert _steps(workdir / "lightning_logs" / "version_1")["val/loss"] == [10, 20]
        return
    # events of steps 15-25 were logged after step-10.ckpt: resuming from it replaces them
    before = dict(read_events(workdir / "lightning_logs" / "version_0")[0]["val/loss"])
    ckpt = "checkpoints/version_0/step-10.ckpt"
    assert _fit(corpus, *every_5, "--trainer.max_steps", "30", "--ckpt_path", ckpt) == 0
    line = printed(capsys.readouterr().out)[0]
    assert line.startswith(f"run version_0, resumed from {ckpt} at step 10: checkpoints in checkpoints/version_0/")
    steps = _steps(workdir / "lightning_logs" / "version_0")
    assert steps["train/loss"] == [5, 10, 15, 20, 25, 30]  # every step once, in order
    assert steps["val/loss"] == [10, 20, 30] and steps["lr"] == steps["train/loss"]
    after = dict(read_events(workdir / "lightning_logs" / "version_0")[0]["val/loss"])
    assert after[10] == before[10]  # what was logged before the checkpoint stays
    assert len(list((workdir / "lightning_logs").iterdir())) == 2  # no third log folder
    assert torch.load(workdir / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)["global_step"] == 30


def test_ckpt_path_last_starts_a_run_then_resumes_it(
    corpus: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    # a cluster scheduler re-runs the same command: the first time it starts, then it resumes
    assert _fit(corpus, "--ckpt_path", "last") == 0
    assert printed(capsys.readouterr().out)[0].startswith("run version_0: ")
    assert _fit(corpus, "--ckpt_path", "last", "--trainer.max_steps", "20") == 0
    assert printed(capsys.readouterr().out)[0].startswith("run version_0, resumed from")
    assert os.listdir(workdir / "checkpoints") == ["version_0"]
    assert _steps(workdir / "lightning_logs" / "version_0")["val/loss"] == [10, 20]


def test_named_runs(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert _fit(corpus, "--run_name", "baseline") == 0
    out = printed(capsys.readouterr().out)[0]
    assert out.startswith("run baseline: checkpoints in checkpoints/baseline/, logs in lightning_logs/baseline/")
    first = _snapshot(workdir / "checkpoints" / "baseline")
    assert _fit(corpus, "--run_name", "baseline") == 2  # the name is taken: say how to resume it
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: run baseline exists already (checkpoints/baseline); resume it with --ckpt_path last "
        "--run_name baseline, or choose another --run_name"
    ]
    assert _snapshot(workdir / "checkpoints" / "baseline") == first
    assert _fit(corpus, "--run_name", "other") == 0
    capsys.readouterr()
    # "last" with a name resumes that run, not the newest one
    assert _fit(corpus, "--run_name", "baseline", "--ckpt_path", "last", "--trainer.max_steps", "20") == 0
    assert printed(capsys.readouterr().out)[0].startswith(
        "run baseline, resumed from checkpoints/baseline/last.ckpt at step 10:"
    )
    assert sorted(os.listdir(workdir / "checkpoints")) == ["baseline", "other"]
    assert _fit(corpus, "--run_name", "a/b") == 2
    assert "--run_name 'a/b' must be a plain folder name" in capsys.readouterr().err


def test_validate_needs_a_checkpoint_and_writes_no_run(
    corpus: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_main(["validate", *FAST, "--data.path", str(corpus)]) == 2
    assert "validate evaluates a checkpoint: pass --ckpt_path last or best" in capsys.readouterr().err
    assert _fit(corpus) == 0
    logs = _snapshot(workdir / "lightning_logs")
    capsys.readouterr()
    assert run_main(["validate", *FAST, "--data.path", str(corpus), "--ckpt_path", "best"]) == 0
    lines = printed(capsys.readouterr().out)
    assert lines[0].startswith("validate checkpoints/version_0/best.ckpt (step 10)")
    rows = [line.strip(" │┃|").split()[:1] for line in lines]
    assert ["val/loss"] in rows and ["step"] not in rows  # "step" is the x-axis of a fit, not a metric
    assert _snapshot(workdir / "lightning_logs") == logs  # no new TensorBoard run, no config.yaml
    assert sorted(os.listdir(workdir)) == ["checkpoints", "data", "lightning_logs"]  # data/: the corpus cache


# ---- one semantics for resuming, whatever form --ckpt_path takes ----


def test_the_checkpoint_decides_the_model(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert _fit(corpus) == 0  # 2 layers (TINY's flag; configs/small.yaml says 4)
    capsys.readouterr()
    before = outputs_under(workdir)
    for form in ("last", "checkpoints/version_0/last.ckpt"):
        # a flag that conflicts with the checkpoint: one line naming both values, nothing written
        assert _fit(corpus, "--model.config.n_layer", "3", "--ckpt_path", form, "--trainer.max_steps", "20") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --model.config.n_layer 3 conflicts with checkpoint ")
        assert "trained with 2: when resuming, the checkpoint decides the model" in err[0]
        assert _fit(corpus, "--model.learning_rate=0.01", "--ckpt_path", form) == 2
        assert "--model.learning_rate 0.01 conflicts" in capsys.readouterr().err
    assert outputs_under(workdir) == before

    # without the flag, the config file's 4 layers give way to the checkpoint's 2
    i = FAST.index("--model.config.n_layer")
    args = ["fit", *FAST[:i], *FAST[i + 2 :], "--data.path", str(corpus), "--ckpt_path", "last"]
    # settings that may change on resume: the number of steps, the fused optimizer kernel
    assert run_main([*args, "--trainer.max_steps", "20", "--model.fused_adamw", "false"]) == 0
    last = torch.load(workdir / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 20 and last["hyper_parameters"]["config"]["n_layer"] == 2
    assert last["hyper_parameters"]["fused_adamw"] is False
    assert os.listdir(workdir / "checkpoints") == ["version_0"]


def test_a_checkpoint_from_elsewhere_starts_a_new_run(
    tiny_checkpoint: Path, corpus: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    # tiny_checkpoint lies in another project folder: its run is not this folder's to continue
    assert _fit(corpus, "--ckpt_path", str(tiny_checkpoint), "--trainer.max_steps", "25") == 0
    line = printed(capsys.readouterr().out)[0]
    assert line.startswith(f"run version_0, starting from the weights of {tiny_checkpoint} at step 20: ")
    assert torch.load(workdir / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)["global_step"] == 25
    assert torch.load(tiny_checkpoint, weights_only=True)["global_step"] == 20


def _one_line_and_nothing_written(args: list[str], cwd: Path) -> str:
    before = outputs_under(cwd)
    result = run_subprocess(args, cwd=cwd, timeout=120)
    lines = printed(result.stdout + result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert outputs_under(cwd) == before
    return lines[0]


@pytest.mark.slow
def test_resume_with_another_vocabulary_is_the_only_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text(make_text(30_000) + "~")  # one character more
    work = tmp_path / "work"
    work.mkdir()
    line = _one_line_and_nothing_written(
        ["fit", *FAST, "--data.path", str(other), "--ckpt_path", str(tiny_checkpoint)], work
    )
    assert line.startswith("error: the checkpoint's vocabulary") and "only in the corpus: '~'" in line
    assert outputs_under(work) == []


# ---- every shipped config trains ----

SHRUNK = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "3",
    "--trainer.limit_val_batches", "1", "--model.config.n_layer", "1", "--model.config.n_head", "2",
    "--model.config.n_embd", "32", "--data.block_size", "16", "--data.batch_size", "4",
    "--sampling.final_max_new_tokens", "0", "--trainer.enable_progress_bar", "false",
    "--periodic_checkpoint.every_n_train_steps", "3", "--periodic_checkpoint.save_top_k", "-1",
]  # fmt: skip


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_trains_on_a_cpu(config: Path, corpus: Path, workdir: Path) -> None:
    """Shapes shrunk; precision, clipping, optimizer and schedule stay the config's own."""
    assert run_main(["fit", "--config", str(config), *SHRUNK, "--data.path", str(corpus)]) == 0
    own = yaml.safe_load(config.read_text())
    saved = yaml.safe_load((workdir / "lightning_logs" / "version_0" / "config.yaml").read_text())
    for key in ("precision", "gradient_clip_val"):
        assert saved["trainer"][key] == own["trainer"][key]
    for key in ("learning_rate", "lr_schedule", "warmup_steps", "weight_decay", "betas", "fused_adamw", "optimizer"):
        assert saved["model"][key] == own["model"].get(key, saved["model"][key]), key
    ckpt = torch.load(workdir / "checkpoints" / "version_0" / "step-3.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    groups = ckpt["optimizer_states"][0]["param_groups"]
    adamw = [group for group in groups if "betas" in group]
    assert adamw and all(group["fused"] for group in adamw)  # fused_adamw null: on
    assert any("momentum" in group for group in groups) == (own["model"].get("optimizer", "adamw") == "muon")
    assert bool(ckpt["lr_schedulers"]) == (
        own["model"]["lr_schedule"] != "constant" or own["model"]["warmup_steps"] > 0
    )


def test_bf16_clips_gradients_before_a_fused_step() -> None:
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 10.0)
    optimizer = torch.optim.AdamW([param], fused=True)
    plugin = allow_clipping_with_fused_optimizers(MixedPrecision("bf16-mixed", "cpu"))
    plugin.clip_gradients(optimizer, clip_val=1.0)
    assert torch.linalg.vector_norm(param.grad).item() == pytest.approx(1.0, rel=1e-5)
    # fp16's scaled gradients cannot be clipped before a fused step: that refusal stays
    fp16 = allow_clipping_with_fused_optimizers(MixedPrecision("16-mixed", "cpu"))
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fp16.clip_gradients(optimizer, clip_val=1.0)


@pytest.mark.slow
def test_a_gpu_config_on_a_cpu_says_so(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["fit", "--config", str(ROOT / "configs" / "large.yaml"), "--data.path", str(corpus)]
    args += ["--trainer.accelerator", "cpu", "--trainer.max_steps", "0", "--trainer.enable_model_summary", "false"]
    assert run_main(args) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1
    assert re.fullmatch(
        r"note: this run is sized for a GPU: on this CPU one step takes ~\d+ s; configs/small.yaml is the CPU config",
        notes[0],
    )


@pytest.mark.slow
def test_resume_on_more_devices(corpus: Path, tmp_path: Path) -> None:
    """A 1-process run resumed by 2 DDP processes (CPU, gloo): the same run, trained on to the new max_steps."""
    assert run_subprocess(["fit", *FAST, "--data.path", str(corpus)], cwd=tmp_path).returncode == 0
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    args = ["fit", *FAST, "--data.path", str(corpus), *ddp, "--ckpt_path", "last", "--trainer.max_steps", "20"]
    result = run_subprocess(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed(result.stdout)[0].startswith(
        "run version_0, resumed from checkpoints/version_0/last.ckpt at step 10"
    )
    assert os.listdir(tmp_path / "checkpoints") == ["version_0"]  # the second process joined rank 0's run
    assert "sync_dist" not in result.stderr  # val/loss is synced by torchmetrics: no warning that it is not
    assert torch.load(tmp_path / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)["global_step"] == 20
    assert _steps(tmp_path / "lightning_logs" / "version_0")["val/loss"] == [10, 20]


@pytest.mark.slow
def test_one_process_at_a_time_trains_a_run(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    """Two processes continuing run X at once: the second says X is in use and writes nothing; the lock dies with
    the first process, also with a kill -9."""
    assert _fit(corpus, "--run_name", "X") == 0
    resume = [
        sys.executable, "-m", "lit_gpt_char", "fit", *FAST, "--data.path", str(corpus), "--ckpt_path", "last",
        "--run_name", "X", "--trainer.val_check_interval", "1000",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [*resume, "--trainer.max_steps", "100000"], cwd=workdir, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().startswith("run X, resumed from checkpoints/X/last.ckpt at step 10")
        second = subprocess.run(resume, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None  # still training X
    finally:
        first.kill()
        first.communicate()
    assert second.returncode == 2
    assert printed(second.stdout + second.stderr) == [
        "error: run X is in use: another process is training it (checkpoints/X/.lock is locked); wait until it ends, "
        "or choose another --run_name"
    ]
    assert len(list((workdir / "lightning_logs" / "X").glob("config-resumed-*"))) == 1  # the first process's only
    assert len(list((workdir / "lightning_logs" / "X").glob("events.*"))) == 2
    capsys.readouterr()
    assert _fit(corpus, "--ckpt_path", "last", "--run_name", "X") == 0  # the SIGKILLed process held it no more
    assert not (workdir / "checkpoints" / "X" / ".lock").exists()


def test_a_run_with_logs_but_no_checkpoints_says_so(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert _fit(corpus, "--run_name", "X") == 0
    shutil.rmtree(workdir / "checkpoints" / "X")
    capsys.readouterr()
    assert _fit(corpus, "--ckpt_path", "last", "--run_name", "X") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: run X has logs (lightning_logs/X) but no checkpoints (checkpoints/X): there is nothing to resume; "
        "choose another --run_name, or delete its logs to start it over"
    ]
    assert not (workdir / "checkpoints" / "X").exists()
