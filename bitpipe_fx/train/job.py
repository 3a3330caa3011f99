"""What a training run is: ``TrainConfig``, checked and resolved before any process starts, and the model,
loss and optimizer it names.

A config crosses process boundaries (pickled to every launched rank), so it holds only plain values; each
rank rebuilds the model, data and optimizer from it, deterministically.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.optim.registry import OPTIMIZERS

MODELS = {"gpt": "bitpipe_fx.examples.models:gpt", "bert": "bitpipe_fx.examples.models:bert"}
# sizes of the built-in models for real (byte-level) training; --arg KEY=VALUE overrides them
MODEL_DEFAULTS = {"dim": 128, "heads": 4, "layers": 8}
DTYPES = ("float32", "float64", "bfloat16")
DEFAULT_SEQ, DEFAULT_BATCH = 64, 16

# fields a resumed run must share with the checkpoint's run (everything that changes the numbers; the schedule,
# D and data-parallel size may change: checkpoints are by original names)
RESUME_FIELDS = (
    "model", "model_args", "task", "microbatches", "batch_size", "seq_len", "optimizer", "lr", "warmup",
    "weight_decay", "dtype", "seed", "data", "max_bytes",
)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; ``None`` fields are filled in by ``resolve``."""

    model: str = "gpt"
    model_args: tuple[tuple[str, Any], ...] = ()
    task: str | None = None
    schedule: str = "bitpipe"
    schedule_options: tuple[tuple[str, Any], ...] = ()
    devices: int = 4
    microbatches: int = 8
    data_parallel: int = 1
    steps: int = 200
    batch_size: int | None = None
    seq_len: int | None = None
    optimizer: str = "sf-adamw"
    lr: float | None = None
    warmup: int = 10
    weight_decay: float = 0.0
    dtype: str = "float32"
    seed: int = 0
    data: str | None = None
    max_bytes: int = 16 * 2**20
    out: str = "runs/train"
    resume: bool = False
    overwrite: bool = False
    resume_from: int | None = None
    eval_every: int | None = None
    eval_batches: int = 4
    save_every: int = 50
    record_step: int | None = None
    compare_steps: int = 0
    local: bool = False
    cpu: bool = False
    threads: int = 1
    timeout: float = 60.0
    on_nonfinite: str = "raise"
    shard_optimizer: bool = False
    precision: str = "fp32"  # or "bf16-mixed" (runtime.precision)
    recompute: str = "none"  # none | full | auto (bitpipe_fx.recompute)
    memory_limit: str | None = None  # the bound of recompute="auto" (that of schedule auto is in schedule_options)

    @property
    def rows_per_microbatch(self) -> int:
        return self.batch_size // (self.microbatches * self.data_parallel)

    @property
    def processes(self) -> int:
        """Ranks the run needs: one per (device, data-parallel index); 1 with ``local``."""
        return 1 if self.local else self.devices * self.data_parallel

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_args"] = dict(self.model_args)
        d["schedule_options"] = dict(self.schedule_options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["model_args"] = tuple(sorted(d.get("model_args", {}).items()))
        d["schedule_options"] = tuple(sorted(d.get("schedule_options", {}).items()))
        return cls(**d)


def _positive(name: str, value: Any, flag: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value!r}")


def check(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, naming the value and the fix; pure Python, no torch."""
    from bitpipe_fx.schedules import generate
    from bitpipe_fx.schedules.spec import AUTO
    from bitpipe_fx.sim.memory import RECOMPUTE_MODES

    for name, flag in (("devices", "--devices"), ("microbatches", "--microbatches"), ("steps", "--steps"),
                       ("data_parallel", "--data-parallel"), ("eval_batches", "--eval-batches"),
                       ("threads", "--threads"), ("max_bytes", "--max-bytes")):
        _positive(name, getattr(cfg, name), flag)
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer {cfg.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype {cfg.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr}")
    for name, flag in (("warmup", "--warmup"), ("save_every", "--save-every"), ("eval_every", "--eval-every"),
                       ("compare_steps", "--compare-steps"), ("seed", "--seed")):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ConfigError(f"{flag} must be an integer >= 0, got {value!r}")
    if cfg.task is not None and cfg.task not in ("lm", "mlm"):
        raise ConfigError(f"--task {cfg.task!r} is unknown; use lm (causal) or mlm (masked), or leave it out "
                          "(taken from the model's example inputs)")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ConfigError(f"--weight-decay must be a number >= 0, got {cfg.weight_decay}")
    if cfg.record_step is not None and not 1 <= cfg.record_step <= cfg.steps:
        raise ConfigError(f"--record-step {cfg.record_step} is not a step of this run; pass a step in 1..{cfg.steps} "
                          "(--steps) or leave it out (the third step, or the last, is recorded)")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if not (cfg.timeout > 0 and math.isfinite(cfg.timeout)):
        raise ConfigError(f"--timeout must be a finite number of seconds > 0, got {cfg.timeout}")
    from bitpipe_fx.runtime.precision import PRECISIONS  # here: reading the command line imports no torch

    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.precision == "bf16-mixed" and cfg.dtype != "float32":
        raise ConfigError(f"--precision bf16-mixed keeps float32 master weights; it needs --dtype float32, got "
                          f"--dtype {cfg.dtype} (or drop --precision)")
    if cfg.local and cfg.shard_optimizer:
        raise ConfigError("--shard-optimizer shards optimizer state over the processes holding copies of a stage and "
                          "--local runs every device in one process; drop --local or --shard-optimizer")
    if cfg.local and cfg.data_parallel != 1:
        raise ConfigError("--local runs every device in one process and cannot do data parallelism; "
                          "drop --local or use --data-parallel 1")
    if cfg.recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"--recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {cfg.recompute!r}")
    if cfg.recompute == "auto" and cfg.memory_limit is None and "memory_limit" not in dict(cfg.schedule_options):
        raise ConfigError("--recompute auto needs --memory-limit (peak bytes per device, e.g. 12GiB); give it, or "
                          "use --recompute full or none")
    if cfg.schedule != AUTO:  # auto is checked by its search, which refuses when no family runs
        generate(cfg.schedule, cfg.devices, cfg.microbatches, **dict(cfg.schedule_options))  # ScheduleError if not
    for name, flag in (("batch_size", "--batch-size"), ("seq_len", "--seq-len")):
        value = getattr(cfg, name)
        if value is not None:
            _positive(name, value, flag)
    if cfg.seq_len is not None and cfg.seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2 bytes, got {cfg.seq_len}")
    per = cfg.microbatches * cfg.data_parallel
    if cfg.batch_size is not None and cfg.batch_size % per:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is not a multiple of microbatches x data-parallel = {per}; "
            f"use {max(per, cfg.batch_size // per * per)} or {(cfg.batch_size // per + 1) * per}"
        )


def factory_target(model: str) -> str:
    """MODULE:FACTORY of a model name (gpt, bert) or the MODULE:FACTORY itself."""
    if model in MODELS:
        return MODELS[model]
    if ":" not in model:
        raise ConfigError(f"model {model!r} is unknown; use gpt, bert, or MODULE:FACTORY (a function returning "
                          "(model, example_inputs) for one micro-batch)")
    return model


def factory_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments of the model factory: sizes and shapes for the built-in models, --arg values for all."""
    if cfg.model not in MODELS:
        return dict(cfg.model_args)
    rows = cfg.rows_per_microbatch if cfg.batch_size else DEFAULT_BATCH // cfg.microbatches
    base = {"vocab": 256, "seq": cfg.seq_len or DEFAULT_SEQ, "micro_batch": rows, "seed": cfg.seed, **MODEL_DEFAULTS}
    return base | dict(cfg.model_args)


def build_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """(model in the run's dtype, example inputs of one micro-batch) from the factory the config names."""
    import torch

    from bitpipe_fx.passes.command import load_factory

    model, example = load_factory(factory_target(cfg.model), factory_kwargs(cfg))
    if cfg.dtype != "float32":
        model = model.to(getattr(torch, cfg.dtype))
    return model, example


def _tokens(example: Any) -> tuple[Any, int]:
    """The token tensor of the example inputs and how many tensors they hold."""
    import torch

    items = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if not items or not all(isinstance(t, torch.Tensor) for t in items) or len(items) > 2:
        raise ConfigError(
            "the model factory's example inputs must be (tokens,) for a causal LM or (tokens, attention_mask) "
            f"for a masked LM, with tokens of shape (micro_batch, seq); got {type(example).__name__}"
        )
    tokens = items[0]
    if tokens.dim() != 2 or tokens.is_floating_point():
        raise ConfigError(f"the example tokens must be an integer tensor (micro_batch, seq), got shape "
                          f"{tuple(tokens.shape)} and dtype {tokens.dtype}")
    return tokens, len(items)


def resolve(cfg: TrainConfig, example: Any) -> TrainConfig:
    """The config with task, batch size, sequence length, lr and evaluation period filled in and checked
    against the model's example micro-batch."""
    tokens, count = _tokens(example)
    rows, seq = tokens.shape
    task = cfg.task or ("lm" if count == 1 else "mlm")
    if (task == "lm") != (count == 1):
        raise ConfigError(f"task {task!r} needs {'(tokens,)' if task == 'lm' else '(tokens, attention_mask)'} "
                          f"example inputs; the model's factory gave {count} tensor(s)")
    batch = cfg.batch_size or rows * cfg.microbatches * cfg.data_parallel
    seq_len = cfg.seq_len or seq
    if batch // (cfg.microbatches * cfg.data_parallel) != rows or seq_len != seq:
        raise ConfigError(
            f"the model's example micro-batch has {rows} rows of {seq} tokens but --batch-size {batch} / "
            f"(microbatches {cfg.microbatches} x data-parallel {cfg.data_parallel}) and --seq-len {seq_len} ask "
            f"for {batch // (cfg.microbatches * cfg.data_parallel)} rows of {seq_len}; make them agree"
        )
    lr = cfg.lr if cfg.lr is not None else OPTIMIZERS[cfg.optimizer].default_lr
    eval_every = cfg.eval_every if cfg.eval_every is not None else max(1, cfg.steps // 10)
    return replace(cfg, task=task, batch_size=batch, seq_len=seq_len, lr=lr, eval_every=eval_every)


def optimizer_factory(cfg: TrainConfig):
    """``params -> optimizer`` for the run (the same factory builds the non-pipelined reference's)."""
    entry = OPTIMIZERS[cfg.optimizer]
    return lambda params: entry.build(params, lr=cfg.lr, warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay,
                                      total_steps=max(cfg.steps, cfg.warmup + 1))


def loss_fn(logits: Any, targets: Any) -> Any:
    """Cross-entropy over the byte vocabulary (targets of -100 ignored, for masked LM)."""
    from bitpipe_fx.examples.models import lm_loss

    return lm_loss(logits, targets)


def resume_mismatch(saved: TrainConfig, cfg: TrainConfig) -> str | None:
    """The first setting in which ``cfg`` differs from the checkpoint's run, described; None when compatible."""
    for name in RESUME_FIELDS:
        a, b = getattr(saved, name), getattr(cfg, name)
        if a != b:
            return f"{name} is {b!r} but the checkpoint was trained with {a!r}"
    return None


def horizon_problem(saved: TrainConfig, cfg: TrainConfig, step: int) -> str | None:
    """Why ``cfg`` cannot resume the checkpoint of ``step`` of ``saved`` with an lr profile that spans the run
    (REX decays the lr to 0 at the first run's --steps, fixed when it started), with what to do; None if it can.
    The rule: such a run continues only up to its own horizon; past it, a new run is needed."""
    if not OPTIMIZERS[cfg.optimizer].spans_run or cfg.steps == saved.steps:
        return None
    new_run = (f"to train {cfg.steps} steps with {cfg.optimizer}, start a new run with --steps {cfg.steps} "
               f"(another --out, or --overwrite), or use sf-adamw / sf-sgd, which have no horizon")
    if step >= saved.steps:
        return (f"the {cfg.optimizer} run in {cfg.out} ended at its learning-rate horizon, step {saved.steps} "
                f"(REX decays the lr to 0 there), and cannot be extended; {new_run}")
    return (f"{cfg.optimizer}'s learning-rate profile spans the run's --steps {saved.steps} (its horizon, fixed at "
            f"the start); resume with --steps {saved.steps}, or, {new_run}")
