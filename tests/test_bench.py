"""The benchmarks run end to end on tiny sweeps and write what they promise; a failing
point (out of memory, over budget, an error) becomes a row while the others go on."""
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import cli, reference
from fastgpt.bench import attention, common, decode, layer_norm, model, rms_norm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cpu_backends():
    """naive, sdpa and, where built, the fused C++ backend (Triton's interpreter is too slow to time)."""
    return ["naive", "sdpa"] + (["cpu"] if "cpu" in fastgpt.info()["cpu"]["devices"] else [])


def rows_of(data, **match):
    return [r for r in data["results"] if all(r[k] == v for k, v in match.items())]


# ---- helpers -----------------------------------------------------------------------------

def test_loglog_slope_recovers_the_exponent():
    ts = [128, 256, 512, 1024, 2048]
    assert common.loglog_slope(ts, [3e-6 * t * t for t in ts]) == pytest.approx(2.0, abs=1e-9)
    assert common.loglog_slope(ts, [0.5 * t for t in ts]) == pytest.approx(1.0, abs=1e-9)
    assert common.loglog_slope(ts, [7.0] * len(ts)) == pytest.approx(0.0, abs=1e-9)
    assert common.loglog_slope([128], [1.0]) is None  # one point has no slope
    assert common.loglog_slope([128, 256], [1.0, 0.0]) is None  # non-positive values are dropped


def test_out_of_memory_errors_are_recognised():
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    assert common.is_out_of_memory(oom("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert common.is_out_of_memory(MemoryError())
    assert common.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                                "allocate 68719476736 bytes"))
    assert not common.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not common.is_out_of_memory(ValueError("out of memory"))  # only the error types torch raises


def test_attention_flops_and_naive_memory_estimate():
    assert attention.attention_flops(2, 12, 1024, 64, causal=False, mode="fwd") == 4 * 2 * 12 * 1024**2 * 64
    assert attention.attention_flops(2, 12, 1024, 64, causal=True, mode="fwd") == 2 * 2 * 12 * 1024**2 * 64
    assert attention.attention_flops(1, 1, 128, 64, True, "fwdbwd") == 3.5 * 2 * 128**2 * 64
    # 4 (B, H, T, T) matrices in the input dtype plus the (T, T) bool mask
    assert attention.naive_peak_bytes(1, 12, 1024, torch.float32) == 4 * 12 * 1024**2 * 4 + 1024**2
    assert attention.naive_peak_bytes(1, 12, 1024, torch.bfloat16) == 4 * 12 * 1024**2 * 2 + 1024**2


def test_device_kind_names_the_result_files():
    assert common.device_kind(torch.device("cpu")) == "cpu"


def test_peak_memory_counts_what_a_call_allocates():
    device = torch.device("cpu")
    n = 1 << 20  # 4 MiB of float32
    peak = common.peak_memory_bytes(lambda: torch.empty(n).fill_(1.0) + 1.0, device)
    assert 2 * 4 * n <= peak < 3 * 4 * n  # two live (n,) tensors at the peak, not three


# ---- where the results go ---------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", [attention, layer_norm, rms_norm, model, decode])
def test_results_go_to_an_untracked_folder_by_default(module):
    """A plain run must never overwrite the committed results of a checkout."""
    default = module.parse_args([]).out_dir
    assert default == common.DEFAULT_OUT_DIR
    assert Path(default).parts[:2] != Path(common.RESULTS_DIR).parts[:2] == ("benchmarks", "results")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing is tracked or ignored")
    git = ["git", "-C", str(REPO)]
    assert subprocess.run(git + ["ls-files", "--", default], capture_output=True, text=True,
                          check=True).stdout == ""  # nothing tracked there
    ignored = subprocess.run(git + ["check-ignore", "-q", "--", os.path.join(default, "cpu_attention.json")])
    assert ignored.returncode == 0, f"{default} is not git-ignored"


def test_a_run_without_out_dir_writes_under_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out-dir is relative to the current directory
    data = attention.run(["--device", "cpu", "--min-t", "128", "--max-t", "128", "--repeats", "1", "--budget-s", "0",
                          "--backends", "sdpa", "--modes", "fwd"], show_progress=False)
    assert sorted(os.path.relpath(p, tmp_path) for p in data["files"].values()) == [
        os.path.join(common.DEFAULT_OUT_DIR, f"cpu_attention.{ext}") for ext in ("json", "md", "png")]
    assert not (tmp_path / common.RESULTS_DIR).exists()


def test_make_bench_writes_to_the_default_and_bench_results_regenerates_the_committed_ones():
    makefile = (REPO / "Makefile").read_text()
    recipe = {target: re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
              for target in ("bench", "bench-results")}
    assert "fastgpt bench attention" in recipe["bench"] and "--out-dir" not in recipe["bench"]
    assert f"--out-dir {common.RESULTS_DIR}" in recipe["bench-results"]  # recorded in the files it writes


# ---- attention --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["attention", "context"])  # `context`: the alias, same program
def test_attention_end_to_end_through_the_cli(tmp_path, capsys, name):
    backends = cpu_backends()
    argv = ["bench", name, "--device", "cpu", "--max-t", "256", "--repeats", "1", "--budget-s", "0",
            "--backends", ",".join(backends + ["cuda"]), "--out-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "### forward (fwd)" in printed and "### forward + backward (fwdbwd)" in printed

    data = json.loads((tmp_path / "cpu_attention.json").read_text())
    env = data["environment"]
    assert env["device_kind"] == "cpu" and env["torch"] == torch.__version__
    # The command recorded is the canonical one, out directory included: it regenerates these files.
    assert env["command"].startswith("fastgpt bench attention --device cpu")
    assert env["command"].endswith(f"--out-dir {tmp_path}") and data["benchmark"] == "attention"
    assert {"cpu_model", "cpu_cores", "git_commit", "triton", "device_name"} <= set(env)
    assert set(data["unavailable"]) == {"cuda"}  # asked for, cannot run on the CPU: said, not dropped
    assert data["settings"]["t_values"] == [128, 256]
    assert len(data["results"]) == len(backends) * 2 * 2  # backends x modes x T
    for row in data["results"]:
        assert row["status"] == "ok", row
        assert row["time_ms"] > 0 and row["memory_mb"] > 0 and row["repeats"] == 1
        flops = attention.attention_flops(1, 12, row["T"], 64, True, row["mode"])
        assert row["flops"] == flops
        assert row["flop_per_s"] == pytest.approx(flops / (row["time_ms"] / 1e3))
        naive = rows_of(data, backend="naive", mode=row["mode"], T=row["T"])[0]
        assert row["speedup_vs_naive"] == pytest.approx(naive["time_ms"] / row["time_ms"])
    # The naive backend materialises (T, T): 4x the memory for 2x the context. SDPA does not.
    for mode in ("fwd", "fwdbwd"):
        naive = {r["T"]: r["memory_mb"] for r in rows_of(data, backend="naive", mode=mode)}
        sdpa = {r["T"]: r["memory_mb"] for r in rows_of(data, backend="sdpa", mode=mode)}
        assert naive[256] / naive[128] == pytest.approx(4.0, rel=0.1)
        assert sdpa[256] / sdpa[128] < 3.0
        assert data["slopes"][mode]["naive"]["memory"] == pytest.approx(2.0, abs=0.15)

    markdown = (tmp_path / "cpu_attention.md").read_text()
    assert env["command"] in markdown and "![time and memory vs T](cpu_attention.png)" in markdown
    assert "| T " in markdown and "GFLOP/s" in markdown and "fitted log-log slopes" in markdown
    assert (tmp_path / "cpu_attention.png").read_bytes()[:8] == PNG_MAGIC
    # The CPU level and the FMA peak measured in the run, with each row's share of it.
    assert env["cpu_level"] == fastgpt._extension.CPU_CAPABILITY and f"at the {env['cpu_level']} level" in markdown
    peak = data["settings"]["fma_peak_flops"]
    assert peak > 0 and "% of fp32 FMA peak" in markdown
    cpu_row = rows_of(data, backend="cpu", mode="fwd", T=256)[0]
    assert f"| {100 * cpu_row['flop_per_s'] / peak:.0f}% " in markdown


def test_fma_probe_counts_its_flops():
    """The FMA loop's accumulators follow acc = acc * a + b for every iteration asked (nothing is
    skipped), one row per torch thread, 16 chains of whole vectors."""
    out = torch.ops.fastgpt_bench.fma_loop(torch.empty(0), 3)
    assert out.shape[0] == torch.get_num_threads() and out.shape[1] % 16 == 0
    a, b = torch.tensor(0.999999, dtype=torch.float32), torch.tensor(1e-7, dtype=torch.float32)
    start = torch.arange(16, dtype=torch.float32) * 1e-3
    want = start
    for _ in range(3):
        want = want * a + b
    lanes = out.shape[1] // 16
    assert torch.allclose(out[0].view(16, lanes), want[:, None].expand(16, lanes), rtol=1e-6, atol=0)
    peak = common.cpu_fma_peak_flops()
    assert 1e8 < peak < 1e14  # FLOP/s: a working machine, and not a loop the compiler removed


def test_out_of_memory_and_errors_become_rows_and_the_sweep_goes_on(tmp_path):
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    def runs_out_of_memory_from_256(q, k, v, causal, window):
        if q.shape[2] >= 256:
            raise oom("CUDA out of memory. Tried to allocate 64.00 GiB")
        return fastgpt.attention(q, k, v, causal=causal, backend="sdpa")

    def rejects_512(q, k, v, causal, window):
        if q.shape[2] == 512:
            raise ValueError("head dim 64 is not supported at T=512")
        return fastgpt.attention(q, k, v, causal=causal, backend="sdpa")

    impls = {"naive": attention.fastgpt_attention("naive"), "sdpa": attention.fastgpt_attention("sdpa"),
             "oomy": runs_out_of_memory_from_256, "picky": rejects_512}
    # 5 MiB: the naive pre-check passes T=128 (3.2 MB) and refuses T=256 (12.6 MB).
    data = attention.run(["--device", "cpu", "--max-t", "1024", "--repeats", "1", "--budget-s", "0",
                                "--memory-limit-gb", str(5 / 1024), "--out-dir", str(tmp_path)],
                               impls=impls, show_progress=False)
    for mode in ("fwd", "fwdbwd"):
        status = {name: [r["status"] for r in rows_of(data, backend=name, mode=mode)] for name in impls}
        assert status["sdpa"] == ["ok"] * 4
        assert status["naive"] == ["ok", "OOM", "OOM", "OOM"]
        assert status["oomy"] == ["ok", "OOM", "OOM", "OOM"]
        assert status["picky"] == ["ok", "ok", "error", "ok"]  # an error does not stop the series
        naive_256 = rows_of(data, backend="naive", mode=mode, T=256)[0]
        assert naive_256["note"].startswith("pre-check:") and "GiB available" in naive_256["note"]
        assert rows_of(data, backend="oomy", mode=mode, T=256)[0]["note"].startswith("OutOfMemoryError")
        assert rows_of(data, backend="oomy", mode=mode, T=512)[0]["note"] == "since T=256"
        assert "not supported" in rows_of(data, backend="picky", mode=mode, T=512)[0]["note"]
        assert "speedup_vs_naive" not in rows_of(data, backend="sdpa", mode=mode, T=512)[0]
        assert attention.first_failure(data["results"], mode, "naive")["T"] == 256
    markdown = (tmp_path / "cpu_attention.md").read_text()
    assert "OOM: pre-check" in markdown and "OOM: since T=256" in markdown and "error: ValueError" in markdown


def test_points_over_budget_are_skipped_rows(tmp_path):
    data = attention.run(["--device", "cpu", "--max-t", "512", "--repeats", "1", "--budget-s", "1e-9",
                                "--backends", "naive,sdpa", "--modes", "fwd", "--out-dir", str(tmp_path)],
                               show_progress=False)
    for name in ("naive", "sdpa"):
        rows = rows_of(data, backend=name)
        # The first point has nothing to predict from and runs; the next are predicted over budget.
        assert [r["status"] for r in rows] == ["ok", "skipped (budget)", "skipped (budget)"]
        assert rows[1]["note"].startswith("predicted") and rows[2]["note"] == "since T=256"
    assert data["slopes"]["fwd"]["naive"] == {"time": None, "memory": None}
    assert (tmp_path / "cpu_attention.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T, window", [(64, None), (64, 1), (64, 16), (64, 64), (64, 200)])
def test_windowed_flops_count_the_visible_pairs(T, causal, window):
    """The FLOPs of a window are those of the (query, key) pairs the mask lets through; causal
    counts leave out half the diagonal (T²/2 for full causal attention, W²/2 for a window)."""
    visible = reference.visible_keys(T, T, causal, None, torch.device("cpu"), window).sum().item()
    exact_diagonal = (min(T, window or T) / 2) if causal else 0
    assert attention.visible_pairs(T, causal, window) == pytest.approx(visible - exact_diagonal)
    assert attention.attention_flops(1, 3, T, 8, causal, "fwd", window) == 4 * 3 * 8 * attention.visible_pairs(
        T, causal, window)


def test_gqa_scenario_measures_each_backend_grouped_and_as_mha(tmp_path):
    data = attention.run(["--scenario", "gqa", "--device", "cpu", "--heads", "4", "--kv-heads", "2", "-D", "16",
                          "--min-t", "64", "--max-t", "128", "--repeats", "1", "--budget-s", "0",
                          "--backends", "sdpa", "--out-dir", str(tmp_path)], show_progress=False)
    assert data["settings"]["kv_heads"] == 2 and data["settings"]["scenario"] == "gqa"
    assert {r["series"] for r in data["results"]} == {"sdpa", "sdpa MHA"}
    for row in rows_of(data, series="sdpa"):
        assert row["status"] == "ok" and row["kv_heads"] == 2
        mha = rows_of(data, series="sdpa MHA", mode=row["mode"], T=row["T"])[0]
        assert mha["kv_heads"] == 4 and "speedup_vs_mha" not in mha
        assert row["speedup_vs_mha"] == pytest.approx(mha["time_ms"] / row["time_ms"])
        assert row["flops"] == attention.attention_flops(1, 4, row["T"], 16, True, row["mode"])
    markdown = (tmp_path / "cpu_attention_gqa.md").read_text()
    assert "Hq=4, Hkv=2" in markdown and "vs mha" in markdown
    assert (tmp_path / "cpu_attention_gqa.png").read_bytes()[:8] == PNG_MAGIC


def test_bf16_scenario_measures_each_backend_in_bfloat16_and_float32(tmp_path):
    data = attention.run(["--scenario", "bf16", "--device", "cpu", "--heads", "2", "-D", "16", "--min-t", "64",
                          "--max-t", "128", "--repeats", "1", "--budget-s", "0", "--backends", "sdpa,cpu",
                          "--out-dir", str(tmp_path)], show_progress=False)
    assert data["settings"]["dtype"] == "bfloat16"
    assert {r["series"] for r in data["results"]} == {"sdpa", "sdpa fp32", "cpu", "cpu fp32"}
    for row in rows_of(data, series="cpu"):
        assert row["status"] == "ok" and row["dtype"] == "bfloat16"
        fp32 = rows_of(data, series="cpu fp32", mode=row["mode"], T=row["T"])[0]
        sdpa = rows_of(data, series="sdpa", mode=row["mode"], T=row["T"])[0]
        sdpa_fp32 = rows_of(data, series="sdpa fp32", mode=row["mode"], T=row["T"])[0]
        assert fp32["dtype"] == "float32" and "speedup_vs_fp32" not in fp32
        assert row["speedup_vs_fp32"] == pytest.approx(fp32["time_ms"] / row["time_ms"])
        # sdpa in the row's own dtype is the baseline of each row
        assert row["speedup_vs_sdpa"] == pytest.approx(sdpa["time_ms"] / row["time_ms"])
        assert fp32["speedup_vs_sdpa"] == pytest.approx(sdpa_fp32["time_ms"] / fp32["time_ms"])
    markdown = (tmp_path / "cpu_attention_bf16.md").read_text()
    assert "bfloat16" in markdown and "vs fp32" in markdown


def test_window_scenario_series_ratios_and_flex_rows(tmp_path):
    def flex_stand_in(q, k, v, causal, window):  # torch.compile would take a minute per shape
        return fastgpt.attention(q, k, v, causal=causal, window=window, backend="sdpa")

    impls = {"sdpa": attention.fastgpt_attention("sdpa"), attention.FLEX: flex_stand_in}
    data = attention.run(["--scenario", "window", "--device", "cpu", "--heads", "2", "-D", "16", "--min-t", "64",
                          "--max-t", "256", "--windows", "16,32", "--repeats", "1", "--budget-s", "0",
                          "--out-dir", str(tmp_path)], impls=impls, show_progress=False)
    labels = {(r["series"], r["mode"]) for r in data["results"]}
    # flex only with a window and, on the CPU, only forward (torch has no CPU backward for it)
    assert labels == {(s, m) for s in ("sdpa", "sdpa W=16", "sdpa W=32") for m in ("fwd", "fwdbwd")} | {
        ("flex W=16", "fwd"), ("flex W=32", "fwd")}
    for row in data["results"]:
        assert row["status"] == "ok", row
        assert row["flops"] == attention.attention_flops(1, 2, row["T"], 16, True, row["mode"], row["window"])
        if row["window"] is None or row["backend"] == attention.FLEX:  # flex has no full-causal series
            assert "speedup_vs_full" not in row
            continue
        full = rows_of(data, series="sdpa", mode=row["mode"], T=row["T"])[0]
        assert row["speedup_vs_full"] == pytest.approx(full["time_ms"] / row["time_ms"])
        if row["backend"] == "sdpa" and row["mode"] == "fwd":
            flex = rows_of(data, series=f"flex W={row['window']}", mode="fwd", T=row["T"])[0]
            assert row["speedup_vs_flex"] == pytest.approx(flex["time_ms"] / row["time_ms"])
    assert set(data["slopes"]["fwd"]) == {"sdpa", "sdpa W=16", "sdpa W=32", "flex W=16", "flex W=32"}
    assert "forward only" in (tmp_path / "cpu_attention_window.md").read_text()


def test_flex_baseline_attends_to_the_same_window():
    flex, why_not = attention.flex_attention(compiled=False)
    if flex is None:
        pytest.skip(why_not)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 64, 16, generator=gen) for heads in (4, 2, 2))
    for causal in (True, False):
        want = fastgpt.attention(q, k, v, causal=causal, window=9, backend="naive")
        torch.testing.assert_close(flex(q, k, v, causal, 9), want, atol=1e-5, rtol=1e-5)


# ---- layer norm ------------------------------------------------------------------------------

def test_layer_norm_bytes():
    # fwd: x, y (rows·C) + weight, bias (C); bwd: x, dy, dx + weight, dweight, dbias + float32 mean, rstd
    assert layer_norm.layer_norm_bytes(10, 8, torch.float32, "fwd") == (2 * 80 + 2 * 8) * 4
    assert layer_norm.layer_norm_bytes(10, 8, torch.bfloat16, "bwd") == (3 * 80 + 3 * 8) * 2 + 2 * 10 * 4
    # fwd+bwd: x, y, y (the sum) or dy, x, dx; weight, bias, weight, dweight, dbias; mean, rstd written and read
    for pass_ in ("fwd_bwd_sum", "fwd_bwd_dense"):
        assert layer_norm.layer_norm_bytes(10, 8, torch.float32, pass_) == (5 * 80 + 5 * 8) * 4 + 4 * 10 * 4


def test_layer_norm_bench_end_to_end(tmp_path):
    backends = [b for b in cpu_backends() if b != "sdpa"]
    data = layer_norm.run(["--device", "cpu", "--channels", "64,256", "--rows", "128", "--repeats", "1",
                           "--backends", ",".join(backends), "--out-dir", str(tmp_path)], show_progress=False)
    assert data["settings"]["implementations"] == ["torch"] + backends
    assert [(c["rows"], c["C"]) for c in data["copy"]] == [(128, 64), (128, 256)]
    assert all(c["gb_per_s"] > 0 and c["bytes"] == 2 * 128 * c["C"] * 4 for c in data["copy"])
    assert len(data["results"]) == 2 * 2 * (1 + len(backends))  # shapes x passes x implementations
    for row in data["results"]:
        assert row["status"] == "ok", row
        assert row["bytes"] == layer_norm.layer_norm_bytes(128, row["C"], torch.float32, row["pass"])
        assert row["gb_per_s"] == pytest.approx(row["bytes"] / (row["time_us"] / 1e6) / 1e9)
        copy = next(c for c in data["copy"] if c["C"] == row["C"])
        assert row["percent_of_copy"] == pytest.approx(100 * row["gb_per_s"] / copy["gb_per_s"])
        if row["impl"] == "torch":
            assert row["speedup_vs_torch"] == pytest.approx(1.0)
    stored = json.loads((tmp_path / "cpu_layer_norm.json").read_text())
    assert stored["results"] == data["results"] and stored["environment"]["device_kind"] == "cpu"
    markdown = (tmp_path / "cpu_layer_norm.md").read_text()
    assert "### forward (fwd)" in markdown and "### backward (bwd)" in markdown and "copy GB/s" in markdown


def test_layer_norm_fwdbwd_scenario(tmp_path):
    """Forward + backward through autograd, for y.sum() and a dense dy, in float32 and bfloat16, with speedups."""
    backends = [b for b in cpu_backends() if b != "sdpa"]
    data = layer_norm.run(["--scenario", "fwdbwd", "--device", "cpu", "--channels", "64,96", "--rows", "32",
                           "--repeats", "1", "--backends", ",".join(backends), "--out-dir", str(tmp_path)],
                          show_progress=False)
    assert data["settings"]["dtypes"] == ["float32", "bfloat16"]
    assert [(c["dtype"], c["C"]) for c in data["copy"]] == [("float32", 64), ("float32", 96),
                                                             ("bfloat16", 64), ("bfloat16", 96)]
    points = {(r["pass"], r["dtype"], r["C"], r["impl"]) for r in data["results"]}
    assert points == {(p, d, c, i) for p in ("fwd_bwd_sum", "fwd_bwd_dense") for d in ("float32", "bfloat16")
                      for c in (64, 96) for i in ["torch"] + backends}
    for row in data["results"]:
        assert row["status"] == "ok", row
        assert row["bytes"] == layer_norm.layer_norm_bytes(32, row["C"], getattr(torch, row["dtype"]), row["pass"])
        torch_row = rows_of(data, impl="torch", dtype=row["dtype"], C=row["C"], **{"pass": row["pass"]})[0]
        assert row["speedup_vs_torch"] == pytest.approx(torch_row["time_us"] / row["time_us"])
    assert not (tmp_path / "cpu_layer_norm.json").exists()
    markdown = (tmp_path / "cpu_layer_norm_fwdbwd.md").read_text()
    assert "(fwd_bwd_sum)" in markdown and "(fwd_bwd_dense)" in markdown and "### forward (fwd)" not in markdown
    assert all(f"{name} vs torch" in markdown for name in backends)


def test_layer_norm_fwdbwd_pass_differentiates_through_the_backend():
    """A fwd_bwd call returns the gradients of x, weight and bias of y.sum() (fwd_bwd_sum) or of y with dy."""
    x, weight, bias, grad_y = torch.randn(5, 16), 1 + torch.randn(16), torch.randn(16), torch.randn(5, 16)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = F.layer_norm(leaves[0], (16,), leaves[1], leaves[2], 1e-5)
    expected = {"fwd_bwd_sum": torch.autograd.grad(y.sum(), leaves, retain_graph=True),
                "fwd_bwd_dense": torch.autograd.grad(y, leaves, grad_y)}
    for pass_, want in expected.items():
        got = layer_norm._pass_call(layer_norm.fastgpt_layer_norm("naive"), x, weight, bias, grad_y, pass_)()
        for got_grad, want_grad in zip(got, want, strict=True):
            torch.testing.assert_close(got_grad, want_grad)


# ---- RMSNorm ----------------------------------------------------------------------------------

def test_rms_norm_bytes():
    # rms_norm: read x, w, write y; add: read x, residual, w, write y, sum; fwd+bwd adds the backward's traffic.
    assert rms_norm.rms_norm_bytes("rms_norm", 10, 8, torch.float32, "fwd") == (2 * 80 + 8) * 4
    assert rms_norm.rms_norm_bytes("add_rms_norm", 10, 8, torch.bfloat16, "fwd") == (4 * 80 + 8) * 2
    assert rms_norm.rms_norm_bytes("rms_norm", 10, 8, torch.bfloat16, "fwd_bwd") == (5 * 80 + 3 * 8) * 2 + 2 * 10 * 4
    assert rms_norm.rms_norm_bytes("add_rms_norm", 10, 8, torch.float32, "fwd_bwd") == (8 * 80 + 3 * 8) * 4 + 80


def test_rms_norm_bench_end_to_end(tmp_path):
    backends = [b for b in cpu_backends() if b != "sdpa"]
    data = rms_norm.run(["--device", "cpu", "--shapes", "64x48,16x130", "--repeats", "1",
                         "--backends", ",".join(backends), "--out-dir", str(tmp_path)], show_progress=False)
    assert data["settings"]["implementations"] == ["torch"] + backends
    assert data["settings"]["dtypes"] == ["float32", "bfloat16"]  # both by default
    assert [(c["dtype"], c["rows"], c["C"]) for c in data["copy"]] == [
        ("float32", 64, 48), ("float32", 16, 130), ("bfloat16", 64, 48), ("bfloat16", 16, 130)]
    # dtypes x shapes x ops x passes x implementations
    assert len(data["results"]) == 2 * 2 * 2 * 2 * (1 + len(backends))
    for row in data["results"]:
        assert row["status"] == "ok", row
        dtype = common.DTYPES[row["dtype"]]
        assert row["bytes"] == rms_norm.rms_norm_bytes(row["op"], row["rows"], row["C"], dtype, row["pass"])
        assert row["gb_per_s"] == pytest.approx(row["bytes"] / (row["time_us"] / 1e6) / 1e9)
        if row["impl"] == "torch":
            assert row["speedup_vs_torch"] == pytest.approx(1.0)
    markdown = (tmp_path / "cpu_rms_norm.md").read_text()
    for title in ("rms_norm vs F.rms_norm, forward (fwd)", "fused add_rms_norm vs x + residual, then F.rms_norm, "
                  "forward + backward (fwd_bwd)"):
        assert f"### {title}" in markdown
    assert json.loads((tmp_path / "cpu_rms_norm.json").read_text())["results"] == data["results"]


def test_rms_norm_bench_records_why_a_backend_is_not_measured(tmp_path, monkeypatch):
    """A backend without an rms_norm kernel (the cuda one, declared so here): where it runs it is listed
    as not measured, with the reason."""
    from fastgpt import backends
    monkeypatch.setitem(backends.REGISTRY["cuda"].unavailable, "cpu", None)  # as if it ran here
    monkeypatch.setattr(backends.REGISTRY["cuda"], "missing",
                        {"rms_norm": "the cuda backend has no rms_norm kernel (test)"})
    usable, unavailable = common.usable_backends("naive,cuda", torch.device("cpu"), op="rms_norm")
    assert usable == ["naive"] and "has no rms_norm kernel" in unavailable["cuda"]
    assert common.usable_backends("naive,cuda", torch.device("cpu"), op="layer_norm") == (["naive", "cuda"], {})
    monkeypatch.undo()
    data = rms_norm.run(["--device", "cpu", "--shapes", "8x16", "--repeats", "1", "--dtype", "float32",
                         "--backends", "naive,cuda", "--out-dir", str(tmp_path)], show_progress=False)
    assert data["settings"]["implementations"] == ["torch", "naive"] and "cuda" in data["unavailable"]
    failing = {"broken": {op: (lambda *a: 1 / 0) for op in rms_norm.OPS}}
    data = rms_norm.run(["--device", "cpu", "--shapes", "8x16", "--repeats", "1", "--dtype", "float32",
                         "--out-dir", str(tmp_path)], impls=failing, show_progress=False)
    broken = [r for r in data["results"] if r["impl"] == "broken"]
    assert len(broken) == 4 and all(r["status"] == "error" and "ZeroDivisionError" in r["note"] for r in broken)
    assert "Failures:" in (tmp_path / "cpu_rms_norm.md").read_text()


# ---- a model end to end (`fastgpt bench model --arch ...`, alias `gpt`) ----------------------

TINY_CONFIGS = {"gpt2": "tiny", "llama3": "llama3-tiny", "qwen3": "qwen3-tiny", "gemma3": "gemma3-tiny"}


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_model_bench_end_to_end(tmp_path, arch):
    """Every backend runs the same tiny model of the family on the same inputs: one row each, the ratios
    are those of this run's rows, the greedy tokens equal naive's and the files hold what was returned."""
    backends = cpu_backends()
    data = model.run(["--arch", arch, "--device", "cpu", "--config", TINY_CONFIGS[arch], "--vocab-size", "256",
                      "--context-length", "16", "--batch-size", "2", "--steps", "1", "--warmup-steps", "0",
                      "--prompt-len", "4", "--new-tokens", "3", "--gen-repeats", "1", "--backends", ",".join(backends),
                      "--out-dir", str(tmp_path)], show_progress=False)
    s = data["settings"]
    assert data["benchmark"] == "model" and s["arch"] == arch
    assert s["model_class"] == fastgpt.models.MODEL_CLASSES[arch].__name__ and s["config"] == TINY_CONFIGS[arch]
    assert s["model_config"] == fastgpt.models.model_config(TINY_CONFIGS[arch], vocab_size=256, context_length=16)
    built = fastgpt.models.build_model(TINY_CONFIGS[arch], vocab_size=256, context_length=16)
    assert s["parameters"] == sum(p.numel() for p in built.parameters())
    assert [r["backend"] for r in data["results"]] == backends
    by_name = {r["backend"]: r for r in data["results"]}
    naive, sdpa = by_name["naive"], by_name["sdpa"]
    for row in data["results"]:
        assert row["status"] == "ok", row
        assert row["train_tokens_per_s"] == pytest.approx(2 * 16 / (row["train_step_ms"] / 1e3))
        assert row["generate_tokens_per_s"] == pytest.approx(1 * 3 / (row["generate_ms"] / 1e3))
        assert row["train_peak_memory_mb"] > 0 and math.isfinite(row["loss"])
        for base_name, base in (("naive", naive), ("sdpa", sdpa)):  # ratios of this run's own rows
            assert row[f"train_speedup_vs_{base_name}"] == pytest.approx(
                row["train_tokens_per_s"] / base["train_tokens_per_s"])
            assert row[f"generate_speedup_vs_{base_name}"] == pytest.approx(
                row["generate_tokens_per_s"] / base["generate_tokens_per_s"])
        # Same weights, same batch and prompt: the same loss and the same greedy tokens (float32, no dropout).
        assert len(row["generated"]) == 3 and all(0 <= t < 256 for t in row["generated"])
        assert row["generated"] == naive["generated"] and row["same_tokens_as_naive"] is True
        assert row["loss_diff_vs_naive"] == abs(row["loss"] - naive["loss"]) < 1e-4
    assert naive["train_speedup_vs_naive"] == sdpa["train_speedup_vs_sdpa"] == 1.0
    # Naive's greedy tokens are those of the model itself, generated without the benchmark.
    torch.manual_seed(s["seed"])
    reference_model = fastgpt.models.build_model(TINY_CONFIGS[arch], backend="naive", vocab_size=256,
                                                 context_length=16).eval()
    gen = torch.Generator().manual_seed(s["seed"])
    torch.randint(0, 256, (2, 17), generator=gen)  # the training batch, drawn first
    prompt = torch.randint(0, 256, (1, 4), generator=gen)
    assert reference_model.generate(prompt, max_new_tokens=3)[0, 4:].tolist() == naive["generated"]
    assert sorted(data["files"].values()) == [str(tmp_path / f"cpu_model_{arch}.{ext}") for ext in ("json", "md")]
    written = json.loads((tmp_path / f"cpu_model_{arch}.json").read_text())
    assert written["results"] == data["results"] and written["settings"]["arch"] == arch
    text = (tmp_path / f"cpu_model_{arch}.md").read_text()
    assert "train tok/s" in text and "gen vs sdpa" in text and fastgpt.models.MODEL_CLASSES[arch].__name__ in text
    assert all(f"| {name} " in text for name in backends)
    assert f"`fastgpt bench model --arch {arch} " in text  # the command that regenerates the file


def test_model_bench_defaults_follow_the_arch():
    """--arch picks the family's laptop config on the CPU (its GPU size on a GPU); --config alone sets the
    family; `fastgpt bench gpt` (no --arch) is GPT-2; a config of another family is refused."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    expected = {"gpt2": ("small", "gpt2-small"), "llama3": ("llama3-small", "llama3.2-1b"),
                "qwen3": ("qwen3-small", "qwen3-0.6b"), "gemma3": ("gemma3-small", "gemma3-270m")}
    for arch, (on_cpu, on_gpu) in expected.items():
        args = model.apply_defaults(model.parse_args(["--arch", arch]), cpu)
        assert (args.arch, args.config, args.context_length, args.batch_size) == (arch, on_cpu, None, 4)
        cfg = fastgpt.models.model_config(on_cpu)
        assert cfg["n_layers"] == 4 and cfg["emb_dim"] == 256 and cfg["context_length"] == 256  # seconds a step here
        args = model.apply_defaults(model.parse_args(["--arch", arch]), cuda)
        assert args.config == on_gpu and args.batch_size == 8
        assert args.context_length == (None if arch == "gpt2" else 1024)  # not the 32k-128k of the big configs
    assert model.parse_args([]).arch == "gpt2"
    assert model.parse_args(["--config", "qwen3-tiny"]).arch == "qwen3"
    with pytest.raises(SystemExit):
        model.parse_args(["--arch", "llama3", "--config", "qwen3-tiny"])
    assert cli.BENCHMARKS["model"] == "fastgpt.bench.model" and cli.BENCH_ALIASES["gpt"] == "model"


def test_decode_bench_end_to_end(tmp_path):
    data = decode.run(["--device", "cpu", "--kv-lengths", "64,200", "--batches", "1,2", "--backends", "cpu",
                       "--repeats", "1", "--prompts", "9", "--new-tokens", "3", "--out-dir", str(tmp_path)],
                      show_progress=False)
    assert data["settings"]["implementations"] == ["sdpa", "cpu"]
    # scenarios x dtypes x batches x lengths, an sdpa and a cpu row each
    assert len(data["copy"]) == 2 * 2 * 2 * 2 and len(data["results"]) == 2 * len(data["copy"])
    for row in data["results"]:
        assert row["status"] == "ok", row
        s = decode.SCENARIOS[row["scenario"]]
        element = torch.finfo(common.DTYPES[row["dtype"]]).bits // 8
        assert row["bytes"] == 2 * row["B"] * s.kv_heads * row["Tk"] * s.head_dim * element
        assert row["speedup_vs_sdpa"] > 0 and (row["impl"] != "sdpa" or row["speedup_vs_sdpa"] == 1.0)
    generation = {r["backend"]: r for r in data["generation"]}
    assert set(generation) == {"sdpa", "cpu"}
    for row in generation.values():
        assert row["status"] == "ok" and row["prompt"] == 9 and row["same_tokens_as_sdpa"], row
        assert 0 < row["prefill_s"] < row["generate_s"] and row["tokens_per_s"] == pytest.approx(3 / row["generate_s"])
    markdown = (tmp_path / "cpu_decode.md").read_text()
    assert "### Hq = 32, Hkv = 8, D = 128 (Llama 3 8B), bfloat16, Tq = 1" in markdown
    assert "### model.generate end to end" in markdown
    assert json.loads((tmp_path / "cpu_decode.json").read_text())["results"] == data["results"]

