"""What each ``ptjax`` command does, given its parsed arguments (``ptjax.cli`` parses
the command line and turns a user's mistake into one line): ``cmd_<name>(args)``, which
returns the exit status (None = 0)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import sys

import jax
import numpy as np
import yaml

from ptjax import storage, targets
from ptjax.analysis import run_neighbors
from ptjax.autotemplate import run_search as run_template_search
from ptjax.autoverbalizer import run_search
from ptjax.config import load_config, to_dict
from ptjax.errors import PtjaxError
from ptjax.models.generate import decoding
from ptjax.models.model import count_params, load_model
from ptjax.models.named import base_model_path
from ptjax.models.tiny import build_tiny_model
from ptjax.multirun import load_runs
from ptjax.plan import format_plan, parse_bytes, plan, write_plan
from ptjax.preflight import check_config
from ptjax.pretrain import pretrain
from ptjax.report import write_report
from ptjax.run import evaluate_prompts, train
from ptjax.rundir import check_output_dir, check_output_file, write_json
from ptjax.serving import Server, require_aiohttp
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


def _generate(model, params, texts, max_new_tokens, prompt, options):
    """The decoded new text of each of ``texts`` (options: ``Model.generate``'s decoding
    keywords; with num_return_sequences R, R texts per input, best first)."""
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
                         max_new_tokens=max_new_tokens, **options)
    return tok.batch_decode(np.asarray(out), skip_special_tokens=True)


def _decoding_options(args) -> dict:
    """``Model.generate``'s decoding keywords from the command line, checked before the
    model loads."""
    if args.max_new_tokens < 1:
        raise PtjaxError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.num_beams < 1:
        raise PtjaxError(f"--num-beams {args.num_beams}: must be at least 1 (1: no beam "
                         "search)")
    sampling = {"--temperature": args.temperature, "--top-k": args.top_k,
                "--top-p": args.top_p}
    if not args.sample and any(v is not None for v in sampling.values()):
        given = ", ".join(k for k, v in sampling.items() if v is not None)
        raise PtjaxError(f"{given}: only with --sample")
    if args.sample and args.num_beams > 1:
        raise PtjaxError(f"--sample with --num-beams {args.num_beams}: beam sampling is not "
                         "supported; sample with one beam, or search beams without --sample")
    if args.num_return_sequences > args.num_beams:
        raise PtjaxError(f"--num-return-sequences {args.num_return_sequences}: at most "
                         f"--num-beams ({args.num_beams})")
    options = dict(num_beams=args.num_beams, num_return_sequences=args.num_return_sequences,
                   length_penalty=args.length_penalty,
                   early_stopping={"false": False, "true": True}.get(args.early_stopping,
                                                                      args.early_stopping),
                   do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
    try:
        decoding(**options)
    except PtjaxError as e:  # "top_p=0.0: must be ..." -> "--top-p 0.0: must be ..."
        m = re.match(r"(\w+)=(\S+): (.*)", str(e))
        raise (PtjaxError(f"--{m[1].replace('_', '-')} {m[2]}: {m[3]}") if m else e) from None
    return options


def cmd_generate(args):
    options = _decoding_options(args)
    if storage.exists(os.path.join(args.model, "config.yaml")):  # a trained run
        run = load_run(args.model)
        model = run.model
        params, prompt = run.inputs(args.k)
    else:
        model = _load(args)
        params, prompt = model.params, _random_prompt(model, args.prompt_length, args.seed)
    outs = _generate(model, params, args.text, args.max_new_tokens, prompt, options)
    R = args.num_return_sequences
    for i, out in enumerate(outs):
        print(f"{args.text[i // R]!r} -> {out!r}")


def cmd_tiny(args):
    check_output_dir(args.directory, "directory")
    existed = os.path.exists(os.path.join(args.directory, "config.json"))
    path = build_tiny_model(args.directory, family=args.family, seed=args.seed)
    print(f"tiny {args.family} model {'already in' if existed else 'written to'} {path}")


def _run_dir_of(path: str) -> str | None:
    """The run directory a CONFIG argument names: the directory itself, or the directory
    of a run's config.yaml (a file beside the run's checkpoints or metrics)."""
    if storage.isdir(path):
        return path
    parent = os.path.dirname(path) or "."
    if os.path.basename(path) == "config.yaml" and any(
            storage.exists(os.path.join(parent, n))
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
            if not storage.exists(path):
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
    paths = []
    for item in args.items:
        if "=" in item:
            break
        paths.append(item)
    if len(paths) > 1:
        return _eval_runs(args, paths, args.items[len(paths):])
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


def _eval_runs(args, paths, overrides):
    """``ptjax eval RUN_DIR RUN_DIR ...``: the runs' rows in shared batches through their
    one frozen model (``ptjax.multirun``); each run's metrics as ``ptjax eval`` gives them
    alone, named by run and task."""
    if args.prompt or args.ensemble:
        raise PtjaxError(f"{'--prompt' if args.prompt else '--ensemble'} takes one run; "
                         f"with several run directories ({', '.join(paths)}) leave it out")
    multi = load_runs(_run_dirs(paths, overrides), overrides)
    metrics = multi.evaluate(args.split)
    out = {}
    for run in multi.runs:
        task = dev_task_config(run.config).name
        values = metrics[run.run_dir]
        for name, per_member in values.items():
            for k, v in enumerate(per_member):
                print(f"{run.run_dir} member {k}: {args.split} {name} {v:.2f} on task {task}")
        out[run.run_dir] = {"task": task, "method": run.method.name, "split": args.split,
                            **values}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


def _run_dirs(paths, overrides) -> list:
    """Trained run directories given before the key=value overrides (each once)."""
    run_dirs = []
    for path in paths:
        run_dir = _run_dir_of(path)
        if run_dir is None or not os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise PtjaxError(f"{path}: not a run directory; with several arguments before "
                             "the key=value overrides each must be a trained run directory")
        if os.path.normpath(run_dir) in map(os.path.normpath, run_dirs):
            raise PtjaxError(f"{run_dir} is given twice")
        run_dirs.append(run_dir)
    for item in overrides:
        if "=" not in item:
            raise PtjaxError(f"argument {item!r} is not a dotted.key=value override (run "
                             "directories come first)")
    return run_dirs


def cmd_serve(args):
    """``ptjax serve RUN_DIR [RUN_DIR ...] [key=value ...]``: the runs on one frozen
    model behind an HTTP/JSON server (``ptjax.serving``) until SIGTERM or SIGINT."""
    require_aiohttp()
    paths = list(itertools.takewhile(lambda x: "=" not in x, args.items))
    overrides = args.items[len(paths):]
    if not paths:
        raise PtjaxError("ptjax serve needs at least one trained run directory")
    try:
        sizes = sorted({int(x) for x in args.batch_sizes.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise PtjaxError(f"--batch-sizes={args.batch_sizes}: give positive integers "
                         "separated by commas, e.g. 1,2,4,8,16,32")
    for name in ("queue", "timeout", "window_ms"):
        if not getattr(args, name) > 0:
            raise PtjaxError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be > 0")
    multi = load_runs(_run_dirs(paths, overrides), overrides)
    server = Server(multi, sizes, args.window_ms, args.queue, args.timeout)
    warm = server.warm_up()
    for run in server.runs():
        print(f"ptjax serve: {run['run']} (task {run['task']}, {run['method']}, "
              f"{run['kind']})")
    print(f"ptjax serve: warmed up batch sizes {','.join(map(str, server.buckets.sizes))} "
          f"in {warm['seconds']:.1f} s ({warm['compiles']} compiles)", flush=True)
    server.serve(args.host, args.port, ready=lambda url: print(
        f"ptjax serve: listening on {url} (POST /v1/predict, GET /health, /metrics, "
        "/v1/runs)", flush=True))
    print("ptjax serve: stopped", flush=True)


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
    result = plan(cfg, limit, target, steps=("train", "eval", "decode"))
    print(format_plan(result))
    if args.out:
        write_plan(result, args.out)
    return 1 if result["fits"] is False else 0


def cmd_export(args):
    run = load_run(args.run_dir)
    out = args.out or os.path.join(args.run_dir, "export")
    host = jax.tree.map(to_host, run.trainables)
    with storage.staged_dir(out) as local:  # a URL: written here, then uploaded
        run.method.export(local, host, run.model, base_model_path(run.config))
    print(f"{run.method.name}: {run.K} member(s) from checkpoint step {run.step} exported to "
          f"{out}")
    for name in storage.listdir(out):
        print(f"  {os.path.join(out, name)}")


def cmd_config(args):
    cfg = _config_and_overrides(args.items)
    check_config(cfg)  # the errors `ptjax train` would give, before it loads weights
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _search_output(cfg, out, name: str) -> str:
    """Where a search command (``ptjax verbalizer`` / ``template``) writes its JSON: --out,
    else RUN_DIR/NAME; checked before the search runs, so a bad path costs nothing."""
    if out:
        check_output_file(out, "--out")
        return out
    check_output_dir(cfg.run_dir, "run_dir")
    return os.path.join(cfg.run_dir, name)


def _write_search(out: str, found: dict):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    write_json(out, found)


def cmd_verbalizer(args):
    cfg = _config_and_overrides(args.items)
    out = _search_output(cfg, args.out, "verbalizer.json")
    found = run_search(cfg, args.k, args.n, args.per_class, args.seed)
    for c, kept in found["candidates"].items():
        words = ", ".join(f"{w} ({s:.1f})" for w, s in kept)
        print(f"candidates for {c}: {words}")
    print(f"top {len(found['assignments'])} assignments by train accuracy "
          f"({found['train_examples']} examples), then dev ({found['dev_examples']}):")
    for a in found["assignments"]:
        words = ", ".join(f"{c}={w}" for c, w in a["words"].items())
        print(f"  {words}: train {a['train_accuracy']:.2f}, dev {a['dev_accuracy']:.2f}")
    _write_search(out, found)
    print(f"chosen by dev accuracy (written to {out}):")
    print(found["override"])


def cmd_template(args):
    cfg = _config_and_overrides(args.items)
    out = _search_output(cfg, args.out, "templates.json")
    found = run_template_search(cfg, args.shape or (), args.beam, args.top, args.per_class,
                                args.seed, args.max_tokens)
    metric = found["metric"]
    print(f"{len(found['templates'])} templates generated on {found['train_examples']} train "
          f"examples (beam {found['beam']}), ranked by zero-shot dev {metric} "
          f"({found['dev_examples']} examples):")
    for r in found["templates"]:
        print(f"  dev {r['dev'][metric]:.2f}  log-prob {r['mean_score']:.2f}/example  "
              f"{r['template']}")
    _write_search(out, found)
    print(f"the top {len(found['top'])}, to train in one batch (train.ensemble):")
    print(" ".join(shlex.quote(o) for o in found["overrides"]["templates"]))
    print(f"chosen by dev {metric} (written to {out}):")
    print(found["overrides"]["template"])
