"""Input pipeline throughput against the train step it must feed, for T5-base shapes.

    python benchmarks/input_pipeline.py --input-length 512 --batch 32

Measures examples/s of ``ptjax.data.pipeline.TrainStream`` (sampling, tokenization with a
32k-piece Unigram tokenizer like T5's SentencePiece, truncation, padding to fixed shapes)
on BoolQ-length passages, then compares it with the examples/s the train step consumes:
measured here on this machine for T5-base, and the rate an accelerator would consume at a
given MFU (--mfu, --peak-tflops; default 40% of an H100's 989 bf16 TFLOP/s) by the FLOPs
formula of benchmarks/train_step.py. Results go to benchmarks/results/ as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def t5_like_tokenizer(vocab_size: int = 32000):
    """A Unigram (SentencePiece-model) fast tokenizer like T5's: 32k pieces (the lexicon's
    words as whole pieces, then letters and frequent fragments), Metaspace pre-tokenizer,
    EOS appended to every text."""
    import math

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = _words()
    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    for rank, w in enumerate(words):  # Zipf scores, as a trained model would give
        pieces.setdefault("\u2581" + w, math.log(1.0 / (rank + 1)) - 5.0)
    for c in "abcdefghijklmnopqrstuvwxyz":
        pieces.setdefault(c, -20.0)
        pieces.setdefault("\u2581" + c, -20.0)
    pieces.setdefault("\u2581", -20.0)
    rng = random.Random(2)
    while len(pieces) < vocab_size:  # fragments, so that rare strings split realistically
        w = rng.choice(words)
        i = rng.randrange(len(w))
        pieces.setdefault(w[i:i + rng.randint(2, 6)], -15.0)
    tok = Tokenizer(models.Unigram(list(pieces.items()), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def _words(n: int = 8000):
    """An English-like lexicon: word lengths 2-12, drawn by a Zipf law when sampled."""
    rng = random.Random(0)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4,
               2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    return ["".join(rng.choices(letters, weights, k=max(2, min(12, int(rng.gauss(5, 2))))))
            for _ in range(n)]


def _sentences(n: int, seed: int, length=(50, 50)):
    words = _words()
    weights = [1.0 / (r + 1) for r in range(len(words))]  # Zipf
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, weights, k=rng.randint(*length))) for _ in range(n)]


def boolq_like(n: int, seed: int = 0):
    """Passages of 250-550 words (about 300-650 tokens) with a yes/no question."""
    rng = random.Random(seed)
    passages = _sentences(n, seed, (250, 550))
    questions = _sentences(n, seed + 1, (6, 12))
    return [{"inputs": f"question: {q} passage: {p}", "targets": rng.choice(("True", "False"))}
            for p, q in zip(passages, questions)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="t5-base")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-length", type=int, default=512)
    p.add_argument("--target-length", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=100)
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--batches", type=int, default=40, help="batches timed after the first epoch")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--peak-tflops", type=float, default=989.4, help="H100 dense bf16")
    p.add_argument("--step-batch", type=int, default=4,
                   help="batch for the measured T5 train step on this machine")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import jax

    from ptjax.data import pipeline
    from ptjax.models.model import Model
    from ptjax.models.presets import preset
    from train_step import model_flops

    cfg = preset(a.model)
    tok = t5_like_tokenizer()
    model = Model(config=cfg, params=None, tokenizer=tok)
    examples = boolq_like(a.examples)
    stream = pipeline.TrainStream(model, {0: examples}, 1, a.batch, a.input_length,
                                  a.target_length, seed=0)

    def rate(steps):
        """examples/s of the prefetched stream over ``steps``; truncated fraction."""
        t0, cut = time.perf_counter(), 0
        for arrays, c in pipeline.prefetch(stream.batch, steps):
            cut += c
            assert arrays["input_ids"].shape == (a.batch, a.input_length)
        return len(steps) * a.batch / (time.perf_counter() - t0), cut / (len(steps) * a.batch)

    per_epoch = a.examples // a.batch
    cold, truncated = rate(range(per_epoch))  # the first epoch tokenizes every example
    warm, _ = rate(range(per_epoch, per_epoch + a.batches))  # later epochs: cached ids

    per_example = model_flops(cfg, 1, a.input_length, a.target_length, a.prompt_length)
    accel_rate = a.mfu * a.peak_tflops * 1e12 / per_example

    # the train step on this machine, same shapes (smaller batch: CPUs are slow)
    from train_step import run_ptjax

    ns = argparse.Namespace(model=a.model, batch=a.step_batch, input_length=a.input_length,
                            target_length=a.target_length, prompt_length=a.prompt_length,
                            prompts=1, dtype="float32", remat="none", dropout=0.1, steps=2,
                            warmup=1)
    step = run_ptjax(ns)
    local_rate = a.step_batch / step["step_s"]
    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.node(),
        "cpu_count": os.cpu_count(), "device": jax.devices()[0].device_kind,
        "command": "python benchmarks/input_pipeline.py " + " ".join(argv or sys.argv[1:]),
        "args": vars(a), "pipeline_examples_per_s_first_epoch": cold,
        "pipeline_examples_per_s_later_epochs": warm, "truncated_fraction": truncated,
        "train_step_examples_per_s_here": local_rate,
        "accelerator_examples_per_s_at_mfu": accel_rate,
        "flops_per_example": per_example,
        "headroom_first_epoch": cold / accel_rate, "headroom_later_epochs": warm / accel_rate,
    }
    print(f"input pipeline      {cold:9.1f} examples/s  first epoch: tokenizing "
          f"({a.input_length} input tokens, {100 * truncated:.0f}% truncated)")
    print(f"                    {warm:9.1f} examples/s  later epochs: cached token ids")
    print(f"train step here     {local_rate:9.1f} examples/s  ({step['device']}, {a.model}, "
          f"P={a.prompt_length})")
    print(f"accelerator at {100 * a.mfu:.0f}% MFU {accel_rate:9.1f} examples/s  "
          f"({a.peak_tflops:.0f} peak TFLOP/s, {per_example / 1e12:.2f} TFLOP/example)")
    print(f"pipeline / accelerator: {result['headroom_first_epoch']:.1f}x first epoch, "
          f"{result['headroom_later_epochs']:.1f}x later")
    from train_step import write_result

    write_result(result, a.out, f"input_pipeline-{result['date']}-{result['device']}-"
                 f"{a.model}-in{a.input_length}.json")


if __name__ == "__main__":
    main()
