"""`fastgpt train --text FILE`: pretraining on a text file, as in chapter 5 of
"Build a Large Language Model (from Scratch)", with fastgpt's kernels in the model.

The book's loop: tokenize with GPT-2's BPE, split the text 90/10 into training and
validation parts, cut each into windows of context_length tokens (GPTDatasetV1 with
stride = context_length), train with AdamW (lr 4e-4, weight decay 0.1), print the
training and validation loss every eval_freq steps (averaged over eval_iter batches)
and a greedy sample from a start context after every epoch, then save a checkpoint
(fastgpt.save_checkpoint: config + state_dict; fastgpt.load_checkpoint reads it).

    fastgpt train --text the-verdict.txt --config small --epochs 10

Under torchrun (WORLD_SIZE > 1) the same loop is data parallel: every rank draws the same global
batch of --batch-size windows and trains on its own rows, gradients averaged over the ranks by
DistributedDataParallel, or by FSDP2 (torch.distributed.fsdp.fully_shard, each block and the
model) with --fsdp. --context-parallel K splits each sequence over K consecutive ranks as well
(fastgpt.distributed: zigzag shards, ring attention; it needs --drop-rate 0). Each rank's loss
is the mean over its tokens, all of equal count, so the mean over the ranks is the global batch's
loss: the per-step losses equal one process's. Rank 0 alone logs and writes the checkpoint.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m fastgpt train --text ... [--fsdp]

The checkpoint holds the model (fastgpt.load_checkpoint reads it); beside it, <out>.state holds
the optimizer, the random number generators and the position in the data, so that --resume
<out> continues exactly where the run stopped (with a larger --max-steps or --epochs).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_state_dict)
from torch.utils.data import DataLoader, Dataset

from .backends import BACKEND_NAMES
from .distributed import context_parallel, mean_over_ranks, shard
from .models import CONFIG_NAMES, GPTModel, model_config
from .tokenizer import ENDOFTEXT, get_tokenizer
from .weights import save_checkpoint

# State dicts with every tensor whole (gathered from FSDP's shards) and on the CPU: what files hold.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


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


@dataclass
class Parallelism:
    """This process's part in a torchrun job: one of `world` ranks; `context` consecutive ranks
    (a context group) share each sequence, the world // context groups are data-parallel replicas."""
    world: int = 1
    rank: int = 0
    context: int = 1
    context_group: object = None
    fsdp: bool = False

    @property
    def replicas(self) -> int:
        return self.world // self.context

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a global batch, inputs, targets (B, T): its replica's rows, its shard of them."""
        rows = inputs.shape[0] // self.replicas
        start = self.rank // self.context * rows
        return self.local_sequence(inputs[start:start + rows], targets[start:start + rows])

    def local_sequence(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of every row (zigzag layout) under context parallelism, else the rows."""
        if self.context == 1:
            return inputs, targets
        return shard(inputs, 1, self.context_group), shard(targets, 1, self.context_group)

    def batch_loss(self, loss: torch.Tensor) -> float:
        """The global batch's loss from each rank's mean loss over its part (the parts are equal)."""
        return loss.item() if self.world == 1 else mean_over_ranks(loss).item()

    def sequence_loss(self, loss: torch.Tensor) -> float:
        """The loss of whole rows from each rank's mean loss over its shard of them."""
        return loss.item() if self.context == 1 else mean_over_ranks(loss, self.context_group).item()


SINGLE_PROCESS = Parallelism()


def setup_parallelism(args: argparse.Namespace, device: torch.device) -> tuple[Parallelism, torch.device]:
    """(this process's Parallelism, its device) from torchrun's environment (WORLD_SIZE, RANK,
    LOCAL_RANK); initialises the process group (NCCL on GPUs, gloo on CPUs) when there is one."""
    if "RANK" not in os.environ:
        if args.fsdp or args.context_parallel > 1:
            raise SystemExit("fastgpt train: --fsdp and --context-parallel run under torchrun "
                             "(python -m torch.distributed.run --nproc_per_node N -m fastgpt train ...)")
        return SINGLE_PROCESS, device
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world % args.context_parallel != 0:
        raise SystemExit(f"fastgpt train: --context-parallel {args.context_parallel} must divide the number of "
                         f"processes, {world}")
    if args.batch_size % (world // args.context_parallel) != 0:
        raise SystemExit(f"fastgpt train: --batch-size {args.batch_size} must be divisible by the "
                         f"{world // args.context_parallel} data-parallel replicas")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    size = args.context_parallel
    if size == 1:
        return Parallelism(world, rank, fsdp=args.fsdp), device
    # Every rank creates every group (torch.distributed's rule), and keeps its own.
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, world, size)]
    return Parallelism(world, rank, size, groups[rank // size], args.fsdp), device


def loss_on_loader(model, loader: DataLoader, device: torch.device, num_batches: int | None,
                   parallel: Parallelism = SINGLE_PROCESS) -> float:
    """Mean batch loss over the first num_batches batches (all when None); every rank of a context
    group computes its shard of each batch, every replica all of them."""
    count = len(loader) if num_batches is None else min(num_batches, len(loader))
    if count == 0:
        return float("nan")
    total = 0.0
    for i, (inputs, targets) in enumerate(loader):
        if i == count:
            break
        total += parallel.sequence_loss(loss_on_batch(model, *parallel.local_sequence(inputs, targets), device))
    return total / count


@torch.no_grad()
def evaluate(model, train_loader: DataLoader, val_loader: DataLoader, device: torch.device,
             eval_iter: int, parallel: Parallelism = SINGLE_PROCESS) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    try:
        return (loss_on_loader(model, train_loader, device, eval_iter, parallel),
                loss_on_loader(model, val_loader, device, eval_iter, parallel))
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


@dataclass
class Progress:
    """Where a run stands in its data; a resumed run starts from here."""
    epoch: int = 1  # the epoch under way
    batch: int = 0  # its batches done
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    epoch_shuffle: torch.Tensor | None = None  # the batch-order generator's state when the epoch began


def _epoch_batches(loader: DataLoader, shuffle: torch.Generator, progress: Progress):
    """An iterator over the epoch's batches from progress.batch on. The generator that orders
    them also serves the evaluations' passes over the loader, so a resumed epoch replays its
    order from the epoch's starting state and then puts the generator back where it is now."""
    if progress.batch == 0:
        progress.epoch_shuffle = shuffle.get_state()
        return iter(loader)
    now = shuffle.get_state()
    shuffle.set_state(progress.epoch_shuffle)
    batches = iter(loader)
    for _ in range(progress.batch):  # the first batch draws the epoch's permutation
        next(batches)
    shuffle.set_state(now)
    return batches


def _main_model(model: GPTModel, parallel: Parallelism) -> GPTModel | None:
    """On rank 0, a model with all the weights (None elsewhere): the model itself, or under FSDP a
    plain copy gathered from the shards (a collective: every rank calls this)."""
    if not parallel.fsdp:
        return model if parallel.is_main else None
    full = get_model_state_dict(model, options=FULL_STATE)
    if not parallel.is_main:
        return None
    copy = GPTModel(model.cfg, backend=model.backend)
    copy.load_state_dict(full)
    return copy.to(model.tok_emb.weight.device)


def _save(path: str, model: GPTModel, optimizer, parallel: Parallelism, run: dict, progress: Progress,
          shuffle: torch.Generator, device: torch.device) -> None:
    """Rank 0 writes the checkpoint (fastgpt.save_checkpoint) and beside it <path>.state: the
    optimizer, generators and progress that --resume continues from (a collective under FSDP)."""
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
    main = _main_model(model, parallel)
    if not parallel.is_main:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint(main, path)
    torch.save({"run": run, "optimizer": optimizer_state, "epoch": progress.epoch, "batch": progress.batch,
                "step": progress.step, "tokens_seen": progress.tokens_seen, "epoch_shuffle": progress.epoch_shuffle,
                "shuffle": shuffle.get_state(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, path + ".state")


def _resume(path: str, model: GPTModel, optimizer, run: dict, shuffle: torch.Generator,
            device: torch.device) -> Progress:
    """Loads what _save wrote into the model, optimizer and generators; the Progress to go on from."""
    if not (os.path.isfile(path) and os.path.isfile(path + ".state")):
        raise SystemExit(f"fastgpt train: --resume {path}: expected a checkpoint and its {path}.state, "
                         f"as fastgpt train writes them")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = torch.load(path + ".state", map_location="cpu", weights_only=True)
    if state["run"] != run:
        differ = ", ".join(f"{key} {state['run'][key]!r} (now {run[key]!r})" for key in run
                           if state["run"].get(key) != run[key])
        raise SystemExit(f"fastgpt train: --resume {path}: that run had {differ}; resume with its settings")
    set_state_dict(model, optimizer, model_state_dict=checkpoint["state_dict"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    shuffle.set_state(state["shuffle"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return Progress(state["epoch"], state["batch"], state["step"], state["tokens_seen"], state["epoch_shuffle"])


def train(args: argparse.Namespace, log=None) -> tuple[GPTModel, History]:
    """The chapter-5 training loop on args.text; returns the trained model and its history.
    log(line) prints the progress lines (default: above the progress bar); under torchrun only
    rank 0 logs, and the model returned on the other ranks is their replica (or shard)."""
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parallel, device = setup_parallelism(args, device)
    log = (tqdm.write if log is None else log) if parallel.is_main else (lambda *_: None)
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
    if parallel.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.trf_blocks:
            fully_shard(block)
        fully_shard(model)
    forward = context_parallel(model, parallel.context_group) if parallel.context > 1 else model
    # DDP averages the gradients over every rank (FSDP reduce-scatters them itself).
    if parallel.world > 1 and not parallel.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        train_forward = DistributedDataParallel(forward)
    else:
        train_forward = forward
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run = {"config": args.config, "context_length": window, "batch_size": args.batch_size, "seed": args.seed,
           "drop_rate": cfg["drop_rate"]}
    progress = _resume(args.resume, model, optimizer, run, shuffle, device) if args.resume else Progress()
    layout = (f"; {parallel.world} processes: {parallel.replicas} {'FSDP' if parallel.fsdp else 'DDP'} replicas"
              f" x {parallel.context} context-parallel ranks" if parallel.world > 1 else "")
    log(f"{args.config}: {sum(p.numel() for p in forward.parameters()) / 1e6:.1f}M parameters, "
        f"backend {args.backend}, {device}; {len(train_ids)} training / {len(val_ids)} validation tokens, "
        f"{len(train_loader)} batches of {args.batch_size} x {window} per epoch{layout}")
    if args.resume:
        log(f"resumed {args.resume} at step {progress.step} (epoch {progress.epoch}, batch {progress.batch})")

    history = History()
    total_steps = args.epochs * len(train_loader)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    bar = tqdm(total=total_steps, initial=progress.step, desc="training", unit="step", dynamic_ncols=True,
               disable=not (args.progress and parallel.is_main))
    while progress.epoch <= args.epochs and progress.step < total_steps:
        forward.train()
        for inputs, targets in _epoch_batches(train_loader, shuffle, progress):
            if progress.step == total_steps:
                break
            optimizer.zero_grad()
            loss = loss_on_batch(train_forward, *parallel.local_batch(inputs, targets), device)
            loss.backward()
            optimizer.step()
            history.step_losses.append(parallel.batch_loss(loss.detach()))
            progress.tokens_seen += inputs.numel()
            progress.batch += 1
            if progress.step % args.eval_freq == 0:
                train_loss, val_loss = evaluate(forward, train_loader, val_loader, device, args.eval_iter, parallel)
                history.evals.append({"epoch": progress.epoch, "step": progress.step,
                                      "tokens_seen": progress.tokens_seen, "train_loss": train_loss,
                                      "val_loss": val_loss})
                log(f"Ep {progress.epoch} (Step {progress.step:06d}): Train loss {train_loss:.3f}, "
                    f"Val loss {val_loss:.3f}")
            progress.step += 1
            bar.update()
            bar.set_postfix(loss=f"{history.step_losses[-1]:.3f}")
        main = _main_model(model, parallel)
        if main is not None:
            history.samples.append(sample_text(main, tokenizer, args.start_context, device))
            log(history.samples[-1])
        if progress.batch == len(train_loader):
            progress = Progress(progress.epoch + 1, 0, progress.step, progress.tokens_seen)
    bar.close()
    if args.out:
        _save(args.out, model, optimizer, parallel, run, progress, shuffle, device)
        history.checkpoint = args.out
        log(f"saved {args.out} and {args.out}.state (fastgpt.load_checkpoint reads the first; "
            f"fastgpt generate --weights {args.out} samples from it; fastgpt train --resume {args.out} continues)")
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
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT",
                        help="continue the run that wrote CHECKPOINT (and CHECKPOINT.state) exactly where it stopped")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP")
    parser.add_argument("--context-parallel", type=int, default=1, metavar="K",
                        help="under torchrun: split each sequence over K ranks (ring attention; needs --drop-rate 0)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "context_length", "eval_freq", "eval_iter"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    if args.drop_rate is not None and not 0.0 <= args.drop_rate < 1.0:
        parser.error("--drop-rate must be in [0, 1)")
    if args.context_parallel < 1:
        parser.error("--context-parallel must be >= 1")
    if args.context_parallel > 1:
        if args.drop_rate != 0.0:
            parser.error("--context-parallel needs --drop-rate 0: ring attention refuses dropout (a block's mask "
                         "would not be the one of the whole sequence)")
        if args.context_length % (2 * args.context_parallel) != 0:
            parser.error(f"--context-length must be divisible by 2 x --context-parallel = "
                         f"{2 * args.context_parallel} (the zigzag layout's chunks)")
    if not os.path.isfile(args.text):
        parser.error(f"--text {args.text}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    train(parse_args(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
