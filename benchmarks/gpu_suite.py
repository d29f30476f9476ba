"""One-call GPU benchmark: ptjax prompt tuning (and PEFT where it fits) at the paper's
shapes, with a time budget, one subprocess per case (so each peak memory is its own and an
out-of-memory case is recorded and skipped).

    PYTHONPATH=. python3 benchmarks/gpu_suite.py --out $OUT            # ~8 min, one GPU
    PYTHONPATH=. python3 benchmarks/gpu_suite.py --tiny --out /tmp/s   # CPU dry run (tests)

Needs only jax, flax, optax, transformers, torch (+CUDA) and peft: no weights are read
(random weights from the configs), no data set, no tensorflow-datasets or tensorboardX
(each case records whether either got imported).

Cases, in priority order (the budget cuts the tail): t5-base K=1 ptjax / PEFT, the dropout
variants at t5-base (attention dropout 0.1 on the einsum path, the previous default; rbg
masks; T5X broadcast masks), K=5, then t5-large, t5-xl and t5-xxl. Shapes: batch 32, 512
input + 100 prompt tokens, 16 target tokens, bf16, hidden dropout 0.1, Adafactor.
ptjax runs with model.remat=auto: the step is AOT-compiled for none, dots, full in turn
and the first whose memory analysis fits 90% of the device is timed (``plan_bytes`` is
that analysis, what ``ptjax plan`` reports; ``peak_bytes`` what the device measured).

Per case: ms/step, examples/s, MFU (the README's model-FLOPs formula against the chip's
dense bf16 peak), peak memory, compile seconds, plan's estimate, the remat chosen and the
attention path. Everything goes to ``--out``/gpu_suite.json and is printed as a table.

Predictions next to each measured peak (``prediction``, ptjax cases): ``local`` is the
plan for this machine's own device, the memory analysis of the step compiled here (on a
GPU that is the prediction: the device is its own target, no targets extra needed);
``deviceless`` is what ``benchmarks/predict.py`` predicted for the same shape on an H100
without one (the row of ``--predictions``, default the newest
``benchmarks/results/predict-*.json``: T5 1.1 LM-adapted, prompt tuning, K, remat auto,
target ``h100``; only cases at predict.py's settings, attention dropout 0, threefry,
element-wise masks, have one). ``*_over_measured`` divide each by the measured peak.
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
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

PAPER = dict(batch=32, input_length=512, prompt_length=100, target_length=16)
PREDICT_TARGET = "h100"  # the predict.py target whose rows are joined to the cases
TINY = dict(batch=2, input_length=16, prompt_length=4, target_length=4)
LAZY = ("tensorflow_datasets", "tensorboardX", "tensorflow")


def cases(tiny: bool) -> list[dict]:
    """The suite's cases in priority order."""
    if tiny:
        return [dict(name="tiny K=1 ptjax", model="tiny", framework="ptjax", prompts=1),
                dict(name="tiny K=2 ptjax einsum+attn-dropout", model="tiny",
                     framework="ptjax", prompts=2, attention_dropout=0.1),
                dict(name="tiny K=1 peft", model="tiny", framework="peft", prompts=1)]
    out = [dict(model="t5-base", framework="ptjax", prompts=1),
           dict(model="t5-base", framework="peft", prompts=1),
           dict(model="t5-base", framework="ptjax", prompts=1, attention_dropout=0.1),
           dict(model="t5-base", framework="ptjax", prompts=1, prng="rbg"),
           dict(model="t5-base", framework="ptjax", prompts=1, dropout_broadcast=True),
           dict(model="t5-base", framework="ptjax", prompts=5)]
    for size in ("t5-large", "t5-xl"):
        out += [dict(model=size, framework="ptjax", prompts=1),
                dict(model=size, framework="ptjax", prompts=5),
                dict(model=size, framework="peft", prompts=1)]
    out += [dict(model="t5-xxl", framework="ptjax", prompts=1)]
    for c in out:
        extra = [f"{k}={c[k]}" for k in ("attention_dropout", "prng", "dropout_broadcast")
                 if k in c]
        c["name"] = f"{c['model']} K={c['prompts']} {c['framework']}" + (
            f" ({', '.join(extra)})" if extra else "")
    return out


def t5_config(name: str):
    from ptjax.models import t5
    from ptjax.models.presets import preset

    if name == "tiny":
        return t5.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                           num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                           scale_decoder_outputs=False, tie_lm_head=False)
    return preset(name)


def _leaked_imports() -> list[str]:
    return [m for m in LAZY if m in sys.modules]


def run_ptjax(c: dict, shape: dict, steps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ptjax.config import OptimConfig
    from ptjax.methods import for_model
    from ptjax.models.model import Model
    from ptjax.models.attention import resolve
    from ptjax.models.common import ModelOptions
    from ptjax.aot import choose_remat, device_memory_limit
    from ptjax.optim import make_optimizer, per_prompt
    from ptjax.train import init_state, make_train_step
    from train_step import _batch_np

    cfg = t5_config(c["model"])
    dtype = jnp.bfloat16 if c.get("dtype", "bfloat16") == "bfloat16" else jnp.float32
    t0 = time.perf_counter()
    module = Model(config=cfg, params=None).module()

    @jax.jit
    def init(rng):  # random weights straight into the compute dtype
        from flax.linen import meta
        ids = jnp.ones((1, 2), jnp.int32)
        params = meta.unbox(module.init(rng, ids, None, ids)["params"])
        return jax.tree.map(lambda p: p.astype(dtype), params)

    params = init(jax.random.key(0))
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    K, P = c["prompts"], shape["prompt_length"]
    tx = per_prompt(make_optimizer(OptimConfig(), 30000))
    table = jax.random.uniform(jax.random.key(1), (K, P, cfg.d_model), minval=-0.5,
                               maxval=0.5)
    state = init_state(tx, {"prompt": table}, 0)
    batch = {k: jnp.asarray(v) for k, v in _batch_np(
        shape["batch"], shape["input_length"], shape["target_length"],
        cfg.vocab_size).items()}
    limit = device_memory_limit()[0]
    compiled, compile_s = {}, {}

    def peak_of(policy):
        model = Model(config=cfg, params=None, dtype=dtype, remat=policy,
                      attention=c.get("attention", "auto"))
        step = make_train_step(model, for_model(model), tx, dropout=c.get("dropout", 0.1),
                               attention_dropout=c.get("attention_dropout", 0.0),
                               dropout_broadcast=c.get("dropout_broadcast", False),
                               prng=c.get("prng", "threefry"))
        t = time.perf_counter()
        compiled[policy] = step.lower(state, params, batch).compile()
        compile_s[policy] = time.perf_counter() - t
        mem = compiled[policy].memory_analysis()
        return (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)

    remat, plan_peaks = choose_remat(peak_of, limit)
    step = compiled[remat]
    for _ in range(warmup):
        state, m = step(state, params, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, params, batch)
    jax.block_until_ready(m)
    seconds = (time.perf_counter() - t0) / steps
    loss = np.asarray(m["loss"])
    stats = jax.local_devices()[0].memory_stats() or {}
    S = shape["prompt_length"] + shape["input_length"]
    attention = resolve(ModelOptions(attention=c.get("attention", "auto"), right_padded=True),
                        head_dim=cfg.d_kv, dtype=dtype, T=S, S=S,
                        dropout_active=c.get("attention_dropout", 0.0) > 0, cached=False)
    local = {"target": f"{jax.local_device_count()} x {jax.devices()[0].device_kind} "
             "(this machine's device)", "bytes": plan_peaks[remat], "remat": remat,
             "fits": None if limit is None else bool(plan_peaks[remat] <= limit)}
    return {"step_s": seconds, "compile_s": compile_s[remat], "compile_s_all": compile_s,
            "init_s": init_s, "remat": remat, "plan_bytes": plan_peaks[remat],
            "prediction": {"local": local},
            "plan_bytes_tried": plan_peaks, "device_bytes_limit": limit,
            "peak_bytes": stats.get("peak_bytes_in_use"),
            "attention": attention,
            "loss_finite": bool(np.all(np.isfinite(loss))),
            "device": jax.devices()[0].device_kind,
            "versions": {"jax": jax.__version__}, "examples": shape["batch"] * K}


def run_peft(c: dict, shape: dict, steps: int, warmup: int) -> dict:
    import train_step

    cfg = t5_config(c["model"])
    a = argparse.Namespace(model=c["model"], dtype=c.get("dtype", "bfloat16"),
                           prompt_length=shape["prompt_length"], batch=shape["batch"],
                           input_length=shape["input_length"],
                           target_length=shape["target_length"],
                           dropout=c.get("dropout", 0.1), warmup=warmup, steps=steps)
    r = train_step.run_peft(a, config=cfg)
    r["examples"] = shape["batch"]
    return r


def _child(c: dict, shape: dict, steps: int, warmup: int):
    import resource

    try:
        r = (run_ptjax if c["framework"] == "ptjax" else run_peft)(c, shape, steps, warmup)
        if r.get("peak_bytes") is None:  # CPU: the process's peak resident memory
            r["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        r["status"] = "ok"
    except Exception as e:  # an OOM is a result: record it, the suite goes on
        msg = str(e).strip().splitlines()
        r = {"status": "oom" if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in
             str(e).lower() else "error", "error": f"{type(e).__name__}: "
             + (msg[0][:500] if msg else "")}
    r["lazy_imports_leaked"] = _leaked_imports()
    print("RESULT " + json.dumps(r), flush=True)


def _derive(r: dict, c: dict, shape: dict):
    from train_step import PEAK_TFLOPS, model_flops

    cfg = t5_config(c["model"])
    if r.get("status") != "ok":
        return
    flops = model_flops(cfg, r["examples"], shape["input_length"], shape["target_length"],
                        shape["prompt_length"])
    r["ms_per_step"] = r["step_s"] * 1e3
    r["examples_per_s"] = r["examples"] / r["step_s"]
    r["model_flops_per_step"] = flops
    peak = PEAK_TFLOPS.get(r.get("device"), {}).get(c.get("dtype", "bfloat16"))
    r["mfu"] = flops / r["step_s"] / (peak * 1e12) if peak else None
    if r.get("plan_bytes") and r.get("peak_bytes"):
        r["plan_over_measured"] = r["plan_bytes"] / r["peak_bytes"]
    predicted = (r.get("prediction") or {}).get("deviceless") or {}
    if predicted.get("bytes") and r.get("peak_bytes"):
        r["deviceless_over_measured"] = predicted["bytes"] / r["peak_bytes"]


def newest_predictions() -> str | None:
    """The newest ``benchmarks/results/predict-*.json`` (by its name's date), or None."""
    import glob

    found = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "predict-*.json")))
    return found[-1] if found else None


def load_predictions(path: str | None) -> dict:
    """predict.py's results: {"file", "rows"} ({"file", "error"} if unreadable)."""
    if not path:
        return {"file": None, "error": "no benchmarks/results/predict-*.json"}
    try:
        with open(path) as f:
            return {"file": _relative(path), "rows": json.load(f)["rows"]}
    except (OSError, ValueError, KeyError) as e:
        return {"file": path, "error": f"{type(e).__name__}: {e}"}


def deviceless(c: dict, predictions: dict) -> dict:
    """predict.py's deviceless prediction for case ``c``'s shape on one H100 (prompt
    tuning, its K, remat auto), or {"missing": why}."""
    if "error" in predictions:
        return {"file": predictions["file"], "missing": predictions["error"]}
    variant = [k for k in ("attention_dropout", "prng", "dropout_broadcast", "attention",
                           "dtype", "dropout") if k in c]
    if variant:
        return {"file": predictions["file"], "missing": f"{', '.join(variant)}: not at "
                "predict.py's settings"}
    size = c["model"].removeprefix("t5-")
    for row in predictions["rows"]:
        if (row.get("size"), row.get("method"), row.get("prompts"), row.get("target"),
                row.get("remat_setting")) == (size, "prompt", c["prompts"], PREDICT_TARGET,
                                              "auto") and row.get("status") == "ok":
            per_device = row.get("per_device") or {}
            return {"file": predictions["file"], "target": row.get("devices") or
                    PREDICT_TARGET, "bytes": per_device.get("accelerator_peak"),
                    "remat": row.get("remat"), "fits": row.get("fits"),
                    "flops_per_step": row.get("flops_per_step")}
    return {"file": predictions["file"], "missing": f"no row for t5-{size} prompt K="
            f"{c['prompts']} on {PREDICT_TARGET} with remat auto"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_suite.json")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="stop starting cases after this many seconds (default 450)")
    p.add_argument("--case-timeout-s", type=float, default=240.0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", "--dry-run", dest="tiny", action="store_true",
                   help="tiny shapes on any device: checks the suite end to end")
    p.add_argument("--only", default="", help="comma-separated substrings of case names")
    p.add_argument("--predictions", default=None, metavar="JSON",
                   help="benchmarks/predict.py's results to put next to each measured peak "
                   "(default: the newest benchmarks/results/predict-*.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    shape = TINY if a.tiny else PAPER
    if a.tiny:
        a.steps, a.warmup = 1, 1
    if a.child:
        return _child(json.loads(a.child), shape, a.steps, a.warmup)

    start = time.perf_counter()
    predictions = load_predictions(a.predictions or newest_predictions())
    rows = []
    todo = [c for c in cases(a.tiny)
            if not a.only or any(s in c["name"] for s in a.only.split(","))]
    for c in todo:
        left = a.budget_s - (time.perf_counter() - start)
        row = {"case": c["name"], **c}
        if left < 20:
            row.update(status="skipped", error="time budget spent")
            rows.append(row)
            continue
        t0 = time.perf_counter()
        cmd = [sys.executable, os.path.abspath(__file__), "--out", a.out, "--child",
               json.dumps(c), "--steps", str(a.steps), "--warmup", str(a.warmup)] + \
            (["--tiny"] if a.tiny else [])
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                 timeout=min(a.case_timeout_s, left))
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if line:
                row.update(json.loads(line[-1][len("RESULT "):]))
            else:
                tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
                oom = "RESOURCE_EXHAUSTED" in out.stderr or "out of memory" in out.stderr
                row.update(status="oom" if oom else "error",
                           error=f"exit {out.returncode}: " + " | ".join(tail)[-800:])
        except subprocess.TimeoutExpired:
            row.update(status="timeout", error=f"over {min(a.case_timeout_s, left):.0f} s")
        row["wall_s"] = time.perf_counter() - t0
        if c["framework"] == "ptjax":
            row.setdefault("prediction", {})["deviceless"] = deviceless(c, predictions)
        _derive(row, c, shape)
        rows.append(row)
        _print_row(row)
        _write(a, shape, rows, start)  # after every case: a killed suite keeps its results
    path = _write(a, shape, rows, start)
    print(f"written to {path}")


def _print_row(r: dict):
    if r.get("status") != "ok":
        print(f"{r['case']:48s} {r['status']}: {r.get('error', '')[:120]}", flush=True)
        return
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    plan = f"{r['plan_bytes'] / 2 ** 30:.1f}" if r.get("plan_bytes") else "-"
    predicted = (r.get("prediction") or {}).get("deviceless") or {}
    if predicted.get("bytes"):
        plan += f" (deviceless {predicted['bytes'] / 2 ** 30:.1f})"
    print(f"{r['case']:48s} {r['ms_per_step']:8.1f} ms/step {r['examples_per_s']:7.1f} ex/s "
          f"MFU {mfu:>6s} peak {r['peak_bytes'] / 2 ** 30:6.1f} GiB plan {plan} GiB "
          f"compile {r.get('compile_s', 0):5.1f} s remat {r.get('remat', '-')} "
          f"attention {r.get('attention', '-')}", flush=True)


def _relative(path: str | None) -> str | None:
    return None if path is None else os.path.relpath(path, ROOT)


def _write(a, shape, rows, start) -> str:
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "gpu_suite.json")
    result = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
              "command": "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:]),
              "shape": shape, "tiny": a.tiny, "elapsed_s": time.perf_counter() - start,
              "predictions": _relative(a.predictions or newest_predictions()),
              "cases": rows}
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    return path


if __name__ == "__main__":
    main()
