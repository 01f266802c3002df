"""Throughput (tokens/s, MFU) and the train-vs-val chart, read back from real TensorBoard event files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lit_gpt_char import monitor
from lit_gpt_char.model import GPT, GPTConfig

from .conftest import TINY, run_main
from .test_cli import read_events


@pytest.mark.parametrize(("positions", "tie_weights"), [("learned", False), ("rotary", True)])
def test_flops_per_token_matches_a_flop_counter(positions: str, tie_weights: bool) -> None:
    """The formula against torch's FLOP counter over a real forward + backward pass of the small config's shape."""
    config = GPTConfig(vocab_size=65, block_size=32, n_layer=4, n_head=4, n_embd=64, positions=positions)
    config.tie_weights = tie_weights
    model = GPT(config)
    idx = torch.randint(65, (8, 32))
    # the math kernel spells attention out as matrix products the counter sees (it counts CPU flash as 0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    counted = counter.get_total_flops() / idx.numel()
    # the counter sees matrix products only; the formula also counts biases and LayerNorm gains (1% here)
    assert model.flops_per_token() == pytest.approx(counted, rel=0.015)


def test_tokens_per_second_and_the_loss_chart(corpus: Path, workdir: Path) -> None:
    assert run_main(["fit", *TINY, "--data.path", str(corpus)]) == 0
    scalars, _ = read_events(workdir / "lightning_logs")
    throughput = scalars["train/tokens_per_sec"]
    # at every log point of train/loss, one value, positive
    assert [s for s, _ in throughput] == [s for s, _ in scalars["train/loss"]] == [5, 10, 15, 20]
    assert all(v > 0 for _, v in throughput)
    assert "train/mfu" not in scalars  # a CPU has no known peak

    (run,) = {p.parent for p in (workdir / "lightning_logs").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    (chart,) = [chart for category in layout.category for chart in category.chart]
    assert list(chart.multiline.tag) == ["train/loss", "val/loss"]  # one chart, both series


def test_mfu_against_the_device_peak(corpus: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a CPU has no published peak: give it one, and check MFU = tokens/s × FLOPs per token / peak
    peak = 1e9
    monkeypatch.setattr(monitor, "get_available_flops", lambda device, dtype: peak)
    assert run_main(["fit", *TINY, "--data.path", str(corpus)]) == 0
    scalars, _ = read_events(workdir / "lightning_logs")
    # TINY's model: 2 layers of 32, block 16; the vocabulary is the tiny corpus's
    from lit_gpt_char.checkpoints import load_checkpoint

    (last,) = workdir.glob("checkpoints/**/last.ckpt")
    flops_per_token = load_checkpoint(last)[0].flops_per_token()
    mfu = dict(scalars["train/mfu"])
    for step, tokens_per_sec in scalars["train/tokens_per_sec"]:
        assert mfu[step] == pytest.approx(tokens_per_sec * flops_per_token / peak, rel=1e-5)
