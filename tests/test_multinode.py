"""Jobs started by the launchers clusters use, for real on 127.0.0.1 (CPU, gloo): torchrun with two "nodes",
torchrun restarting a job that lost a worker, srun's environment, and a run resumed on fewer processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_gpt_char.data import RandomWindows, ShakespeareDataModule

from .conftest import ROOT, TINY, files_under, printed, run_main

pytestmark = pytest.mark.slow

# torchrun's workers run the same command on every node; checkpoints every 10 steps so a lost worker costs little
JOB = [
    "-m", "lit_gpt_char", "fit", *TINY, "--trainer.max_steps", "40", "--trainer.val_check_interval", "20",
    "--sampling.every_n_steps", "20", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
    "--ckpt_path", "last", "--periodic_checkpoint.every_n_train_steps", "10",
]  # fmt: skip
# how many times the lost-worker test kills a worker (benchmarks/lost_worker.py runs many more trials)
LOST_WORKER_TRIALS = int(os.environ.get("LIT_GPT_CHAR_LOST_WORKER_TRIALS", "2"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(commands: list[list[str]], cwd: Path, envs: list[dict], timeout: float = 240) -> list[tuple[int, str, str]]:
    """Start every command at once, each in a session of its own; wait for all, killing every process they
    started if one runs past ``timeout``: (exit status, stdout, stderr) of each."""
    procs = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for command, env in zip(commands, envs)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            # SIGTERM first: torchrun then ends its workers, which run in sessions of their own
            for signum in (signal.SIGTERM, signal.SIGKILL):
                try:  # also workers a launcher left behind in its group
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=30)
    return results


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["global_step"] == 40
    return checkpoint["state_dict"]


def probe(out_dir: Path) -> list[str]:
    return ["--trainer.callbacks+=tests.probes.Probe", "--trainer.callbacks.out_dir", str(out_dir)]


def read_probe(out_dir: Path, ranks: int = 2) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(ranks)]


def check_one_job(work: Path, ranks: list[dict], stdouts: list[str], run: str, attempts: int = 1) -> None:
    """What a 2-process job must look like: one world, own windows per rank, synced validation, rank 0 writes.
    ``ranks``: what each rank's Probe saw in the last of ``attempts`` (a restart resumes at step 20)."""
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [40, 40]
    assert not any(a == b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]))
    assert len(ranks[0]["val_losses"]) == (2 if attempts == 1 else 1)
    assert ranks[0]["val_losses"] == pytest.approx(ranks[1]["val_losses"], abs=1e-6)
    # each process takes its gloo group down before exiting: left to the interpreter, it aborts some of them
    assert [r["process_group_at_exit"] for r in ranks] == [False, False]
    assert os.listdir(work / "checkpoints") == [run]
    assert sorted(p.name for p in (work / "checkpoints" / run).iterdir()) == [
        "best.ckpt", "last.ckpt", "step-10.ckpt", "step-20.ckpt", "step-30.ckpt", "step-40.ckpt",
    ]  # fmt: skip
    # one event file per attempt, from rank 0 alone
    assert len([p for p in files_under(work / "lightning_logs") if "events" in p]) == attempts
    printed = "".join(stdouts)
    assert printed.count("----- samples at step 20 -----") == 1
    assert printed.count("----- samples/final at step 40 -----") == 1


def test_two_nodes_under_torchrun(corpus: Path, tmp_path: Path) -> None:
    """`torchrun --nnodes 2 --node-rank R …` once per "node", as nanoGPT documents a 2-node launch."""
    work = tmp_path / "work"
    work.mkdir()
    port = free_port()
    nodes = [
        torchrun(
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(rank),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            *JOB,
            "--trainer.num_nodes",
            "2",
            "--trainer.devices",
            "1",
            "--data.path",
            str(corpus),
            *probe(tmp_path / "probe"),
        )  # fmt: skip
        for rank in (0, 1)
    ]
    results = launch(nodes, work, [{}, {}])
    assert [status for status, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    ranks = read_probe(tmp_path / "probe")
    assert [r["cluster_environment"] for r in ranks] == ["TorchElasticEnvironment"] * 2
    check_one_job(work, ranks, [out for _, out, _ in results], "version_0")
    assert "run version_0:" in results[0][1] and "run " not in results[1][1]  # node 1 joined the run node 0 named


def test_a_lost_worker_costs_only_the_steps_since_the_last_checkpoint(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """torchrun --max-restarts 1, one worker SIGKILLed at step 25: torchrun restarts the group, the same command
    resumes from step 20, and the job ends with the weights of an unbroken run, bit for bit, every time."""
    job = torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", *JOB, "--trainer.devices", "2")
    job += ["--data.path", str(corpus)]
    unbroken = tmp_path / "unbroken"
    unbroken.mkdir()
    [(status, _, err)] = launch([job], unbroken, [{}])
    assert status == 0, err[-3000:]
    expected = weights(unbroken / "checkpoints" / "version_0" / "last.ckpt")

    lose = ["--trainer.callbacks+=tests.probes.LoseWorker", "--trainer.callbacks.at_step", "25"]
    for trial in range(LOST_WORKER_TRIALS):
        work = tmp_path / f"trial{trial}"
        work.mkdir()
        [(status, out, err)] = launch([job + lose + probe(work / "probe")], work, [{}])
        assert status == 0, f"trial {trial}: " + err[-3000:]
        # the restart was real: the first attempt started the run afresh, so only a second one restores a checkpoint
        # (whether rank 0 logs its peer's death before torchrun stops it depends on timing)
        assert "Restored all states from the checkpoint at checkpoints/version_0/last.ckpt" in err
        assert "resumed from checkpoints/version_0/last.ckpt at step 20" in out
        final = weights(work / "checkpoints" / "version_0" / "last.ckpt")
        assert final.keys() == expected.keys()
        assert all(torch.equal(final[key], expected[key]) for key in expected), f"trial {trial}"
        check_one_job(work, read_probe(work / "probe"), [out], "version_0", attempts=2)

    # the same run resumed on one process: it says so, and rank 0's windows continue from where they stopped
    capsys.readouterr()
    os.chdir(work)
    try:
        steps = ["--trainer.max_steps", "50", "--trainer.val_check_interval", "10"]
        args = ["fit", *TINY, *steps, "--data.path", str(corpus), "--ckpt_path", "last", *probe(work / "one")]
        assert run_main(args) == 0
    finally:
        os.chdir(ROOT)
    assert "note: this run trained with 2 process(es) and resumes with 1:" in capsys.readouterr().out
    [alone] = read_probe(work / "one", ranks=1)
    assert alone["world_size"] == 1 and alone["global_step"] == 50
    dm = ShakespeareDataModule(path=str(corpus), block_size=16, batch_size=8)
    dm.prepare_data()
    stream = RandomWindows(dm._split_ids()[0], 8, 16, seed=1337, rank=0)
    assert alone["batches"] == [stream.batch(n)[0].tolist() for n in range(40, 50)]


def test_srun_environment(corpus: Path, tmp_path: Path) -> None:
    """The variables srun sets for a 2-task job on one node: Lightning takes SLURM's ranks, and both tasks name
    the new run after the job, with no --run_name and no store to hand a name over."""
    work = tmp_path / "work"
    work.mkdir()
    port = str(free_port())
    command = [
        sys.executable, *JOB, "--trainer.devices", "2", "--data.path", str(corpus), *probe(tmp_path / "probe"),
    ]  # fmt: skip
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lit-gpt-char", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": port,
    }  # fmt: skip
    envs = [{**slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)} for rank in (0, 1)]
    results = launch([command, command], work, envs)
    assert [status for status, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    ranks = read_probe(tmp_path / "probe")
    assert [r["cluster_environment"] for r in ranks] == ["SLURMEnvironment"] * 2
    check_one_job(work, ranks, [out for _, out, _ in results], "slurm_4242")
    assert "run slurm_4242:" in results[0][1]


def test_a_rank_that_cannot_learn_the_run_says_so(corpus: Path, tmp_path: Path) -> None:
    """A process that is not rank 0, started by a launcher that hands over no run name (no torchrun store, no
    SLURM job), cannot guess rank 0's run: one error line that says what to pass, and nothing written."""
    work = tmp_path / "work"
    work.mkdir()
    command = [sys.executable, "-m", "lit_gpt_char", "fit", *TINY, "--data.path", str(corpus)]
    [(status, out, err)] = launch([command], work, [{"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}], timeout=60)
    assert status == 2
    lines = printed(out + err)
    assert len(lines) == 1 and lines[0].startswith("error: this process was started by an outside launcher")
    assert lines[0].endswith("give the job a --run_name")
    assert not (work / "checkpoints").exists() and not (work / "lightning_logs").exists()


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_requeued_slurm_job_is_one_unbroken_run(corpus: Path, tmp_path: Path, tasks: int) -> None:
    """The same srun command, as SLURM reruns it: killed before its first checkpoint, requeued, killed mid-run,
    requeued again, it ends as the job's own run with the weights of an unbroken job, bit for bit, beside an older
    job's run that it never touches; no task hangs."""
    command = [sys.executable, *JOB, "--trainer.devices", str(tasks), "--data.path", str(corpus)]
    work = tmp_path / "work"
    work.mkdir()

    def srun(job: str, *extra: str) -> list[tuple[int, str, str]]:
        env = {
            "SLURM_JOB_ID": job, "SLURM_JOB_NAME": "lit-gpt-char", "SLURM_NTASKS": str(tasks), "SLURM_NNODES": "1",
            "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }  # fmt: skip
        envs = [{**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)} for rank in range(tasks)]
        return launch([command + list(extra)] * tasks, work, envs, timeout=150)

    results = srun("100")  # an older job's run, in the same working directory
    assert [status for status, _, _ in results] == [0] * tasks, results[0][2][-3000:]
    older = work / "checkpoints" / "slurm_100"
    expected = weights(older / "last.ckpt")
    before = {p.name: p.read_bytes() for p in older.iterdir()}
    for at_step in (5, 25):  # SIGKILL of the last task: before the first checkpoint, then after step-20.ckpt
        lose = ["--trainer.callbacks+=tests.probes.LoseWorker", "--trainer.callbacks.at_step", str(at_step)]
        results = srun("4242", *lose, "--trainer.callbacks.rank", str(tasks - 1))
        assert results[-1][0] == -signal.SIGKILL, results[0][2][-3000:]
    results = srun("4242")
    assert [status for status, _, _ in results] == [0] * tasks, results[0][2][-3000:]
    assert "run slurm_4242, resumed from checkpoints/slurm_4242/last.ckpt at step 20" in results[0][1]
    final = weights(work / "checkpoints" / "slurm_4242" / "last.ckpt")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[key], expected[key]) for key in expected)
    assert sorted(os.listdir(work / "checkpoints")) == ["slurm_100", "slurm_4242"]
    assert {p.name: p.read_bytes() for p in older.iterdir()} == before


def test_every_task_of_an_srun_job_stops_on_rank_0s_error(corpus: Path, tmp_path: Path) -> None:
    """Rank 0 alone claims the run; when it cannot (the name is taken), the other task learns why from it and
    stops with the same line instead of waiting for a process group rank 0 never joins."""
    work = tmp_path / "work"
    (work / "checkpoints" / "X").mkdir(parents=True)
    command = [sys.executable, "-m", "lit_gpt_char", "fit", *TINY, "--data.path", str(corpus), "--run_name", "X"]
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lit-gpt-char", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(free_port()),
    }  # fmt: skip
    envs = [{**slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)} for rank in (0, 1)]
    results = launch([command + ["--trainer.devices", "2"]] * 2, work, envs, timeout=90)
    assert [status for status, _, _ in results] == [2, 2]
    for _, out, err in results:
        assert printed(out + err) == [
            "error: run X exists already (checkpoints/X); resume it with --ckpt_path last --run_name X, or choose "
            "another --run_name"
        ]


def test_the_example_sbatch_script_continues_its_run_when_submitted_again(corpus: Path, tmp_path: Path) -> None:
    """examples/slurm.sbatch as sbatch would run it (with an srun that starts its one task here), submitted twice:
    the second job (a new job id) continues the run the first one started, named after the job."""
    work = tmp_path / "work"
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / ".venv" / "bin" / "activate").write_text(f"PATH={Path(sys.executable).parent}:$PATH\n")
    (work / "configs").symlink_to(ROOT / "configs")
    (work / "bin").mkdir()
    # an srun that starts its one task here: `srun --kill-on-bad-exit=1 CMD …` runs CMD …
    (work / "bin" / "srun").write_text('#!/bin/bash\nshift\nSLURM_PROCID=0 SLURM_LOCALID=0 exec "$@"\n')
    (work / "bin" / "srun").chmod(0o755)
    tiny = [*TINY, "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--data.path", str(corpus)]
    slurm = {
        "SLURM_SUBMIT_DIR": str(work), "SLURM_JOB_NAME": "lit-gpt-char", "SLURM_NNODES": "1",
        "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
        "PATH": f"{work / 'bin'}:{os.environ['PATH']}",
    }  # fmt: skip
    script = ["bash", str(ROOT / "examples" / "slurm.sbatch"), *tiny]
    for job, steps in (("7", "10"), ("8", "20")):
        [(status, out, err)] = launch([[*script, "--trainer.max_steps", steps]], work, [{**slurm, "SLURM_JOB_ID": job}])
        assert status == 0, err[-3000:]
    assert "run lit-gpt-char, resumed from checkpoints/lit-gpt-char/last.ckpt at step 10" in out
    assert os.listdir(work / "checkpoints") == ["lit-gpt-char"]


def test_torchrun_restarts_a_job_whose_worker_died_before_main(corpus: Path, tmp_path: Path) -> None:
    """torchrun --max-restarts 1, and on the first attempt rank 1 dies while importing, after rank 0 took its part:
    the restarted workers still form one process group, and the job ends at max_steps."""
    work = tmp_path / "work"
    work.mkdir()
    job = torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "tests.slow_start", *JOB[2:])
    job += ["--trainer.devices", "2", "--data.path", str(corpus), "--run_name", "X"]
    [(status, out, err)] = launch([job], work, [{}], timeout=150)
    assert status == 0, err[-3000:]
    assert "(exitcode: -9) local_rank: 1" in err  # rank 1 did die on the first attempt
    assert weights(work / "checkpoints" / "X" / "last.ckpt")
    assert os.listdir(work / "checkpoints") == ["X"]
