"""The ``ptjax`` command line.

    ptjax info MODEL                 architecture, parameter count, weights file
    ptjax generate MODEL|RUN_DIR TEXT ...   greedy decoding (behind a trained run's member k,
                                     or a random soft prompt)
    ptjax tiny DIR [--family t5]     write a built-in tiny model (no network needed)
    ptjax train [CONFIG.yaml] [key=value ...]   train (method.name: prompt | prefix | ptuning |
                                     model); resumes a killed run
    ptjax pretrain CONFIG [key=value ...]   pre-train a T5 on a corpus (pretrain.objective:
                                     span_corruption | prefix_lm); resumes a killed run
    ptjax eval RUN_DIR|CONFIG [key=value ...] [--prompt FILE]   evaluate a trained run
    ptjax plan CONFIG [key=value ...] [--device-memory 80GB]    memory per device, before a run
    ptjax sweep SWEEP.yaml [--shard i/N]   run a sweep (skips finished jobs), then report
    ptjax report SWEEP_DIR               tables and the paper's plots
    ptjax neighbors RUN_DIR [--k 5]      nearest vocabulary tokens of each prompt position
    ptjax export RUN_DIR [--out DIR]     write a run's best members (any method) from its
                                     newest checkpoint, mid-run too
    ptjax config show [CONFIG|RUN_DIR] [key=value ...]   the resolved config, every key
    ptjax --version

A user's mistake (bad path, unsupported model, wrong shape) prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import jax
import numpy as np
import yaml

from ptjax import __version__, targets
from ptjax.analysis import run_neighbors
from ptjax.config import load_config, to_dict
from ptjax.errors import PtjaxError
from ptjax.models.model import count_params, load_model
from ptjax.models.named import base_model_path
from ptjax.models.tiny import build_tiny_model
from ptjax.plan import format_plan, parse_bytes, plan, write_plan
from ptjax.preflight import check_config
from ptjax.pretrain import pretrain
from ptjax.report import write_report
from ptjax.run import evaluate_prompts, train
from ptjax.rundir import check_output_dir, check_output_file
from ptjax.sharding import is_main_process, to_host
from ptjax.sweep import all_done, load_sweep, parse_shard, run_sweep, seedless_runs
from ptjax.taskdata import dev_task_config
from ptjax.trained import load_run


def _load(args):
    return load_model(args.model, dtype=args.dtype)


def cmd_info(args):
    model = _load(args)
    n = count_params(model.params)
    print(f"model:      {args.model} ({model.path})")
    print(f"type:       {model.config.model_type}, dtype {args.dtype}, {n:,} parameters")
    print(f"config:     {model.config}")
    print(f"tokenizer:  {type(model.tokenizer).__name__ if model.tokenizer else 'none'}")


def _random_prompt(model, length: int, seed: int):
    if length <= 0:
        return None
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, (length, model.config.hidden_size)).astype(np.float32)


def _generate(model, params, texts, max_new_tokens, prompt):
    if model.tokenizer is None:
        raise PtjaxError(f"{model.path}: the checkpoint has no tokenizer files, so text "
                         "cannot be encoded")
    tok = model.tokenizer
    if not model.is_encoder_decoder:
        tok.padding_side = "left"  # every row's context must end at the same slot
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    batch = tok(list(texts), padding=True, return_tensors="np")
    out = model.generate(params, batch["input_ids"],
                         attention_mask=batch["attention_mask"], prompt=prompt,
                         max_new_tokens=max_new_tokens)
    return tok.batch_decode(np.asarray(out), skip_special_tokens=True)


def cmd_generate(args):
    if os.path.exists(os.path.join(args.model, "config.yaml")):  # a trained run
        run = load_run(args.model)
        model = run.model
        params, prompt = run.inputs(args.k)
    else:
        model = _load(args)
        params, prompt = model.params, _random_prompt(model, args.prompt_length, args.seed)
    outs = _generate(model, params, args.text, args.max_new_tokens, prompt)
    for text, out in zip(args.text, outs):
        print(f"{text!r} -> {out!r}")


def cmd_tiny(args):
    check_output_dir(args.directory, "directory")
    existed = os.path.exists(os.path.join(args.directory, "config.json"))
    path = build_tiny_model(args.directory, family=args.family, seed=args.seed)
    print(f"tiny {args.family} model {'already in' if existed else 'written to'} {path}")


def _run_dir_of(path: str) -> str | None:
    """The run directory a CONFIG argument names: the directory itself, or the directory
    of a run's config.yaml (a file beside the run's checkpoints or metrics)."""
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(path) or "."
    if os.path.basename(path) == "config.yaml" and any(
            os.path.exists(os.path.join(parent, n))
            for n in ("checkpoints", "metrics.jsonl", "results.json")):
        return parent
    return None


def _config_and_overrides(items):
    """``[CONFIG.yaml | RUN_DIR] [dotted.key=value ...]`` -> RunConfig. A run directory
    (or its config.yaml) is the run_dir, whatever its config.yaml says: a copied or moved
    run continues where it is now, never in the directory it was copied from."""
    path, overrides = None, list(items)
    if overrides and "=" not in overrides[0]:
        path = overrides.pop(0)
        run_dir = _run_dir_of(path)
        if run_dir is not None:
            path = os.path.join(run_dir, "config.yaml")
            if not os.path.exists(path):
                raise PtjaxError(f"{run_dir}: a directory with no config.yaml; give a run "
                                 "directory or a YAML config file")
            overrides.insert(0, f"run_dir={run_dir}")  # an explicit run_dir= still wins
    for item in overrides:
        if "=" not in item:
            raise PtjaxError(f"argument {item!r} is not a dotted.key=value override (only the "
                             "first argument may be a config file)")
    return load_config(path, overrides)


def cmd_train(args):
    cfg = _config_and_overrides(args.items)
    if not args.progress:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
    results = train(cfg)
    metric = results["metric"]
    for p in results["prompts"]:
        print(f"{results['method']} {p['prompt']} (seed {p['seed']}): best {metric} "
              f"{p['best_' + metric]:.2f} at step {p['best_step']}")
    print(f"exported to {results['export']}; metrics in {cfg.run_dir}/metrics.jsonl")


def cmd_pretrain(args):
    cfg = _config_and_overrides(args.items)
    if not args.progress:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
    results = pretrain(cfg)
    print(f"{results['objective']} on {results['corpus']}: {results['steps']} steps, "
          f"validation loss {results['validation_loss']:.4f}; Hugging Face checkpoint in "
          f"{results['model']}; metrics in {cfg.run_dir}/metrics.jsonl")


def cmd_eval(args):
    if args.out:  # before the evaluation, not after it
        check_output_file(args.out, "--out")
    cfg = _config_and_overrides(args.items)
    items = list(args.items)
    run_dir = _run_dir_of(items[0]) if items and "=" not in items[0] else None
    metrics = evaluate_prompts(cfg, args.prompt, args.split, args.ensemble, run_dir)
    task = dev_task_config(cfg).name  # named: e.g. a transfer task (task.name=...)
    if args.ensemble:
        for name, values in metrics["prompts"].items():
            each = ", ".join(f"{v:.2f}" for v in values)
            print(f"{args.split} {name}: prompts [{each}]  average {metrics['average'][name]:.2f}"
                  f"  best {metrics['best'][name]:.2f}  ensemble ({args.ensemble}) "
                  f"{metrics['ensemble'][name]:.2f} on task {task}")
    else:
        for name, values in metrics.items():
            for k, v in enumerate(values):
                print(f"member {k}: {args.split} {name} {v:.2f} on task {task}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"task": task, "split": args.split, "prompt_file": args.prompt, **metrics},
                      f, indent=2)


def cmd_sweep(args):
    shard = parse_shard(args.shard)
    sweep = load_sweep(args.sweep, args.dir)
    if args.dry_run:
        for job in sweep.jobs:
            print(f"job {job.id} -> {job.run_dir}")
            for run in job.runs:
                print(f"  run {run.id}: " + ", ".join(f"{k}={v}" for k, v in
                                                     run.settings.items()))
        print(f"{len(sweep.runs)} runs in {len(sweep.jobs)} jobs")
        return 0
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs in {len(sweep.jobs)} jobs -> "
          f"{sweep.dir}" + (f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""))
    if seedless := seedless_runs(sweep):
        print(f"note: {len(seedless)} model-tuning runs differ only in their seed, which "
              "with train.dropout=0 changes nothing (same weights, same data order): "
              "set train.dropout (the paper's 0.1) for runs that differ", file=sys.stderr)
    out = run_sweep(sweep, shard, progress=args.progress)
    if out["failed"]:
        print(f"{len(out['failed'])} job(s) failed (their error.txt says why); run the same "
              "command again to retry them:", file=sys.stderr)
        for job, err in out["failed"]:
            print(f"  {job}: {err}", file=sys.stderr)
    if not all_done(sweep):
        print(f"this shard is done; when every shard is, run: ptjax report {sweep.dir}")
    elif args.report and is_main_process():
        paths = write_report(sweep.dir)
        print(f"report: {paths.get('report', paths['results'])}")
        for fig in paths.get("figures", []):
            print(f"  figure: {fig}")
    return 1 if out["failed"] else 0


def cmd_report(args):
    paths = write_report(args.directory)
    for name, path in paths.items():
        for p in (path if isinstance(path, list) else [path]):
            print(f"{name}: {p}")


def cmd_neighbors(args):
    if args.out:
        check_output_file(args.out, "--out")
    df = run_neighbors(args.run_dir, args.k, args.prompt)
    for (k, pos), group in df.groupby(["prompt", "position"]):
        tokens = "  ".join(f"{t} ({c:.2f})" for t, c in zip(group["token"], group["cosine"]))
        print(f"prompt {k} position {pos:3d}: {tokens}")
    if args.out:
        df.to_csv(args.out, index=False)


def cmd_plan(args):
    if args.out:
        check_output_file(args.out, "--out")
    cfg = _config_and_overrides(args.items)
    limit = parse_bytes(args.device_memory) if args.device_memory else None
    target = targets.describe(args.target, args.topology) if args.target else None
    result = plan(cfg, limit, target)
    print(format_plan(result))
    if args.out:
        write_plan(result, args.out)
    return 1 if result["fits"] is False else 0


def cmd_export(args):
    run = load_run(args.run_dir)
    out = args.out or os.path.join(args.run_dir, "export")
    host = jax.tree.map(to_host, run.trainables)
    run.method.export(out, host, run.model, base_model_path(run.config))
    print(f"{run.method.name}: {run.K} member(s) from checkpoint step {run.step} exported to "
          f"{out}")
    for name in sorted(os.listdir(out)):
        print(f"  {os.path.join(out, name)}")


def cmd_config(args):
    cfg = _config_and_overrides(args.items)
    check_config(cfg)  # the errors `ptjax train` would give, before it loads weights
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _version() -> str:
    parts = []
    for name in ("jax", "jaxlib", "flax", "optax", "transformers"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return f"ptjax {__version__} ({', '.join(parts)})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptjax", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback behind an error message")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("model", help="checkpoint directory or Hugging Face hub id")
        sp.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")

    sp = sub.add_parser("info", help="describe a checkpoint")
    model_args(sp)
    sp.set_defaults(fn=cmd_info)

    sp = sub.add_parser("generate", help="greedy decoding")
    sp.add_argument("model", help="checkpoint directory, Hugging Face hub id, or a trained "
                                  "run directory (any method)")
    sp.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    sp.add_argument("--k", type=int, default=0, help="a trained run's member (prompt k)")
    sp.add_argument("text", nargs="+")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--prompt-length", type=int, default=0,
                    help="prepend a random uniform[-0.5, 0.5] soft prompt of this length")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_generate)

    sp = sub.add_parser("tiny", help="write a built-in tiny model")
    sp.add_argument("directory")
    sp.add_argument("--family", default="t5", choices=["t5", "gpt2"])
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_tiny)

    for name, fn, what in (
            ("train", cmd_train, "train a method (prompt, prefix, ptuning, model) from a YAML "
                                 "config"),
            ("pretrain", cmd_pretrain, "pre-train every weight of a T5 on a corpus with span "
                                       "corruption or prefix LM (LM adaptation)")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="an optional YAML config, then dotted.key=value overrides")
        sp.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar: one line per train.log_every steps and per eval")
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("eval", help="evaluate a trained run (or a prompt file) on a split")
    sp.add_argument("items", nargs="*", metavar="RUN_DIR | CONFIG.yaml | key=value",
                    help="a run directory or YAML config, then dotted.key=value overrides")
    sp.add_argument("--prompt", default=None,
                    help="a .npy ([P, D] or [K, P, D]) or safetensors soft prompt; default: "
                         "the run's trained members (best, from its checkpoints)")
    sp.add_argument("--split", default="validation")
    sp.add_argument("--ensemble", default="", choices=["", "majority", "mean_logprob"],
                    help="also score the prompts as one ensemble (one forward over K x B rows)")
    sp.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("sweep", help="run a sweep file (grid x zip x seeds), then report")
    sp.add_argument("sweep", help="a sweep YAML (see experiments/)")
    sp.add_argument("--shard", default=None, help="i/N: run every N-th job, from job i")
    sp.add_argument("--dir", default=None, help="the sweep directory (default: the file's "
                                                  "dir:, or runs/<name>)")
    sp.add_argument("--dry-run", action="store_true", help="list runs and jobs, run nothing")
    sp.add_argument("--no-report", dest="report", action="store_false")
    sp.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bar: one line per train.log_every steps and per eval")
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("report", help="tables and the paper's plots of a sweep directory")
    sp.add_argument("directory")
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("neighbors", help="nearest vocabulary tokens of each prompt position")
    sp.add_argument("run_dir", help="a prompt-tuning run (or a sweep's jobs/<id>) directory")
    sp.add_argument("--k", type=int, default=5)
    sp.add_argument("--prompt", type=int, default=None, help="only this prompt of the run")
    sp.add_argument("--out", default=None, help="also write the table as CSV")
    sp.set_defaults(fn=cmd_neighbors)

    sp = sub.add_parser("plan", help="memory per device of a run's train step, before loading")
    sp.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                    help="a YAML config, then dotted.key=value overrides")
    sp.add_argument("--device-memory", default=None,
                    help="memory of the target device (e.g. 80GB) instead of the local one")
    sp.add_argument("--target", default=None, metavar="NAME",
                    help="compile for these accelerators without them: "
                         f"{', '.join(targets.CHIPS)} (needs ptjax[targets])")
    sp.add_argument("--topology", default="", metavar="SHAPE",
                    help="with --target: GPUs as 8 (one host) or 2x8; TPU chips as 2x2 "
                         "(v5e, v6e) or 2x2x1 (v4, v5p); default one")
    sp.add_argument("--out", default=None, help="also write the plan as JSON")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("export", help="export a run's best members (any method), mid-run too")
    sp.add_argument("run_dir", help="a run directory (ptjax train, or a sweep's jobs/<id>)")
    sp.add_argument("--out", default=None, help="where to write (default: RUN_DIR/export)")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("config", help="show the resolved config: every key, defaults filled")
    sp.add_argument("action", choices=["show"])
    sp.add_argument("items", nargs="*", metavar="CONFIG.yaml | RUN_DIR | key=value",
                    help="an optional YAML config or run directory, then key=value overrides")
    sp.set_defaults(fn=cmd_config)

    return p


def enable_compilation_cache():
    """Reuse compiled steps across runs (a resumed run starts in seconds): JAX's persistent
    cache in $PTJAX_COMPILATION_CACHE (default ~/.cache/ptjax/xla; "" turns it off)."""
    path = os.environ.get("PTJAX_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "ptjax", "xla"))
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line, not only before the command
    argv = [a for a in argv if a != "--debug"]
    # overrides may come after options too: `ptjax train c.yaml --no-progress a.b=1`
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "items") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.items += extra
    if getattr(args, "target", None):
        # compile-only devices: JAX starts on its CPU, and their executables are not
        # cached (a compile-only client cannot load one back)
        targets.start_on_cpu()
    elif args.command in ("train", "pretrain", "eval", "plan", "sweep", "neighbors", "export"):
        enable_compilation_cache()
    try:
        code = args.fn(args)
    except (PtjaxError, OSError, UnicodeDecodeError) as e:
        if debug:
            raise
        print(f"ptjax: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return code or 0


def _one_line(e: Exception) -> str:
    """A user's mistake or a file system error as one line naming the path. (An OSError
    or a decoding error that reached here came from a file the user named or a directory
    the run writes; anything else is a bug and keeps its traceback.)"""
    if isinstance(e, PtjaxError):
        return " ".join(str(e).split("\n"))
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start}); rerun with --debug"
    where = e.filename or "a file"
    other = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    return f"{where}{other}: {e.strerror or e}"


if __name__ == "__main__":
    sys.exit(main())
