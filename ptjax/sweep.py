"""Sweeps: a base config crossed over axes, run by ``ptjax sweep``, read by
``ptjax.analysis`` and ``ptjax report``.

A sweep file (YAML)::

    name: fig3a-length            # default: the file's name
    dir: runs/fig3a-length        # default: runs/<name>
    base: ../base.yaml            # a run config (relative to this file), optional
    config:                       # keys on top of base, nested or dotted
      train.steps: 30000
    grid:                         # crossed, in this order
      model.path: [google/t5-small-lm-adapt, google/t5-base-lm-adapt]
      prompt.length: [1, 5, 20, 100, 150]
    zip:                          # zipped together, then crossed with the grid
      method.name: [prompt, model]
      optim.learning_rate: [0.3, 0.001]
    # zip may also be a list of such groups: each zipped, the groups crossed
    seeds: [0, 1, 2]              # one run per seed: the prompt's init and dropout seed
    pack: 8                       # runs differing only in seed / init share a job (K <= 8)
    ensemble: majority            # also score each packed job's prompts as an ensemble

Every run is one prompt (or one tuned model) with a stable id derived from its resolved
config. Runs that differ only in ``seed`` and ``prompt.init`` are packed into one job: a
normal run directory ``DIR/jobs/<job id>`` training K prompts at once over one read of the
frozen weights, each prompt exactly as its own run would train (same data order, own
init, own dropout stream). ``--shard i/N`` runs every N-th job; running the same command
again skips finished jobs and resumes partial ones from their checkpoints.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import sys

import yaml

from ptjax import config as config_lib
from ptjax import methods, preemption, storage
from ptjax.errors import PtjaxError
from ptjax.run import train
from ptjax.sharding import is_main_process

SWEEP_KEYS = ("name", "description", "dir", "base", "config", "grid", "zip", "seeds", "pack",
              "ensemble")
INIT_KEYS = ("prompt.init",)  # what may differ inside a packed job, besides the seed
# Keys that never change what a run computes, but for float rounding (the mesh, the
# microbatches): left out of its id.
NOT_IN_ID = ("run_dir", "train.progress", "train.wandb", "train.eval_batch_size", "mesh.data",
             "mesh.model", "mesh.fsdp", "mesh.distributed", "model.attention",
             "train.microbatches", "train.profile_steps")

# Settings added after the first sweeps: left out of the id while at their default, so
# sweep directories made before them keep their run and job ids.
LATER_DEFAULTS = {"task.target_sentinel": False, "task.template": "", "task.verbalizer": [],
                  "task.verbalizer_tokens": "mean", "task.shots": 0, "task.templates": [],
                  "train.attention_dropout": 0.0, "train.dropout_broadcast": False,
                  "train.prng": "threefry", "task.verbalizer_loss": "first_word",
                  "task.verbalizer_kind": "manual", "task.mixture": [],
                  "task.mixture_rates": "proportional", "task.source": "tfds",
                  "task.hf_path": "", "train.ensemble_weighting": "equal",
                  "train.ensemble_weights": []}


@dataclasses.dataclass(frozen=True)
class Run:
    """One prompt (or one tuned model): its id, the swept settings and its config."""
    id: str
    settings: dict
    config: config_lib.RunConfig


@dataclasses.dataclass(frozen=True)
class Job:
    """Runs trained together; ``config`` is a normal run config with K = len(runs)."""
    id: str
    runs: tuple
    config: config_lib.RunConfig

    @property
    def run_dir(self) -> str:
        return self.config.run_dir


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    path: str
    dir: str
    keys: tuple  # swept keys, "seed" last
    runs: tuple
    jobs: tuple
    description: str = ""


def _canonical(cfg) -> dict:
    d = config_lib.to_dict(cfg)
    # The method seam moved train.method to method.name and added method sections: ids
    # keep the old form; the named method's own section enters once it leaves its
    # defaults (other methods' sections do not change what this run computes).
    method = d.pop("method")
    name = d["train"]["method"] = method.pop("name")
    defaults = config_lib.to_dict(config_lib.MethodConfig())
    if name in method and method[name] != defaults[name]:
        d["method"] = {name: method[name]}
    for key in NOT_IN_ID:
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            node = node[p]
        node.pop(parts[-1], None)
    for key, default in LATER_DEFAULTS.items():
        section, name = key.split(".")
        if d[section].get(name) == default:
            del d[section][name]
    if d.get("pretrain") == config_lib.to_dict(config_lib.PretrainConfig()):
        del d["pretrain"]  # a later section: ids of runs that do not pretrain stay as they were
    return d


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def run_id(cfg) -> str:
    """A stable id for a run: the hash of its resolved config (devices and paths aside)."""
    return _hash(_canonical(cfg))


def _flatten(data: dict, prefix: str = "") -> dict:
    """{"train": {"steps": 3}, "a.b": 1} -> {"train.steps": 3, "a.b": 1}."""
    out = {}
    leaves = set(config_lib.all_keys())  # a mapping-valued key (task.verbalizer) stays whole
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in leaves:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(data: dict, key: str, value):
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _check_axis(key: str, where: str):
    if key in ("prompt.seeds", "seed"):
        raise PtjaxError(f"{where}: sweep axis {key!r}: give seeds with the top-level "
                         "'seeds: [0, 1, 2]' (one run per seed)")
    if key not in config_lib.all_keys() or key == "run_dir":
        raise config_lib.unknown_key(key, where + ": sweep axis")


def _read(path: str) -> dict:
    if not os.path.exists(path):
        raise PtjaxError(f"{path}: sweep file not found")
    try:
        with open(path) as f:
            data = config_lib.parse_yaml(f) or {}
    except yaml.YAMLError as e:
        raise PtjaxError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PtjaxError(f"{path}: a sweep file holds a mapping ({', '.join(SWEEP_KEYS)})")
    for key in data:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(key, SWEEP_KEYS, n=1, cutoff=0.5)
            if not close and key in config_lib.all_keys() + [k.split(".")[0] for k in
                                                              config_lib.all_keys()]:
                close = ["config"]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PtjaxError(f"{path}: unknown sweep key {key!r}{hint} (valid: "
                             f"{', '.join(SWEEP_KEYS)})")
    return data


def _axes(axes, name: str, path: str) -> dict:
    """One mapping of config keys to non-empty lists of values (``grid`` or a zip group)."""
    axes = axes or {}
    if not isinstance(axes, dict):
        raise PtjaxError(f"{path}: {name} must map config keys to lists of values")
    axes = {config_lib.current_key(k): v for k, v in axes.items()}
    for key, values in axes.items():
        _check_axis(key, path)
        if not isinstance(values, list) or not values:
            raise PtjaxError(f"{path}: {name}.{key} must be a non-empty list of values "
                             f"(got {values!r}); an empty axis makes an empty sweep")
    return axes


def _zip_groups(data: dict, path: str) -> list[dict]:
    """``zip``: one mapping of equal-length axes, or a list of them (crossed)."""
    raw = data.get("zip") or {}
    groups = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(g, dict) or g is None for g in groups):
        raise PtjaxError(f"{path}: zip must map config keys to lists of values (or be a list "
                         "of such mappings)")
    groups = [_axes(g, "zip", path) for g in groups]
    seen = set()
    for g in groups:
        if seen & set(g):
            raise PtjaxError(f"{path}: {sorted(seen & set(g))[0]!r} is in two zip groups")
        seen |= set(g)
        if len({len(v) for v in g.values()}) > 1:
            raise PtjaxError(f"{path}: zip axes must have equal lengths (got "
                             f"{', '.join(f'{k}: {len(v)}' for k, v in g.items())})")
    return groups


def load_sweep(path: str, directory: str | None = None) -> Sweep:
    """Expand a sweep file into runs and packed jobs (nothing is written)."""
    data = _read(path)
    name = str(data.get("name") or os.path.splitext(os.path.basename(path))[0])
    base = {}
    if data.get("base"):
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), data["base"])
        base = config_lib.to_dict(config_lib.load_config(base_path))
        base.pop("run_dir", None)
    overrides = data.get("config") or {}
    if not isinstance(overrides, dict):
        raise PtjaxError(f"{path}: config must be a mapping of config keys")
    for key, value in _flatten(overrides).items():
        key = config_lib.current_key(key)
        if key not in config_lib.all_keys():
            raise config_lib.unknown_key(key, f"{path}: config")
        _set(base, key, value)
    grid, groups = _axes(data.get("grid"), "grid", path), _zip_groups(data, path)
    zipped = {k: v for g in groups for k, v in g.items()}
    both = set(grid) & set(zipped)
    if both:
        raise PtjaxError(f"{path}: {sorted(both)[0]!r} is both a grid and a zip axis")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise PtjaxError(f"{path}: seeds must be a non-empty list of integers (got {seeds!r})")
    pack = data.get("pack", 8)
    pack = 1 if pack is False else (8 if pack is True else pack)
    if not isinstance(pack, int) or pack < 1:
        raise PtjaxError(f"{path}: pack must be true, false or a positive number of prompts "
                         f"per job (got {pack!r})")
    ensemble = data.get("ensemble") or ""
    if ensemble and ensemble not in config_lib.ENSEMBLES:
        raise PtjaxError(f"{path}: ensemble={ensemble!r} is not valid; valid: "
                         f"{', '.join(config_lib.ENSEMBLES)}")
    directory = directory or data.get("dir") or os.path.join("runs", name)
    keys = tuple(grid) + tuple(zipped) + ("seed",)

    zip_rows = [{k: v for row in rows for k, v in row.items()}
                for rows in itertools.product(*(
                    [dict(zip(g, vals)) for vals in zip(*g.values())] if g else [{}]
                    for g in groups))]
    runs, seen = [], {}
    for grid_vals in itertools.product(*grid.values()):
        for zip_row in zip_rows:
            for seed in seeds:
                settings = {**dict(zip(grid, grid_vals)), **zip_row, "seed": seed}
                cfg_data = json.loads(json.dumps(base))
                for key, value in settings.items():
                    if key != "seed":
                        _set(cfg_data, key, value)
                _set(cfg_data, "prompt.seeds", [seed])
                _set(cfg_data, "prompt.inits", [])
                _set(cfg_data, "train.ensemble", "")
                _set(cfg_data, "run_dir", "")
                where = f"{path} run {', '.join(f'{k}={v}' for k, v in settings.items())}"
                cfg = config_lib.from_dict(cfg_data, where=where)
                rid = run_id(cfg)
                if rid in seen:
                    raise PtjaxError(f"{path}: runs {seen[rid]} and {settings} are the same "
                                     "run; remove the duplicate axis value")
                seen[rid] = settings
                runs.append(Run(rid, settings, cfg))
    jobs = _pack(runs, pack, ensemble, directory)
    return Sweep(name, os.path.abspath(path), directory, keys, tuple(runs), tuple(jobs),
                 str(data.get("description") or ""))


def _pack_key(cfg) -> str:
    d = _canonical(cfg)
    d["prompt"].pop("seeds"), d["prompt"].pop("init"), d["prompt"].pop("inits")
    return json.dumps(d, sort_keys=True)


def _pack(runs, pack: int, ensemble: str, directory: str) -> list[Job]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        packs = methods.build(run.config, None).packs
        key = _pack_key(run.config) if packs else run.id
        groups.setdefault(key, []).append(run)
    jobs = []
    for members in groups.values():
        for i in range(0, len(members), pack):
            chunk = tuple(members[i:i + pack])
            first = chunk[0].config
            inits = tuple(r.config.prompt.init for r in chunk)
            prompt = dataclasses.replace(
                first.prompt, seeds=tuple(r.config.prompt.seeds[0] for r in chunk),
                init=inits[0], inits=inits if len(set(inits)) > 1 else ())
            train = dataclasses.replace(first.train, ensemble=ensemble if len(chunk) > 1
                                        else "")
            cfg = dataclasses.replace(first, prompt=prompt, train=train)
            jid = _hash([r.id for r in chunk])
            cfg = dataclasses.replace(cfg, run_dir=os.path.join(directory, "jobs", jid))
            jobs.append(Job(jid, chunk, config_lib.validate(cfg)))
    return jobs


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/N' -> (i, N), 0 <= i < N."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PtjaxError(f"--shard {text!r} must look like i/N (e.g. 0/4)") from None
    if n < 1 or not 0 <= i < n:
        raise PtjaxError(f"--shard {text}: the index must be in 0..{max(n - 1, 0)} for N={n}")
    return i, n


def manifest(sweep: Sweep) -> dict:
    return {"name": sweep.name, "sweep_file": sweep.path, "description": sweep.description,
            "keys": list(sweep.keys),
            "runs": [{"run": r.id, "job": j.id, "prompt": k, "settings": r.settings}
                     for j in sweep.jobs for k, r in enumerate(j.runs)],
            "jobs": [{"job": j.id, "runs": [r.id for r in j.runs]} for j in sweep.jobs]}


def write_manifest(sweep: Sweep):
    """DIR/sweep.json; a directory made by another sweep is refused, nothing overwritten."""
    path = os.path.join(sweep.dir, "sweep.json")
    new = manifest(sweep)
    if storage.exists(path):
        old = json.loads(storage.read_text(path))
        if sorted(r["run"] for r in old["runs"]) != sorted(r["run"] for r in new["runs"]):
            raise PtjaxError(
                f"{path}: this directory holds sweep {old['name']!r} from "
                f"{old['sweep_file']} ({len(old['runs'])} runs), which {sweep.path} does not "
                "reproduce; give another directory (--dir) or the same sweep file")
        return
    storage.makedirs(sweep.dir)
    storage.write_text(path, json.dumps(new, indent=2))  # atomic


def seedless_runs(sweep: Sweep) -> list:
    """Runs whose seed changes nothing: model tuning (no prompt to initialise) without
    dropout trains the same weights on the same data order for every seed, so its seeds
    repeat one run and its interval over seeds is 0."""
    out = []
    for run in sweep.runs:
        c = run.config
        if c.method.name == "model" and not c.train.dropout and not c.train.attention_dropout:
            out.append(run)
    return out if len({r.settings.get("seed") for r in out}) > 1 else []


def job_done(job: Job) -> bool:
    path = os.path.join(job.run_dir, "results.json")
    if not storage.exists(path):
        return False
    results = json.loads(storage.read_text(path))
    if results.get("method") == "design":  # prompt design trains nothing: 0 steps is done
        return results.get("steps") == 0
    return results.get("steps") == job.config.train.steps


def _describe(job: Job, keys) -> str:
    first = job.runs[0].settings
    fixed = ", ".join(f"{k}={first[k]}" for k in keys if k not in ("seed", *INIT_KEYS))
    inits = sorted({r.config.prompt.init for r in job.runs})
    seeds = sorted({r.settings["seed"] for r in job.runs})
    # prompt.init is named only where the method starts from it (not model, prefix, design)
    uses = methods.REGISTRY[job.config.method.name].prompt_init
    return (f"{len(job.runs)} run{'s' * (len(job.runs) > 1)}"
            f"{': ' + fixed if fixed else ''}; seeds {seeds}"
            + (f"; init {', '.join(inits)}" if uses else ""))


def run_sweep(sweep: Sweep, shard=(0, 1), progress: bool = True) -> dict:
    """Train this shard's jobs in order; returns {"done", "skipped", "failed": [...]}."""
    if is_main_process():
        write_manifest(sweep)
    i, n = shard
    mine = [j for idx, j in enumerate(sweep.jobs) if idx % n == i]
    out = {"done": [], "skipped": [], "failed": []}
    with preemption.handling_sigterm():  # a notice between jobs stops before the next
        for idx, job in enumerate(mine, 1):
            if preemption.heard():
                raise preemption.Preempted(f"before job {job.id} ({idx}/{len(mine)})")
            _run_job(sweep, job, f"[{sweep.name} {idx}/{len(mine)}] job {job.id}", progress,
                     out)
    return out


def _run_job(sweep: Sweep, job: Job, head: str, progress: bool, out: dict):
    """Train one job (``run_sweep``) and note it in ``out``: done, skipped or failed."""
    if job_done(job):
        out["skipped"].append(job.id)
        print(f"{head}: finished earlier, skipped")
        return
    print(f"{head}: {_describe(job, sweep.keys)}", flush=True)
    cfg = job.config
    if not progress:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
    try:
        train(cfg)
        out["done"].append(job.id)
    except PtjaxError as e:  # the sweep goes on; the error stays beside the job
        out["failed"].append((job.id, str(e)))
        print(f"{head}: failed: {e}", file=sys.stderr)
        if is_main_process():
            storage.makedirs(job.run_dir)
            storage.write_text(os.path.join(job.run_dir, "error.txt"), str(e) + "\n")


def all_done(sweep: Sweep) -> bool:
    return all(job_done(j) for j in sweep.jobs)
