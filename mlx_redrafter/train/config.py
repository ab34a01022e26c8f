"""What a training job is asked to do, as two config objects: `DataConfig` (the data set) and
`FitConfig` (the training run). Each default is written here once; the CLI's options and help
read them from these classes."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import TrainError

LOSSES = ("ce", "kd", "mix")
TARGETS = ("self", "sample", "dataset", "relabel", "auto")
LABELLED_TARGETS = ("sample", "relabel", "auto")  # targets learnt from labels, not the tokens
SAVE_DTYPES = (None, "float32", "float16", "bfloat16")
DEFAULT_GEN_BATCH = 32
DEFAULT_SHARD_SIZE = 128
DEFAULT_CHECKPOINT_EVERY = 200
DEFAULT_TOP_K = 32  # the teacher's distribution kept per position for the distillation losses


def auto_feature_layers(num_blocks: int) -> tuple[int, ...]:
    """The blocks one third and two thirds deep (EAGLE-3 reads a low, a middle and a high
    layer; the last is always read)."""
    return tuple(sorted({max(0, num_blocks // 3 - 1), max(0, 2 * num_blocks // 3 - 1)}))


def _layers(value, num_blocks: int):
    if value == "auto":
        return auto_feature_layers(num_blocks)
    return None if value is None else tuple(int(i) for i in value)


@dataclass(frozen=True)
class DataConfig:
    """The distillation data: which prompts, how long the responses, what is stored.

    `num_prompts` is a fixed random selection of the prompt file (None: all of it);
    `target` "self" (the base's greedy responses), "sample" (the base's sampled responses, at
    `sample_temp` and `sample_top_p`, with the base's greedy choice at each position as the
    label: the states sampled decoding visits), "dataset" (the file's answers) or
    "relabel" (the file's answers as context, the base's greedy token at each as the label)
    or "auto" (relabel where the file has an answer, self where it has none);
    `gen_batch_size` responses are generated together, `shard_size` prompts per shard on disk.
    `top_k` keeps the base's k most likely tokens per position (None: 32 for the "kd" and
    "mix" losses, else 0); `feature_layers` the states of those base blocks (None: the
    drafter's, FitConfig.feature_layers; "auto": one third and two thirds deep; a superset
    lets drafters with fewer layers share the data). `time_budget` (seconds) stops starting
    shards once spent; `workers` processes make shards at once.
    """

    num_prompts: int | None = 1000
    new_tokens: int = 128
    target: str = "self"
    gen_batch_size: int = DEFAULT_GEN_BATCH
    shard_size: int = DEFAULT_SHARD_SIZE
    top_k: int | None = None
    feature_layers: tuple[int, ...] | str | None = None
    time_budget: float | None = None
    workers: int = 1
    sample_temp: float = 0.7
    sample_top_p: float = 0.9

    def resolved(self, num_blocks: int, fit: FitConfig | None = None) -> DataConfig:
        """Concrete values: "auto" layers for a base of `num_blocks` blocks, and the defaults
        that follow the training run (`fit`: its loss and feature layers)."""
        layers = _layers(self.feature_layers, num_blocks)
        if layers is None:
            layers = () if fit is None else _layers(fit.feature_layers, num_blocks)
        top_k = self.top_k
        if top_k is None:
            top_k = DEFAULT_TOP_K if fit is not None and fit.kd else 0
        return replace(self, feature_layers=layers, top_k=top_k)


@dataclass(frozen=True)
class FitConfig:
    """The training hyperparameters of one `fit`.

    A batch is `batch_size` positions; each epoch visits every training position once in a
    seeded order. The learning rate warms up linearly over `warmup_fraction` of the steps to
    `learning_rate`, then follows a cosine to 0. `max_steps` stops early (with a checkpoint);
    `save_dtype` is the saved drafter's dtype (None: float32).

    Drafter v2 levers: `loss` "ce" (labels), "kd" (the base's top-k distribution) or "mix"
    (`kd_weight` on the distribution, the rest on the label); `feature_layers` (base blocks
    the context reads besides the last; "auto": one third and two thirds deep);
    `feature_noise` (Gaussian noise on the context, times its RMS); `patience` (stop after
    that many evaluations without a better held-out predicted tokens per step, and keep the
    best); `draft_vocab_coverage` (the smallest draft vocabulary covering that share of the
    training targets; overrides the size).

    Drafter v3 levers (each a change to the recurrence; off in Apple's layout):
    `rnn_context` (every step of the RNN also reads the fused context) and `rnn_gate` (a
    sigmoid gate mixes each new state with the previous one).

    `init_from`: a drafter directory to start from instead of a random drafter (a warm start:
    go on training a drafter on new data); its architecture (exit width, layers, feature
    layers, recurrence) and its draft vocabulary are kept, and the settings for them here are
    replaced by its own.
    """

    epochs: int = 1
    learning_rate: float = 1e-3
    batch_size: int = 256
    num_predict: int = 5
    num_layers: int = 2
    draft_vocab_size: int = 0
    exit_dim: int | None = None
    seed: int = 0
    eval_fraction: float = 0.05
    eval_every: int | None = None
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_dtype: str | None = None
    max_steps: int | None = None
    loss: str = "ce"
    kd_weight: float = 0.5
    feature_layers: tuple[int, ...] | str = ()
    feature_noise: float = 0.0
    patience: int | None = None
    draft_vocab_coverage: float | None = None
    rnn_context: bool = False
    rnn_gate: bool = False
    init_from: str | None = None

    def __post_init__(self):
        if self.feature_layers != "auto":  # a list (from JSON or a caller) becomes a tuple
            object.__setattr__(self, "feature_layers", _layers(self.feature_layers, 0))

    @property
    def kd(self) -> float:
        """The weight of the distillation term."""
        return {"ce": 0.0, "kd": 1.0, "mix": self.kd_weight}[self.loss]

    def resolved(self, num_blocks: int) -> FitConfig:
        """The same settings with "auto" feature layers made concrete for `num_blocks`."""
        return replace(self, feature_layers=_layers(self.feature_layers, num_blocks))

    def check(self) -> None:
        """Raise TrainError for a setting out of range."""
        for name, low in (
            ("epochs", 1),
            ("batch_size", 1),
            ("num_predict", 1),
            ("num_layers", 0),
            ("draft_vocab_size", 0),
            ("checkpoint_every", 1),
        ):
            value = getattr(self, name)
            if value < low:
                raise TrainError(f"{name} must be >= {low}, got {value}")
        if self.learning_rate <= 0:
            raise TrainError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.loss not in LOSSES:
            raise TrainError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise TrainError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.feature_noise < 0:
            raise TrainError(f"feature_noise must be >= 0, got {self.feature_noise}")
        if self.patience is not None and self.patience < 1:
            raise TrainError(f"patience must be >= 1, got {self.patience}")
        if self.save_dtype not in SAVE_DTYPES:
            raise TrainError(
                f"save_dtype must be float32, float16 or bfloat16, got {self.save_dtype!r}"
            )
