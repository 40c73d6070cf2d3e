"""Small runs of every CUDA kernel of fastgpt, for compute-sanitizer (tools/gpu_check.sh):

    compute-sanitizer --tool memcheck python3 tools/sanitizer_driver.py

Attention forward and backward (causal and not, Tq < Tk and Tq > Tk, a key padding mask with
a fully masked row, dropout, non-contiguous inputs) for float16, bfloat16 and float32 at every
head dim, and layer norm forward and backward on each kernel shape (warp rows, block rows, the
generic path). Shapes are small and ragged (partial tiles everywhere) so the sanitizer finishes
quickly. Each result is also checked against the float64 reference, so a run that the
sanitizer passes but that computes garbage still fails (exit status 1).
"""
import sys

import torch

from fastgpt import reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}  # max abs error, loose: a smoke check


def check(name, got, want, dtype, failures):
    err = (got.double() - want.double()).abs().max().item() / max(want.abs().max().item(), 1.0)
    status = "ok" if err <= TOLERANCE[dtype] else "FAIL"
    print(f"{status:4} {name}: relative max error {err:.2e}", flush=True)
    if status == "FAIL":
        failures.append(name)


def attention_case(B, H, Tq, Tk, D, dtype, causal, masked, dropout_p, failures):
    gen = torch.Generator().manual_seed(Tq * 1000 + Tk + D)
    q = torch.randn(B, H, Tq, D, generator=gen).to("cuda", dtype)
    k = torch.randn(B, Tk, H, D, generator=gen).to("cuda", dtype).transpose(1, 2)  # non-contiguous
    v = torch.randn(B, H, Tk, D, generator=gen).to("cuda", dtype)
    grad_out = torch.randn(B, H, Tq, D, generator=gen).to("cuda", dtype)
    mask = None
    if masked:
        mask = torch.rand(B, Tk, generator=gen).to("cuda") > 0.3
        mask[0] = False
    scale, seed = D ** -0.5, 7
    out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, mask, causal, scale, dropout_p, seed, 0, 0.0)
    grads = torch.ops.fastgpt.attention_bwd(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed,
                                            0, 0.0)
    torch.cuda.synchronize()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference.attention(*leaves, causal, mask, dropout_p, scale, seed)
    want_grads = torch.autograd.grad(want, leaves, grad_out.double())
    name = f"attention {str(dtype)[6:]} B{B} H{H} Tq{Tq} Tk{Tk} D{D} causal={causal} mask={masked} p={dropout_p}"
    check(name + " out", out, want.detach(), dtype, failures)
    for grad_name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        check(f"{name} {grad_name}", g, w, dtype, failures)


def layer_norm_case(N, C, dtype, failures):
    gen = torch.Generator().manual_seed(N + C)
    x, grad_y = (torch.randn(N, C, generator=gen).to("cuda", dtype) for _ in range(2))
    weight, bias = (torch.randn(C, generator=gen).to("cuda", dtype) for _ in range(2))
    y, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x, weight, bias, 1e-5)
    grads = torch.ops.fastgpt.layer_norm_bwd(grad_y, x, weight, mean, rstd)
    torch.cuda.synchronize()
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    want = reference.layer_norm(*leaves, 1e-5)
    want_grads = torch.autograd.grad(want, leaves, grad_y.double())
    name = f"layer_norm {str(dtype)[6:]} N{N} C{C}"
    check(name + " y", y, want.detach(), dtype, failures)
    for grad_name, g, w in zip(("dx", "dweight", "dbias"), grads, want_grads):
        check(f"{name} {grad_name}", g, w, dtype, failures)


def main():
    if not torch.cuda.is_available():
        sys.exit("sanitizer_driver.py needs a CUDA GPU")
    failures = []
    for dtype in DTYPES:
        for D in (16, 32, 64, 128):
            attention_case(1, 2, 70, 130, D, dtype, True, D == 64, 0.0, failures)
        attention_case(2, 1, 130, 61, 64, dtype, True, True, 0.0, failures)   # Tq > Tk: rows without keys
        attention_case(2, 1, 45, 45, 32, dtype, False, True, 0.2, failures)   # dropout, full attention
        for N, C in ((37, 768), (9, 1600), (5, 4099), (3, 8)):  # warp rows, block rows, generic, tiny
            layer_norm_case(N, C, dtype, failures)
    print(f"{len(failures)} failed" if failures else "all ok")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
