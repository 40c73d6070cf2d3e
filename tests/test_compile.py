"""torch.compile(fullgraph=True) traces whole models through fastgpt, on the CPU.

fullgraph=True turns any graph break into an error, so these tests fail if fastgpt's
operators (their fake impls), backend selection, fastgpt.nn's modules or fastgpt.hf's
mask and attention functions cannot be traced. The compiled model (inductor) must give
the eager model's outputs.

Each inductor compile takes 6-20 s on a 2-core CPU (all six model x backend pairs: ~75 s
with a cold cache), so each model runs on the C++ `cpu` backend (the project's own
operators) and one reference backend: fastgpt's GPTModel on `naive`, the HF GPT-2 on
`sdpa`; every backend is compiled at least once.
"""
import copy

import pytest
import torch

import book_model as book
import fastgpt
from checks import assert_close
from conftest import require_backend



def use(backend: str) -> str:
    require_backend(backend)
    torch._dynamo.reset()  # each case compiles from scratch, within the default recompile limit
    return backend


def compiled_matches_eager(model, *args, compiler="inductor", **kwargs):
    """Runs `model` eagerly in float64 (the oracle) and compiled in float32: (got, oracle)."""
    oracle_model = copy.deepcopy(model).double()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    with torch.no_grad():
        got, oracle = compiled(*args, **kwargs), oracle_model(*args, **kwargs)
    return getattr(got, "logits", got), getattr(oracle, "logits", oracle)


@pytest.mark.parametrize("backend", ["naive", "cpu"])
def test_gpt_model_compiles_fullgraph(backend):
    use(backend)
    torch.manual_seed(0)
    model = fastgpt.GPTModel(book.tiny_config(), backend=backend).eval()
    idx = torch.randint(0, 97, (2, 16))
    got, oracle = compiled_matches_eager(model, idx)
    assert_close(got, oracle)


def hf_gpt2(implementation: str, n_layer: int = 2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=n_layer, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


@pytest.mark.parametrize("backend", ["sdpa", "cpu"])
def test_patched_hugging_face_gpt2_compiles_fullgraph(backend):
    use(backend)
    pytest.importorskip("transformers")
    import fastgpt.hf

    model = hf_gpt2(fastgpt.hf.register(backend=backend, name=f"fastgpt-{backend}"))
    report = fastgpt.patch(model, backend=backend)
    assert len(report.swapped) == 5  # ln_1, ln_2 of both blocks and ln_f
    assert report.left == []  # the attention already runs fastgpt
    idx = torch.randint(0, 97, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the fused path with a key padding mask
    got, oracle = compiled_matches_eager(model, idx, attention_mask=mask)
    real = mask.bool()  # padded positions attend to nothing real (see test_hf)
    assert_close(got[real], oracle[real])


def test_hugging_face_fallback_under_compile_is_recorded_not_a_graph_break(monkeypatch):
    """Compiled without a mask or cache, transformers cannot rule out packed sequences and builds a
    block mask fastgpt cannot express: the sdpa fallback must trace (no warning inside the graph).
    What is tested is tracing, so aot_eager (dynamo + AOT autograd, no inductor codegen) suffices."""
    use("naive")
    pytest.importorskip("transformers")
    import fastgpt.hf

    monkeypatch.setattr(fastgpt.hf, "FALLBACKS", set())
    model = hf_gpt2("fastgpt", n_layer=1)
    got, oracle = compiled_matches_eager(model, torch.randint(0, 97, (2, 12)), compiler="aot_eager", use_cache=False)
    assert_close(got, oracle)
    assert len(fastgpt.hf.FALLBACKS) == 1 and "cannot be expressed as causal + key padding" in \
        next(iter(fastgpt.hf.FALLBACKS))
