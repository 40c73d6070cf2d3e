"""fastgpt's benchmarks, shared by `fastgpt bench ...` and the scripts in benchmarks/:

- context_scaling: causal attention time and memory vs context length, every backend;
- layer_norm: layer norm forward/backward GB/s vs F.layer_norm and the copy bandwidth;
- gpt_e2e: GPT-2 training-step and KV-cache generation tokens/s per backend.
"""
