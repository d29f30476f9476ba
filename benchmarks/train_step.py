"""Prompt-tuning train step: ptjax vs Hugging Face PEFT, side by side in one run.

    python benchmarks/train_step.py --model t5-small --batch 8 --input-length 128 \
        --target-length 8 --prompt-length 20 --steps 10

Both frameworks train the same T5 shape (random weights, the paper's Adafactor, dropout
0.1) on the same synthetic batch; each runs in its own subprocess so its peak memory is its
own. Reported per framework: examples/s, tokens/s, model FLOPs utilisation and peak memory;
then the ptjax / PEFT throughput ratio. Results go to benchmarks/results/ as JSON.

FLOPs per example (``model_flops``, the README's formula): forward = 2 x non-embedding
params x tokens for each stack it runs over (encoder over prompt + input tokens; decoder
self-attention and MLP over target tokens; cross-attention q/o over target tokens and k/v
over encoder tokens; the output projection over target tokens) + attention scores
(2 x 2 x query tokens x key tokens x heads x d_kv per attention); prompt tuning doubles it
for the activation gradients and has no weight gradients.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bf16 / fp32 peak TFLOP/s per device, from the vendors' data sheets.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4, "float32": 66.9},
    "NVIDIA H200": {"bfloat16": 989.4, "float32": 66.9},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 19.5},
}


def write_result(result: dict, out: str | None, name: str) -> str:
    """Write a benchmark's JSON to ``out`` or benchmarks/results/NAME (spaces -> _)."""
    path = out or os.path.join(ROOT, "benchmarks", "results", name.replace(" ", "_"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written to {os.path.relpath(path, ROOT)}")
    return path


def model_flops(cfg, batch: int, input_length: int, target_length: int,
                prompt_length: int) -> float:
    """Model FLOPs of one prompt-tuning train step (forward + activation gradients)."""
    d, dkv, h, ff = cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff
    attn_proj = 4 * d * h * dkv  # q, k, v, o
    mlp = (3 if cfg.is_gated else 2) * d * ff
    S, T = prompt_length + input_length, target_length
    enc = cfg.num_layers * (2 * (attn_proj + mlp) * S + 4 * S * S * h * dkv)
    dec = cfg.num_decoder_layers * (
        2 * (attn_proj + mlp) * T + 4 * T * T * h * dkv  # self-attention, MLP
        + 2 * (2 * d * h * dkv) * T + 2 * (2 * d * h * dkv) * S  # cross q/o, cross k/v
        + 4 * T * S * h * dkv)  # cross-attention scores
    head = 2 * d * cfg.vocab_size * T
    return 2.0 * batch * (enc + dec + head)


def _batch_np(batch, input_length, target_length, vocab, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (batch, input_length)).astype(np.int32)
    tgt = rng.integers(2, vocab, (batch, target_length)).astype(np.int32)
    dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1)
    return dict(input_ids=ids, input_mask=np.ones_like(ids), decoder_input_ids=dec,
                targets=tgt, target_mask=np.ones_like(tgt))


def run_ptjax(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ptjax.config import OptimConfig
    from ptjax.methods import for_model
    from ptjax.models.model import Model, init_params
    from ptjax.models.presets import preset
    from ptjax.optim import make_optimizer, per_prompt
    from ptjax.train import init_state, make_train_step

    cfg = preset(a.model)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[a.dtype]
    params = init_params(Model(config=cfg, params=None).module(), jax.random.key(0))
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    model = Model(config=cfg, params=params, dtype=dtype, remat=a.remat,
                  attention=a.attention)
    tx = per_prompt(make_optimizer(OptimConfig(), 30000))
    table = jax.random.uniform(jax.random.key(1), (a.prompts, a.prompt_length, cfg.d_model),
                               minval=-0.5, maxval=0.5)
    state = init_state(tx, {"prompt": table}, 0)
    step = make_train_step(model, for_model(model), tx, dropout=a.dropout,
                           attention_dropout=a.attention_dropout, prng=a.prng,
                           dropout_broadcast=a.dropout_broadcast)
    batch = {k: jnp.asarray(v) for k, v in _batch_np(a.batch, a.input_length,
                                                   a.target_length, cfg.vocab_size).items()}
    t0 = time.perf_counter()
    compiled = step.lower(state, params, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    for _ in range(a.warmup):
        state, m = step(state, params, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        state, m = step(state, params, batch)
    jax.block_until_ready(m)
    seconds = (time.perf_counter() - t0) / a.steps
    assert np.all(np.isfinite(np.asarray(m["loss"])))
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"framework": "ptjax", "step_s": seconds, "compile_s": compile_s,
            "xla_flops": float(cost.get("flops", 0.0)),
            "peak_bytes": stats.get("peak_bytes_in_use"),
            "device": jax.devices()[0].device_kind, "versions": {"jax": jax.__version__}}


def run_peft(a, config=None) -> dict:
    import peft
    import torch
    import transformers

    from ptjax.models.presets import preset

    cfg = config or preset(a.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hf = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, feed_forward_proj=cfg.feed_forward_proj,
        tie_word_embeddings=False, dropout_rate=a.dropout, decoder_start_token_id=0)
    base = transformers.T5ForConditionalGeneration(hf)
    if a.dtype == "bfloat16":
        base = base.to(torch.bfloat16)  # frozen weights in bf16; the prompt stays fp32
    model = peft.get_peft_model(base, peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=a.prompt_length,
        num_transformer_submodules=1)).to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = transformers.optimization.Adafactor(
        trainable, lr=0.3, scale_parameter=False, relative_step=False, warmup_init=False,
        decay_rate=-0.8, clip_threshold=1.0, weight_decay=1e-5)
    b = {k: torch.tensor(v, dtype=torch.long, device=device)
         for k, v in _batch_np(a.batch, a.input_length, a.target_length,
                               cfg.vocab_size).items()}

    def step():
        out = model(input_ids=b["input_ids"], attention_mask=b["input_mask"],
                    decoder_input_ids=b["decoder_input_ids"], labels=b["targets"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        loss = step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - t0) / a.steps
    assert torch.isfinite(loss).item()
    return {"framework": "peft", "step_s": seconds,
            "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "versions": {"torch": torch.__version__, "peft": peft.__version__,
                         "transformers": transformers.__version__}}


# ptjax variants measured beside ptjax in one run (--frameworks): what each dropout choice
# costs against the defaults. ptjax-previous is the step before train.attention_dropout
# existed: einsum attention with the probabilities dropped at --dropout (None below).
VARIANTS = {
    "ptjax-previous": dict(attention="einsum", attention_dropout=None),
    "ptjax-rbg": dict(prng="rbg"),
    "ptjax-unsafe_rbg": dict(prng="unsafe_rbg"),
    "ptjax-broadcast": dict(dropout_broadcast=True),
    "ptjax-nodropout": dict(dropout=0.0),  # the floor: what hidden dropout costs in all
}


def _child(a):
    import resource

    for key, value in VARIANTS.get(a.framework, {}).items():
        setattr(a, key, a.dropout if value is None else value)
    result = (run_peft if a.framework == "peft" else run_ptjax)(a)
    result["framework"] = a.framework
    if result["peak_bytes"] is None:  # CPU: the process's peak resident memory
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="t5-small", help="t5-small | t5-base | ... | t5-xxl")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-length", type=int, default=128)
    p.add_argument("--target-length", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=20)
    p.add_argument("--prompts", type=int, default=1, help="K prompts (ptjax only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--dropout", type=float, default=0.1, help="hidden dropout (both)")
    p.add_argument("--attention-dropout", type=float, default=0.0,
                   help="ptjax's attention-probability dropout (train.attention_dropout; "
                   "PEFT always uses --dropout there too)")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "einsum"],
                   help="ptjax's attention path (model.attention)")
    p.add_argument("--prng", default="threefry", choices=["threefry", "rbg", "unsafe_rbg"])
    p.add_argument("--dropout-broadcast", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU where the device is not in the table")
    p.add_argument("--frameworks", default="ptjax,peft",
                   help="any of ptjax, peft and the ptjax variants: ptjax-previous "
                   "(einsum attention with attention dropout = --dropout: ptjax's step "
                   "before the fused path), ptjax-rbg, ptjax-unsafe_rbg (train.prng), "
                   "ptjax-broadcast (train.dropout_broadcast), ptjax-nodropout")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--framework", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.framework:
        return _child(a)

    from ptjax.models.presets import preset

    cfg = preset(a.model)
    flops = model_flops(cfg, a.batch * a.prompts, a.input_length, a.target_length,
                        a.prompt_length)
    rows = []
    load_before = os.getloadavg()  # other processes on the machine skew CPU timings
    for fw in a.frameworks.split(","):
        if fw not in ("ptjax", "peft", *VARIANTS):
            sys.exit(f"--frameworks: unknown {fw!r}; valid: ptjax, peft, {', '.join(VARIANTS)}")
        if fw == "peft" and a.prompts != 1:
            continue
        cmd = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]),
               "--framework", fw]
        out = subprocess.run(cmd, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT))
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{fw} failed:\n{out.stderr[-3000:]}")
        r = json.loads(line[0][len("RESULT "):])
        ours = fw.startswith("ptjax")
        examples = a.batch * (a.prompts if ours else 1)
        r["examples_per_s"] = examples / r["step_s"]
        r["tokens_per_s"] = r["examples_per_s"] * (a.prompt_length + a.input_length +
                                                  a.target_length)
        r["model_flops_per_step"] = flops if ours else flops / a.prompts
        peak = a.peak_tflops or PEAK_TFLOPS.get(r["device"], {}).get(a.dtype)
        r["mfu"] = (r["model_flops_per_step"] / r["step_s"] / (peak * 1e12)) if peak else None
        rows.append(r)
    by = {r["framework"]: r for r in rows}
    ratio = (by["ptjax"]["examples_per_s"] / by["peft"]["examples_per_s"]
             if {"ptjax", "peft"} <= set(by) else None)
    previous = (by["ptjax-previous"]["examples_per_s"] / by["peft"]["examples_per_s"]
                if {"ptjax-previous", "peft"} <= set(by) else None)
    result = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
              "cpu_count": os.cpu_count(), "command": "python benchmarks/train_step.py " +
              " ".join(argv or sys.argv[1:]), "args": {k: v for k, v in vars(a).items()
                                                        if k not in ("framework", "out")},
              "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
              "results": rows, "ptjax_over_peft_throughput": ratio}
    if previous is not None:
        result["ptjax_previous_over_peft_throughput"] = previous
    if "ptjax" in by:  # each variant's step time against the defaults', side by side
        result["step_s_over_ptjax"] = {r["framework"]: r["step_s"] / by["ptjax"]["step_s"]
                                       for r in rows if r["framework"] in VARIANTS}
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['framework']:14s} {r['device']:10s} {r['step_s'] * 1e3:9.1f} ms/step "
              f"{r['examples_per_s']:9.2f} ex/s {r['tokens_per_s']:10.0f} tok/s  MFU {mfu:>6s} "
              f" peak {r['peak_bytes'] / 2 ** 30:6.2f} GiB")
    if ratio:
        print(f"ptjax / PEFT throughput: {ratio:.2f}x")
    if previous:
        print(f"ptjax-previous / PEFT throughput: {previous:.2f}x")
    for fw, x in result.get("step_s_over_ptjax", {}).items():
        print(f"{fw} step time / ptjax: {x:.3f}")
    write_result(result, a.out, f"train_step-{result['date']}-{rows[0]['device']}-{a.model}-"
                 f"b{a.batch}-in{a.input_length}-p{a.prompt_length}-{a.dtype}.json")


if __name__ == "__main__":
    main()
