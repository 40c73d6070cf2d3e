"""fastgpt.distributed on gloo: 2 and 4 CPU processes on localhost.

Every case runs on every rank of one spawned process group per world size (spawning is the
slow part), in order, and reports per rank; a case that hangs fails by the harness's timeout
(and gloo's own), naming the case. Ring attention is checked against fastgpt.attention on the
whole sequence (forward and gradients, causal and not, GQA, key padding with a fully padded
row, float32 and float64); the bad calls must raise the same error on every rank and leave the
group usable for the next case; context_parallel models must give the single-process loss and
gradients.
"""
import json
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastgpt
from conftest import require_backend
from fastgpt import distributed
from fastgpt.distributed import context_parallel, mean_over_ranks, ring_attention, shard, unshard

WORLD_SIZES = (2, 4)
TIMEOUT_S = 150  # for all the cases of one world size; gloo's own timeout (below) ends a hung exchange sooner
CHUNK = 4  # tokens per zigzag chunk: T = 2 * world * CHUNK


# ---- the plan of a ring step (no processes needed) -------------------------------------------

@pytest.mark.parametrize("world", (1, 2, 3, 4))
@pytest.mark.parametrize("causal", (True, False))
def test_ring_steps_compute_every_visible_pair_once_and_nothing_else(world, causal):
    """Over the N steps of every rank, the kernel calls cover each (query, key) pair the mask
    keeps exactly once and no pair it drops: skipped sub-blocks are not computed at all. Causal
    steps all cost the same (the zigzag balance)."""
    c = 3
    positions = [list(range(r * c, (r + 1) * c)) + list(range((2 * world - 1 - r) * c, (2 * world - r) * c))
                 for r in range(world)]
    for rank in range(world):
        seen, costs = [], []
        for step in range(world):
            source = (rank - step) % world
            rows, keys, block_causal = distributed.step_block(rank, source, causal, c)
            queries, keys_at = positions[rank][rows], positions[source][keys]
            pairs = [(i, j) for a, i in enumerate(queries) for b, j in enumerate(keys_at)
                     if not block_causal or b <= a + len(keys_at) - len(queries)]
            seen += pairs
            costs.append(len(pairs))
        expected = [(i, j) for i in positions[rank] for j in range(2 * world * c) if not causal or j <= i]
        assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
        if causal:
            assert costs[1:] == [2 * c * c] * (world - 1) and costs[0] == c * (2 * c + 1)


# ---- the cases, run on every rank ---------------------------------------------------------------

def _inputs(world, *, B=2, Hq=4, Hkv=4, D=16, dtype=torch.float32, padding=False, seed=0):
    """The whole-sequence q, k, v, upstream gradient and key padding mask: the same on every rank."""
    T = 2 * world * CHUNK
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, Hkv, T, D, generator=g, dtype=dtype) for _ in range(2))
    grad = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
    mask = None
    if padding:
        mask = torch.rand(B, T, generator=g) > 0.4
        mask[-1] = False  # a fully padded batch row: its outputs and gradients are zeros
    return q, k, v, grad, mask


def _check_ring(world, causal=True, dtype=torch.float32, **options):
    softcap = options.pop("softcap", None)
    q, k, v, grad, mask = _inputs(world, dtype=dtype, **options)
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = fastgpt.attention(*whole, causal=causal, key_padding_mask=mask, softcap=softcap, backend="cpu")
    expected.backward(grad)
    local = [shard(t, 2).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, causal=causal, key_padding_mask=None if mask is None else shard(mask, 1),
                         softcap=softcap, backend="cpu")
    out.backward(shard(grad, 2))
    # float64: the kernels' lse is float32, so the merge weights carry float32 rounding.
    forward_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-6, 1e-6)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, shard(expected, 2), atol=forward_tol, rtol=0)
    for name, mine, theirs in zip("qkv", local, whole):
        torch.testing.assert_close(mine.grad, shard(theirs.grad, 2), atol=grad_tol, rtol=0, msg=f"d{name}")
    if mask is not None:
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        assert expected[-1].abs().max() == 0  # the oracle agrees the padded row is zeros


def _expect_error(error, match, call):
    """call() must raise `error` with `match` in its message on this rank."""
    with pytest.raises(error, match=match):
        call()


def _ring(q, k, v, **options):
    return lambda: ring_attention(q, k, v, backend=options.pop("backend", "cpu"), **options)


def case_shard_layout(world, rank):
    T = 2 * world * CHUNK
    positions = shard(torch.arange(T), 0)
    expected = list(range(rank * CHUNK, (rank + 1) * CHUNK))
    expected += list(range((2 * world - 1 - rank) * CHUNK, (2 * world - rank) * CHUNK))
    assert positions.tolist() == expected
    x = torch.randn(2, 3, T, 5, generator=torch.Generator().manual_seed(1))
    for dim in (2, -2):
        assert torch.equal(unshard(shard(x, dim), dim), x)
    assert torch.equal(unshard(shard(x[:, 0], 1), 1), x[:, 0])


def case_shard_needs_divisible_length(world, rank):
    _expect_error(ValueError, f"divisible by 2 x the world size = {2 * world}.*got {2 * world * CHUNK + 2}",
                  lambda: shard(torch.zeros(1, 2 * world * CHUNK + 2), 1))


def case_unshard_shapes_must_agree(world, rank):
    x = torch.zeros(2, 4 + 2 * (rank == 1))
    _expect_error(ValueError, "fastgpt.unshard: every rank of the group must make the same call.*rank 1: shard "
                              r"\(2, 6\)", lambda: unshard(x, 1))


def case_ring_causal(world, rank):
    _check_ring(world)


def case_ring_not_causal(world, rank):
    _check_ring(world, causal=False)


def case_ring_gqa(world, rank):
    _check_ring(world, Hq=4, Hkv=2)
    _check_ring(world, causal=False, Hq=4, Hkv=1)


def case_ring_key_padding(world, rank):
    _check_ring(world, padding=True, Hkv=2)
    _check_ring(world, causal=False, padding=True)


def case_ring_float64_softcap_odd_head_dim(world, rank):
    _check_ring(world, dtype=torch.float64, D=24, softcap=2.0)


def case_ring_rejects_mismatched_shapes(world, rank):
    q, k, v, _, _ = _inputs(world)
    local = [shard(t, 2) for t in (q, k, v)]
    if rank == world - 1:  # one rank with a shorter shard: the others must not wait for it forever
        local = [t[:, :, :-2] for t in local]
    _expect_error(ValueError, "every rank of the group must make the same call.*rank 0: q .*"
                              f"rank {world - 1}: q \\(2, 4, {2 * CHUNK - 2}, 16\\)", _ring(*local))


def case_ring_rejects_bad_input_on_one_rank(world, rank):
    q, k, v, _, _ = _inputs(world)
    local = [shard(t, 2) for t in (q, k, v)]
    if rank == 1:
        local[0] = local[0].double()  # q's dtype differs from k's and v's on rank 1 alone
    _expect_error(ValueError, "fastgpt.ring_attention: on rank 1, q, k and v must share one dtype, got "
                              "torch.float64, torch.float32", _ring(*local))


def case_ring_rejects_odd_shards(world, rank):
    q, k, v, _, _ = _inputs(world)
    local = [shard(t, 2)[:, :, 1:] for t in (q, k, v)]  # T / N odd: T not divisible by 2N
    _expect_error(ValueError, f"shard length T / N must be even.*got {2 * CHUNK - 1}", _ring(*local))


def case_ring_refusals(world, rank):
    q, k, v, _, _ = _inputs(world)
    local = [shard(t, 2) for t in (q, k, v)]
    _expect_error(NotImplementedError, "window must be None", _ring(*local, window=4))
    _expect_error(ValueError, "dropout_p must be 0", _ring(*local, dropout_p=0.1))
    _expect_error(ValueError, "backend must be a fused one.*got backend= 'naive'", _ring(*local, backend="naive"))
    _expect_error(ValueError, "fastgpt.ring_attention: key_padding_mask must have shape",
                  _ring(*local, key_padding_mask=torch.ones(2, 3, dtype=torch.bool)))


def _model_case(name, world, **overrides):
    """context_parallel(model) on shards: the loss (mean over ranks) and the gradients (averaged
    over ranks) of the whole sequence, as one process computes them."""
    torch.manual_seed(0)
    model = fastgpt.models.build_model(name, backend="cpu", vocab_size=97, context_length=4 * world * CHUNK,
                                       **overrides)
    T = 4 * world * CHUNK
    g = torch.Generator().manual_seed(3)
    ids, targets = torch.randint(0, 97, (2, T), generator=g), torch.randint(0, 97, (2, T), generator=g)
    logits = model(ids)
    expected_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    expected_loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    sharded = context_parallel(model)
    local_logits = sharded(shard(ids, 1))
    torch.testing.assert_close(local_logits, shard(logits.detach(), 1), atol=1e-5, rtol=0)
    loss = F.cross_entropy(local_logits.flatten(0, 1), shard(targets, 1).flatten())
    loss.backward()
    for param in model.parameters():  # what DDP over the group does
        dist.all_reduce(param.grad)
        param.grad /= world
    assert abs(mean_over_ranks(loss).item() - expected_loss.item()) < 1e-5
    for n, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[n], atol=1e-4, rtol=0, msg=n)
    # Outside the wrapper's forward the model is itself again: whole sequences, KV-cache generation.
    assert torch.equal(model(ids), logits) and "positions" not in vars(model)


def case_context_parallel_gpt2(world, rank):
    _model_case("tiny", world, drop_rate=0.0)


def case_context_parallel_llama3_rope_gqa(world, rank):
    _model_case("llama3-tiny", world)


def case_context_parallel_refuses_dropout(world, rank):
    model = fastgpt.models.build_model("tiny", backend="cpu", vocab_size=97, context_length=32).train()
    _expect_error(ValueError, "dropout_p must be 0", lambda: context_parallel(model)(torch.zeros(1, 8, dtype=torch.long)))


def case_group_still_works(world, rank):
    """After every error above, the ranks are still in step."""
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    assert total.item() == world * (world - 1) / 2


CASES = {name: case for name, case in globals().items() if name.startswith("case_")}


# ---- the harness ------------------------------------------------------------------------------

def run_ranks(worker, world: int, out_dir: str, timeout_s: float, *args) -> list[dict]:
    """Runs worker(rank, world, out_dir, *args) in `world` spawned processes that share a gloo group
    on localhost (torchrun's environment variables set) and returns what each wrote to
    out_dir/rank<r>.json. Processes still running after timeout_s are killed: their file says
    how far they got."""
    distributed.spawn_local_group(_with_process_group, world, (out_dir, worker, args), timeout_s)
    reports = []
    for rank in range(world):
        path = os.path.join(out_dir, f"rank{rank}.json")
        with open(path) if os.path.isfile(path) else open(os.devnull) as f:
            reports.append(json.loads(f.read() or "{}"))
    return reports


def _with_process_group(rank, world, port, out_dir, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=40))
    try:
        worker(rank, world, out_dir, *args)
    finally:
        dist.destroy_process_group()


def write_report(out_dir: str, rank: int, report: dict) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def _run_cases(rank, world, out_dir):
    results = {}
    for name, case in CASES.items():
        results[name] = "started (did not finish)"
        write_report(out_dir, rank, results)
        try:
            case(world, rank)
            results[name] = None
        except BaseException:  # noqa: BLE001 - every failure is reported per case
            results[name] = traceback.format_exc()
    write_report(out_dir, rank, results)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world={n}")
def ranks(request, tmp_path_factory):
    """{case name: [each rank's traceback or None]} of one process group of request.param ranks."""
    require_backend("cpu")
    world = request.param
    reports = run_ranks(_run_cases, world, str(tmp_path_factory.mktemp(f"world{world}")), TIMEOUT_S)
    return {name: [report.get(name, "not reached (timed out before)") for report in reports] for name in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_on_every_rank(ranks, case):
    failures = [f"rank {rank}: {error}" for rank, error in enumerate(ranks[case]) if error is not None]
    assert not failures, "\n".join(failures)


def test_outside_a_process_group_the_error_says_so():
    with pytest.raises(RuntimeError, match="fastgpt.shard: torch.distributed must be initialised"):
        shard(torch.zeros(1, 8), 1)


def test_context_parallel_benchmark_writes_its_table_and_plot(tmp_path):
    """`fastgpt bench context-parallel` on a tiny sweep: one row per (series, T), each rank's
    memory growing with T, the longest-T summary, the files (the default goes to benchmarks/out)."""
    from fastgpt.bench import common
    from fastgpt.bench import context_parallel as bench

    assert bench.parse_args([]).out_dir == common.DEFAULT_OUT_DIR
    data = bench.run(["--world-sizes", "1,2", "--lengths", "32,64", "--heads", "1", "--head-dim", "16",
                      "--repeats", "1", "--memory-budget-mb", "1000", "--out-dir", str(tmp_path)])
    series = {(row["impl"], row["world"]) for row in data["results"]}
    assert series == {("ring", 1), ("ring", 2), (bench.BASELINE, 1)} and len(data["results"]) == 6
    for impl, world in series:
        peaks = [r["peak_mb"] for r in data["results"] if (r["impl"], r["world"]) == (impl, world)]
        assert 0 < peaks[0] < peaks[1]
    assert set(data["longest_under_budget"].values()) == {64}
    markdown = open(data["files"]["md"]).read()
    assert "ring, 2 ranks: ms / MB per rank" in markdown and "fastgpt bench context-parallel" in markdown
    with open(data["files"]["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
