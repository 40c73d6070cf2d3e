"""`fastgpt train --text FILE`: pretraining on a text file, as in chapter 5 of
"Build a Large Language Model (from Scratch)", with fastgpt's kernels in the model.

The book's loop: tokenize with GPT-2's BPE, split the text 90/10 into training and
validation parts, cut each into windows of context_length tokens (GPTDatasetV1 with
stride = context_length), train with AdamW (lr 4e-4, weight decay 0.1), print the
training and validation loss every eval_freq steps (averaged over eval_iter batches)
and a greedy sample from a start context after every epoch, then save a checkpoint
(fastgpt.save_checkpoint: config + state_dict; fastgpt.load_checkpoint reads it).

    fastgpt train --text the-verdict.txt --config small --epochs 10
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .backends import BACKEND_NAMES
from .models import CONFIG_NAMES, GPTModel, model_config
from .tokenizer import ENDOFTEXT, get_tokenizer
from .weights import save_checkpoint


class GPTDatasetV1(Dataset):
    """The book's sliding window over token ids: input ids[i : i + max_length], target
    the same window shifted by one token, for i = 0, stride, 2·stride, ..."""

    def __init__(self, token_ids: Sequence[int], max_length: int, stride: int):
        self.inputs, self.targets = [], []
        for start in range(0, len(token_ids) - max_length, stride):
            self.inputs.append(torch.tensor(token_ids[start:start + max_length]))  # (max_length,)
            self.targets.append(torch.tensor(token_ids[start + 1:start + max_length + 1]))  # (max_length,)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def loss_on_batch(model: GPTModel, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean next-token cross entropy; inputs, targets (B, T) token ids."""
    logits = model(inputs.to(device))  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())


def loss_on_loader(model: GPTModel, loader: DataLoader, device: torch.device, num_batches: int | None) -> float:
    """Mean batch loss over the first num_batches batches (all when None)."""
    count = len(loader) if num_batches is None else min(num_batches, len(loader))
    if count == 0:
        return float("nan")
    total = 0.0
    for i, (inputs, targets) in enumerate(loader):
        if i == count:
            break
        total += loss_on_batch(model, inputs, targets, device).item()
    return total / count


@torch.no_grad()
def evaluate(model: GPTModel, train_loader: DataLoader, val_loader: DataLoader, device: torch.device,
             eval_iter: int) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    try:
        return (loss_on_loader(model, train_loader, device, eval_iter),
                loss_on_loader(model, val_loader, device, eval_iter))
    finally:
        model.train(was_training)


def sample_text(model: GPTModel, tokenizer, start_context: str, device: torch.device, max_new_tokens: int = 50
                ) -> str:
    """The book's greedy sample from start_context, on one line."""
    ids = tokenizer.encode(start_context, allowed_special={ENDOFTEXT})
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, temperature=0.0)
    return tokenizer.decode(out[0].tolist()).replace("\n", " ")


@dataclass
class History:
    step_losses: list[float] = field(default_factory=list)  # the training batch loss of every step
    evals: list[dict] = field(default_factory=list)  # {"epoch", "step", "tokens_seen", "train_loss", "val_loss"}
    samples: list[str] = field(default_factory=list)  # one per epoch
    checkpoint: str | None = None


def train(args: argparse.Namespace, log=None) -> tuple[GPTModel, History]:
    """The chapter-5 training loop on args.text; returns the trained model and its history.
    log(line) prints the progress lines (default: above the progress bar)."""
    from tqdm import tqdm

    log = tqdm.write if log is None else log
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    tokenizer = get_tokenizer()
    cfg = model_config(args.config, context_length=args.context_length, drop_rate=args.drop_rate)
    # Split the characters 90/10, as the book does, then tokenize each part.
    split = int(0.9 * len(text))
    train_ids = tokenizer.encode(text[:split], allowed_special={ENDOFTEXT})
    val_ids = tokenizer.encode(text[split:], allowed_special={ENDOFTEXT})
    window = cfg["context_length"]
    torch.manual_seed(args.seed)
    shuffle = torch.Generator().manual_seed(args.seed)
    train_set, val_set = GPTDatasetV1(train_ids, window, window), GPTDatasetV1(val_ids, window, window)
    if len(train_set) < args.batch_size or len(val_set) == 0:
        raise SystemExit(f"fastgpt train: {args.text} is too short for context length {window} and batch size "
                         f"{args.batch_size}: {len(train_ids)} training and {len(val_ids)} validation tokens "
                         f"make {len(train_set)} training and {len(val_set)} validation windows; "
                         f"lower --context-length or --batch-size")
    # The book's loaders: training batches shuffled (seeded here), the last partial one dropped.
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True, generator=shuffle)
    val_loader = DataLoader(val_set, args.batch_size, shuffle=False, drop_last=False)
    model = GPTModel(cfg, backend=args.backend).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    log(f"{args.config}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"backend {args.backend}, {device}; {len(train_ids)} training / {len(val_ids)} validation tokens, "
        f"{len(train_loader)} batches of {args.batch_size} x {window} per epoch")

    history = History()
    total_steps = args.epochs * len(train_loader)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    tokens_seen, step = 0, 0
    bar = tqdm(total=total_steps, desc="training", unit="step", dynamic_ncols=True, disable=not args.progress)
    for epoch in range(1, args.epochs + 1):
        model.train()
        for inputs, targets in train_loader:
            if step == total_steps:
                break
            optimizer.zero_grad()
            loss = loss_on_batch(model, inputs, targets, device)
            loss.backward()
            optimizer.step()
            history.step_losses.append(loss.item())
            tokens_seen += inputs.numel()
            if step % args.eval_freq == 0:
                train_loss, val_loss = evaluate(model, train_loader, val_loader, device, args.eval_iter)
                history.evals.append({"epoch": epoch, "step": step, "tokens_seen": tokens_seen,
                                      "train_loss": train_loss, "val_loss": val_loss})
                log(f"Ep {epoch} (Step {step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{history.step_losses[-1]:.3f}")
        history.samples.append(sample_text(model, tokenizer, args.start_context, device))
        log(history.samples[-1])
        if step == total_steps:
            break
    bar.close()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        save_checkpoint(model, args.out)
        history.checkpoint = args.out
        log(f"saved {args.out} (fastgpt.load_checkpoint reads it; "
            f"fastgpt generate --weights {args.out} samples from it)")
    return model, history


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgpt train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="UTF-8 text file to train on (e.g. the-verdict.txt)")
    parser.add_argument("--config", default="gpt2-small", choices=CONFIG_NAMES,
                        help="model size: tiny (2 layers, 64 dims), small (4 layers, 256 dims), or a GPT-2 size (default: %(default)s)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
                        help="attention / layer norm kernels (default auto: the best available, see fastgpt info)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training text (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per step (default: %(default)s)")
    parser.add_argument("--context-length", type=int, default=256,
                        help="the model's context length and the training window (default: %(default)s), as the book")
    parser.add_argument("--drop-rate", type=float, default=None, help="dropout rate (default: the config's, 0.1)")
    parser.add_argument("--lr", type=float, default=4e-4, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--eval-freq", type=int, default=5, help="evaluate every N steps (default: %(default)s)")
    parser.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation (default: %(default)s)")
    parser.add_argument("--start-context", default="Every effort moves you", help="prompt of the samples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=123, help="weights and batch order (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--out", default="fastgpt-checkpoint.pt", help="checkpoint path, '' to not save (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "context_length", "eval_freq", "eval_iter"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    if args.drop_rate is not None and not 0.0 <= args.drop_rate < 1.0:
        parser.error("--drop-rate must be in [0, 1)")
    if not os.path.isfile(args.text):
        parser.error(f"--text {args.text}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    train(parse_args(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
