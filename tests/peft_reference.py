"""Torch-side reference for prefix tuning and P-tuning parity: Hugging Face PEFT (0.21.2) on
transformers (5.24) GPT2LMHeadModel / T5ForConditionalGeneration. Numpy in, numpy out, fp32.

Not a test module. Shapes: B batch, L encoder / GPT-2 length, T decoder length, V vocab,
P num_virtual_tokens, N num_layers (config.num_layers resp. n_layer), D d_model (= H * Dh,
PEFT's token_dim), H heads, Dh head dim. Parameter names are relative to
`peft_model.prompt_encoder["default"]` (PEFT's own module names):

  prefix, projection=False: embedding.weight [P, N*2*D]
  prefix, projection=True:  embedding.weight [P, D], transform.0.weight [hidden, D],
                            transform.0.bias [hidden], transform.2.weight [N*2*D, hidden],
                            transform.2.bias [N*2*D]          (Linear -> tanh -> Linear)
  P-tuning MLP:   embedding.weight [S*P, D], mlp_head.{0,2,4}.weight / .bias, shapes
                  [hidden, D], [hidden, hidden], [D, hidden]  (Linear-ReLU-Linear-ReLU-Linear)
  P-tuning LSTM:  embedding.weight [S*P, D], lstm_head.{weight_ih,weight_hh,bias_ih,bias_hh}_l{0,1}
                  [_reverse] (torch LSTM, 2 layers, bidirectional, gates i,f,g,o; weight_ih_l0
                  [4*hidden, D], weight_ih_l1 [4*hidden, 2*hidden], weight_hh [4*hidden, hidden]),
                  mlp_head.0 [2*hidden, 2*hidden], mlp_head.2 [D, 2*hidden] (Linear-ReLU-Linear)

S = num_transformer_submodules: 1 for GPT-2, 2 for T5 (PEFT's default for SEQ_2_SEQ_LM). Torch
Linear weights are [out, in] (y = x @ W.T + b). See tests/PEFT_NOTES.md for the semantics.
"""
import copy
import warnings

import numpy as np
import peft
import torch


def _wrap(base, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), config)  # the caller's model is untouched
    return model.eval()  # no dropout anywhere (the prompt encoders have none with the defaults)


def _task_type(base):
    if base.config.model_type in ("bert", "roberta"):  # PEFT has no masked-LM task type;
        return "FEATURE_EXTRACTION"  # this one hands BertForMaskedLM the prompted inputs
    return "SEQ_2_SEQ_LM" if base.config.is_encoder_decoder else "CAUSAL_LM"


def _randomise(model, seed, std=0.5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.prompt_encoder["default"].named_parameters():
            p.normal_(0.0, std)
    return model


def prefix_model(torch_base_model, num_virtual_tokens, projection: bool, hidden: int = 16,
                 seed: int = 0, **config_kwargs):
    """PeftModel with PREFIX_TUNING (CAUSAL_LM for GPT-2, SEQ_2_SEQ_LM for T5), in eval mode, on a
    deep copy of the base model; every prefix-encoder parameter ~ N(0, 0.5) after
    torch.manual_seed(seed), in named_parameters order. `hidden` = encoder_hidden_size (only
    used with projection). config_kwargs go to PrefixTuningConfig."""
    config = peft.PrefixTuningConfig(task_type=_task_type(torch_base_model),
                                     num_virtual_tokens=num_virtual_tokens,
                                     prefix_projection=projection, encoder_hidden_size=hidden,
                                     **config_kwargs)
    return _randomise(_wrap(torch_base_model, config), seed)


def ptuning_model(torch_base_model, num_virtual_tokens, encoder_type: str, hidden: int = 16,
                  seed: int = 0, **config_kwargs):
    """PeftModel with P_TUNING, encoder_type "MLP" or "LSTM", encoder_hidden_size=hidden,
    otherwise PEFT's defaults (encoder_num_layers=2 (LSTM only), encoder_dropout=0.0,
    num_transformer_submodules 1 (GPT-2) / 2 (T5)); same random init as prefix_model."""
    config = peft.PromptEncoderConfig(task_type=_task_type(torch_base_model),
                                      num_virtual_tokens=num_virtual_tokens,
                                      encoder_reparameterization_type=encoder_type,
                                      encoder_hidden_size=hidden, **config_kwargs)
    return _randomise(_wrap(torch_base_model, config), seed)


def adapter_state(peft_model):
    """{name: np.float32 array} of the trainable prompt-encoder parameters, names as in the
    module docstring (e.g. "embedding.weight", "transform.0.weight", "lstm_head.weight_ih_l0")."""
    return {n: p.detach().cpu().numpy().astype(np.float32)
            for n, p in peft_model.prompt_encoder["default"].named_parameters()}


def loss_weights(shape, mask=None):
    """W = np.random.default_rng(123).standard_normal(shape) as float32, times mask[..., None]
    when a 0/1 mask of shape[:2] is given. The loss is sum(logits * W)."""
    w = np.random.default_rng(123).standard_normal(shape).astype(np.float32)
    if mask is not None:
        w = w * np.asarray(mask, np.float32)[..., None]
    return w


def logits_and_grads(peft_model, input_ids, attention_mask, decoder_input_ids=None,
                     decoder_attention_mask=None, mask_padding: bool = True):
    """Logits of the real positions and d loss / d prompt-encoder parameters.

    GPT-2: logits [B, L, V] (P-tuning prepends P virtual tokens; their logits are sliced off;
    prefix tuning has none). T5: decoder logits [B, T, V]. loss = sum(logits * W) with
    W = loss_weights(logits.shape, out_mask) where out_mask is attention_mask (GPT-2) or
    decoder_attention_mask (T5; all ones if None) when mask_padding, else W unmasked.
    Returns (logits np.float32, {name: grad np.float32}) with names as in adapter_state;
    a parameter that does not reach the output gets a zero gradient.
    """
    kw = dict(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
              attention_mask=torch.as_tensor(np.asarray(attention_mask), dtype=torch.long))
    if decoder_input_ids is not None:
        kw["decoder_input_ids"] = torch.as_tensor(np.asarray(decoder_input_ids), dtype=torch.long)
        if decoder_attention_mask is not None:
            kw["decoder_attention_mask"] = torch.as_tensor(np.asarray(decoder_attention_mask),
                                                           dtype=torch.long)
    params = dict(peft_model.prompt_encoder["default"].named_parameters())
    for p in params.values():
        p.grad = None
    logits = peft_model(**kw).logits.float()
    if decoder_input_ids is None:
        out_mask = np.asarray(attention_mask)
        logits = logits[:, logits.shape[1] - out_mask.shape[1]:]
    else:
        out_mask = (np.ones(np.shape(decoder_input_ids)) if decoder_attention_mask is None
                    else np.asarray(decoder_attention_mask))
    w = loss_weights(tuple(logits.shape), out_mask if mask_padding else None)
    (logits * torch.from_numpy(w)).sum().backward()
    grads = {n: (np.zeros(tuple(p.shape), np.float32) if p.grad is None
                 else p.grad.detach().cpu().numpy().astype(np.float32))
             for n, p in params.items()}
    return logits.detach().cpu().numpy(), grads


@torch.no_grad()
def _saved_prompt_embeddings(peft_model):
    return peft.get_peft_model_state_dict(peft_model)["prompt_embeddings"].float().cpu().numpy()


def materialised_prefix(peft_model):
    """PEFT's saved prefix ("prompt_embeddings" in adapter_model.safetensors): [P, N*2*D],
    last dim ordered (layer, k/v, head, head_dim): flat index ((n*2 + kv)*H + h)*Dh + d.
    (T5: the same [P, N*2*D]; PEFT itself only ever uses entries n=0 of it, see the notes.)"""
    return _saved_prompt_embeddings(peft_model)


def materialised_prompt(peft_model):
    """PEFT's saved P-tuning prompt ("prompt_embeddings"): the encoder output for all S*P
    virtual tokens, [S*P, D] (GPT-2 [P, D]; T5 [2P, D], of which only rows :P enter the
    encoder input)."""
    return _saved_prompt_embeddings(peft_model)


@torch.no_grad()
def decoder_prefix_kv(peft_model):
    """What each (decoder) self-attention layer actually receives as prefix, read from the cache
    PEFT builds: np [num_layers, 2 (k, v), H, P, Dh] (batch row 0)."""
    cache = peft_model.get_prompt(1)
    cache = getattr(cache, "self_attention_cache", cache)
    return np.stack([np.stack([layer.keys[0].float().numpy(), layer.values[0].float().numpy()])
                     for layer in cache.layers])


def from_adapter_dir(torch_base_model, path):
    """PeftModel.from_pretrained(deep copy of the base, path) in eval (inference) mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(torch_base_model), path).eval()
