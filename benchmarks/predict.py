"""Predicted per-device memory and FLOPs of the paper's train steps on accelerators this
machine does not have: deviceless compiles (``ptjax.targets``), not measurements.

    JAX_PLATFORMS=cpu .venv-targets/bin/python benchmarks/predict.py --markdown
    JAX_PLATFORMS=cpu .venv-targets/bin/python benchmarks/predict.py --sizes small,base \\
        --targets h100 --methods prompt --markdown                    # a quick subset
    .venv-targets/bin/python benchmarks/predict.py --table benchmarks/results/predict-X.json

Every row is the train step of ``experiments/lester2021/base.yaml`` (T5 1.1 LM-adapted,
bf16 frozen weights, batch 32, inputs 512, targets 16, hidden dropout 0.1, Adafactor) with
``train.attention_dropout=0`` (so cuDNN's fused attention can be chosen on a GPU) and each
method as ``experiments/lester2021/fig1_methods.yaml`` sets it (``METHODS``), compiled for a
target's devices with ``ptjax.plan.compile_plan``: the per-device peak is XLA's memory
analysis of that target's executable, held against the chip's memory; the FLOPs are
``ptjax plan``'s (the step lowered whole, no recomputation); the compile time is this
machine's. ``remat=auto`` is ``model.remat=auto``'s choice (``ptjax.aot.choose_remat``:
none, dots, full, the first within 90% of the memory), made from the same compiles as the
``none`` row, so each policy is compiled once per shape and target.

A TPU compile that does not fit fails inside libtpu ("RESOURCE_EXHAUSTED: ... HLO
temporaries (X) exceeds available HBM"): the row records it as not fitting, with XLA's X
as a lower bound, and ``auto`` moves on to the next policy.

Requires the targets extra (``pip install -e '.[targets]'``, ``make test-targets`` builds
``.venv-targets``). Rows run in priority order (``priority``) and a row that fails records
its one-line error; ``--budget-s`` stops starting rows, ``--jobs 2`` splits the targets over
two processes. The JSON (``--out``, default ``benchmarks/results/predict-<date>.json``) is
rewritten after every row.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASE = os.path.join(ROOT, "experiments", "lester2021", "base.yaml")
SIZES = ("small", "base", "large", "xl", "xxl")
# method: its settings in experiments/lester2021/fig1_methods.yaml (prompt length,
# optimizer; prefix: MLP reparameterisation of width 512)
METHODS = {
    "prompt": ["prompt.length=100", "optim.name=adafactor", "optim.learning_rate=0.3",
               "optim.schedule=constant"],
    "prefix": ["prompt.length=10", "optim.name=adamw", "optim.learning_rate=5e-5",
               "optim.schedule=linear", "method.prefix.hidden=512"],
    "model": ["prompt.length=100", "optim.name=adafactor", "optim.learning_rate=0.001",
              "optim.schedule=constant"],
}
PROMPTS = (1, 5)  # K packed members (model tuning: 1)
REMATS = ("none", "auto")
# name: (ptjax.targets name, topology)
TARGETS = {
    "h100": ("h100", "1"),
    "8xh100": ("h100", "8"),
    "v5e-2x2": ("tpu-v5e", "2x2"),
    "v4-2x2x1": ("tpu-v4", "2x2x1"),
}
# the next slices up, to find the smallest that holds a row that does not fit
LADDER = {"h100": ["1", "2", "4", "8", "2x8"], "h200": ["1", "2", "4", "8", "2x8"],
          "a100": ["1", "2", "4", "8", "2x8"],
          "tpu-v5e": ["1x1", "2x2", "2x4", "4x4"], "tpu-v6e": ["1x1", "2x2", "2x4", "4x4"],
          "tpu-v4": ["1x1x1", "2x2x1", "2x2x2", "2x2x4"],
          "tpu-v5p": ["1x1x1", "2x2x1", "2x2x2", "2x2x4"]}
VERSIONS = ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt",
            "nvidia-cudnn-cu12", "flax", "optax")
GiB = 1024 ** 3
# what a frozen bf16 copy (prompt / prefix) or model tuning's state (fp32 master weights,
# their gradients, the bf16 copy: ~10 bytes a parameter) may take of a device before the
# mesh splits it
SHARE = 0.25


def model_name(size: str) -> str:
    """small -> google/t5-small-lm-adapt; any other name (tiny-t5, a path) as it is."""
    return f"google/t5-{size}-lm-adapt" if size in SIZES else size


def priority(row: dict, targets: list[str]) -> tuple:
    """The order rows run in (a time budget cuts the tail): prompt tuning K=1 on the first
    target (one H100) for every size, then every row of the GPU targets (a deviceless GPU
    compile takes seconds), then the TPU targets' rows for small and base (minutes each),
    then their prompt tuning K=1 and model tuning for the larger sizes, then the rest."""
    size = SIZES.index(row["size"]) if row["size"] in SIZES else -1
    k1 = row["method"] == "prompt" and row["prompts"] == 1
    tpu = _target_name(row["target"]).startswith("tpu")
    tier = (0 if row["target"] == targets[0] and k1 else 1 if not tpu else
            2 if size < 2 else 3 if k1 or row["method"] == "model" else 4)
    return (tier, size, targets.index(row["target"]), list(METHODS).index(row["method"]),
            row["prompts"], REMATS.index(row["remat_setting"]))


def _target_name(target: str) -> str:
    return TARGETS[target][0] if target in TARGETS else target.partition(":")[0]


def matrix(sizes, targets, methods, prompts, remats) -> list[dict]:
    rows = []
    for size in sizes:
        for target in targets:
            for method in methods:
                for K in prompts:
                    if method == "model" and K != 1:
                        continue
                    for remat in remats:
                        rows.append(dict(size=size, model=model_name(size), target=target,
                                         method=method, prompts=K, remat_setting=remat))
    return sorted(rows, key=lambda r: priority(r, targets))


def choose_mesh(n: int, parameters: int, method: str, memory: float) -> tuple[dict, str]:
    """The mesh a row runs on and why. One device: (1, 1). Prompt / prefix tuning: every
    device data-parallel, with the frozen bf16 weights replicated while they take at most
    SHARE of a device, else split tensor-parallel over the fewest model devices (a power of
    two) that brings them under it. Model tuning: data-parallel while its state (fp32
    master weights and gradients, a bf16 copy: ~10 bytes a parameter) takes at most SHARE,
    else FSDP over every device (weights, gradients and optimizer state split over data,
    gathered a layer at a time)."""
    if n == 1:
        return {"data": 1, "model": 1, "fsdp": False}, "one device"
    if method == "model":
        state = 10 * parameters
        if state <= SHARE * memory:
            return ({"data": n, "model": 1, "fsdp": False},
                    f"data-parallel: model tuning's state {state / GiB:.1f} GiB fits a device")
        return ({"data": n, "model": 1, "fsdp": True},
                f"FSDP over {n}: model tuning's state {state / GiB:.1f} GiB (fp32 weights, "
                f"gradients, bf16 copy) split {n} ways")
    weights, m = 2 * parameters, 1
    while m < n and n % (2 * m) == 0 and weights / m > SHARE * memory:
        m *= 2
    if m == 1:
        return ({"data": n, "model": 1, "fsdp": False},
                f"data-parallel: bf16 weights {weights / GiB:.1f} GiB replicated")
    return ({"data": n // m, "model": m, "fsdp": False},
            f"model={m}: bf16 weights {weights / GiB:.1f} GiB split {m} ways "
            f"(tensor-parallel), data={n // m}")


def one_line(e: BaseException) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return f"{type(e).__name__}: " + (lines[0][:300] if lines else "")


class Predictor:
    """Compiles rows for targets, one compile per (shape, mesh, remat policy, target), and
    FLOPs once per shape."""

    def __init__(self, extra: list[str]):
        # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) when it starts, so a
        # second process describing a TPU (--jobs, two runs) fails; these compiles use
        # no chip, so several processes may load it
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        from ptjax.targets import start_on_cpu
        start_on_cpu()
        self.extra = list(extra)
        self.targets, self.compiles, self.flops, self.parameters = {}, {}, {}, {}

    def target(self, name: str, topology: str):
        from ptjax.targets import describe
        if (name, topology) not in self.targets:
            self.targets[name, topology] = describe(name, topology)
        return self.targets[name, topology]

    def overrides(self, row: dict, mesh: dict, remat: str) -> list[str]:
        return ([f"model.path={row['model']}", f"method.name={row['method']}",
                 f"prompt.seeds={list(range(row['prompts']))}",
                 "model.dtype=bfloat16", "train.attention_dropout=0",
                 f"model.remat={remat}", f"mesh.data={mesh['data']}",
                 f"mesh.model={mesh['model']}", f"mesh.fsdp={str(mesh['fsdp']).lower()}"]
                + METHODS[row["method"]] + self.extra)

    def config(self, row, mesh, remat):
        from ptjax.config import load_config
        return load_config(BASE, self.overrides(row, mesh, remat))

    def count(self, row) -> int:
        """Parameters of the row's model (its shapes only)."""
        from ptjax.models.hf_config import architecture
        from ptjax.models.model import abstract_params, count_params
        from ptjax.models.named import model_path
        key = tuple(self.overrides(row, {"data": 1, "model": 1, "fsdp": False}, "none"))
        if key not in self.parameters:
            cfg = self.config(row, {"data": 1, "model": 1, "fsdp": False}, "none")
            self.parameters[key] = count_params(abstract_params(architecture(
                model_path(cfg.model))))
        return self.parameters[key]

    def step_flops(self, row) -> float:
        """``ptjax plan``'s model FLOPs of the step (independent of target, mesh, remat)."""
        import jax

        from ptjax import methods
        from ptjax.aot import step_flops
        from ptjax.models.hf_config import architecture
        from ptjax.models.model import DTYPES, Model, abstract_params
        from ptjax.models.named import model_path
        one = {"data": 1, "model": 1, "fsdp": False}
        key = tuple(self.overrides(row, one, "none"))
        if key not in self.flops:
            cfg = self.config(row, one, "none")
            path = model_path(cfg.model)
            config = architecture(path)
            dtype = DTYPES[cfg.model.dtype]
            model = Model(config=config, params=None, dtype=dtype, path=path, remat="none",
                          attention=cfg.model.attention)
            method = methods.build(cfg, config, dtype)
            frozen = None if method.tunes_weights else jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, dtype), abstract_params(config))
            self.flops[key] = step_flops(model, method, cfg, method.shapes(), frozen)
        return self.flops[key]

    def compile(self, row, target, mesh, policy) -> dict:
        """One compile of the row's step with ``model.remat=policy`` for ``target``:
        {estimate, breakdown, attention, compile_s} or {oom: bytes, ...} / {error}."""
        from ptjax.aot import compiled_peak, per_device_bytes, refused_bytes
        from ptjax.plan import attention_summary, compile_plan
        key = (tuple(self.overrides(row, mesh, policy)), target.name, target.topology)
        if key in self.compiles:
            return self.compiles[key]
        cfg = self.config(row, mesh, policy)
        t0 = time.perf_counter()
        try:
            p = compile_plan(cfg, target=target)
            mem = p.compiled.memory_analysis()
            out = {"estimate": int(p.estimate), "per_device": {
                "frozen_weights": 0 if p.frozen is None else per_device_bytes(p.frozen),
                "trainable_and_optimizer": per_device_bytes(p.state),
                "batch": per_device_bytes(p.batch),
                "temporaries": int(mem.temp_size_in_bytes),
                "peak": int(compiled_peak(p.compiled)),
                "accelerator_peak": int(p.estimate)},
                "attention": attention_summary(p.model, cfg)["train_step"],
                "devices": f"{p.mesh.devices.size} x {p.mesh.devices.flat[0].device_kind}"}
            del p
        except Exception as e:  # noqa: BLE001 -- a row's failure is a result
            oom = refused_bytes(e)
            out = {"oom": oom, "error": one_line(e)} if oom else {"error": one_line(e)}
        out["compile_s"] = time.perf_counter() - t0
        self.compiles[key] = out
        import jax
        jax.clear_caches()
        return out

    def predict(self, row: dict) -> dict:
        """The row's result: mesh, per-device memory, fit, FLOPs, remat, compile time."""
        from ptjax.aot import HEADROOM, REMAT_ORDER, choose_remat
        name, topology = TARGETS[row["target"]] if row["target"] in TARGETS else \
            _split_target(row["target"])
        target = self.target(name, topology)
        n = len(target.devices)
        mesh, why = choose_mesh(n, self.count(row), row["method"], target.memory)
        out = dict(row, target_name=name, topology=topology, target_memory=target.memory,
                   parameters=self.count(row), mesh=mesh, mesh_reason=why)
        tried = {}

        def peak_of(policy):
            c = self.compile(row, target, mesh, policy)
            tried[policy] = c
            if "estimate" in c:
                return c["estimate"]
            if c.get("oom"):
                return math.inf  # libtpu refused it: it does not fit
            raise RuntimeError(c["error"])

        if row["remat_setting"] == "auto":
            chosen, _ = choose_remat(peak_of, target.memory, REMAT_ORDER, HEADROOM)
        else:
            chosen = row["remat_setting"]
            peak_of(chosen)
        c = tried[chosen]
        out.update(remat=chosen, remat_tried={
            k: v.get("estimate", "oom" if v.get("oom") else "error") for k, v in tried.items()},
            compile_s=c["compile_s"],
            compile_s_tried={k: v["compile_s"] for k, v in tried.items()},
            device_memory=target.memory)
        if "estimate" in c:
            out.update(per_device=c["per_device"], attention=c["attention"],
                       devices=c["devices"], fits=bool(c["estimate"] <= target.memory),
                       status="ok")
        else:
            out.update(per_device=None, fits=False, status="ok",
                       temporaries_at_least=c["oom"], error=c["error"])
        flops = self.step_flops(row)
        out.update(flops_per_step=flops, flops_per_step_per_device=flops / n)
        return out

    def smallest_slice(self, row: dict, result: dict, max_up: int) -> dict | None:
        """The first slice up the target's ladder whose step fits with remat=full (the
        least memory a policy gives), at most ``max_up`` slices past the row's."""
        name, topology = result["target_name"], result["topology"]
        ladder = LADDER.get(name, [])
        if topology not in ladder:
            return None
        tried, outcomes = [], {}
        for bigger in ladder[ladder.index(topology) + 1:][:max_up]:
            target = self.target(name, bigger)
            mesh, why = choose_mesh(len(target.devices), self.count(row), row["method"],
                                    target.memory)
            c = self.compile(row, target, mesh, "full")
            tried.append(bigger)
            # what each slice said: its peak, libtpu's refusal (the temporaries it named),
            # or an error, which is not "does not fit" and ends the search
            outcomes[bigger] = {"mesh": mesh, "compile_s": c["compile_s"], **(
                {"peak": c["estimate"]} if "estimate" in c else
                {"refused_at_least": c["oom"]} if c.get("oom") else {"error": c["error"]})}
            if "error" in outcomes[bigger]:
                return {"topology": None, "tried": tried, "outcomes": outcomes,
                        "error": c["error"]}
            if "estimate" in c and c["estimate"] <= target.memory:
                return {"topology": bigger, "devices": c["devices"], "mesh": mesh,
                        "remat": "full", "accelerator_peak": c["estimate"],
                        "compile_s": c["compile_s"], "tried": tried, "outcomes": outcomes}
        return {"topology": None, "tried": tried, "outcomes": outcomes}


def _split_target(text: str) -> tuple[str, str]:
    """"tpu-v5e:2x4" -> ("tpu-v5e", "2x4"): a target not in TARGETS, named directly."""
    name, _, topology = text.partition(":")
    return name, topology


def versions() -> dict:
    out = {}
    for name in VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "ptjax_modified": bool(git("status", "--porcelain", "--", "ptjax"))}


def gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.1f}" if x >= GiB else f"{x / GiB:.2f}"


def markdown(result: dict) -> str:
    """The rows as a markdown table, one line per shape and target (sorted by size,
    method, K, target) with its remat settings side by side: the per-device peak, whether
    it fits, the policy remat=auto chose; failed rows as their error."""
    order = {t: i for i, t in enumerate(TARGETS)}
    groups: dict = {}
    for r in result["rows"]:
        groups.setdefault(_key(r)[:4], {})[r["remat_setting"]] = r
    keys = sorted(groups, key=lambda k: (SIZES.index(k[0]) if k[0] in SIZES else -1,
                                         list(METHODS).index(k[1]), k[2], order.get(k[3], 99),
                                         k[3]))
    remats = [m for m in REMATS if any(m in g for g in groups.values())] + sorted(
        {m for g in groups.values() for m in g} - set(REMATS))
    lines = ["| model | method | K | target | mesh (data x model) | "
             + " | ".join(f"remat {m}: peak / device (GiB)" for m in remats)
             + " | device memory (GiB) | FLOPs / step | FLOPs / device | compile (s) "
             "| smallest slice that holds it | ptjax |",
             "| --- " * (11 + len(remats)) + "|"]
    for key in keys:
        g = groups[key]
        ok = [r for r in g.values() if r.get("status") == "ok"]
        head = f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | "
        if not ok:
            r = next(iter(g.values()))
            error = f"{r.get('status')}: {(r.get('error') or '')[:120]}"
            lines.append(head + " | ".join([error] + [""] * (5 + len(remats))
                                           + [r.get("commit", "")]) + " |")
            continue
        r0 = ok[0]
        m = r0["mesh"]
        cells = [f"{m['data']} x {m['model']}" + (" fsdp" if m["fsdp"] else "")]
        for remat in remats:
            r = g.get(remat)
            if r is None:
                cells.append("not run")
            elif r.get("status") != "ok":
                cells.append(f"{r.get('status')}: {(r.get('error') or '')[:80]}")
            else:
                cells.append(_cell(r))
        cells += [gib(r0["device_memory"]), f"{r0['flops_per_step']:.3g}",
                  f"{r0['flops_per_step_per_device']:.3g}",
                  " / ".join(_compile_s(g[x]) for x in remats if x in g and
                             g[x].get("status") == "ok"),
                  _slice(g), " / ".join(dict.fromkeys(  # each remat row's, once
                      g[x].get("commit", "") for x in remats if x in g))]
        lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(r: dict) -> str:
    """'4.2 fits', '131.8 **does not fit**', 'dots: 66.2 fits' (remat auto's choice)."""
    if r.get("per_device"):
        peak = gib(r["per_device"]["accelerator_peak"])
    else:
        peak = f"> {gib(r.get('temporaries_at_least'))} (libtpu)"
    chosen = f"{r['remat']}: " if r["remat_setting"] == "auto" else ""
    return f"{chosen}{peak} " + ("fits" if r["fits"] else "**does not fit**")


def _slice(g: dict) -> str:
    ok = [r for r in g.values() if r.get("status") == "ok"]
    if any(r["fits"] for r in ok):
        return "this one" if all(r["fits"] for r in ok) else "this one, with remat auto"
    s = next((r["smallest_slice"] for r in ok if r.get("smallest_slice")), None)
    if not s:
        return "not searched"
    if s.get("topology"):
        return (f"{ok[0]['target_name']} {s['topology']} (remat full, "
                f"{gib(s['accelerator_peak'])} GiB)")
    if s.get("error"):  # a compile that failed says nothing about fitting
        where = f" on {s['tried'][-1]}" if s.get("tried") else ""
        return f"search failed{where} (see the JSON)"
    return f"none of {', '.join(s['tried'])}" if s.get("tried") else "not searched"


def _compile_s(r: dict) -> str:
    """The compile of the policy a row ran, and of every policy remat=auto tried."""
    tried = r.get("compile_s_tried") or {}
    if len(tried) > 1:
        return f"{r['compile_s']:.0f} ({sum(tried.values()):.0f} for {', '.join(tried)})"
    return f"{r['compile_s']:.0f}"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES),
                   help="T5 1.1 LM-adapted sizes (small ... xxl) or model.path values, "
                   "comma-separated (default: all five)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"of {', '.join(TARGETS)}, or NAME:TOPOLOGY (e.g. tpu-v5e:2x4); "
                   "the first is the one every size runs on first (default: all)")
    p.add_argument("--methods", default=",".join(METHODS), help="prompt, prefix, model")
    p.add_argument("--prompts", default="1,5", help="K values (model tuning: K=1 only)")
    p.add_argument("--remat", default="none,auto", help="remat settings (none, auto, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every row (e.g. task.max_input_length=64)")
    p.add_argument("--budget-s", type=float, default=0,
                   help="stop starting rows after this many seconds (0: no limit)")
    p.add_argument("--max-up", type=int, default=2,
                   help="slices up the ladder tried for a remat=auto row that does not fit "
                   "(0: no search)")
    p.add_argument("--jobs", type=int, default=1,
                   help="processes, the targets dealt round-robin between them")
    p.add_argument("--out", default="", help="JSON path (default "
                   "benchmarks/results/predict-<date>.json)")
    p.add_argument("--markdown", action="store_true", help="print the table at the end")
    p.add_argument("--table", metavar="JSON", help="only print the table of a results file")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine results files (runs of parts of the matrix) into --out; a "
                   "row of the matrix (--sizes, --targets, ...) in none of them is listed "
                   "as skipped")
    p.add_argument("--only-targets", help=argparse.SUPPRESS)  # a --jobs worker's share
    return p.parse_args(argv)


def _write(path: str, result: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.table:
        with open(a.table) as f:
            print(markdown(json.load(f)))
        return 0
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    sizes, targets, methods = split(a.sizes), split(a.targets), split(a.methods)
    prompts, remats = [int(k) for k in split(a.prompts)], split(a.remat)
    for t in targets:
        if t not in TARGETS and ":" not in t:
            raise SystemExit(f"--targets: {t!r} is not one of {', '.join(TARGETS)} nor "
                             "NAME:TOPOLOGY")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    out = a.out or os.path.join(ROOT, "benchmarks", "results",
                                f"predict-{datetime.date.today().isoformat()}.json")
    if a.merge:
        result = merge(a.merge, matrix(sizes, targets, methods, prompts, remats), targets)
        _write(out, result)
        print(f"written to {out} ({len(result['rows'])} rows, {len(result['skipped'])} "
              "skipped)")
        if a.markdown:
            print(markdown(result))
        return 0
    start = time.perf_counter()
    result = {"date": datetime.date.today().isoformat(),
              "what": "deviceless compile predictions (ptjax.targets + ptjax.plan), not "
                      "measurements: no GPU or TPU ran",
              "command": "benchmarks/predict.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": platform.node(), "versions": versions(), "ptjax": git_commit(),
              "base": os.path.relpath(BASE, ROOT), "methods": METHODS, "share": SHARE,
              "overrides": a.set, "rows": [], "skipped": []}
    rows = matrix(sizes, targets, methods, prompts, remats)
    if a.jobs > 1 and not a.only_targets:
        result["rows"], result["skipped"] = _run_jobs(a, argv, targets, out)
        rows = []
    elif a.only_targets:
        mine = split(a.only_targets)
        rows = [r for r in rows if r["target"] in mine]
    predictor = Predictor(a.set) if rows else None
    commit = (result["ptjax"]["commit"] or "")[:7] + ("+" if result["ptjax"][
        "ptjax_modified"] else "")
    for row in rows:
        if a.budget_s and time.perf_counter() - start > a.budget_s:
            result["skipped"].append(dict(row, why="time budget spent"))
            continue
        t0 = time.perf_counter()
        try:
            r = predictor.predict(row)
        except Exception as e:  # noqa: BLE001 -- record it, go on
            r = dict(row, status="error", error=one_line(e))
        if a.max_up > 0 and r.get("status") == "ok" and not r["fits"] and \
                r["remat_setting"] == "auto":  # the smallest slice that holds it
            try:
                r["smallest_slice"] = predictor.smallest_slice(r, r, a.max_up)
            except Exception as e:  # noqa: BLE001
                r["smallest_slice"] = {"topology": None, "tried": [], "error": one_line(e)}
        r["wall_s"] = time.perf_counter() - t0
        r["commit"] = commit  # merged files mix runs: each row says which ptjax made it
        result["rows"].append(r)
        print(_line(r), flush=True)
        result["elapsed_s"] = time.perf_counter() - start
        _write(out, result)
    result["elapsed_s"] = time.perf_counter() - start
    _write(out, result)
    print(f"written to {out} ({len(result['rows'])} rows, {len(result['skipped'])} skipped, "
          f"{result['elapsed_s']:.0f} s)")
    if a.markdown:
        print(markdown(result))
    return 0


def _key(row: dict) -> tuple:
    return (row["size"], row["method"], row["prompts"], row["target"], row["remat_setting"])


def merge(paths: list[str], wanted: list[dict], targets: list[str]) -> dict:
    """Results files combined: their rows (of duplicates the first that ran), each run's
    command, date, elapsed time, versions and ptjax commit under "runs", and as skipped
    every row of ``wanted`` that none of them has."""
    runs, rows, seen, first = [], [], {}, None
    for path in paths:
        with open(path) as f:
            got = json.load(f)
        first = first or got
        for run in got.get("runs") or [got]:  # a merged file brings its own runs
            if run.get("command") not in [x["command"] for x in runs]:
                runs.append({k: run.get(k) for k in ("command", "date", "elapsed_s", "ptjax",
                                                      "versions", "machine")})
        made = (got.get("runs") or [got])[0].get("ptjax") or {}
        for r in got["rows"]:
            r.setdefault("commit", (made.get("commit") or "")[:7])  # files from before rows had it
            if _key(r) not in seen:
                seen[_key(r)] = len(rows)
                rows.append(r)
            elif rows[seen[_key(r)]].get("status") != "ok" and r.get("status") == "ok":
                rows[seen[_key(r)]] = r  # a row that ran beats one that failed
    result = {k: v for k, v in first.items() if k not in ("rows", "skipped", "command",
                                                          "elapsed_s")}
    result.update(command=" && ".join(r["command"] for r in runs), runs=runs,
                  elapsed_s=None)  # each run's is under runs (they may have overlapped)
    order = {t: i for i, t in enumerate(targets)}
    result["rows"] = sorted(rows, key=lambda r: priority(r, targets) if r["target"] in order
                            else (9,))
    result["skipped"] = [dict(r, why="not run: the time budget") for r in wanted
                         if _key(r) not in seen]
    return result


def _run_jobs(a, argv, targets, out):
    """--jobs N: the targets dealt round-robin to N worker processes (this script with
    --only-targets), their rows merged back in priority order."""
    argv = list(sys.argv[1:] if argv is None else argv)
    share = [targets[i::a.jobs] for i in range(a.jobs)]
    tmp = tempfile.mkdtemp(prefix="predict-")
    procs = []
    for i, mine in enumerate(s for s in share if s):
        part = os.path.join(tmp, f"part{i}.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--jobs", "1",
               "--only-targets", ",".join(mine), "--out", part]
        cmd = [x for x in cmd if x != "--markdown"]
        procs.append((part, subprocess.Popen(cmd)))
    rows, skipped = [], []
    for part, proc in procs:
        proc.wait()
        try:
            with open(part) as f:
                got = json.load(f)
            rows += got["rows"]
            skipped += got["skipped"]
        except (OSError, ValueError) as e:
            skipped.append({"part": part, "why": f"worker failed (exit {proc.returncode}): "
                            + one_line(e)})
    key = lambda r: priority(r, targets)  # noqa: E731
    return sorted(rows, key=key), sorted([s for s in skipped if "size" in s], key=key) + \
        [s for s in skipped if "size" not in s]


def _line(r: dict) -> str:
    head = f"{r['size']:6s} {r['method']:6s} K={r['prompts']} {r['target']:9s} " \
           f"remat {r['remat_setting']:4s}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}: {r.get('error')}"
    peak = gib(r["per_device"]["accelerator_peak"]) if r.get("per_device") else \
        f">{gib(r.get('temporaries_at_least'))}"
    return (f"{head} -> {r['remat']:4s} peak {peak:>6s} / {gib(r['device_memory'])} GiB "
            f"fits {r['fits']!s:5s} FLOPs {r['flops_per_step']:.3g} compile "
            f"{r['compile_s']:.0f} s (row {r['wall_s']:.0f} s) mesh {r['mesh']}")


if __name__ == "__main__":
    sys.exit(main())
