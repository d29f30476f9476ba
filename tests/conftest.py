"""Shared fixtures: tiny random Hugging Face PyTorch models saved to disk, and the same
checkpoints loaded by ptjax. Nothing here touches the network."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (or a subprocess) with ``devices`` CPU devices."""
    return (f"--xla_force_host_platform_device_count={devices}"
            " --xla_backend_optimization_level=0")


# One CPU device, as on a user's CPU machine; the tests marked `mesh` need eight, and run in
# a session of their own with PTJAX_TEST_DEVICES=8 (`make test` runs both). Why not eight
# for all: a run's default mesh (mesh.data=-1) takes every device, and XLA:CPU programs over
# several devices stay out of the compilation cache (ptjax.cli), so every run would compile
# its steps afresh, and a step over eight devices compiles slower than over one.
# The tiny test models spend their time compiling, not running: LLVM's -O0 halves compile
# time (a T5 step with dropout: 12.5 s -> 5.2 s) and leaves the HLO, hence the maths, as is.
TEST_DEVICES = int(os.environ.get("PTJAX_TEST_DEVICES", "1"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                           + xla_flags(TEST_DEVICES)).strip()
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One XLA compilation cache for the tests, shared with `ptjax train` subprocesses and kept
# between sessions: `make test-slow` after `make test` (as CI runs them) reuses the steps
# the default suite compiled. Entries are keyed by the HLO, the XLA flags and the jax
# version, so a stale one is never read. jax's own size limit is not used: it keeps a second
# file per entry, and one entry whose second file is missing (a writer killed between the
# two, as the SIGKILL tests may) fails every later write with a warning on stderr. Instead
# the oldest entries past CACHE_LIMIT go when a session starts (pytest_sessionstart).
import tempfile  # noqa: E402

os.environ.setdefault("PTJAX_COMPILATION_CACHE", os.path.join(
    tempfile.gettempdir(), f"ptjax-test-xla-{os.getuid()}"))
CACHE_LIMIT = 2 * 1024 ** 3

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:  # the reference side of the parity tests; tests that need it are marked `torch`
    import torch
except ImportError:
    torch = None
import transformers  # noqa: E402

import ptjax  # noqa: E402
from ptjax.cli import enable_compilation_cache  # noqa: E402

enable_compilation_cache()  # identical steps compiled by several tests are compiled once
from ptjax.models.tiny import train_tokenizer  # noqa: E402

T5_CONFIGS = {
    # v1.0: ReLU, tied output embedding with the d_model**-0.5 rescale.
    "t5_v1_0": dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16,
                    feed_forward_proj="relu", decoder_start_token_id=0),
    # v1.1 / LM-adapted: gated-GELU, separate lm_head, decoder deeper than the encoder.
    "t5_v1_1": dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                    num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=16,
                    relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, decoder_start_token_id=0),
}
GPT2_CONFIGS = {
    "gpt2": dict(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                 bos_token_id=0, eos_token_id=0),
    "gpt2_wide_ff": dict(vocab_size=96, n_positions=64, n_embd=32, n_layer=3, n_head=2,
                         n_inner=80, activation_function="gelu", layer_norm_epsilon=1e-6,
                         bos_token_id=0, eos_token_id=0),
}

BERT_CONFIGS = {  # masked LMs: (transformers class, config class, config)
    "bert": ("BertForMaskedLM", "BertConfig", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)),
    # RoBERTa: positions from pad_token_id + 1, one token type; gelu_new in the layers
    # (its head stays exact gelu)
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=66, type_vocab_size=1,
        pad_token_id=1, hidden_act="gelu_new", layer_norm_eps=1e-5)),
}


def make_torch_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name in BERT_CONFIGS:
        cls, cfg_cls, kw = BERT_CONFIGS[name]
        model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kw))
        with torch.no_grad():  # a head bias and LayerNorms that are not 0 / 1
            for n, p in model.named_parameters():
                if "LayerNorm" in n or "layer_norm" in n or n.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
        return model.eval()
    if name in T5_CONFIGS:
        cfg = transformers.T5Config(**T5_CONFIGS[name])
        model = transformers.T5ForConditionalGeneration(cfg)
        if not T5_CONFIGS[name].get("tie_word_embeddings", True):
            # transformers 5 ties lm_head at init; real v1.1 checkpoints have their own.
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIGS[name]))
    return model.eval()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """{name: (torch_model, directory)} for every tiny reference configuration."""
    out = {}
    for name in list(T5_CONFIGS) + list(GPT2_CONFIGS) + list(BERT_CONFIGS):
        model = make_torch_model(name)
        directory = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(directory)
        out[name] = (model, directory)
    return out


@pytest.fixture(scope="session")
def loaded(saved_models):
    """{name: (torch_model, ptjax.Model)} in float32."""
    return {k: (m, ptjax.load_model(d)) for k, (m, d) in saved_models.items()}


def padded_batch(rng, batch, length, vocab, lengths, left=False, low=2):
    """Random ids [B, L] and a 0/1 mask with the given real lengths (pads = id 0)."""
    ids = rng.integers(low, vocab, (batch, length))
    mask = np.zeros((batch, length), np.int64)
    for i, n in enumerate(lengths):
        if left:
            mask[i, length - n:] = 1
        else:
            mask[i, :n] = 1
    return np.where(mask == 1, ids, 0), mask


@pytest.fixture(scope="session")
def t5_tokenizer():
    return train_tokenizer("t5")


# Fixtures built with PyTorch: a test that takes one is a `torch` test.
TORCH_FIXTURES = {"saved_models", "loaded", "t5_odd"}


def pytest_sessionstart(session):
    """Trim the tests' compilation cache to CACHE_LIMIT bytes, the oldest entries first (in
    the controller: xdist's workers start after it)."""
    path = os.environ["PTJAX_COMPILATION_CACHE"]
    if os.environ.get("PYTEST_XDIST_WORKER") or not os.path.isdir(path or ""):
        return
    entries = sorted(os.scandir(path), key=lambda e: e.stat().st_mtime, reverse=True)
    kept = 0
    for entry in entries:
        kept += entry.stat().st_size
        if kept > CACHE_LIMIT:
            os.remove(entry.path)


def pytest_collection_modifyitems(config, items):
    """Without torch only the `torch` tests are skipped (by name), never the suite; with
    one device the `mesh` tests are skipped, saying how to run them."""
    for item in items:
        if TEST_DEVICES < 8 and item.get_closest_marker("mesh"):
            item.add_marker(pytest.mark.skip(reason="needs 8 CPU devices: "
                                                    "PTJAX_TEST_DEVICES=8 (as `make test` runs "
                                                    "the `mesh` tests)"))
        if TORCH_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.torch)
        if torch is None and item.get_closest_marker("torch"):
            item.add_marker(pytest.mark.skip(reason="needs PyTorch, the reference side "
                                                    "(`make test` installs it)"))
