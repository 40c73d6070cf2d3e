"""`fastgpt train`: the book's chapter-5 loop learns, the fused CPU kernels train the same
model as the naive backend step for step, and the checkpoint reloads; --resume continues a
run exactly; under torchrun (here: spawned gloo processes with its environment) DDP, FSDP and
context parallelism give one process's per-step losses."""
import os

import pytest
import torch

import fastgpt
from conftest import require_backend
from fastgpt import cli, train
from test_distributed import run_ranks, write_report


@pytest.fixture
def verdict(shared_data, monkeypatch):
    """the-verdict.txt, with GPT-2's vocabulary read from ../shared/data (no network)."""
    monkeypatch.setenv("FASTGPT_GPT2_VOCAB", os.path.join(shared_data, "gpt2.tiktoken"))
    return os.path.join(shared_data, "the-verdict.txt")


def tiny_args(text, out, backend, max_steps, **extra):
    argv = ["--text", text, "--config", "tiny", "--context-length", "32", "--batch-size", "2", "--drop-rate", "0",
            "--backend", backend, "--device", "cpu", "--max-steps", str(max_steps), "--out", out, "--no-progress"]
    for key, value in extra.items():
        flag = f"--{key.replace('_', '-')}"
        argv += [flag] if value is True else [flag, str(value)]
    return train.parse_args(argv)


def test_dataset_is_the_books_sliding_window():
    ids = list(range(10))
    dataset = train.GPTDatasetV1(ids, max_length=4, stride=3)
    assert len(dataset) == 2  # starts 0 and 3; start 6 would need ids[6:11]
    inputs, targets = dataset[1]
    assert inputs.tolist() == [3, 4, 5, 6] and targets.tolist() == [4, 5, 6, 7]


def test_loss_goes_down_and_the_checkpoint_reloads(verdict, tmp_path):
    out = str(tmp_path / "ckpt" / "tiny.pt")
    # A learning rate above the book's 4e-4, so that a few steps show the descent.
    args = tiny_args(verdict, out, "naive", 15, eval_freq=7, eval_iter=2, lr=3e-3)
    model, history = train.train(args, log=lambda *_: None)
    assert len(history.step_losses) == 15 and [e["step"] for e in history.evals] == [0, 7, 14]
    first, last = history.step_losses[:4], history.step_losses[-4:]
    assert sum(last) / 4 < sum(first) / 4 - 0.5, history.step_losses
    assert history.evals[-1]["val_loss"] < history.evals[0]["val_loss"] - 0.5
    assert history.evals[-1]["tokens_seen"] == 15 * 2 * 32
    assert len(history.samples) == 1 and history.samples[0].startswith("Every effort moves you")

    reloaded = fastgpt.load_checkpoint(out, backend="naive")
    assert reloaded.cfg == model.cfg and reloaded.cfg["emb_dim"] == 64 and reloaded.cfg["context_length"] == 32
    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


def test_fused_cpu_backend_trains_like_the_naive_backend(verdict, tmp_path):
    require_backend("cpu")
    losses = {}
    for backend in ("naive", "cpu"):
        _, history = train.train(tiny_args(verdict, "", backend, 6, eval_freq=100, eval_iter=1), log=lambda *_: None)
        losses[backend] = history.step_losses
    # Same seed, same batches, no dropout: the kernels differ only in float32 rounding.
    assert len(losses["cpu"]) == 6
    for step, (naive, fused) in enumerate(zip(losses["naive"], losses["cpu"])):
        assert abs(naive - fused) < 1e-4, f"step {step}: naive {naive} vs cpu {fused}"
    assert losses["naive"][-1] != losses["naive"][0]  # the steps did change the model


def test_train_command_line(verdict, tmp_path, capsys):
    out = tmp_path / "cli.pt"
    assert cli.main(["train", "--text", verdict, "--config", "tiny", "--context-length", "32", "--batch-size", "2",
                     "--max-steps", "2", "--eval-iter", "1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in printed and f"saved {out}" in printed
    assert fastgpt.load_checkpoint(str(out)).cfg["n_layers"] == 2


def test_train_rejects_text_too_short_for_the_context(tmp_path, verdict):
    short = tmp_path / "short.txt"
    short.write_text("Every effort moves you. " * 20)
    with pytest.raises(SystemExit, match="too short for context length 256"):
        train.train(train.parse_args(["--text", str(short), "--config", "tiny", "--out", "", "--no-progress"]),
                    log=lambda *_: None)


def test_resume_continues_exactly(verdict, tmp_path):
    """6 steps in one run = 3 steps, then --resume for 3 more: the same losses and evaluations
    (evaluations every 2 steps also draw from the generator that orders the batches)."""
    options = {"eval_freq": 2, "eval_iter": 1}
    _, whole = train.train(tiny_args(verdict, "", "cpu", 6, **options), log=lambda *_: None)
    first = str(tmp_path / "first.pt")
    train.train(tiny_args(verdict, first, "cpu", 3, **options), log=lambda *_: None)
    _, resumed = train.train(tiny_args(verdict, "", "cpu", 6, resume=first, **options), log=lambda *_: None)
    assert resumed.step_losses == whole.step_losses[3:]
    assert resumed.evals == whole.evals[2:] and [e["step"] for e in resumed.evals] == [4]
    with pytest.raises(SystemExit, match="that run had batch_size 2 \\(now 4\\)"):
        train.train(tiny_args(verdict, "", "cpu", 6, resume=first, batch_size=4), log=lambda *_: None)


# Each: how the two processes train (train's options), run one after the other in one process group.
PARALLEL_RUNS = {"ddp": {}, "fsdp": {"fsdp": True}, "context_parallel": {"context_parallel": 2}}


def _parallel_tiny_args(text, out, **extra):
    return tiny_args(text, out, "cpu", 4, eval_freq=3, eval_iter=1, **extra)


def _train_runs(rank, world, out_dir, text, vocab):
    os.environ["FASTGPT_GPT2_VOCAB"] = vocab
    report = {}
    for name, extra in PARALLEL_RUNS.items():
        _, history = train.train(_parallel_tiny_args(text, os.path.join(out_dir, f"{name}.pt"), **extra),
                                 log=lambda *_: None)
        report[name] = {"step_losses": history.step_losses, "evals": history.evals}
        write_report(out_dir, rank, report)


def test_two_processes_train_like_one(verdict, tmp_path):
    """The same global batch (2 windows) over 2 processes, as DDP replicas, FSDP shards, or one
    sequence split by context parallelism: rank 0's per-step losses and evaluations are the
    single process's, and its checkpoint loads."""
    require_backend("cpu")
    _, single = train.train(_parallel_tiny_args(verdict, ""), log=lambda *_: None)
    reports = run_ranks(_train_runs, 2, str(tmp_path), 240, verdict, os.environ["FASTGPT_GPT2_VOCAB"])
    for name in PARALLEL_RUNS:
        assert name in reports[0] and name in reports[1], f"{name} did not finish: {reports}"
        for rank, report in enumerate(reports):
            losses = report[name]["step_losses"]
            assert len(losses) == 4 and max(abs(a - b) for a, b in zip(losses, single.step_losses)) < 1e-5, \
                (name, rank, losses, single.step_losses)
            for mine, theirs in zip(report[name]["evals"], single.evals):
                assert mine["step"] == theirs["step"] and abs(mine["val_loss"] - theirs["val_loss"]) < 1e-5
        reloaded = fastgpt.load_checkpoint(str(tmp_path / f"{name}.pt"))
        assert reloaded.cfg["context_length"] == 32 and os.path.isfile(tmp_path / f"{name}.pt.state")
    assert single.step_losses[-1] != single.step_losses[0]


def test_parallel_options_are_checked(verdict, capsys):
    for argv, message in ((["--context-parallel", "2"], "--context-parallel needs --drop-rate 0"),
                          (["--context-parallel", "4", "--drop-rate", "0", "--context-length", "36"],
                           "divisible by 2 x --context-parallel = 8")):
        with pytest.raises(SystemExit):
            train.parse_args(["--text", verdict, *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="run under torchrun"):
        train.train(tiny_args(verdict, "", "cpu", 1, context_parallel=2), log=lambda *_: None)
