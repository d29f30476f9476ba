"""Serving several tasks on one frozen model: mixed-task batches against the same
requests served one run at a time, side by side in one process (the paper's claim that
a batch of many tasks' rows costs about what a batch of one task's does).

    nice python benchmarks/serve.py --model tiny-t5
    nice python benchmarks/serve.py --model t5-small      # random weights of that shape
    python benchmarks/serve.py --model t5-base --requests 256 --sizes 32,64,128  # a GPU

Runs are built in memory on one frozen model (random prompts, prefixes and P-tuning
encoders: the cost does not depend on what they learned), of different methods and
prompt lengths, in groups (rank and decoded rows batch separately in ``ptjax serve``):

  prompt:   the paper's case: prompt tuning (P=20) on three tasks (sentiment, shifted
            sentiment, QA ranked over 6 colours)
  rank:     prompt tuning (P=20) on sentiment, P-tuning (P=10) with a verbalizer on the
            shifted sentiment task, prefix tuning (P=5) on QA ranked over 6 colours
  generate: prompt tuning (P=20) and prefix tuning (P=5) on QA decoded greedily

Each group's requests (``--requests`` per run, the runs' dev examples, arriving
interleaved) are answered through ``MultiRun.answer`` with ``ptjax serve``'s fixed
buckets (``MultiRun.buckets`` of ``--sizes``, all compiled before timing) two ways, in
batches as ``ptjax serve`` makes them under load (the next requests while their rows fit
in the largest size):

  mixed:   requests in arrival order, rows of every run together (one ``MultiRun`` of
           the group: widths of its widest run, prompts padded to its longest);
  per run: each run's requests in batches of their own, through a ``MultiRun`` of that
           run alone (its own widths and prompt length), as a server of one run would.

Reported per group and way: requests/s and rows/s over all batches, batch latency
percentiles (ms), and mixed / per-run time. Encoding (tokenization) happens before the
timing, as ``ptjax serve`` does it before a request queues. Rounds alternate the two
ways; each reports its best round. JSON goes to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ptjax import methods  # noqa: E402
from ptjax.config import load_config  # noqa: E402
from ptjax.data.tasks import load_task  # noqa: E402
from ptjax.models.model import Model, init_params  # noqa: E402
from ptjax.models.named import load_run_model  # noqa: E402
from ptjax.models.presets import preset  # noqa: E402
from ptjax.multirun import MultiRun  # noqa: E402
from ptjax.taskdata import dev_task_config  # noqa: E402
from ptjax.trained import TrainedRun  # noqa: E402
from train_step import write_result  # noqa: E402

COLOURS = "[red, green, blue, yellow, black, white]"
VERBALIZER = "{negative: [bad, awful], positive: [good, great]}"
GROUPS = {
    "prompt": {  # the paper's case: prompt tuning only, one prompt length, any tasks
        "sentiment": ["method.name=prompt", "prompt.length=20"],
        "sentiment-shifted": ["method.name=prompt", "prompt.length=20",
                              "task.name=synthetic_sentiment_shifted"],
        "qa-rank": ["method.name=prompt", "prompt.length=20", "task.name=synthetic_qa",
                    f"task.labels={COLOURS}", "task.eval_mode=rank"],
    },
    "rank": {
        "prompt-sentiment": ["method.name=prompt", "prompt.length=20"],
        "ptuning-verbalizer": ["method.name=ptuning", "prompt.length=10",
                               "task.name=synthetic_sentiment_shifted",
                               f"task.verbalizer={VERBALIZER}"],
        "prefix-qa-rank": ["method.name=prefix", "prompt.length=5", "task.name=synthetic_qa",
                           f"task.labels={COLOURS}", "task.eval_mode=rank"],
    },
    "generate": {
        "prompt-qa": ["method.name=prompt", "prompt.length=20", "task.name=synthetic_qa"],
        "prefix-qa": ["method.name=prefix", "prompt.length=5", "task.name=synthetic_qa",
                      "task.max_input_length=48"],
    },
}


def frozen_model(name: str, tiny_dir: str):
    """The tiny T5 (its own weights), or a preset's shape with random weights and the
    tiny T5's tokenizer (ids within any T5 vocabulary; no download)."""
    tiny = load_run_model(load_config(None, ["model.path=tiny-t5",
                                             f"model.tiny_dir={tiny_dir}"]).model)
    if name == "tiny-t5":
        return tiny
    cfg = preset(name)
    params = init_params(Model(config=cfg, params=None).module(), jax.random.key(0))
    return Model(config=cfg, params=params, tokenizer=tiny.tokenizer)


def build_run(model, name: str, overrides, tiny_dir: str, seed: int) -> TrainedRun:
    """A run in memory: the method's initial members (random), no checkpoint."""
    cfg = load_config(None, [f"run_dir={name}", "model.path=tiny-t5",
                             f"model.tiny_dir={tiny_dir}", "task.max_input_length=32",
                             "task.max_target_length=6", "task.dev_size=64",
                             "method.prefix.hidden=64", "method.ptuning.hidden=64",
                             f"prompt.seeds=[{seed}]", *overrides])
    method = methods.build(cfg, model.config, model.dtype)
    task = load_task(dev_task_config(cfg), splits=("train", "validation"))
    members = jax.tree.map(jax.numpy.asarray, method.init(model, cfg, task))
    return TrainedRun(name, cfg, model, method, members, 0)


def requests_of(multi: MultiRun, n: int) -> list:
    """n dev examples of each run, interleaved (run 0's first, run 1's first, ...)."""
    per = []
    for i, run in enumerate(multi.runs):
        exs = multi._task(run, "validation").split("validation")
        per.append([{"run": i, "inputs": exs[j % len(exs)]["inputs"],
                     "fields": exs[j % len(exs)].get("fields") or {}} for j in range(n)])
    return [r for group in zip(*per) for r in group]


def timed(multi: MultiRun, batches, buckets) -> dict:
    """Each batch of prepared requests answered (host arrays back) -> timings."""
    times, rows = [], 0
    for batch in batches:
        t0 = time.perf_counter()
        multi.answer(batch, buckets=buckets)
        times.append(time.perf_counter() - t0)
        rows += sum(len(next(iter(p.arrays.values()))) for p in batch)
    total = sum(times)
    ms = np.asarray(times) * 1e3
    n = sum(len(b) for b in batches)
    return {"seconds": total, "requests": n, "rows": rows, "batches": len(batches),
            "requests_per_s": n / total, "rows_per_s": rows / total, **latency(ms),
            "batch_ms": ms.tolist()}


def latency(ms) -> dict:
    return {f"batch_p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def chunks(prepared, max_rows: int) -> list:
    """Requests in arrival order, batched as ``ptjax serve``'s batcher does under load:
    each batch takes the next requests while their rows fit in ``max_rows``."""
    out, rows = [[]], 0
    for p in prepared:
        n = len(next(iter(p.arrays.values())))
        if rows + n > max_rows:
            out.append([])
            rows = 0
        out[-1].append(p)
        rows += n
    return out


def run_group(model, group: str, a, tiny_dir: str) -> dict:
    runs = [build_run(model, name, o, tiny_dir, seed)
            for seed, (name, o) in enumerate(GROUPS[group].items())]
    mixed = MultiRun(runs)
    alone = [MultiRun([run]) for run in runs]
    reqs = requests_of(mixed, a.requests)
    prepared = [mixed.prepare([r])[0] for r in reqs]
    # the same requests for each run's own MultiRun (run index 0 there)
    own = [[m.prepare([{**r, "run": 0}])[0] for r in reqs if r["run"] == i]
           for i, m in enumerate(alone)]
    sizes = a.sizes
    t0 = time.perf_counter()
    buckets = mixed.buckets(sizes)
    mixed.warm_up(buckets)
    own_buckets = [m.buckets(sizes) for m in alone]
    for m, b in zip(alone, own_buckets):
        m.warm_up(b)
    warm_s = time.perf_counter() - t0
    best = {}
    for _ in range(a.rounds):  # alternated, so a busy machine hurts both alike
        r = timed(mixed, chunks(prepared, sizes[-1]), buckets)
        if "mixed" not in best or r["seconds"] < best["mixed"]["seconds"]:
            best["mixed"] = r
        parts = [timed(m, chunks(p, sizes[-1]), b) for m, p, b in zip(alone, own,
                                                                       own_buckets)]
        total = sum(p["seconds"] for p in parts)
        n, rows = sum(p["requests"] for p in parts), sum(p["rows"] for p in parts)
        r = {"seconds": total, "requests": n, "rows": rows,
             "batches": sum(p["batches"] for p in parts), "requests_per_s": n / total,
             "rows_per_s": rows / total,
             **latency(np.concatenate([p["batch_ms"] for p in parts])),
             "runs": dict(zip(GROUPS[group], parts))}
        if "per_run" not in best or total < best["per_run"]["seconds"]:
            best["per_run"] = r
    best["mixed_over_per_run_time"] = best["mixed"]["seconds"] / best["per_run"]["seconds"]
    best["batch_sizes"] = list(buckets.sizes)
    best["widths"] = {k: s.widths for k, s in buckets.shapes.items()}
    best["warm_up_s"] = warm_s
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-t5", help="tiny-t5 or a preset (t5-small, ...)")
    p.add_argument("--requests", type=int, default=48, help="requests per run")
    p.add_argument("--sizes", default="8,16,32",
                   help="batch-size buckets in rows; the largest: the rows of a full batch")
    p.add_argument("--groups", default="prompt,rank,generate")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.sizes = sorted(int(x) for x in a.sizes.split(","))
    with tempfile.TemporaryDirectory() as tiny_dir:
        model = frozen_model(a.model, tiny_dir)
        result = {"benchmark": "serve", "date": datetime.date.today().isoformat(),
                  "machine": platform.platform(), "cpus": os.cpu_count(),
                  "device": jax.devices()[0].device_kind, "model": a.model,
                  "command": " ".join(["python", "benchmarks/serve.py", *sys.argv[1:]]),
                  "requests_per_run": a.requests, "batch_sizes": a.sizes,
                  "versions": {"jax": jax.__version__}, "groups": {}}
        for group in a.groups.split(","):
            r = run_group(model, group, a, tiny_dir)
            result["groups"][group] = r
            for way in ("mixed", "per_run"):
                x = r[way]
                print(f"{a.model} {group:8s} {way:8s} {x['requests_per_s']:8.1f} requests/s "
                      f"{x['rows_per_s']:8.1f} rows/s  batch p50 {x['batch_p50_ms']:.1f} ms"
                      f"  p90 {x['batch_p90_ms']:.1f} ms")
            print(f"{a.model} {group:8s} mixed / per-run time "
                  f"{r['mixed_over_per_run_time']:.3f}")
    device = "cpu" if jax.devices()[0].platform == "cpu" else jax.devices()[0].platform
    write_result(result, a.out, f"serve-{result['date']}-{device}-{a.model}.json")


if __name__ == "__main__":
    main()
