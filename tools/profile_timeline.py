"""Draw a timeline PNG from the trace `train.profile_steps` writes (a drawing of the trace
file's events, not a screenshot of TensorBoard or Perfetto):

    python tools/profile_timeline.py RUN_DIR/profile OUT.png [--title TEXT]

Reads the newest `plugins/profile/<time>/perfetto_trace.json.gz` under the directory (a
gzip JSON in Chrome's trace event format), draws one row per thread that has events, a
box per complete ("X") event (XLA's ops of a jitted module, coloured by module; Python
calls; the runtime's own), and shades the span of each execution of the train step
(`jit_step`), numbered by the profiled steps. docs/images/profile.png is drawn by it
from a tiny-model run (tests/test_profile.py draws one the same way).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

STEP_MODULE = "jit_step"  # the train step's XLA module: ptjax.train.make_train_step's `step`


def newest_trace(directory: str) -> str:
    """The newest perfetto_trace.json.gz under ``directory`` (a run's profile dir)."""
    found = sorted(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"),
                             recursive=True), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"{directory}: no perfetto_trace.json.gz (run with "
                         "train.profile_steps=[a,b] first)")
    return found[-1]


def read_trace(path: str):
    """(complete events with a duration, {(pid, tid): row name}) of a Chrome trace."""
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    names, processes = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            # XLA's pool threads carry a numeric id after a slash; the name says enough
            names[(e["pid"], e["tid"])] = re.sub(r"^tf_|/-?\d+$", "", e["args"]["name"])
    boxes = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) > 0.01
             and not e["name"].startswith("end: ")]
    rows = {}
    for e in boxes:
        key = (e["pid"], e["tid"])
        rows[key] = f"{processes.get(e['pid'], e['pid'])} {names.get(key, e['tid'])}"
    count = collections.Counter(rows.values())
    seen = collections.Counter()
    for key in sorted(rows, key=lambda k: (rows[k], k)):  # XLAEigen #1, #2: pool threads
        if count[rows[key]] > 1:
            seen[rows[key]] += 1
            rows[key] = f"{rows[key]} #{seen[rows[key]]}"
    return boxes, rows


def step_spans(boxes) -> list[tuple[float, float]]:
    """(start, end) in microseconds of each execution of the train step, in time order."""
    spans = collections.defaultdict(lambda: [float("inf"), 0.0])
    for e in boxes:
        args = e.get("args", {})
        if args.get("hlo_module") == STEP_MODULE:
            span = spans[args.get("run_id")]
            span[0], span[1] = min(span[0], e["ts"]), max(span[1], e["ts"] + e["dur"])
    return sorted(tuple(s) for s in spans.values())


def kind(e) -> str:
    module = e.get("args", {}).get("hlo_module")
    if module:
        return f"XLA: {module}"
    return "Python" if e["name"].startswith("$") else "runtime"


def draw(path: str, out: str, title: str = "", first_step: int | None = None):
    """The timeline of the trace at ``path`` as a PNG at ``out``."""
    import matplotlib  # noqa: PLC0415 (tools: matplotlib only where it draws)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after the backend choice)

    boxes, rows = read_trace(path)
    t0 = min(e["ts"] for e in boxes)
    order = sorted(rows, key=lambda k: rows[k])
    kinds = sorted({kind(e) for e in boxes}, key=lambda k: (not k.startswith("XLA"), k))
    palette = dict(zip(kinds, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(order) + 1.8), dpi=110)
    for i, key in enumerate(order):
        by_kind = collections.defaultdict(list)
        for e in boxes:
            if (e["pid"], e["tid"]) == key:
                by_kind[kind(e)].append(((e["ts"] - t0) / 1e3, e["dur"] / 1e3))
        for k, spans in by_kind.items():
            ax.broken_barh(spans, (i - 0.35, 0.7), facecolors=palette[k], alpha=0.7,
                           linewidth=0)
    spans = step_spans(boxes)
    for n, (a, b) in enumerate(spans):
        ax.axvspan((a - t0) / 1e3, (b - t0) / 1e3, color="0.85", zorder=0)
        label = f"step {first_step + n}" if first_step is not None else f"{STEP_MODULE} #{n + 1}"
        ax.text((a - t0) / 1e3, len(order) - 0.4, label, fontsize=9, va="bottom")
    ax.set_yticks(range(len(order)), [rows[k] for k in order], fontsize=8)
    ax.set_ylim(-0.6, len(order) + 0.2)
    ax.invert_yaxis()
    xlabel = "time since the trace started (ms)"
    end = max(e["ts"] + e["dur"] for e in boxes)
    if spans and end > spans[-1][1] + 0.15 * (spans[-1][1] - t0):
        # what follows the last step is jax.profiler.stop_trace writing the files
        end = spans[-1][1] + 0.15 * (spans[-1][1] - t0)
        xlabel += (f"; cut at the last step's end + 15% (the trace goes on to "
                   f"{(max(e['ts'] + e['dur'] for e in boxes) - t0) / 1e3:.0f} ms, stopping "
                   "the profiler)")
    ax.set_xlim(0, (end - t0) / 1e3)
    ax.set_xlabel(xlabel)
    ax.legend(handles=[matplotlib.patches.Patch(color=palette[k], alpha=0.7, label=k)
                       for k in kinds], loc="upper right", fontsize=8, ncol=len(kinds))
    ax.set_title(title or os.path.relpath(path), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile_dir", help="a run's profile directory (or a trace file)")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--first-step", type=int, default=None,
                        help="number the step executions from this step (train.profile_steps' "
                             "first)")
    a = parser.parse_args(argv)
    path = a.profile_dir if os.path.isfile(a.profile_dir) else newest_trace(a.profile_dir)
    draw(path, a.out, a.title, a.first_step)
    print(f"wrote {a.out} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
