"""The config schema: one frozen dataclass per section of a run's config (every method's
section included), the valid choices of its string settings, and ``get``.

Every section's defaults are the paper's (Lester et al. 2021): prompt length 100,
Adafactor at a constant 0.3 with weight decay 1e-5 and decay rate 0.8, no parameter
scaling, batch 32, 30,000 steps, dropout 0.1. ``ptjax.config.load`` reads YAML and
overrides into these; ``ptjax.config.checks`` holds the value checks.
"""
from __future__ import annotations

import dataclasses

PROMPT_INITS = ("random_uniform", "sampled_vocab", "class_label", "text", "file")
OPTIMIZERS = ("adafactor", "adam", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
METHODS = ("prompt", "prefix", "ptuning", "model", "design")  # = ptjax.methods.NAMES
EVAL_MODES = ("auto", "rank", "generate")
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "full", "dots", "dots_no_batch", "auto")
ATTENTIONS = ("auto", "xla", "cudnn", "einsum")  # = ptjax.models.attention.IMPLEMENTATIONS
PRNGS = ("threefry", "rbg", "unsafe_rbg")  # = ptjax.train.PRNGS
ENSEMBLES = ("majority", "mean_logprob")
ENSEMBLE_WEIGHTINGS = ("equal", "fixed", "train", "dev")


# {class: [word, ...]} as ((class, (word, ...)), ...): frozen, ordered, hashable
LabelWords = tuple[tuple[str, tuple[str, ...]], ...]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = "tiny-t5"  # checkpoint dir, hub id, or built-in: tiny-{t5,gpt2,bert,roberta}
    dtype: str = "float32"  # weights and activations; softmax, norms and loss stay fp32
    remat: str = "none"  # auto: the cheapest policy whose compiled step fits the device
    tiny_dir: str = "runs/models"  # where built-in tiny models are written
    # auto: cuDNN fused attention on GPUs, XLA's elsewhere (see ptjax.models.attention)
    attention: str = "auto"


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    length: int = 100
    init: str = "sampled_vocab"
    seeds: tuple[int, ...] = (0,)  # one prompt per seed: K = len(seeds)
    low: float = -0.5  # random_uniform range (the official code uses [0, 0.5))
    high: float = 0.5
    vocab_limit: int = 5000  # sampled_vocab draws from the first N ids
    fallback: str = "sampled_vocab"  # class_label's filler for positions past the labels
    text: str = ""  # text init
    file: str = ""  # file init: .npy [P, D] / [K, P, D] or safetensors
    inits: tuple[str, ...] = ()  # one init per seed (packed sweeps); empty = `init` for all


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adafactor"
    learning_rate: float = 0.3
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-5
    decay_rate: float = 0.8  # Adafactor's second-moment decay exponent
    clipping_threshold: float = 1.0  # Adafactor's update clipping (T5X's default)
    multiply_by_parameter_scale: bool = False
    b1: float = 0.9  # Adam / AdamW
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 0.0  # global-norm gradient clipping per prompt; 0 = off


@dataclasses.dataclass(frozen=True)
class MixtureTask:
    """One task of ``task.mixture`` (multi-task prompted training, strategy 3): what makes
    it a task of its own; everything else (lengths, dev_size, data_dir) is the ``task``
    section's."""
    name: str = ""  # a built-in, jsonl or TFDS task
    template: str = ""  # its own template ("" = its own format, {inputs})
    verbalizer: LabelWords = ()  # its own label words; training targets are first words
    verbalizer_tokens: str = "mean"
    labels: tuple[str, ...] = ()
    eval_mode: str = "auto"
    train_file: str = ""  # jsonl
    dev_file: str = ""
    rate: float = 0.0  # its mixing weight; 0 = from task.mixture_rates


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: str = "synthetic_sentiment"  # built-in, "jsonl", or a TFDS task (e.g. rte, boolq)
    data_dir: str = ""  # TFDS data_dir ("" = TFDS's default, ~/tensorflow_datasets)
    # where the paper's tasks (SuperGLUE, GLUE, SQuAD, MRQA) are read from: tfds
    # (tensorflow-datasets, prepared with `tfds build`) | hf (Hugging Face datasets, no
    # TensorFlow; not MRQA); other tasks ignore it
    source: str = "tfds"
    # task.source=hf: "" = each task's hub dataset (aps/super_glue, nyu-mll/glue,
    # rajpurkar/squad), another hub id, or a local directory in the hub's layout
    # (DIR/CONFIG/SPLIT-*.parquet, e.g. DIR/boolq/train-00000-of-00001.parquet)
    hf_path: str = ""
    prefix: bool = False  # keep T5's task-name prefix ("rte sentence1: ..."); the paper drops it
    train_file: str = ""  # jsonl: {"inputs": ..., "targets": ...} per line
    dev_file: str = ""
    labels: tuple[str, ...] = ()  # verbalized classes; empty = the task's own (if any)
    max_input_length: int = 64  # input tokens; longer inputs are truncated
    max_target_length: int = 8
    eval_mode: str = "auto"  # rank classification when there are labels, else greedy EM
    dev_size: int = 0  # evaluate on the first N dev examples; 0 = all
    transfer: tuple[str, ...] = ()  # tasks the best prompts are evaluated on zero-shot
    # T5: every target starts with <extra_id_0> (token space), like span-corruption
    # targets; the paper's "span corruption + sentinel" (Figure 3c)
    target_sentinel: bool = False
    # lay the input out: fields, hard text, {soft:N} slots, {mask} (ptjax.data.templates);
    # "" = the task's own format ({inputs}) with the prompt prepended
    template: str = ""
    # one template per member (prompt.seeds), trained and scored side by side in one
    # batch and ensembled like K prompts (train.ensemble); excludes task.template
    templates: tuple[str, ...] = ()
    # label words per class, {class: [word, ...]}: classes ranked by their words'
    # log-probabilities; training targets are each class's first word (task.verbalizer_loss)
    verbalizer: LabelWords = ()
    verbalizer_tokens: str = "mean"  # a multi-token word's score: first | mean | max
    # the training loss with a verbalizer: first_word (cross-entropy of each class's first
    # label word as the target) | class (cross-entropy over classes of the class scores
    # evaluation ranks by, OpenPrompt's ManualVerbalizer + CE; ptjax.verbalizers)
    verbalizer_loss: str = "first_word"
    # manual (label words scored by the LM head) | soft (WARP: learned class vectors, from
    # the label words' output embeddings, trained with the method; loss over classes)
    verbalizer_kind: str = "manual"
    # prompt design (method.name=design): in-context examples drawn from the train split
    # (per dev example, seeded by prompt.seeds[0]) before every evaluated input
    shots: int = 0
    # multi-task prompted training (strategy 3): the tasks trained together, each with its
    # own template / verbalizer / labels (MixtureTask); entries named in task.transfer are
    # held out (never trained) and evaluated zero-shot through their own template. The
    # first trained entry's dev set picks the best step. task.name is then unused.
    mixture: tuple[MixtureTask, ...] = ()
    # each row's task is drawn with these weights: proportional (to train examples) |
    # equal | one number per task.mixture entry (0 for held-out entries), e.g. "2,1,0"
    mixture_rates: str = "proportional"


PREFIX_INITS = ("random", "text")


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    sites: tuple[str, ...] = ()  # T5 encoder, decoder, cross; GPT-2 decoder; BERT encoder; () = all
    projection: bool = True  # the MLP reparameterisation; false = P-tuning v2
    hidden: int = 512  # h, the MLP's width
    embed_dim: int = 0  # k, the width of P' (0 = the model's d_model)
    init: str = "random"  # random | text: the frozen model's own keys/values of prompt.text


ENCODERS = ("mlp", "lstm")


@dataclasses.dataclass(frozen=True)
class PTuningConfig:
    encoder: str = "mlp"  # mlp | lstm
    hidden: int = 0  # the encoder's width h (0 = the model's d_model, PEFT's default)
    tune_model: bool = False  # also train the model's weights (K = 1)
    model_learning_rate: float = 1e-5  # their learning rate (the prompt's is optim's)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """What trains: ``name`` picks the method (ptjax.methods); each method with settings
    of its own has a subsection here, read only when it is the one named."""
    name: str = "prompt"  # prompt | prefix | ptuning | model | design
    prefix: PrefixConfig = PrefixConfig()
    ptuning: PTuningConfig = PTuningConfig()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 30000
    batch_size: int = 32
    dropout: float = 0.1
    seed: int = 0  # data order and dropout
    log_every: int = 50
    eval_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    eval_batch_size: int = 64
    metric: str = ""  # the metric that picks the best step; "" = the task's default
    ensemble: str = ""  # "", majority or mean_logprob: also score the K prompts' ensemble
    # the ensemble's member weights (weighted fusion): equal | fixed (train.ensemble_weights)
    # | train (each member's dev metric on train examples before training: PET's weights)
    # | dev (each member's best dev score)
    ensemble_weighting: str = "equal"
    ensemble_weights: tuple[float, ...] = ()  # ensemble_weighting=fixed: one per member
    data_shards: int = 0  # train data shards (one per process by default); see pipeline
    progress: bool = True  # a progress bar; false = one log line every log_every steps
    wandb: str = ""  # a Weights & Biases project to log to ("" = off; WANDB_MODE=offline works)
    # Dropout on attention probabilities, apart from train.dropout (hidden). 0 (T5X's
    # prompt-tuning default, per DESIGN.md) lets the fused attention run; > 0 forces the
    # einsum path. Before this key existed attention dropout was the checkpoint's rate.
    attention_dropout: float = 0.0
    dropout_broadcast: bool = False  # T5X's masks: shared over length (hidden), queries
    prng: str = "threefry"  # dropout masks: threefry | rbg | unsafe_rbg (cheaper on GPUs)
    # Each batch in this many passes, one after another inside the step, with one update
    # (gradient accumulation): the activations of batch_size / microbatches examples at a
    # time. The same loss, gradients and dropout masks as one pass up to float rounding
    # (rbg / unsafe_rbg masks differ). Must divide batch_size, and on a mesh leave a
    # multiple of mesh.data examples per microbatch. May change when a run is resumed.
    microbatches: int = 1
    # [a, b]: a jax.profiler trace of steps a..b in run_dir/profile (TensorBoard's
    # profile plugin, Perfetto); [] = none. 0 < a <= b <= steps; may change on resume.
    profile_steps: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel devices; -1 = all remaining
    model: int = 1  # tensor-parallel devices for the frozen weights
    fsdp: bool = False  # also split the weights' embed axis over data (the largest models)
    distributed: str = "auto"  # jax.distributed.initialize(): auto (cluster found) | on | off


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """``ptjax pretrain``: every weight of a T5 trained on a corpus with one of T5's
    objectives (ptjax.objectives), from scratch or from a checkpoint; train.*, optim.*,
    mesh.* and model.dtype apply as in ``ptjax train``."""
    objective: str = "span_corruption"  # span_corruption | prefix_lm (LM adaptation)
    corpus: str = "shakespeare"  # ptjax.data.corpus
    documents: int = 0  # read only the first N train documents (smoke runs); 0 = all
    init: str = "scratch"  # scratch (a T5 v1.1 of the size below) or a checkpoint dir
    noise_density: float = 0.15  # span corruption: fraction of tokens dropped
    mean_span_length: float = 3.0  # span corruption: mean noise span length
    input_length: int = 128  # encoder tokens, EOS included (targets: what the objective needs)
    eval_examples: int = 256  # held-out sequences scored for the validation loss
    # scratch: the tokenizer trained on the corpus (unigram, T5's special ids, extra_ids
    # sentinels last, cached in tokenizer_dir) and a T5 v1.1 (gated-GELU, untied head)
    vocab_size: int = 8000
    extra_ids: int = 100
    tokenizer_dir: str = "runs/lab/tokenizers"
    d_model: int = 64
    d_kv: int = 16
    d_ff: int = 128
    num_layers: int = 2  # encoder and decoder each
    num_heads: int = 4


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    prompt: PromptConfig = PromptConfig()
    optim: OptimConfig = OptimConfig()
    task: TaskConfig = TaskConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    pretrain: PretrainConfig = PretrainConfig()


def get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
