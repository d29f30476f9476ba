"""Checkpoint formats and loading errors of ``ptjax.load_model``.

Tiny random Hugging Face PyTorch models are saved in every format ptjax reads (sharded
safetensors, Hugging Face's Flax ``flax_model.msgpack``, ``pytorch_model.bin``, bfloat16
safetensors) and ptjax's logits are compared with the PyTorch reference. Every bad input
must raise a one-line ``PtjaxError`` that names the thing at fault. No network is used.
"""
import copy
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402
from flax import serialization  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import ptjax  # noqa: E402
from ptjax import PtjaxError  # noqa: E402
from ptjax.models import checkpoint_files  # noqa: E402

ATOL = 1e-4
VOCAB = 64

T5_CONFIG = dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                 decoder_start_token_id=0, relative_attention_num_buckets=8)
GPT2_CONFIG = dict(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                   bos_token_id=0, eos_token_id=0)

# ------------------------------------------------------------------ reference models


def _inputs(family: str):
    """Fixed ids [2, 7] with a right-padded second row, and T5 decoder ids [2, 4]."""
    rng = np.random.default_rng(0)
    ids = rng.integers(2, VOCAB, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, 5:] = 0
    ids = np.where(mask == 1, ids, 0)
    dec = rng.integers(2, VOCAB, (2, 4))
    dec[:, 0] = 0  # decoder_start_token_id
    return ids, mask, (dec if family == "t5" else None)


def _torch_logits(model, family: str) -> np.ndarray:
    ids, mask, dec = _inputs(family)
    kw = {"decoder_input_ids": torch.tensor(dec)} if family == "t5" else {}
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    return out.logits.float().numpy()


def _assert_logits_match(model: ptjax.Model, ref: np.ndarray, family: str):
    ids, mask, dec = _inputs(family)
    kw = {"decoder_input_ids": jnp.asarray(dec)} if family == "t5" else {}
    got = np.asarray(model.logits(model.params, jnp.asarray(ids),
                                  attention_mask=jnp.asarray(mask), **kw))
    assert got.shape == ref.shape
    if family == "gpt2":  # compare real (non-pad) positions only
        keep = mask.astype(bool)
        got, ref = got[keep], ref[keep]
    err = np.max(np.abs(got - ref))
    assert err <= ATOL, f"max abs logits error {err:.3g} > {ATOL}"


def _make_torch_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_CONFIG))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIG))
    return model.eval()


class Ref:
    """A torch model, its save_pretrained directory and its reference logits."""

    def __init__(self, family, model, directory):
        self.family, self.model, self.directory = family, model, directory
        self.logits = _torch_logits(model, family)

    def state_dict(self) -> dict:
        """The tensors save_pretrained wrote (tied duplicates already dropped), cloned."""
        return {k: v.clone() for k, v in
                load_file(os.path.join(self.directory, "model.safetensors")).items()}

    def copy_config(self, directory) -> str:
        os.makedirs(directory, exist_ok=True)
        shutil.copy(os.path.join(self.directory, "config.json"), directory)
        return str(directory)


def _make_ref(family, tmp_path_factory) -> Ref:
    model = _make_torch_model(family)
    directory = tmp_path_factory.mktemp(f"{family}_saved")
    model.save_pretrained(str(directory))
    return Ref(family, model, str(directory))


@pytest.fixture(scope="module")
def t5_ref(tmp_path_factory) -> Ref:
    return _make_ref("t5", tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2_ref(tmp_path_factory) -> Ref:
    return _make_ref("gpt2", tmp_path_factory)


@pytest.fixture(scope="module", params=["t5", "gpt2"])
def ref(request) -> Ref:
    return request.getfixturevalue(f"{request.param}_ref")


def _error(excinfo) -> str:
    """The error's message, checked to be exactly one line."""
    msg = str(excinfo.value)
    assert "\n" not in msg, f"PtjaxError message is not one line: {msg!r}"
    assert msg.strip()
    return msg


# ------------------------------------------------------------------ formats


def test_sharded_safetensors_logits_match(ref, tmp_path):
    directory = tmp_path / "sharded"
    ref.model.save_pretrained(str(directory), max_shard_size="20KB")
    files = os.listdir(directory)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len(shards) > 1, files
    index = json.load(open(directory / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)

    assert checkpoint_files.Weights(str(directory)).filename == "model.safetensors.index.json"
    model = ptjax.load_model(str(directory))
    _assert_logits_match(model, ref.logits, ref.family)


_FLAX_EMBEDDINGS = ("shared", "wte", "wpe", "relative_attention_bias")


def _to_flax_tree(state: dict, family: str) -> dict:
    """A torch state dict in Hugging Face's Flax naming and layout (nested by name parts).

    2-D Linear / Conv1D weights -> ``kernel`` = weight.T; embeddings -> ``embedding``;
    GPT-2 LayerNorm weight -> ``scale`` (T5's layer norms keep ``weight``); biases stay.
    Tied copies (T5's embed_tokens / lm_head, GPT-2's lm_head) are not stored, as in the
    Flax models' own checkpoints.
    """
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    tree = {}
    for key, tensor in state.items():
        if key in tied:
            continue
        *prefix, leaf = key.split(".")
        value = tensor.detach().float().numpy()
        if leaf == "weight":
            if prefix[-1] in _FLAX_EMBEDDINGS:
                leaf = "embedding"
            elif value.ndim == 2:
                leaf, value = "kernel", value.T
            elif family == "gpt2":
                leaf = "scale"
        node = tree
        for part in prefix:
            node = node.setdefault(part, {})
        assert leaf not in node, key
        node[leaf] = np.ascontiguousarray(value)
    return tree


def _write_msgpack(ref: Ref, directory) -> str:
    directory = ref.copy_config(directory)
    tree = _to_flax_tree(ref.model.state_dict(), ref.family)
    with open(os.path.join(directory, "flax_model.msgpack"), "wb") as f:
        f.write(serialization.msgpack_serialize(tree))
    return directory


def test_flax_msgpack_logits_match(ref, tmp_path):
    directory = _write_msgpack(ref, tmp_path / "flax")
    assert sorted(os.listdir(directory)) == ["config.json", "flax_model.msgpack"]
    # Spot-check that the file really is in Flax naming (what Hugging Face writes).
    tree = serialization.msgpack_restore(open(os.path.join(directory, "flax_model.msgpack"),
                                              "rb").read())
    if ref.family == "t5":
        assert "embedding" in tree["shared"]
        attn = tree["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]
        assert set(attn) == {"q", "k", "v", "o", "relative_attention_bias"}
        assert set(attn["q"]) == {"kernel"}
        assert set(tree["encoder"]["final_layer_norm"]) == {"weight"}
    else:
        assert set(tree) == {"transformer"}
        assert set(tree["transformer"]["ln_f"]) == {"scale", "bias"}
        assert tree["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (48, 16)

    assert checkpoint_files.Weights(directory).filename == "flax_model.msgpack"
    model = ptjax.load_model(directory)
    _assert_logits_match(model, ref.logits, ref.family)


def _write_torch_bin(ref: Ref, directory) -> str:
    directory = ref.copy_config(directory)
    torch.save(ref.model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    return directory


@pytest.fixture(scope="module")
def t5_bin_dir(t5_ref, tmp_path_factory) -> str:
    return _write_torch_bin(t5_ref, tmp_path_factory.mktemp("t5_bin"))


def test_pytorch_bin_logits_match(ref, tmp_path):
    directory = _write_torch_bin(ref, tmp_path / "bin")
    assert sorted(os.listdir(directory)) == ["config.json", "pytorch_model.bin"]
    assert checkpoint_files.Weights(directory).filename == "pytorch_model.bin"
    model = ptjax.load_model(directory)
    _assert_logits_match(model, ref.logits, ref.family)


def test_sharded_pytorch_bin_logits_match(gpt2_ref, tmp_path):
    """pytorch_model.bin.index.json with two shards, each read and merged."""
    directory = gpt2_ref.copy_config(tmp_path / "bin_sharded")
    state = gpt2_ref.model.state_dict()
    keys = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, os.path.join(directory, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    model = ptjax.load_model(directory)
    _assert_logits_match(model, gpt2_ref.logits, "gpt2")


def test_bfloat16_safetensors_loads_as_bf16(t5_ref, tmp_path):
    bf16 = copy.deepcopy(t5_ref.model).to(torch.bfloat16)
    directory = tmp_path / "bf16"
    bf16.save_pretrained(str(directory))
    from safetensors import safe_open
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("shared.weight").dtype == torch.bfloat16

    model = ptjax.load_model(str(directory), dtype="bfloat16")
    leaves = jax.tree.leaves(model.params)
    assert leaves and all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    assert model.dtype == jnp.bfloat16
    # Weights are the checkpoint's bf16 values exactly (no detour that rounds them).
    np.testing.assert_array_equal(
        np.asarray(model.params["shared"]["embedding"], np.float32),
        bf16.shared.weight.detach().float().numpy())
    # The forward runs in bf16 and still tracks the fp32 reference loosely.
    ids, mask, dec = _inputs("t5")
    got = np.asarray(model.logits(model.params, jnp.asarray(ids),
                                  attention_mask=jnp.asarray(mask),
                                  decoder_input_ids=jnp.asarray(dec)))
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    assert np.max(np.abs(got - t5_ref.logits)) < 0.05 * max(1.0, np.abs(t5_ref.logits).max())


def test_tokenizer_is_none_without_tokenizer_files(ref):
    assert not any(os.path.exists(os.path.join(ref.directory, f))
                   for f in checkpoint_files.TOKENIZER_FILES)
    model = ptjax.load_model(ref.directory)
    assert model.tokenizer is None
    _assert_logits_match(model, ref.logits, ref.family)


# ------------------------------------------------------------------ errors


def test_error_nonexistent_local_path(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(PtjaxError, match=re.escape(path)) as excinfo:
        ptjax.load_model(path)
    assert "no such directory" in _error(excinfo)


def test_error_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    with pytest.raises(PtjaxError, match="'llama'") as excinfo:
        ptjax.load_model(str(tmp_path))
    msg = _error(excinfo)
    assert "config.json" in msg
    assert all(re.search(rf"\b{t}\b", msg) for t in ("t5", "gpt2", "bert", "roberta")), msg


def test_error_missing_weight_names_key(t5_ref, tmp_path):
    missing = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
    state = t5_ref.state_dict()
    del state[missing]
    directory = t5_ref.copy_config(tmp_path / "missing")
    save_file(state, os.path.join(directory, "model.safetensors"))
    with pytest.raises(PtjaxError, match=re.escape(repr(missing))) as excinfo:
        ptjax.load_model(directory)
    msg = _error(excinfo)
    assert "missing" in msg and "model.safetensors" in msg
    assert "(16, 32)" in msg  # the shape it should have had


def test_error_missing_weight_gpt2(gpt2_ref, tmp_path):
    missing = "transformer.h.1.mlp.c_fc.weight"
    state = gpt2_ref.state_dict()
    del state[missing]
    directory = gpt2_ref.copy_config(tmp_path / "missing")
    save_file(state, os.path.join(directory, "model.safetensors"))
    # ptjax reports GPT-2 names without the "transformer." prefix.
    with pytest.raises(PtjaxError, match=re.escape("h.1.mlp.c_fc.weight")) as excinfo:
        ptjax.load_model(directory)
    assert "missing" in _error(excinfo)


def test_error_misshaped_weight_names_key_and_shapes(t5_ref, tmp_path):
    key = "encoder.block.1.layer.1.DenseReluDense.wi.weight"
    state = t5_ref.state_dict()
    assert tuple(state[key].shape) == (32, 16)
    state[key] = torch.zeros(31, 16)
    directory = t5_ref.copy_config(tmp_path / "misshaped")
    save_file(state, os.path.join(directory, "model.safetensors"))
    with pytest.raises(PtjaxError, match=re.escape(repr(key))) as excinfo:
        ptjax.load_model(directory)
    msg = _error(excinfo)
    assert "(31, 16)" in msg and "(32, 16)" in msg, msg


def test_error_torch_bin_without_torch(t5_bin_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` -> ImportError
    with pytest.raises(PtjaxError, match="install torch") as excinfo:
        ptjax.load_model(t5_bin_dir)
    assert "pytorch_model.bin" in _error(excinfo)


def test_safetensors_preferred_over_torch_bin_without_torch(t5_ref, tmp_path, monkeypatch):
    """A stray pytorch_model.bin next to model.safetensors needs no torch: safetensors wins."""
    directory = tmp_path / "both"
    shutil.copytree(t5_ref.directory, directory)
    torch.save({"garbage": torch.zeros(1)}, directory / "pytorch_model.bin")
    expected = t5_ref.state_dict()["shared.weight"].numpy()
    monkeypatch.setitem(sys.modules, "torch", None)
    assert checkpoint_files.Weights(str(directory)).filename == "model.safetensors"
    model = ptjax.load_model(str(directory))
    np.testing.assert_array_equal(np.asarray(model.params["shared"]["embedding"]), expected)


def test_torch_bin_loads_with_torch(t5_bin_dir, t5_ref):
    """The same directory loads once torch is importable (the error above is not sticky)."""
    model = ptjax.load_model(t5_bin_dir)
    _assert_logits_match(model, t5_ref.logits, "t5")


def test_error_config_without_weights(t5_ref, tmp_path):
    directory = t5_ref.copy_config(tmp_path / "noweights")
    with pytest.raises(PtjaxError, match=re.escape(directory)) as excinfo:
        ptjax.load_model(directory)
    msg = _error(excinfo)
    assert "no weights" in msg and "model.safetensors" in msg


def test_error_directory_without_config(t5_ref, tmp_path):
    directory = tmp_path / "noconfig"
    directory.mkdir()
    shutil.copy(os.path.join(t5_ref.directory, "model.safetensors"), directory)
    with pytest.raises(PtjaxError, match="config.json") as excinfo:
        ptjax.load_model(str(directory))
    assert str(directory) in _error(excinfo)


def test_error_invalid_dtype(t5_ref):
    with pytest.raises(PtjaxError, match="'int8'") as excinfo:
        ptjax.load_model(t5_ref.directory, dtype="int8")
    msg = _error(excinfo)
    assert "float32" in msg and "bfloat16" in msg


def test_error_hub_id_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # no local directory of that name can exist
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = "nonexistent-org-xyz/nonexistent-model"
    with pytest.raises(PtjaxError, match=re.escape(repo)) as excinfo:
        ptjax.load_model(repo)
    assert "hub" in _error(excinfo).lower()


def _bad_json(d, src):
    shutil.copy(os.path.join(src, "model.safetensors"), d)
    (d / "config.json").write_text("{not json")


def _truncated_safetensors(d, src):
    (d / "model.safetensors").write_bytes(open(os.path.join(src, "model.safetensors"),
                                               "rb").read()[:1000])


def _garbage_torch_bin(d, src):
    (d / "pytorch_model.bin").write_bytes(b"garbage")


def _garbage_msgpack(d, src):
    (d / "flax_model.msgpack").write_bytes(b"\x00garbage")


def _index_without_shard(d, src):
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}))


@pytest.mark.parametrize("setup, names", [
    pytest.param(_bad_json, "config.json", id="invalid_config_json"),
    pytest.param(_truncated_safetensors, "model.safetensors",
                 id="truncated_safetensors"),
    pytest.param(_garbage_torch_bin, "pytorch_model.bin", id="garbage_torch_bin"),
    pytest.param(_garbage_msgpack, "flax_model.msgpack", id="garbage_msgpack"),
    pytest.param(_index_without_shard, "model-00001-of-00002.safetensors",
                 id="index_names_missing_shard"),
])
def test_error_corrupt_checkpoint_file(t5_ref, tmp_path, setup, names):
    directory = tmp_path / "corrupt"
    t5_ref.copy_config(directory)
    setup(directory, t5_ref.directory)
    with pytest.raises(PtjaxError, match=re.escape(names)) as excinfo:
        ptjax.load_model(str(directory))
    _error(excinfo)


def test_config_json_that_is_not_an_object(t5_ref, tmp_path):
    directory = tmp_path / "listconfig"
    directory.mkdir()
    (directory / "config.json").write_text("[1, 2]")
    with pytest.raises(PtjaxError, match="must hold a JSON object, got list") as excinfo:
        ptjax.load_model(str(directory))
    _error(excinfo)


def test_legacy_untied_t5_without_lm_head_is_an_error(tmp_path):
    """An old v1.1 config (tie_word_embeddings false) promises an lm_head: a checkpoint that
    lost it must fail, not silently project with the input embedding."""
    from ptjax.models.tiny import build_tiny_model

    path = build_tiny_model(str(tmp_path / "tiny"), family="t5")  # untied v1.1-style
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg.pop("scale_decoder_outputs")
    cfg["tie_word_embeddings"] = False
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    ptjax.load_model(path)  # still loads with its head
    from safetensors.numpy import load_file, save_file

    state = load_file(os.path.join(path, "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, os.path.join(path, "model.safetensors"))
    with pytest.raises(PtjaxError, match="missing weight 'lm_head.weight'") as excinfo:
        ptjax.load_model(path)
    _error(excinfo)


def test_unreachable_hub_fails_at_once_or_reads_the_cache(monkeypatch, tmp_path, saved_models):
    """No network and no HF_HUB_OFFLINE: a hub id is one line within seconds (not after
    huggingface_hub's ~25 s of retries), and a checkpoint already in the Hugging Face
    cache still loads."""
    import socket
    import time

    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    t0 = time.perf_counter()
    with pytest.raises(PtjaxError, match="google/t5-small-lm-adapt: not a local directory, "
                                         "not in the Hugging Face cache, and huggingface.co "
                                         "is not reachable"):
        ptjax.load_model("google/t5-small-lm-adapt")
    assert time.perf_counter() - t0 < 5
    # the same repository, already downloaded: read from the cache
    snapshot = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(saved_models["gpt2"][1], snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    assert ptjax.load_model("acme/tiny").config.n_layer == 2
