"""Architectures of the public checkpoints the paper uses, known without downloading them.

``ptjax plan`` and the benchmarks need only a model's shapes: for these hub ids (and the
short names ``t5-small`` ... ``t5-xxl``) the config is built here, so planning an 11B run
needs no network and no weights. Sizes from Lester et al. (2021), Table 1 of T5 1.1.
"""
from __future__ import annotations

from ptjax.models import gpt2, t5

# size: (d_model, layers per stack, heads, d_ff); d_kv = 64, vocab 32128 for every size.
T5_1_1_SIZES = {
    "small": (512, 8, 6, 1024),
    "base": (768, 12, 12, 2048),
    "large": (1024, 24, 16, 2816),
    "xl": (2048, 24, 32, 5120),
    "xxl": (4096, 24, 64, 10240),
}
# name: (n_embd, n_layer, n_head)
GPT2_SIZES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16),
              "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}


def t5_1_1(size: str) -> t5.T5Config:
    """T5 1.1 / LM-adapted (gated-GELU, untied lm_head, no output rescale)."""
    d, layers, heads, ff = T5_1_1_SIZES[size]
    return t5.T5Config(vocab_size=32128, d_model=d, d_kv=64, d_ff=ff, num_layers=layers,
                       num_decoder_layers=layers, num_heads=heads,
                       feed_forward_proj="gated-gelu", scale_decoder_outputs=False,
                       tie_lm_head=False)


def gpt2_config(name: str) -> gpt2.GPT2Config:
    d, layers, heads = GPT2_SIZES[name]
    return gpt2.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=d, n_layer=layers,
                           n_head=heads)


def _table() -> dict:
    out = {}
    for size in T5_1_1_SIZES:
        config = t5_1_1(size)
        for name in (f"t5-{size}", f"google/t5-{size}-lm-adapt", f"google/t5-v1_1-{size}"):
            out[name] = config
    for name in GPT2_SIZES:
        out[name] = out[f"openai-community/{name}"] = gpt2_config(name)
    return out


PRESETS = _table()


def preset(name: str):
    """The config of a known checkpoint name, or None."""
    return PRESETS.get(name)
