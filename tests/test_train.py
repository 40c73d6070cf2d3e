"""`fastgpt train`: the book's chapter-5 loop learns, the fused CPU kernels train the same
model as the naive backend step for step, and the checkpoint reloads."""
import os

import pytest
import torch

import fastgpt
from conftest import require_backend
from fastgpt import cli, train


@pytest.fixture
def verdict(shared_data, monkeypatch):
    """the-verdict.txt, with GPT-2's vocabulary read from ../shared/data (no network)."""
    monkeypatch.setenv("FASTGPT_GPT2_VOCAB", os.path.join(shared_data, "gpt2.tiktoken"))
    return os.path.join(shared_data, "the-verdict.txt")


def tiny_args(text, out, backend, max_steps, **extra):
    argv = ["--text", text, "--config", "tiny", "--context-length", "32", "--batch-size", "2", "--drop-rate", "0",
            "--backend", backend, "--device", "cpu", "--max-steps", str(max_steps), "--out", out, "--no-progress"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
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
