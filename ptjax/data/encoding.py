"""Text-to-text examples -> fixed-shape numpy arrays (the train stream and the dev sets
batch these: ``ptjax.data.pipeline``).

Shapes are fixed by the config (inputs ``Li`` = task.max_input_length, targets ``Lt`` =
task.max_target_length), so the jitted step compiles once.

T5 (teacher forcing): input_ids/input_mask [N, Li]; decoder_input_ids, targets and
target_mask [N, Lt], the decoder input being the targets shifted right behind
decoder_start_token_id. Both sides end in EOS, as T5's tokenizer writes them.

With ``task.target_sentinel`` (T5 only) every target starts with the sentinel
``<extra_id_0>`` in token space, as span-corruption pre-training targets do: the paper's
"span corruption + sentinel" setting (Figure 3c). ``target_prefix`` gives those ids.

GPT-2: one sequence ``inputs + " " + targets + EOS`` right-padded to Li + Lt:
input_ids/input_mask [N, Li+Lt]; targets[t] = the token at t+1 and target_mask marks only
the target tokens (the loss never sees the input), as PEFT's causal-LM labels do.

BERT / RoBERTa (a masked LM): the template's ``{mask}`` becomes task.max_target_length
(M) mask tokens inside ``[CLS] ... [SEP]`` (RoBERTa's <s> ... </s>), and the target's
tokens (" " + target, no special tokens) are predicted there: input_ids/input_mask,
targets and target_mask [N, Li] (+ the soft tokens), targets[t] = the target token the
mask at t stands for, target_mask marking them. A shorter word leaves the masks after it
unscored: PET's scoring of multi-token label words in one pass (Schick & Schütze 2021,
"It's Not Just Size That Matters", M = the longest word's tokens); set
task.max_target_length to that.

With a template (``ptjax.data.templates``) the input is laid out by it, and its P soft
tokens take places of their own: inputs are Li + P wide, and ``slots`` (same shape as
input_ids, and gen_slots as gen_ids) holds at each place the index of the soft vector
that goes there (-1 elsewhere). Tokenized inputs mark a soft token as id -(1 + index).

With several templates (a tuple, ``task.templates``: one per member) every array gets a
member axis after the rows, [N, K, ...], each member's layout padded to the widest
(Li + the most soft tokens of any); rows stay the first axis, so batches shard and split
as before, and member k reads ``[:, k]``.
"""
from __future__ import annotations

import weakref

import numpy as np
import tokenizers

from ptjax.data.templates import field_values
from ptjax.errors import PtjaxError


def _clip(ids, limit, keep_last=None):
    """ids cut to ``limit`` tokens (keeping a final EOS if given); also says if it cut."""
    if len(ids) <= limit:
        return list(ids), False
    if keep_last is not None and ids and ids[-1] == keep_last:
        return list(ids[:limit - 1]) + [keep_last], True
    return list(ids[:limit]), True


_TRUNCATING = weakref.WeakKeyDictionary()  # tokenizer -> {max_length: Rust tokenizer}


def _truncating(tokenizer, max_length: int):
    """The tokenizer's Rust backend set to truncate at ``max_length`` (special tokens such
    as T5's EOS kept, as ``truncation=True`` does), or None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    by_length = _TRUNCATING.setdefault(tokenizer, {})
    if max_length not in by_length:
        copy = tokenizers.Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        copy.enable_truncation(max_length)
        by_length[max_length] = copy
    return by_length[max_length]


CHARS_PER_TOKEN = 8  # prefix budget for long texts (English averages about 4)


_SPLITTING = ("Metaspace", "ByteLevel", "Whitespace", "WhitespaceSplit", "BertPreTokenizer")


def _splits_at_spaces(backend) -> bool:
    """True when the pre-tokenizer cuts words at spaces, so tokens never span one."""
    text = repr(backend.pre_tokenizer)  # also lists the parts of a Sequence
    return any(f"{name}(" in text for name in _SPLITTING) and "split=False" not in text


def _tokenize(tokenizer, texts, max_length: int, eos=None):
    """[(ids, truncated)] for each text: tokenized with the tokenizer's special tokens, cut
    to ``max_length`` in the Rust tokenizer (a long passage never becomes a Python list).
    eos: append this id after the text's own tokens (GPT-2 targets), within max_length."""
    if not texts:
        return []
    limit = max_length - (eos is not None)
    fast = _truncating(tokenizer, limit)
    if fast is None:  # a slow (pure Python) tokenizer
        rows = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        if eos is not None:
            return [_clip(ids + [eos], max_length, eos) for ids in rows]
        specials = tokenizer.all_special_ids
        return [_clip(ids, max_length, ids[-1] if ids and ids[-1] in specials else None)
                for ids in rows]
    texts = list(texts)
    # A text far longer than the limit is tokenized from a prefix cut at a space: with a
    # pre-tokenizer that splits words at spaces the first tokens are the same, and if the
    # prefix still overflows, the kept tokens are exact. Otherwise the whole text is used.
    budget = CHARS_PER_TOKEN * max_length if _splits_at_spaces(fast) else None
    cuts = [t.find(" ", budget) if budget and len(t) > budget else -1 for t in texts]
    encs = fast.encode_batch([t[:c] if c > 0 else t for t, c in zip(texts, cuts)])
    redo = [i for i, (c, e) in enumerate(zip(cuts, encs)) if c > 0 and not e.overflowing]
    for i, e in zip(redo, fast.encode_batch([texts[i] for i in redo])):
        encs[i] = e
    out = [(e.ids, bool(e.overflowing)) for e in encs]
    if eos is not None:
        out = [(ids + [eos], cut) for ids, cut in out]
    return out


def _pad(rows, length, pad_id, left=False):
    out = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if left:
            out[i, length - len(r):], mask[i, length - len(r):] = r, 1
        else:
            out[i, :len(r)], mask[i, :len(r)] = r, 1
    return out, mask


SENTINEL = "<extra_id_0>"  # T5's first span-corruption sentinel, the vocabulary's last id
MASK_SLOT = -(2 ** 30)  # a masked LM's {mask} token while tokenized (soft tokens are -1..-P)


def _tokenizer(model):
    if model.tokenizer is None:
        raise PtjaxError(f"{model.path}: the checkpoint has no tokenizer files, so task text "
                         "cannot be encoded")
    return model.tokenizer


def target_prefix(model, sentinel: bool, max_target_length: int,
                  why: str = "task.target_sentinel=true") -> tuple:
    """Token ids put before every target: () or, with ``sentinel`` (task.target_sentinel),
    T5's ``<extra_id_0>``, so downstream targets look like span-corruption targets.
    why: the setting that asked for the sentinel, named by the errors."""
    if not sentinel:
        return ()
    if max_target_length < 2:
        raise PtjaxError(f"{why} puts {SENTINEL} before every target; "
                         f"task.max_target_length={max_target_length} leaves no room for it")
    if not model.is_encoder_decoder:
        what = "a decoder-only" if model.kind == "causal" else \
            "a masked LM (its {mask} is its own mask token, targets have no sentinel)"
        raise PtjaxError(f"{why} needs a T5 checkpoint with span-"
                         f"corruption sentinels; {model.path} is {what} model")
    tok = _tokenizer(model)
    i = tok.convert_tokens_to_ids(SENTINEL)
    if i is None or i == tok.unk_token_id or i >= model.config.vocab_size:
        raise PtjaxError(f"{why}: the tokenizer of {model.path} has no "
                         f"{SENTINEL} token; only T5 checkpoints with extra_ids have one")
    return (int(i),)


def tokenize(model, examples, max_input_length: int, max_target_length: int,
             target_prefix: tuple = (), template=None) -> list:
    """Per example (input ids, target ids, truncated), cut to the configured lengths;
    ``target_prefix`` ids (T5) start every target and count towards its length.
    template: lay the input out by a ``Template`` (soft tokens as ids -(1 + index))."""
    tok, cfg = _tokenizer(model), model.config
    if not examples:  # e.g. a batch whose examples were all tokenized before (the cache)
        return []
    if model.kind == "masked":
        if template is None or not template.has_mask:
            raise PtjaxError("a masked LM predicts its targets at mask tokens: it needs "
                             "task.template with {mask} (e.g. '{inputs} It was {mask}.')")
        inputs = _tokenize_template(model, template, examples, max_input_length,
                                    masks=max_target_length)
        targets = [_clip(ids, max_target_length) for ids in tok(
            [" " + e["targets"] for e in examples], add_special_tokens=False)["input_ids"]]
        return [(a, b, ca or cb) for (a, ca), (b, cb) in zip(inputs, targets)]
    if template is not None:
        inputs = _tokenize_template(model, template, examples, max_input_length)
    else:
        inputs = _tokenize(tok, [e["inputs"] for e in examples], max_input_length)
    if model.is_encoder_decoder:
        targets = _tokenize(tok, [e["targets"] for e in examples],
                            max_target_length - len(target_prefix))
        targets = [(list(target_prefix) + ids, cut) for ids, cut in targets]
    else:  # " " + target, then EOS: what PEFT's causal-LM labels hold
        targets = _tokenize(tok, [" " + e["targets"] for e in examples], max_target_length,
                            eos=cfg.eos_token_id)
    return [(a, b, ca or cb) for (a, ca), (b, cb) in zip(inputs, targets)]


def _split_slots(ids_NxL, pad_id):
    """Soft tokens (ids < 0) -> (ids with the pad id there, slots: vector index or -1)."""
    slots = np.where(ids_NxL < 0, -ids_NxL - 1, -1).astype(np.int32)
    return np.where(ids_NxL < 0, pad_id, ids_NxL).astype(np.int32), slots


def assemble(model, tokenized, max_input_length: int, max_target_length: int,
             soft_tokens: int = 0) -> dict:
    """Tokenized examples (``tokenize``) -> the fixed-shape arrays of the module docstring.
    soft_tokens: P of a template with soft slots (inputs are Li + P wide, with ``slots``)."""
    cfg = model.config
    width = max_input_length + soft_tokens
    if model.kind == "masked":
        return _assemble_masked(model, tokenized, width, soft_tokens)
    if model.is_encoder_decoder:
        input_ids, input_mask = _pad([a for a, _, _ in tokenized], width, cfg.pad_token_id)
        targets, target_mask = _pad([b for _, b, _ in tokenized], max_target_length,
                                    cfg.pad_token_id)
        dec = np.concatenate([np.full((len(tokenized), 1), cfg.decoder_start_token_id,
                                      np.int32), targets[:, :-1]], axis=1)
        out = dict(input_ids=input_ids, input_mask=input_mask, decoder_input_ids=dec,
                   targets=targets, target_mask=target_mask)
        if soft_tokens:
            out["input_ids"], out["slots"] = _split_slots(input_ids, cfg.pad_token_id)
        return out
    pad = cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id
    seqs = [a + b for a, b, _ in tokenized]
    input_ids, input_mask = _pad(seqs, width + max_target_length, pad)
    targets = np.concatenate([input_ids[:, 1:], np.full((len(seqs), 1), pad, np.int32)], 1)
    targets = np.maximum(targets, 0)  # a soft token is never a target (target_mask is 0)
    target_mask = np.zeros_like(input_mask)
    for i, (a, b, _) in enumerate(tokenized):
        target_mask[i, len(a) - 1:len(a) + len(b) - 1] = 1  # positions predicting the target
    # generation reads the inputs alone, left-padded so every row ends at the same slot
    gen_ids, gen_mask = _pad([a for a, _, _ in tokenized], width, pad, left=True)
    out = dict(input_ids=input_ids, input_mask=input_mask, targets=targets,
               target_mask=target_mask, gen_ids=gen_ids, gen_mask=gen_mask)
    if soft_tokens:
        out["input_ids"], out["slots"] = _split_slots(input_ids, pad)
        out["gen_ids"], out["gen_slots"] = _split_slots(gen_ids, pad)
    return out


def _assemble_masked(model, tokenized, width: int, soft_tokens: int) -> dict:
    """A masked LM's arrays (module docstring): the target's tokens at the mask tokens."""
    pad, mask_id = model.config.pad_token_id, model.tokenizer.mask_token_id
    input_ids, input_mask = _pad([a for a, _, _ in tokenized], width, pad)
    targets = np.zeros_like(input_ids)
    target_mask = np.zeros_like(input_mask)
    for i, (_, b, _) in enumerate(tokenized):
        at = np.flatnonzero(input_ids[i] == MASK_SLOT)[:len(b)]
        targets[i, at], target_mask[i, at] = b, 1
    input_ids = np.where(input_ids == MASK_SLOT, mask_id, input_ids).astype(np.int32)
    out = dict(input_ids=input_ids, input_mask=input_mask, targets=targets,
               target_mask=target_mask)
    if soft_tokens:
        out["input_ids"], out["slots"] = _split_slots(input_ids, pad)
    return out


def soft_width(template) -> int:
    """The soft tokens an encoding's inputs make room for: a template's, the most of
    several templates', 0 without one."""
    if isinstance(template, tuple):
        return max(t.soft_tokens for t in template)
    return 0 if template is None else template.soft_tokens


def stack_members(per_member: list) -> dict:
    """K arrays dicts (one per template) -> one dict of [N, K, ...] arrays."""
    return {k: np.stack([a[k] for a in per_member], axis=1) for k in per_member[0]}


def encode(model, examples, max_input_length: int, max_target_length: int,
           target_prefix: tuple = (), template=None) -> tuple[dict, int]:
    """Examples -> (arrays as in the module docstring, number of truncated examples).
    template: a Template, a tuple of them (one per member: arrays [N, K, ...]) or None."""
    width = soft_width(template)
    per_member = []
    for t in (template if isinstance(template, tuple) else (template,)):
        tokenized = tokenize(model, examples, max_input_length, max_target_length,
                             target_prefix, t)
        per_member.append(assemble(model, tokenized, max_input_length, max_target_length,
                                   width))
    cut = sum(c for _, _, c in tokenized)
    if isinstance(template, tuple):
        return stack_members(per_member), cut
    return per_member[0], cut


def _tokenize_template(model, template, examples, max_length: int, masks: int = 0) -> list:
    """[(input ids with soft tokens as -(1 + index), truncated)] laid out by ``template``:
    pieces tokenized one by one (a space before a piece that follows text), T5's
    <extra_id_0> at {mask} and EOS at the end; fields cut longest-first so the text
    tokens fit ``max_length`` (soft tokens come on top). A masked LM (``masks``): {mask}
    is that many ``MASK_SLOT`` ids and the row is [CLS] ... [SEP] (the tokenizer's)."""
    tok, cfg = _tokenizer(model), model.config
    enc_dec = model.is_encoder_decoder
    masked = model.kind == "masked"
    if masked and tok.mask_token_id is None:
        raise PtjaxError(f"{model.path}: the tokenizer has no mask token, which a masked LM's "
                         "{mask} needs")

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    fixed, seen_text = [], False  # per piece: ids (text, mask, soft) or None (a field)
    for p in template.pieces:
        lead = " " if p.space and seen_text else ""
        if p.kind == "text":
            fixed.append(ids(lead + p.text))
        elif p.kind == "mask" and masked:
            fixed.append([MASK_SLOT] * masks)
        elif p.kind == "mask":
            fixed.append(list(target_prefix(model, True, 2)) if enc_dec else [])
        elif p.kind == "soft":
            fixed.append([-(1 + p.start + j) for j in range(p.n)])
        else:
            fixed.append(None)
        seen_text |= p.kind in ("text", "field")
    eos = [cfg.eos_token_id] if enc_dec else []
    bos = []
    if masked:  # the single-sequence special tokens: [CLS] ... [SEP] / <s> ... </s>
        bos, eos = [tok.cls_token_id], [tok.sep_token_id]
    n_fixed = sum(len([i for i in f if i >= 0 or i == MASK_SLOT]) for f in fixed
                  if f is not None) + len(eos) + len(bos)
    if n_fixed >= max_length:
        raise PtjaxError(f"task.template={template.source!r}: its own text takes {n_fixed} of "
                         f"task.max_input_length={max_length} tokens, leaving none for the "
                         "example's fields; raise task.max_input_length")
    values = [field_values(ex) for ex in examples]
    for name in template.fields:
        if values and name not in values[0]:
            raise PtjaxError(f"task.template={template.source!r}: the examples have no field "
                             f"{{{name}}}; they have: "
                             f"{', '.join('{' + k + '}' for k in values[0])}")
    field_ids, seen_text = {}, False
    for i, p in enumerate(template.pieces):
        if p.kind == "field":
            lead = " " if p.space and seen_text else ""
            rows = tok([lead + str(v[p.name]) for v in values],
                       add_special_tokens=False)["input_ids"]
            field_ids[i] = rows
        seen_text |= p.kind in ("text", "field")
    out = []
    for r in range(len(examples)):
        fields = {i: list(rows[r]) for i, rows in field_ids.items()}
        excess = n_fixed + sum(map(len, fields.values())) - max_length
        cut = excess > 0
        while excess > 0:  # shorten the longest field first
            i = max(fields, key=lambda k: len(fields[k]))
            fields[i].pop()
            excess -= 1
        seq = []
        for i, f in enumerate(fixed):
            seq += fields[i] if f is None else f
        out.append((bos + seq + eos, cut))
    return out
