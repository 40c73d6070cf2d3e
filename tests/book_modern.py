"""The book's modern attention and norm modules, with the book's interfaces and arithmetic:
what patch() must swap exactly or leave with a reason (tests/test_patch_modern.py).

As the book writes them (rasbt/LLMs-from-scratch), so that the tests run against the code a
reader has, not against fastgpt's own idea of it:
- ch05/07_gpt_to_llama, llms_from_scratch.llama3: GroupedQueryAttention(d_in, d_out, num_heads,
  num_kv_groups) with forward(x, mask, cos, sin), the model's boolean triu mask sliced to T;
  torch.nn.RMSNorm.
- llms_from_scratch.qwen3: GroupedQueryAttention(d_in, num_heads, num_kv_groups, head_dim,
  qk_norm) with forward(x, mask, cos, sin); RMSNorm with `scale` (and optional `shift`),
  computed in float32 when qwen3_compatible.
- ch05/12_gemma3: the same attention with `scaling` = query_pre_attn_scalar**-0.5 applied to the
  queries and the model's global (causal) or local (causal + sliding window) mask; RMSNorm
  x̂ · (1 + scale) in float32.
- ch04/04_gqa: GroupedQueryAttention(d_in, d_out, dropout, num_heads, num_kv_groups) with its
  own growing KV cache: forward(x, use_cache=False), reset_cache().
- ch04/06_swa: MultiHeadAttentionWithSWA(d_in, d_out, dropout, num_heads, qkv_bias,
  sliding_window_size) with a KV cache trimmed to the window.
Scores are masked with -inf and softmaxed over matmul attention with repeat_interleave-d keys,
as the book does. Tiny models around them exercise the modules as the book's models call them.
"""
import torch
import torch.nn as nn


def compute_rope_params(head_dim, theta_base=10_000, context_length=4096):
    """cos, sin (context_length, head_dim): the angles of each position, the halves repeated."""
    inv_freq = 1.0 / theta_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(context_length).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):  # x (b, heads, T, head_dim); the tables cut to T
    T, half = x.shape[2], x.shape[3] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return ((x * cos[:T][None, None]) + (rotated * sin[:T][None, None])).to(x.dtype)


class RMSNorm(nn.Module):
    """Qwen 3's RMSNorm: `scale` (ones), optional `shift`; float32 statistics when qwen3_compatible."""

    def __init__(self, emb_dim, eps=1e-6, bias=False, qwen3_compatible=True):
        super().__init__()
        self.eps, self.qwen3_compatible = eps, qwen3_compatible
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x):
        dtype = x.dtype
        if self.qwen3_compatible:
            x = x.to(torch.float32)
        normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.scale
        if self.shift is not None:
            normed = normed + self.shift
        return normed.to(dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma 3's RMSNorm: zero-centred `scale`, x̂ · (1 + scale), all in float32."""

    def __init__(self, emb_dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps) * (1.0 + self.scale.float())
        return out.to(x.dtype)


def _grouped_scores_softmax(queries, keys, values, mask, group_size, divide_by=None):
    """The book's attention core: repeat k/v per query group, mask with -inf, softmax."""
    keys = keys.repeat_interleave(group_size, dim=1)
    values = values.repeat_interleave(group_size, dim=1)
    scores = (queries @ keys.transpose(2, 3)).masked_fill(mask, -torch.inf)
    weights = torch.softmax(scores if divide_by is None else scores / divide_by, dim=-1)
    return weights @ values


class GroupedQueryAttention(nn.Module):
    """Qwen 3's GroupedQueryAttention: forward(x, mask, cos, sin), mask (T, T) bool, True = hidden."""

    def __init__(self, d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False, dtype=None):
        super().__init__()
        self.num_heads, self.num_kv_groups = num_heads, num_kv_groups
        self.group_size = num_heads // num_kv_groups
        self.head_dim = head_dim or d_in // num_heads
        self.d_out = num_heads * self.head_dim
        self.W_query = nn.Linear(d_in, self.d_out, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        else:
            self.q_norm = self.k_norm = None

    def _heads(self, x):
        b, T, _ = x.shape
        q = self.W_query(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(b, T, self.num_kv_groups, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, T, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm:
            q = self.q_norm(q)
        if self.k_norm:
            k = self.k_norm(k)
        return q, k, v

    def _merge(self, context):
        b, _, T, _ = context.shape
        return self.out_proj(context.transpose(1, 2).reshape(b, T, self.d_out))

    def forward(self, x, mask, cos, sin):
        q, k, v = self._heads(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self._merge(_grouped_scores_softmax(q, k, v, mask, self.group_size, self.head_dim ** 0.5))


class GemmaGroupedQueryAttention(GroupedQueryAttention):
    """Gemma 3's: QK-norm with (1 + w) norms, queries scaled by `scaling` before the scores."""

    def __init__(self, d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False, query_pre_attn_scalar=None,
                 dtype=None):
        super().__init__(d_in, num_heads, num_kv_groups, head_dim, False, dtype)
        if qk_norm:
            self.q_norm, self.k_norm = GemmaRMSNorm(self.head_dim), GemmaRMSNorm(self.head_dim)
        self.scaling = (query_pre_attn_scalar or self.head_dim) ** -0.5

    def forward(self, x, mask, cos, sin):
        q, k, v = self._heads(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self._merge(_grouped_scores_softmax(q * self.scaling, k, v, mask, self.group_size))


class LlamaGroupedQueryAttention(GroupedQueryAttention):
    """Llama 3's (d_in, d_out, num_heads, num_kv_groups): the model's mask is sliced to T here."""

    def __init__(self, d_in, d_out, num_heads, num_kv_groups, dtype=None):
        super().__init__(d_in, num_heads, num_kv_groups, d_out // num_heads, False, dtype)
        self.out_proj = nn.Linear(d_out, d_out, bias=False, dtype=dtype)

    def forward(self, x, mask, cos, sin):
        T = x.shape[1]
        return super().forward(x, mask[:T, :T], cos, sin)


def causal_mask(T):
    return torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)


def sliding_mask(T, window):
    """Gemma 3's local mask: the future or more than window - 1 tokens back is hidden."""
    ones = torch.ones(T, T, dtype=torch.bool)
    return causal_mask(T) | torch.triu(ones, diagonal=window).T


class RopeBlock(nn.Module):
    """A pre-norm decoder block as the book's Qwen 3 / Gemma 3 write it (norms around attention
    and a SwiGLU feed-forward); Gemma's adds post-norms."""

    def __init__(self, attention, norm, emb_dim, gemma=False):
        super().__init__()
        self.att = attention
        self.norm1, self.norm2 = norm(emb_dim), norm(emb_dim)
        self.post_norms = nn.ModuleList([norm(emb_dim), norm(emb_dim)]) if gemma else None
        self.fc1, self.fc2 = nn.Linear(emb_dim, 2 * emb_dim, bias=False), nn.Linear(emb_dim, 2 * emb_dim, bias=False)
        self.fc3 = nn.Linear(2 * emb_dim, emb_dim, bias=False)

    def forward(self, x, mask, cos, sin):
        h = self.att(self.norm1(x), mask, cos, sin)
        x = x + (h if self.post_norms is None else self.post_norms[0](h))
        h = self.norm2(x)
        h = self.fc3(nn.functional.silu(self.fc1(h)) * self.fc2(h))
        return x + (h if self.post_norms is None else self.post_norms[1](h))


class RopeModel(nn.Module):
    """A tiny Qwen 3 / Llama 3 / Gemma 3-shaped model: family 'qwen3' (qk-norm), 'llama3'
    (torch.nn.RMSNorm, the mask sliced in the attention) or 'gemma3' (sliding then global layers,
    (1 + w) norms, query_pre_attn_scalar, embeddings scaled by sqrt(emb_dim))."""

    def __init__(self, family, vocab=97, emb_dim=64, n_layers=2, num_heads=4, num_kv_groups=2, head_dim=16,
                 window=5, context_length=64):
        super().__init__()
        self.family, self.window, self.emb_dim = family, window, emb_dim
        self.tok_emb = nn.Embedding(vocab, emb_dim)
        blocks = []
        for layer in range(n_layers):
            if family == "qwen3":
                att, norm = GroupedQueryAttention(emb_dim, num_heads, num_kv_groups, head_dim, qk_norm=True), RMSNorm
            elif family == "llama3":
                att = LlamaGroupedQueryAttention(emb_dim, emb_dim, num_heads, num_kv_groups)
                norm = lambda dim: nn.RMSNorm(dim, eps=1e-5)  # noqa: E731
            else:
                att = GemmaGroupedQueryAttention(emb_dim, num_heads, num_kv_groups, head_dim, qk_norm=True,
                                                 query_pre_attn_scalar=24)
                norm = GemmaRMSNorm
            blocks.append(RopeBlock(att, norm, emb_dim, gemma=family == "gemma3"))
        self.trf_blocks = nn.ModuleList(blocks)
        self.final_norm = blocks[0].norm1.__class__(emb_dim) if family != "llama3" else nn.RMSNorm(emb_dim, eps=1e-5)
        self.out_head = nn.Linear(emb_dim, vocab, bias=False)
        att_head_dim = blocks[0].att.head_dim
        self.register_buffer("cos", compute_rope_params(att_head_dim, 10_000, context_length)[0], persistent=False)
        self.register_buffer("sin", compute_rope_params(att_head_dim, 10_000, context_length)[1], persistent=False)
        local = compute_rope_params(att_head_dim, 100, context_length)
        self.register_buffer("cos_local", local[0], persistent=False)
        self.register_buffer("sin_local", local[1], persistent=False)
        self.context_length = context_length

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok_emb(idx)
        if self.family == "gemma3":
            x = x * self.emb_dim ** 0.5
        full = causal_mask(self.context_length if self.family == "llama3" else T).to(x.device)
        for layer, block in enumerate(self.trf_blocks):
            if self.family == "gemma3" and layer % 2 == 0:  # sliding layers, then global ones
                x = block(x, sliding_mask(T, self.window).to(x.device), self.cos_local, self.sin_local)
            else:
                x = block(x, full, self.cos, self.sin)
        return self.out_head(self.final_norm(x))


class GroupedQueryAttentionWithKVCache(nn.Module):
    """ch04/04_gqa: a growing KV cache of the num_kv_groups heads, keys repeated per call."""

    def __init__(self, d_in, d_out, dropout, num_heads, num_kv_groups, dtype=None, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.num_kv_groups, self.group_size = num_kv_groups, num_heads // num_kv_groups
        self.W_key = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=qkv_bias, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=qkv_bias, dtype=dtype)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias, dtype=dtype)
        self.out_proj = nn.Linear(d_out, d_out, bias=False, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0

    def forward(self, x, use_cache=False):
        b, T, _ = x.shape
        q = self.W_query(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(b, T, self.num_kv_groups, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, T, self.num_kv_groups, self.head_dim).transpose(1, 2)
        first = 0
        if use_cache:
            if self.cache_k is not None:
                k, v = torch.cat([self.cache_k, k], dim=2), torch.cat([self.cache_v, v], dim=2)
            self.cache_k, self.cache_v = k, v
            first, self.ptr_current_pos = self.ptr_current_pos, self.ptr_current_pos + T
        else:
            self.cache_k = self.cache_v = None
            self.ptr_current_pos = 0
        mask = torch.arange(first, first + T, device=x.device)[:, None] < torch.arange(k.shape[2], device=x.device)
        k, v = k.repeat_interleave(self.group_size, dim=1), v.repeat_interleave(self.group_size, dim=1)
        scores = (q @ k.transpose(2, 3)).masked_fill(mask, -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, T, self.d_out))

    def reset_cache(self):
        self.cache_k, self.cache_v, self.ptr_current_pos = None, None, 0


class MultiHeadAttentionWithSWA(nn.Module):
    """ch04/06_swa: query p sees keys p - W < j <= p; the KV cache, (b, T, heads, head_dim), keeps
    the last W keys (W - 1 older ones plus the chunk are attended to)."""

    def __init__(self, d_in, d_out, dropout, num_heads, qkv_bias=False, sliding_window_size=None):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.sliding_window_size = sliding_window_size
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0

    def forward(self, x, use_cache=False):
        b, T, _ = x.shape
        split = lambda t: t.view(b, T, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
        q_start = k_start = 0
        if use_cache:
            old = 0 if self.cache_k is None else self.cache_k.shape[1]
            if self.cache_k is not None:
                k, v = torch.cat([self.cache_k, k], dim=1), torch.cat([self.cache_v, v], dim=1)
            all_k, all_v = k, v
            if self.sliding_window_size is not None:
                attend = min(k.shape[1], self.sliding_window_size + T - 1)
                k, v = k[:, -attend:], v[:, -attend:]
                keep = min(all_k.shape[1], self.sliding_window_size)
                self.cache_k, self.cache_v = all_k[:, -keep:], all_v[:, -keep:]
            else:
                self.cache_k, self.cache_v = all_k, all_v
            k_start = self.ptr_current_pos - old + (all_k.shape[1] - k.shape[1])
            q_start = self.ptr_current_pos
            self.ptr_current_pos += T
        else:
            self.ptr_current_pos = 0
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        W = k.shape[2] + 1 if self.sliding_window_size is None else int(self.sliding_window_size)
        diff = (torch.arange(q_start, q_start + T, device=x.device)[:, None]
                - torch.arange(k_start, k_start + k.shape[2], device=x.device)[None, :])
        scores = (q @ k.transpose(2, 3)).masked_fill((diff < 0) | (diff >= W), -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, T, self.d_out))

    def reset_cache(self):
        self.cache_k, self.cache_v, self.ptr_current_pos = None, None, 0


class CachedGPT(nn.Module):
    """The chapter-4 GPT skeleton around a KV-cached attention (ch04/04_gqa, ch04/06_swa): learned
    positions, pre-norm blocks with torch LayerNorm, forward(idx, use_cache), reset_kv_cache()."""

    def __init__(self, make_attention, vocab=97, emb_dim=64, n_layers=2, context_length=64):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, emb_dim), nn.Embedding(context_length, emb_dim)
        self.atts = nn.ModuleList([make_attention(emb_dim) for _ in range(n_layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(emb_dim) for _ in range(n_layers)])
        self.out_head = nn.Linear(emb_dim, vocab, bias=False)
        self.current_pos = 0

    def forward(self, idx, use_cache=False):
        T = idx.shape[1]
        start = self.current_pos if use_cache else 0
        self.current_pos = start + T if use_cache else 0
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        for norm, att in zip(self.norms, self.atts):
            x = x + att(norm(x), use_cache=use_cache)
        return self.out_head(x)

    def reset_kv_cache(self):
        self.current_pos = 0
        for att in self.atts:
            att.reset_cache()


def generate_cached(model, idx, max_new_tokens, chunk=None):
    """Greedy tokens with the KV cache: the prompt in chunks of `chunk` tokens (all at once when
    None; chunked prefill is what ch04/06_swa's cache trimming is for), then one token at a time."""
    model.reset_kv_cache()
    with torch.no_grad():
        pieces = [idx] if chunk is None else list(idx.split(chunk, dim=1))
        for piece in pieces:
            logits = model(piece, use_cache=True)
        out = idx
        for _ in range(max_new_tokens):
            next_id = logits[:, -1].argmax(dim=-1, keepdim=True)
            out = torch.cat([out, next_id], dim=1)
            logits = model(next_id, use_cache=True)
    return out
