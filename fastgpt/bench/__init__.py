"""fastgpt's benchmarks, shared by `fastgpt bench <name>` and the scripts in benchmarks/
(benchmarks/<module>.py only calls fastgpt.bench.<module>.main):

- attention (`fastgpt bench attention`, alias `context`): causal attention time and
  memory vs context length, every backend;
- layer_norm (`fastgpt bench layernorm`): layer norm forward/backward GB/s vs
  F.layer_norm and the copy bandwidth (`--scenario fwdbwd`: both through autograd);
- rms_norm (`fastgpt bench rmsnorm`): RMSNorm (and add + RMSNorm) forward/backward GB/s;
- model (`fastgpt bench model --arch gpt2|llama3|qwen3|gemma3`, alias `gpt`): a model of
  fastgpt.models end to end, training-step and KV-cache generation tokens/s per backend
  against sdpa and naive;
- decode (`fastgpt bench decode`): one query against a long KV cache vs SDPA, then generate;
- context_parallel (`fastgpt bench context-parallel`): ring-attention training step, per-rank
  peak memory and time vs context length for 1, 2 and 4 processes (gloo), the longest context
  under a memory budget.

Results go to benchmarks/out/ (git-ignored) unless --out-dir says otherwise; the
committed ones in benchmarks/results/ are rewritten only by `--out-dir benchmarks/results`
(`make bench-results`).
"""
