"""The book's GPT-2, as chapters 3 and 4 of "Build a Large Language Model (from Scratch)"
write it: the reference that fastgpt's drop-in modules and patch() are tested against.

Kept as the book has it on purpose (the registered T×T `mask` buffer, masked_fill_ with
-inf, softmax of scores / sqrt(head_dim), the tanh GELU), so that tests compare against
the code a reader of the book actually has.

Below the chapter 3/4 model, the book's variants that patch() must recognise or leave alone,
with the book's interfaces: the KV-cache model (ch04/03_kv-cache), the fused-`qkv` attentions of
the chapter 3 bonus notebook, and ch05/10's GPTModelFast.
"""
import torch
import torch.nn as nn


class CausalAttention(nn.Module):
    """Single-head causal self-attention (chapter 3.5)."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):  # x (b, num_tokens, d_in) -> (b, num_tokens, d_out)
        b, num_tokens, d_in = x.shape
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.transpose(1, 2)
        attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values


class MultiHeadAttentionWrapper(nn.Module):
    """Several CausalAttention heads side by side (chapter 3.6.1)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)])

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads], dim=-1)


class MultiHeadAttention(nn.Module):
    """Multi-head causal self-attention with weight splits (chapter 3.6.2)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):  # x (b, num_tokens, d_in) -> (b, num_tokens, d_out)
        b, num_tokens, d_in = x.shape
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, num_tokens)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)


class LayerNorm(nn.Module):
    """Layer norm over the last dim with `scale` and `shift` (chapter 4.2)."""

    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    """The tanh approximation of GELU (chapter 4.3)."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            num_heads=cfg["n_heads"], dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        x = self.att(x)
        x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        return x + shortcut


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):  # in_idx (batch, seq_len) -> logits (batch, seq_len, vocab_size)
        batch_size, seq_len = in_idx.shape
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = tok_embeds + pos_embeds
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)


def tiny_config(**overrides):
    """A GPT small enough for the CPU test suite, with the book's config keys."""
    cfg = {"vocab_size": 97, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    cfg.update(overrides)
    return cfg


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """Greedy decoding without a cache (chapter 4.7): idx (batch, n) -> (batch, n + max_new_tokens)."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])
        idx = torch.cat((idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


# ---------------------------------------------------------------- the KV cache (ch04/03_kv-cache)

class MultiHeadAttentionWithKVCache(MultiHeadAttention):
    """Chapter 3's attention with the bonus KV cache: `forward(x, use_cache=False)` appends this
    call's keys and values to the `cache_k` / `cache_v` buffers, `reset_cache()` empties them."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0

    def forward(self, x, use_cache=False):  # x (b, num_tokens, d_in) -> (b, num_tokens, d_out)
        b, num_tokens, _ = x.shape

        def split_heads(t):  # (b, num_tokens, d_out) -> (b, num_heads, num_tokens, head_dim)
            return t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        queries, keys, values = split_heads(self.W_query(x)), split_heads(self.W_key(x)), split_heads(self.W_value(x))
        first_row = 0
        if use_cache:
            if self.cache_k is not None:
                keys, values = torch.cat([self.cache_k, keys], dim=2), torch.cat([self.cache_v, values], dim=2)
            self.cache_k, self.cache_v = keys, values
            first_row, self.ptr_current_pos = self.ptr_current_pos, self.ptr_current_pos + num_tokens
        attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, cached + num_tokens)
        attn_scores.masked_fill_(self.mask.bool()[first_row:first_row + num_tokens, :keys.shape[2]], -torch.inf)
        attn_weights = self.dropout(torch.softmax(attn_scores / self.head_dim ** 0.5, dim=-1))
        return self.out_proj((attn_weights @ values).transpose(1, 2).reshape(b, num_tokens, self.d_out))

    def reset_cache(self):
        self.cache_k, self.cache_v, self.ptr_current_pos = None, None, 0


class TransformerBlockWithKVCache(TransformerBlock):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.att = MultiHeadAttentionWithKVCache(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            num_heads=cfg["n_heads"], dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"])

    def forward(self, x, use_cache=False):
        x = x + self.drop_shortcut(self.att(self.norm1(x), use_cache=use_cache))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModelWithKVCache(GPTModel):
    """The chapter 4 GPT with the KV cache: `forward(in_idx, use_cache=False)`, `reset_kv_cache()`."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.trf_blocks = nn.ModuleList([TransformerBlockWithKVCache(cfg) for _ in range(cfg["n_layers"])])
        self.current_pos = 0

    def forward(self, in_idx, use_cache=False):
        seq_len = in_idx.shape[1]
        first_pos = self.current_pos if use_cache else 0
        if use_cache:
            self.current_pos += seq_len
        pos_embeds = self.pos_emb(torch.arange(first_pos, first_pos + seq_len, device=in_idx.device))
        x = self.drop_emb(self.tok_emb(in_idx) + pos_embeds)
        for block in self.trf_blocks:
            x = block(x, use_cache=use_cache)
        return self.out_head(self.final_norm(x))

    def reset_kv_cache(self):
        for block in self.trf_blocks:
            block.att.reset_cache()
        self.current_pos = 0


def generate_text_simple_cached(model, idx, max_new_tokens):
    """Greedy decoding with the KV cache: the prompt once, then one token a step."""
    model.eval()
    with torch.no_grad():
        model.reset_kv_cache()
        logits = model(idx, use_cache=True)
        for _ in range(max_new_tokens):
            next_idx = logits[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_idx], dim=1)
            logits = model(next_idx, use_cache=True)
    return idx


# ---------------------------------------------------------------- fused QKV (ch03 bonus, ch05/10)

class MultiHeadAttentionCombinedQKV(nn.Module):
    """One `qkv` projection (d_in -> 3 * d_out, split as (3, num_heads, head_dim)) and `proj`;
    the book's causal `mask` buffer and nn.Dropout on the attention weights."""

    def __init__(self, d_in, d_out, num_heads, context_length, dropout=0.0, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out is indivisible by num_heads"
        self.num_heads = num_heads
        self.context_length = context_length
        self.head_dim = d_out // num_heads
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):  # x (b, num_tokens, d_in) -> (b, num_tokens, d_out)
        b, num_tokens, _ = x.shape
        # (b, num_tokens, 3 * d_out) -> (3, b, num_heads, num_tokens, head_dim)
        queries, keys, values = self.qkv(x).view(b, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_scores = (queries @ keys.transpose(-2, -1)).masked_fill(
            self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = self.dropout(torch.softmax(attn_scores / self.head_dim ** 0.5, dim=-1))
        return self.proj((attn_weights @ values).transpose(1, 2).reshape(b, num_tokens, -1))


class PyTorchMultiHeadAttention(nn.Module):
    """GPTModelFast's attention (ch05/10): `qkv` + `proj` around torch's scaled_dot_product_attention
    with is_causal=True, and `dropout` a float, applied only in training."""

    def __init__(self, d_in, d_out, num_heads, dropout=0.0, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out is indivisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def forward(self, x):  # x (b, num_tokens, d_in) -> (b, num_tokens, d_out)
        b, num_tokens, _ = x.shape
        queries, keys, values = self.qkv(x).view(b, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        context_vec = nn.functional.scaled_dot_product_attention(
            queries, keys, values, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(context_vec.transpose(1, 2).reshape(b, num_tokens, self.d_out))


class MHAPyTorchScaledDotProduct(PyTorchMultiHeadAttention):
    """The chapter 3 bonus notebook's SDPA variant: PyTorchMultiHeadAttention that also records context_length."""

    def __init__(self, d_in, d_out, num_heads, context_length, dropout=0.0, qkv_bias=False):
        super().__init__(d_in, d_out, num_heads, dropout, qkv_bias)
        self.context_length = context_length


class GPTModelFast(GPTModel):
    """ch05/10's faster GPT: torch's nn.LayerNorm and tanh nn.GELU, PyTorchMultiHeadAttention."""

    def __init__(self, cfg):
        super().__init__(cfg)
        for block in self.trf_blocks:
            block.att = PyTorchMultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["n_heads"], cfg["drop_rate"],
                                                  cfg["qkv_bias"])
            block.norm1, block.norm2 = nn.LayerNorm(cfg["emb_dim"]), nn.LayerNorm(cfg["emb_dim"])
            block.ff.layers[1] = nn.GELU(approximate="tanh")
        self.final_norm = nn.LayerNorm(cfg["emb_dim"])
