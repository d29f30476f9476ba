"""What pre-training taught, with no training: each lab checkpoint scores held-out lines
of Shakespeare and the same lines with 6 consecutive words shuffled (the
``shakespeare_order`` task's corruption), and we count how often the real line is the
more likely one. The decoder reads the line after an empty input (EOS only), as LM
adaptation's prefix LM does; span corruption never trained that, which the numbers show.

    python experiments/lab/probe.py runs/lab/pretrain/*/model [--out runs/lab/probe.csv]

One row per checkpoint: parameters, objective, pairs, the share where the real line is
more likely (Wilson 95% interval) and the mean NLL per token of the real lines.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys

import jax
import numpy as np
import pandas as pd

from ptjax.data.corpus import _speeches, load_corpus
from ptjax.data.encoding import encode
from ptjax.models.model import load_model
from ptjax.report import pretrain_results
from ptjax.train import sequence_nll

PAIRS_SEED = 0


def pairs(n: int = 150, words: int = 20, window: int = 6) -> list[tuple[str, str]]:
    """(real line, the line with one window shuffled) from the held-out scenes."""
    corpus = load_corpus("shakespeare")
    rng = random.Random(f"probe-{PAIRS_SEED}")
    pool = [s[:words] for d in corpus.validation for s in _speeches(d) if len(s) >= words]
    out = []
    for line in rng.sample(pool, n):
        start = rng.randrange(words - window + 1)
        part = line[start:start + window]
        shuffled = part[:]
        while shuffled == part:
            rng.shuffle(shuffled)
        out.append((" ".join(line), " ".join(line[:start] + shuffled + line[start + window:])))
    return out


def line_nll(model, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and token count (EOS included) of each text as the decoder's target
    after an empty input (the encoder reads EOS alone): ([N], [N])."""
    arrays, cut = encode(model, [{"inputs": "", "targets": t} for t in texts], 1,
                         max(len(model.tokenizer(t).input_ids) for t in texts))
    assert cut == 0
    nll, n = jax.jit(lambda p, b: sequence_nll(model, p, b))(model.params, arrays)
    return np.asarray(nll), np.asarray(n)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return mid - half, mid + half


def probe(paths: list[str]) -> list[dict]:
    data = pairs()
    rows = []
    for path in paths:
        model = load_model(path)
        real, n_tok = line_nll(model, [a for a, _ in data])
        fake, _ = line_nll(model, [b for _, b in data])
        k = int((real < fake).sum())
        lo, hi = wilson(k, len(data))
        done = pretrain_results(path)
        rows.append({"checkpoint": path, "objective": done.get("objective", ""),
                     "steps": done.get("steps", ""),
                     "parameters": sum(x.size for x in jax.tree.leaves(model.params)),
                     "pairs": len(data), "real_more_likely": 100 * k / len(data),
                     "ci95_low": 100 * lo, "ci95_high": 100 * hi,
                     "nll_per_token": float(real.sum() / n_tok.sum())})
        print(f"{path}: real line more likely in {k}/{len(data)} pairs "
              f"({100 * lo:.1f}-{100 * hi:.1f}%), NLL/token {rows[-1]['nll_per_token']:.3f}",
              flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="checkpoint directories (RUN/model)")
    p.add_argument("--out", default="runs/lab/probe.csv")
    a = p.parse_args(argv)
    df = pd.DataFrame(probe(a.models))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    df.to_csv(a.out, index=False)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
