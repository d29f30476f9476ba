"""The ``ptjax`` command line.

    ptjax info MODEL                 architecture, parameter count, weights file
    ptjax generate MODEL|RUN_DIR TEXT ...   greedy decoding, beam search (--num-beams) or
                                     sampling (--sample), behind a trained run's member k
                                     or a random soft prompt
    ptjax tiny DIR [--family t5]     write a built-in tiny model (no network needed)
    ptjax train [CONFIG.yaml] [key=value ...]   train (method.name: prompt | prefix | ptuning |
                                     model); resumes a killed run
    ptjax pretrain CONFIG [key=value ...]   pre-train a T5 on a corpus (pretrain.objective:
                                     span_corruption | prefix_lm); resumes a killed run
    ptjax eval RUN_DIR|CONFIG [key=value ...] [--prompt FILE]   evaluate a trained run
    ptjax eval RUN_DIR RUN_DIR ... [key=value ...]   several runs on one frozen model in
                                     shared batches (each row its own prompt or prefix)
    ptjax serve RUN_DIR [RUN_DIR ...] [key=value ...] [--port 8000]   an HTTP/JSON server
                                     of the runs, requests of every run batched together
    ptjax plan CONFIG [key=value ...] [--device-memory 80GB] [--target h100 [--topology 8]]
                                     memory per device and FLOPs, before a run; --target:
                                     compiled for an accelerator this machine does not have
    ptjax sweep SWEEP.yaml [--shard i/N]   run a sweep (skips finished jobs), then report
    ptjax report SWEEP_DIR               tables and the paper's plots
    ptjax neighbors RUN_DIR [--k 5]      nearest vocabulary tokens of each prompt position
    ptjax export RUN_DIR [--out DIR]     write a run's best members (any method) from its
                                     newest checkpoint, mid-run too
    ptjax config show [CONFIG|RUN_DIR] [key=value ...]   the resolved config, every key
    ptjax verbalizer CONFIG [key=value ...] [--k 10] [--n 20] [--per-class 16]   label words
                                     searched at the template's {mask} (LM-BFF's automatic
                                     label word selection), ready as task.verbalizer=...
    ptjax --version

A user's mistake (bad path, unsupported model, wrong shape) prints one line and exits 2.
A run stopped by SIGTERM (preemption) saves its step and exits 75; the same command resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import jax

from ptjax import __version__, targets
from ptjax.commands import (cmd_config, cmd_eval, cmd_export, cmd_generate, cmd_info, cmd_neighbors,
                            cmd_plan, cmd_pretrain, cmd_report, cmd_serve, cmd_sweep, cmd_tiny,
                            cmd_train, cmd_verbalizer)
from ptjax.errors import PtjaxError
from ptjax.preemption import EXIT_PREEMPTED, Preempted
from ptjax.serving import SIZES


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

    sp = sub.add_parser("generate", help="greedy decoding, beam search or sampling")
    sp.add_argument("model", help="checkpoint directory, Hugging Face hub id, or a trained "
                                  "run directory (any method)")
    sp.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    sp.add_argument("--k", type=int, default=0, help="a trained run's member (prompt k)")
    sp.add_argument("text", nargs="+")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--prompt-length", type=int, default=0,
                    help="prepend a random uniform[-0.5, 0.5] soft prompt of this length")
    sp.add_argument("--seed", type=int, default=0,
                    help="seeds the random prompt and sampling")
    sp.add_argument("--num-beams", type=int, default=1,
                    help="beam search with this many beams (1: greedy), as transformers")
    sp.add_argument("--num-return-sequences", type=int, default=1,
                    help="with --num-beams: print this many best beams per text")
    sp.add_argument("--length-penalty", type=float, default=1.0,
                    help="beams rank by sum of log-probs / new tokens ** this")
    sp.add_argument("--early-stopping", default="false", choices=["false", "true", "never"],
                    help="when beam search stops (transformers' early_stopping)")
    sp.add_argument("--sample", action="store_true",
                    help="sample instead of taking the most likely token")
    sp.add_argument("--temperature", type=float, help="with --sample (default 1.0)")
    sp.add_argument("--top-k", type=int,
                    help="with --sample: keep the k most likely tokens (default 50; 0: all)")
    sp.add_argument("--top-p", type=float, help="with --sample: keep the most likely tokens "
                                                "up to this mass (default 1.0: all)")
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

    sp = sub.add_parser("eval", help="evaluate a trained run (or a prompt file) on a split, "
                                     "or several runs on one frozen model together")
    sp.add_argument("items", nargs="*", metavar="RUN_DIR | CONFIG.yaml | key=value",
                    help="a run directory or YAML config (or several run directories: "
                         "evaluated in shared batches), then dotted.key=value overrides")
    sp.add_argument("--prompt", default=None,
                    help="a .npy ([P, D] or [K, P, D]) or safetensors soft prompt; default: "
                         "the run's trained members (best, from its checkpoints)")
    sp.add_argument("--split", default="validation")
    sp.add_argument("--ensemble", default="", choices=["", "majority", "mean_logprob"],
                    help="also score the prompts as one ensemble (one forward over K x B rows)")
    sp.add_argument("--out", default=None, help="also write the metrics to this JSON file "
                                                  "(several runs: {run_dir: metrics})")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("serve", help="trained runs on one frozen model behind an HTTP/JSON "
                                      "server, requests of every run batched together")
    sp.add_argument("items", nargs="+", metavar="RUN_DIR | key=value",
                    help="trained run directories, then dotted.key=value overrides")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--batch-sizes", default=",".join(map(str, SIZES)),
                    help="batch-size buckets in rows, all compiled before listening "
                         "(the largest: the most rows of one batch)")
    sp.add_argument("--window-ms", type=float, default=2.0,
                    help="how long a batch's first request waits for others")
    sp.add_argument("--queue", type=int, default=256,
                    help="requests waiting at most; more are answered 429")
    sp.add_argument("--timeout", type=float, default=30.0,
                    help="seconds until a request not yet answered gets 504")
    sp.set_defaults(fn=cmd_serve)

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

    sp = sub.add_parser("verbalizer", help="search label words at the template's {mask} "
                                           "(LM-BFF's automatic label word selection)")
    sp.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                    help="a YAML config (task.template with {mask}), then key=value overrides")
    sp.add_argument("--k", type=int, default=10, help="candidate words per class (top-k)")
    sp.add_argument("--n", type=int, default=20,
                    help="assignments kept by train accuracy, then ranked on dev")
    sp.add_argument("--per-class", type=int, default=None,
                    help="train examples per class, drawn with --seed (LM-BFF: 16); "
                         "default: the whole train split")
    sp.add_argument("--seed", type=int, default=0, help="the draw of --per-class")
    sp.add_argument("--out", default=None,
                    help="the results JSON (default: RUN_DIR/verbalizer.json)")
    sp.set_defaults(fn=cmd_verbalizer)

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
    elif args.command in ("train", "pretrain", "eval", "plan", "sweep", "neighbors", "export",
                          "verbalizer", "serve"):
        enable_compilation_cache()
    try:
        code = args.fn(args)
    except Preempted as e:  # a checkpoint of the last step is saved: not an error
        print(f"ptjax: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
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
