"""The real CLI end to end: fit, resume, validate/test, sample, configs, --help, errors (exit 2, one line)."""

from __future__ import annotations

import inspect
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_gpt_char.checkpoints import load_checkpoint
from lit_gpt_char.data import ShakespeareDataModule
from lit_gpt_char.model import GPTConfig
from lit_gpt_char.module import LitGPT
from lit_gpt_char.precision import auto_precision
from lit_gpt_char.sampling import SampleTextCallback

from .conftest import ROOT, SMALL, TINY, outputs_under, printed, run_main, run_subprocess


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} as {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def read_events(logdir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    """Scalars and text summaries from every event file under ``logdir``, read with TensorBoard's reader."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    texts: dict[str, list[tuple[int, str]]] = {}
    for run in sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")}):
        with tempfile.TemporaryDirectory(prefix="events-") as links:
            acc = EventAccumulator(_in_order(run, Path(links)), size_guidance={"scalars": 0, "tensors": 0})
            acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["tensors"]:
            if tag == "custom_scalars__config__":  # a layout (protobuf), not text: see test_monitor.py
                continue
            texts.setdefault(tag, []).extend((e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag))
    return scalars, texts


def _in_order(run: Path, links: Path) -> str:
    """A folder of links to ``run``'s event files named so that name order is write order. TensorBoard reads a
    folder's files in name order: events.out.tfevents.<second>.<host>.<pid>.<n>, and runs in one test process
    (in-process, within one second) sort .10 before .9."""
    for path in run.glob("events.out.tfevents.*"):
        stamp, count = int(path.name.split(".")[3]), int(path.name.rsplit(".", 1)[1])
        (links / f"events.out.tfevents.{stamp:012d}.{count:06d}").symlink_to(path)
    return str(links)


@pytest.fixture
def trained(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> tuple[Path, str]:
    """A 20-step run of the tiny config on the tiny corpus; (workdir, its stdout)."""
    assert run_main(["fit", *TINY, "--data.path", str(corpus)]) == 0
    return workdir, capsys.readouterr().out


def test_fit_writes_checkpoints_metrics_and_samples(trained: tuple[Path, str], corpus: Path) -> None:
    workdir, out = trained
    assert sorted(p.name for p in (workdir / "checkpoints" / "version_0").iterdir()) == ["best.ckpt", "last.ckpt"]
    # periodic samples every 10 steps and a final one, printed once each
    assert out.count("----- samples at step 10 -----") == 1 and out.count("----- samples at step 20 -----") == 1
    assert out.count("----- samples/final at step 20 -----") == 1

    scalars, texts = read_events(workdir / "lightning_logs")
    assert {"train/loss", "val/loss", "val/bpc", "lr"} <= set(scalars)
    assert [step for step, _ in scalars["val/loss"]] == [10, 20]
    for (_, loss), (_, bpc) in zip(scalars["val/loss"], scalars["val/bpc"]):
        assert bpc == pytest.approx(loss / math.log(2), rel=1e-6)
    assert [step for step, _ in scalars["train/loss"]] == [5, 10, 15, 20]  # every log_every_n_steps (5)
    assert all(v == pytest.approx(1e-3) for _, v in scalars["lr"])
    assert {"samples/text_summary", "samples/final/text_summary"} <= set(texts)
    assert [step for step, _ in texts["samples/text_summary"]] == [10, 20]
    assert (workdir / "lightning_logs" / "version_0" / "config.yaml").is_file()

    # the last line is the result: the final and the best val/loss as logged, the steps, the checkpoints
    best_step, best = min(scalars["val/loss"], key=lambda point: point[1])
    assert re.fullmatch(
        rf"run version_0 done: 20 steps in 0:00:\d\d; val/loss {scalars['val/loss'][-1][1]:.4f} at step 20 \(best "
        rf"{best:.4f} at step {best_step}\); checkpoints/version_0/best.ckpt, checkpoints/version_0/last.ckpt",
        out.splitlines()[-1],
    )
    best_ckpt = torch.load(workdir / "checkpoints" / "version_0" / "best.ckpt", weights_only=True)
    assert best_ckpt["global_step"] == best_step


def test_checkpoint_is_self_contained(trained: tuple[Path, str], corpus: Path) -> None:
    workdir, _ = trained
    text = corpus.read_text()
    corpus.unlink()  # sampling must need nothing but the checkpoint
    ckpt = torch.load(workdir / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["vocab"] == "".join(sorted(set(text)))
    assert ckpt["global_step"] == 20
    model, tokenizer = load_checkpoint(workdir / "checkpoints" / "version_0" / "last.ckpt")
    out = model.generate(tokenizer.encode("ROMEO:")[None], 30, generator=torch.Generator().manual_seed(0))
    assert tokenizer.decode(out[0]).startswith("ROMEO:") and out.shape == (1, 36)
    # Lightning's own loader rebuilds the module from the same file
    lit = LitGPT.load_from_checkpoint(workdir / "checkpoints" / "version_0" / "last.ckpt")
    assert torch.equal(lit.model.wte.weight, model.wte.weight)


# last.ckpt: written at the end of fit; best.ckpt: at the evaluation at step 20, mid-epoch
@pytest.mark.parametrize("ckpt_path", ["last", "checkpoints/version_0/best.ckpt"])
def test_resume_continues_from_the_checkpoint(
    trained: tuple[Path, str], corpus: Path, ckpt_path: str, capsys: pytest.CaptureFixture
) -> None:
    workdir, _ = trained
    args = ["fit", *TINY, "--data.path", str(corpus), "--trainer.max_steps", "30", "--ckpt_path", ckpt_path]
    assert run_main([*args, "--trainer.enable_progress_bar", "true"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("run version_0 done: steps 20 to 30 in ")
    # the bar reads as a run's that did not resume: the nominal epoch's batches (210) up to max_steps, not "30/?"
    assert re.match(r"Epoch \d+: 100%\|[^|]*\| 30/30 \[", out[out.rindex("Epoch ") :])
    assert torch.load(workdir / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)["global_step"] == 30
    scalars, _ = read_events(workdir / "lightning_logs")
    assert [step for step, _ in scalars["val/loss"]] == [10, 20, 30]


@pytest.mark.parametrize(
    ("subcommand", "extra", "windows"),
    [("validate", [], 64), ("test", ["--data.val_windows", "32"], 32)],
    ids=["validate", "test-val_windows-given"],
)
def test_validate_and_test_score_the_runs_own_windows(
    trained: tuple[Path, str], corpus: Path, subcommand: str, extra: list[str], windows: int, capsys
) -> None:
    """The run's corpus and validation windows come from its checkpoint, not from the config given (small.yaml:
    the packaged corpus, 3,200 windows); an option on the command line wins. The first line says what is scored."""
    workdir, _ = trained
    best = torch.load(workdir / "checkpoints" / "version_0" / "best.ckpt", weights_only=True)
    score = next(v["best_model_score"] for k, v in best["callbacks"].items() if "'monitor': 'val/loss'" in k)
    args = [subcommand, "--config", SMALL, "--ckpt_path", "best", "--trainer.enable_progress_bar", "false", *extra]
    assert run_main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"{subcommand} checkpoints/version_0/best.ckpt (step 20) on {windows} fixed windows of 16 characters of the "
        f"validation split of {corpus}"
    )
    prefix = "val" if subcommand == "validate" else "test"
    line = next(line for line in out.splitlines() if f"{prefix}/loss" in line)
    if windows == 64:  # the run's own windows: the score it reported
        assert float(line.split()[-1].strip("│")) == pytest.approx(float(score), abs=1e-5)


def test_bf16_mixed_precision_trains_on_cpu(corpus: Path, workdir: Path) -> None:
    args = ["fit", *TINY, "--data.path", str(corpus), "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "10"]
    assert run_main(args) == 0
    scalars, _ = read_events(workdir / "lightning_logs")
    assert math.isfinite(scalars["val/loss"][-1][1])


@pytest.mark.parametrize(
    ("accelerator", "cuda", "mps", "expected"),
    [
        ("auto", (9, 0), False, "bf16-mixed"),  # H100/H200, A100 (8.0), RTX 30xx/40xx
        ("gpu", (7, 5), False, "16-mixed"),  # T4 (Colab's default)
        ("cuda", (7, 0), False, "16-mixed"),  # V100
        ("cpu", (9, 0), False, "32-true"),  # a GPU is there, but the run asks for the CPU
        ("auto", None, True, "32-true"),  # Apple MPS
        ("auto", None, False, "32-true"),  # a CPU
    ],
)
def test_auto_precision_follows_the_device(
    accelerator: str, cuda, mps: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device's facts, as torch reports them, decide."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    precision, why = auto_precision(accelerator)
    assert precision == expected and why


def test_auto_precision_on_this_cpu_is_32_true(corpus: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["fit", *TINY, "--data.path", str(corpus), "--trainer.precision", "auto", "--trainer.max_steps", "2"]
    assert run_main([*args, "--trainer.accelerator", "cpu"]) == 0
    out = printed(capsys.readouterr().out)
    assert out[1] == "precision auto: 32-true (on a CPU, float32 is the fast path: most CPUs emulate bf16)", out
    saved = yaml.safe_load((workdir / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == "auto"  # a resumed run decides again, on the machine it runs on


def test_fp16_with_clipping_takes_the_plain_adamw_step(
    corpus: Path, workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # what auto picks on a T4 or V100, on this CPU: Lightning's fp16 plugin (autocast and a GradScaler) given directly
    fp16 = tmp_path / "fp16.yaml"
    fp16.write_text(
        "trainer:\n  precision: null\n  gradient_clip_val: 1.0\n  plugins:\n"
        "    - class_path: lit_gpt_char.checkpoints.AtomicCheckpointIO\n"
        "    - {class_path: lightning.pytorch.plugins.precision.MixedPrecision, "
        "init_args: {precision: 16-mixed, device: cpu}}\n"
    )
    args = ["fit", *TINY, "--config", str(fp16), "--data.path", str(corpus), "--trainer.max_steps", "10"]
    assert run_main([*args, "--sampling.final_max_new_tokens", "0"]) == 0
    note = "note: 16-mixed precision scales the loss, so a fused AdamW step cannot be clipped"
    assert note in capsys.readouterr().out
    ckpt = torch.load(workdir / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)
    assert [group["fused"] for group in ckpt["optimizer_states"][0]["param_groups"]] == [False, False]
    assert ckpt["MixedPrecision"]["scale"] > 1  # the loss was scaled: fp16 ran


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_main(["fit", "--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["n_layer"] >= 1 and printed["data"]["block_size"] >= 1


def test_small_config_is_the_lectures(capsys: pytest.CaptureFixture) -> None:
    assert run_main(["fit", "--config", SMALL, "--print_config"]) == 0
    c = yaml.safe_load(capsys.readouterr().out)
    assert (c["data"]["batch_size"], c["data"]["block_size"], c["trainer"]["max_steps"]) == (16, 32, 5000)
    assert (c["trainer"]["val_check_interval"], c["data"]["val_windows"]) == (100, 200 * 16)
    shape = c["model"]["config"]
    assert (shape["n_embd"], shape["n_head"], shape["n_layer"], shape["dropout"]) == (64, 4, 4, 0.0)
    assert (c["model"]["learning_rate"], c["model"]["lr_schedule"], c["seed_everything"]) == (1e-3, "constant", 1337)


def test_fit_without_a_config_is_the_lectures_recipe(capsys: pytest.CaptureFixture) -> None:
    """`fit` alone runs configs/small.yaml, which ends (Lightning's own defaults train for ~2 million steps)."""
    assert run_main(["fit", "--print_config"]) == 0
    bare = _flatten(yaml.safe_load(capsys.readouterr().out))
    small = _flatten(yaml.safe_load(Path(SMALL).read_text()))
    del small["trainer.precision"]  # left to the device when no config names one (issue 21, item 7)
    assert {key: bare[key] for key in small} == small


def test_fit_help_documents_every_option(capsys: pytest.CaptureFixture) -> None:
    assert run_main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    expected = [f"--model.config.{f.name}" for f in fields(GPTConfig) if f.name not in ("vocab_size", "block_size")]
    for prefix, cls in (("model", LitGPT), ("data", ShakespeareDataModule), ("sampling", SampleTextCallback)):
        names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "vocab", "config")]
        expected += [f"--{prefix}.{name}" for name in names]
    missing = [option for option in expected if option not in out]
    assert not missing
    assert "lacks type and help" not in out
    assert "--trainer.precision" in out and "--run_name" in out and "--checkpoint.save_top_k" in out


@pytest.mark.parametrize(
    "command",
    [["lightning"], ["lit-gpt-char"], [sys.executable, "-m", "lit_gpt_char"]],
    ids=["lightning", "lit-gpt-char", "python-m"],
)
def test_entry_points(command: list[str]) -> None:
    if not command[0].startswith("/"):
        script = Path(sys.executable).parent / command[0]
        if not script.exists():
            pytest.skip(f"{command[0]} is not installed beside this Python (pip install -e .)")
        command = [str(script)]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "{fit,validate,test,sample}" in result.stdout


# ---- bad input: one line on stderr, exit status 2, nothing written ----


def _short_corpus(tmp: Path) -> str:
    path = tmp / "short.txt"
    path.write_text("tiny text, far too short for the split\n")
    return str(path)


def _empty_corpus(tmp: Path) -> str:
    path = tmp / "empty.txt"
    path.write_text("")
    return str(path)


BAD_INPUTS = {
    "no-network": (lambda tmp: ["--data.url", "http://127.0.0.1:9/input.txt"], "could not download"),
    "wrong-sha256": (
        lambda tmp: ["--data.url", (tmp / "corpus.txt").as_uri(), "--data.sha256", "0" * 64],
        "expected 0000",
    ),
    "empty-file": (lambda tmp: ["--data.path", _empty_corpus(tmp)], "is empty"),
    "short-split": (lambda tmp: ["--data.path", _short_corpus(tmp)], "fewer than block_size"),
    "n_embd-n_head": (lambda tmp: ["--model.config.n_head", "5"], "must be divisible by --model.config.n_head (5)"),
    "block_size-0": (lambda tmp: ["--data.block_size", "0"], "block_size must be at least 1"),
    "prompt-not-in-vocab": (lambda tmp: ["--sampling.prompt", "€"], "not in the model's vocabulary"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(
    case: str, corpus: Path, workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make_args, message = BAD_INPUTS[case]
    default_corpus = ["--data.data_dir", str(workdir / "data")]
    args = ["fit", *TINY, *default_corpus, *make_args(tmp_path)]
    if case not in ("no-network", "wrong-sha256", "empty-file", "short-split"):
        args += ["--data.path", str(corpus)]
    assert run_main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert outputs_under(workdir) == []  # no logs, checkpoints or partial downloads


def test_errors_print_no_traceback_from_the_console(tmp_path: Path) -> None:
    result = run_subprocess(["fit", "--config", SMALL, "--data.path", str(tmp_path / "missing.txt")], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()  # Lightning's own info lines ("Seed set to 1337") may come first
    assert lines[-1] == (
        f"error: corpus path {tmp_path / 'missing.txt'} does not exist; "
        f"pass --data.path a text file or a folder of them"
    )
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in result.stderr


@pytest.mark.slow
def test_small_config_learns_on_the_real_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/small.yaml as given, on Tiny Shakespeare, 300 steps: the packaged corpus, no download."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", SMALL, "--trainer.max_steps", "300", "--trainer.enable_progress_bar", "false"]
    assert run_main(args) == 0
    scalars, _ = read_events(tmp_path / "lightning_logs")
    vals = dict(scalars["val/loss"])
    assert list(vals) == [100, 200, 300]
    assert vals[300] < vals[100] < 3.0 and vals[300] < 2.55  # ln(65) = 4.17 at the start
