"""Built-in tiny models: a locally trained tokenizer and random weights, saved in Hugging
Face form, so demos and tests run with no network.

    path = build_tiny_model("runs/tiny-t5", family="t5")
    model = ptjax.load_model(path)
"""
from __future__ import annotations

import json
import os
import random

import jax
import transformers
from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

from ptjax.errors import PtjaxError
from ptjax.models import bert, gpt2, t5
from ptjax.models.model import Model, init_params

# Words of the built-in synthetic tasks, so the tiny tokenizer covers them whole.
WORDS = (
    "the a an this that is was and or not very quite rather really movie film story plot "
    "actor scene music ending book song meal place day "
    "good great excellent wonderful lovely fine superb brilliant pleasant delightful "
    "bad awful terrible poor boring dull horrible dreadful weak bland "
    "positive negative neutral yes no true false entailment contradiction "
    "red green blue yellow black white cat dog bird fish horse cow "
    "one two three four five six seven eight nine ten "
    "question answer context premise hypothesis sentence review label "
    "what who where when why how which is are do does did can will"
).split()

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's vocabulary
T5_SENTINELS = 100  # the built-in tiny T5's <extra_id_N>, as many as real T5 checkpoints have
GPT2_EOS = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # <s>=0, <pad>=1, </s>=2 as RoBERTa


def _corpus(n: int = 2000, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))


def train_tokenizer(family: str, vocab_size: int = 512, texts=None, extra_ids: int = 0,
                    kind: str = "bpe", words: bool = True, normalize: bool = False):
    """A tokenizer trained here, wrapped as a transformers fast tokenizer.

    t5: SentencePiece-like (Metaspace) with <pad>=0, </s>=1, <unk>=2 and an EOS appended
    to every sequence, like T5's; ``extra_ids`` sentinels <extra_id_N-1> .. <extra_id_0>
    take the last ids, <extra_id_0> the very last, as in T5's vocabulary. ``kind``: "bpe"
    or "unigram" (SentencePiece's model, as T5's vocabulary is); ``normalize``: NFKC and
    every run of whitespace as one space, as T5's SentencePiece normalizer does (text
    with newlines, e.g. ``ptjax.data.corpus``). A unigram vocabulary has (at most)
    ``vocab_size`` ids, sentinels included; BPE's sentinels come on top of ``vocab_size``.
    gpt2: byte-level BPE with <|endoftext|> as BOS/EOS.
    bert: lower-cased WordPiece with [PAD]=0, [UNK], [CLS], [SEP], [MASK] and every
    sequence as [CLS] ... [SEP], like bert-base-uncased's.
    roberta: byte-level BPE with <s>=0, <pad>=1, </s>=2, <unk>, <mask> and every sequence as
    <s> ... </s>, like roberta-base's.
    words: also train on the built-in tasks' words, so each is a whole token.
    """
    texts = list(texts) if texts is not None else list(_corpus())
    if words:
        texts += WORDS  # every word reachable as a whole token
    if family == "t5":
        size = vocab_size - extra_ids if kind == "unigram" else vocab_size
        if kind == "unigram":
            tok = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=size, unk_token="<unk>",
                                              special_tokens=list(T5_SPECIALS),
                                              show_progress=False)
        elif kind == "bpe":
            tok = Tokenizer(models.BPE(unk_token="<unk>"))
            trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=list(T5_SPECIALS),
                                          show_progress=False)
        else:
            raise PtjaxError(f"unknown tokenizer kind {kind!r}; valid: bpe, unigram")
        if normalize:
            tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                                   normalizers.Replace(Regex(r"\s+"), " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
        sentinels = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
        tok.add_special_tokens(sentinels)
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                       eos_token="</s>", unk_token="<unk>",
                                       additional_special_tokens=sentinels)
    if family == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[GPT2_EOS], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        # GPT-2 has no pad token; padding with EOS is the usual choice (masked anyway).
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=GPT2_EOS,
                                       eos_token=GPT2_EOS, unk_token=GPT2_EOS,
                                       pad_token=GPT2_EOS)
    if family == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        texts = texts + list(".,;:!?'\"()-")  # punctuation is split off: each its own token
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS), show_progress=False))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    if family == "roberta":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(ROBERTA_SPECIALS), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
            unk_token="<unk>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    raise PtjaxError(f"unknown tiny model family {family!r}; valid: t5, gpt2, bert, roberta")


def tiny_config(family: str, vocab_size: int, **overrides):
    """A config small enough to train in seconds on a laptop CPU."""
    if family == "t5":
        base = dict(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                    num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=16,
                    relative_attention_max_distance=64, feed_forward_proj="gated-gelu",
                    scale_decoder_outputs=False, tie_lm_head=False)
        return t5.T5Config(**{**base, **overrides})
    if family == "bert":
        base = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, max_position_embeddings=256,
                    pad_token_id=0)
        return bert.BertConfig(**{**base, **overrides})
    if family == "roberta":  # positions from pad_token_id + 1: 256 of them after the offset
        base = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, max_position_embeddings=258,
                    type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                    eos_token_id=2, model_type="roberta")
        return bert.BertConfig(**{**base, **overrides})
    base = dict(vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                bos_token_id=0, eos_token_id=0)
    return gpt2.GPT2Config(**{**base, **overrides})


def build_tiny_model(directory: str, family: str = "t5", seed: int = 0,
                     extra_ids: int | None = None, **overrides) -> str:
    """Train a tokenizer, draw random weights and save both in Hugging Face form.

    extra_ids: T5 sentinels in the vocabulary (see ``train_tokenizer``); default: T5's 100
    for t5 (the built-in tiny T5, so templates' ``{mask}`` and ``task.target_sentinel``
    work on it as on a real T5), none for the others. Returns ``directory``; an existing model of
    the same family and sentinels there is reused as it is; another model, or other
    files, are an error (never overwritten).
    """
    if reusable(directory, family, extra_ids):
        return directory
    config, tokenizer = tiny_parts(family, extra_ids, **overrides)
    model = Model(config=config, params=None, tokenizer=tokenizer)
    params = init_params(model.module(), jax.random.key(seed))
    model.save_pretrained(directory, params=params)
    return directory


def tiny_parts(family: str = "t5", extra_ids: int | None = None, **overrides):
    """(config, tokenizer) of a tiny model, no weights: what ``build_tiny_model`` saves,
    and what ``ptjax config show`` checks a config against before the model is built."""
    if extra_ids is None:
        extra_ids = T5_SENTINELS if family == "t5" else 0
    tokenizer = train_tokenizer(family, extra_ids=extra_ids)
    return tiny_config(family, len(tokenizer), **overrides), tokenizer


def reusable(directory: str, family: str = "t5", extra_ids: int | None = None) -> bool:
    """Whether ``directory`` holds the tiny model ``build_tiny_model`` would write (True:
    reuse it) or nothing (False: build it); anything else is a one-line error."""
    if extra_ids is None:
        extra_ids = T5_SENTINELS if family == "t5" else 0
    existing = os.path.join(directory, "config.json")
    if os.path.exists(existing):  # reuse it, but never in place of another model
        try:
            with open(existing, encoding="utf-8") as f:
                found = json.load(f).get("model_type")
        except (OSError, ValueError):
            found = None
        if found != family:
            raise PtjaxError(f"{directory}: already holds a model of type {found!r}, not a "
                             f"tiny {family}; give an empty or new directory")
        have = _sentinels(directory) if family == "t5" else 0
        if have is not None and have != extra_ids:
            raise PtjaxError(f"{directory}: holds a tiny t5 with {have} sentinel tokens, not "
                             f"{extra_ids} (the built-in tiny T5 now has T5's {T5_SENTINELS}: an "
                             "older ptjax built this one); delete the directory and it is built "
                             "again, or give another one")
        return True
    if os.path.isdir(directory) and os.listdir(directory):
        raise PtjaxError(f"{directory}: is not empty and holds no model; give an empty or new "
                         "directory for the tiny model")
    return False


def _sentinels(directory: str) -> int | None:
    """How many <extra_id_N> tokens a saved tiny model's tokenizer.json holds (None: no
    readable tokenizer.json, nothing to compare)."""
    try:
        with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
            added = json.load(f).get("added_tokens", [])
    except (OSError, ValueError):
        return None
    return sum(str(t.get("content", "")).startswith("<extra_id_") for t in added)
