"""`TrainConfig`: every knob of a fine-tuning run, in one validated dataclass, read from YAML or TOML.

``TrainConfig.from_file("recipes/tiny-clex.yaml", ["steps=50", "clex.max_factor=8"])``: any field can be
overridden with ``key=value`` (values parsed as YAML: numbers, true/false, null, [lists]); ``a.b=v`` sets one
entry of a dict field (``clex``, ``rope``). The resolved config is written as YAML next to the checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import tomllib
import yaml

from ..core.config import CLEXConfig
from ..core.io import atomic_write_text
from ..hf.methods import METHODS
from ..recipes import get as get_recipe

TRAINABLE = ("all", "clex", "lora")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "linear", "constant")
#: rope keys that TrainConfig sets itself: given in `rope`, they would train another run than the one recorded
_OWN_ROPE_KEYS = {"factor": "factor", "rope_type": "method"}


def refuse_unknown(where: str, keys, allowed) -> None:
    """A ValueError of one line for the first key not in ``allowed``: the closest valid name when there is
    one ("did you mean"), else every valid name."""
    allowed = list(allowed)
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            if close:
                raise ValueError(f"{where} has no field {key!r} (did you mean {close[0]!r}?)")
            raise ValueError(f"{where} has no field {key!r}; fields: {', '.join(allowed)}")


@dataclass
class TrainConfig:
    # --- model and method ---
    model: str = "tiny-llama"  # a preset of clex.data.presets.MODEL_PRESETS, or a local model folder
    recipe: str | None = None  # paper | recommended | far (clex.recipes): its method, factor, pose and clex
    # fields go under the ones given explicitly (from_dict / from_file: in files and overrides)
    method: str = "clex"  # clex | pi | ntk | dynamic-ntk | yarn | longrope | llama3 | none (clex.hf.methods.METHODS)
    factor: float = 16.0  # target length / L: the baselines' scale, the PoSE span, CLEX's max_factor (default)
    clex: dict = field(default_factory=dict)  # CLEXConfig fields for method clex; seed defaults to `seed`
    rope: dict = field(default_factory=dict)  # extra transformers rope_parameters (e.g. beta_fast for yarn)
    pose: bool = False  # PoSE positional skip-wise training, with any method

    # --- data ---
    data: str | None = None  # None: the embedded corpus; a .txt/.md/.jsonl file, a folder, a saved dataset
    text_field: str = "text"  # the text column of .jsonl files and saved datasets
    seq_len: int = 128  # tokens per training row (train short: L or less for CLEX)
    held_out: float = 0.05  # fraction of documents held out for the evaluation loss (0: none)

    # --- optimisation (defaults: the paper's recipe) ---
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # rows per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * processes * grad_accum
    lr: float = 2e-5  # peak learning rate of AdamW (the paper: 2e-5 for a 7B model; from random weights, more)
    clex_lr: float | None = None  # lr of the CLEX ODE weights (None: lr; 0: frozen, θ(t) stays the prior's);
    # Adam moves W_down by ~lr a step, and the network's output scales with λd, so a large lr makes θ(t) jagged
    t_lr: float | None = None  # lr of CLEX's learned functions of t (the learned temperature's weights, the
    # t-conditioned adapters' gate powers; None: lr): a few scalars that must move far in a few hundred steps
    warmup_ratio: float = 0.03  # linear warmup over this fraction of the steps
    schedule: str = "cosine"  # cosine | linear | constant (after the warmup)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    adam_beta1: float = 0.9  # AdamW's beta1
    adam_beta2: float = 0.999  # AdamW's beta2
    max_grad_norm: float = 1.0  # gradient clipping; 0 = none

    # --- what to train ---
    train: str = "all"  # all | clex (only the ODE weights) | lora (LoRA adapters + the ODE weights)
    lora_rank: int = 8  # train=lora: the adapters' rank r
    lora_alpha: float = 16.0  # train=lora: the adapters' scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0  # train=lora: dropout on the adapters' input
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # adapted linears
    save_adapter: bool = False  # train=lora: also write the adapters unmerged to final/adapter (peft's format)

    # --- precision, devices, seeds ---
    seed: int = 0  # model init, data order, held-out split, t draws, PoSE positions
    dtype: str = "float32"  # float32 | bfloat16 (autocast, float32 master weights); float32 on CPU
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, one more forward
    cpu: bool = False  # force the CPU even where a GPU is present
    threads: int = 0  # torch CPU threads per process (0: torch's default); 1 is fastest for tiny models on busy CPUs

    # --- output ---
    out_dir: str = "runs/clex"  # config.yaml, log.jsonl, checkpoint-*/ and final/
    save_every: int = 200  # checkpoint every N steps (0: none but the final model)
    keep_checkpoints: int = 2  # keep the newest N checkpoints (0: all)
    log_every: int = 10  # a JSONL record (and TensorBoard point) every N steps
    eval_every: int = 200  # held-out loss every N steps (0: only at the end)
    eval_batches: int = 8  # held-out batches per evaluation
    tensorboard: bool = False  # also log to TensorBoard (out_dir/tensorboard; needs `pip install tensorboard`)
    resume: bool = False  # continue from the newest complete checkpoint in out_dir (an error if it has none)
    overwrite: bool = False  # a fresh run may replace the run already in out_dir (else refused)

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _KINDS[f.name]))

        def bad(name, expected):
            raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"TrainConfig.{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}{hint}"
                )

        choice("method", tuple(METHODS))
        choice("train", TRAINABLE)
        choice("dtype", DTYPES)
        choice("schedule", SCHEDULES)
        for name, low in [
            ("steps", 1),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("seq_len", 2),
            ("eval_batches", 1),
            ("lora_rank", 1),
            ("log_every", 1),
            ("save_every", 0),
            ("keep_checkpoints", 0),
            ("eval_every", 0),
            ("threads", 0),
        ]:
            if getattr(self, name) < low:
                bad(name, f"an integer >= {low}")
        if not self.factor >= 1:
            bad("factor", "a number >= 1 (target length / original length)")
        if not 0 <= self.held_out < 1:
            bad("held_out", "a fraction in [0, 1)")
        if not 0 <= self.warmup_ratio <= 1:
            bad("warmup_ratio", "a fraction in [0, 1]")
        for name in ("lr", "weight_decay", "max_grad_norm", "lora_alpha", "lora_dropout"):
            if getattr(self, name) < 0:
                bad(name, "a number >= 0")
        if self.lr == 0:
            bad("lr", "a number > 0")
        if self.clex_lr is not None and self.clex_lr < 0:
            bad("clex_lr", "a number >= 0 (0: the ODE weights frozen), or null for lr")
        if self.t_lr is not None and self.t_lr <= 0:
            bad("t_lr", "a number > 0, or null for lr")
        if self.save_adapter and self.train != "lora":
            raise ValueError(
                f"TrainConfig.save_adapter=true needs train='lora' (the adapters it saves), got train={self.train!r}"
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "a number in [0, 1)")
        if self.resume and self.overwrite:
            raise ValueError(
                "TrainConfig.resume=true and overwrite=true contradict: resume continues the run in out_dir, "
                "overwrite replaces it; set one of them"
            )
        if self.train == "clex" and self.method != "clex":
            raise ValueError(
                f"TrainConfig.train='clex' trains only the CLEX parameters: it needs method 'clex', got {self.method!r}"
            )
        if self.train == "clex" and self.clex_lr == 0:
            raise ValueError(
                "TrainConfig.train='clex' with clex_lr=0 would train nothing: the ODE weights are all it trains"
            )
        if self.clex and self.method != "clex":
            raise ValueError(
                f"TrainConfig.clex fields {sorted(self.clex)} apply to method 'clex' only, got method {self.method!r}"
            )
        if self.rope and self.method in ("clex", "none"):
            raise ValueError(f"TrainConfig.rope parameters apply to the transformers rope methods, not {self.method!r}")
        for key, field_name in _OWN_ROPE_KEYS.items():
            if key in self.rope:
                raise ValueError(
                    f"TrainConfig.rope.{key}={self.rope[key]!r}: the run's {key} is TrainConfig.{field_name} "
                    f"({getattr(self, field_name)!r}); set {field_name}={self.rope[key]} instead of rope.{key}"
                )
        if self.recipe is not None:
            recipe = get_recipe(self.recipe)
            if not set(recipe.clex) <= set(self.clex):  # TrainConfig(recipe=...) directly: nothing merged
                raise ValueError(
                    f"TrainConfig.recipe={self.recipe!r} is applied by TrainConfig.from_dict / from_file; in Python "
                    f"use TrainConfig(**clex.recipes.get({self.recipe!r}).train_fields(...))"
                )
        if self.method == "clex":
            self.clex_config()  # validates the fields now, with CLEXConfig's messages

    def clex_config(self) -> CLEXConfig:
        """The CLEXConfig this run applies: max_factor = factor, seed = seed, then the ``clex`` fields."""
        refuse_unknown("TrainConfig.clex", self.clex, CLEXConfig.field_names())
        fields_ = {"max_factor": self.factor, "seed": self.seed, **self.clex}
        if self.pose:
            sampler = self.clex.get("position_sampler", "pose")
            if sampler != "pose":
                raise ValueError(
                    f"TrainConfig.pose=true draws PoSE positions, but clex.position_sampler={sampler!r} asks for "
                    "others: drop one of them (pose=true is clex.position_sampler=pose)"
                )
            fields_["position_sampler"] = "pose"
        return CLEXConfig.from_dict(fields_)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        refuse_unknown("TrainConfig", d, [f.name for f in fields(cls)])
        if d.get("recipe") is not None:  # the recipe's fields under the explicit ones
            d = get_recipe(d["recipe"]).train_fields(**d)
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        """Read a YAML (.yaml/.yml) or TOML (.toml) file (None: the defaults), then apply ``key=value``
        overrides."""
        d = read_config_file(path) if path is not None else {}
        for item in overrides or ():
            apply_override(d, item)
        return cls.from_dict(d)

    def write_yaml(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# --- file and override parsing -----------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict:
    """The mapping in a YAML or TOML config file; clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        siblings = [str(p) for p in path.parent.glob("*") if p.suffix.lower() in (".yaml", ".yml", ".toml")]
        close = difflib.get_close_matches(str(path), siblings, n=1, cutoff=0.75) if path.parent.is_dir() else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise FileNotFoundError(f"config file not found: {path}{hint}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        elif suffix == ".toml":
            d = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"config file {path} must end in .yaml, .yml or .toml, got {suffix or '(none)'!r}")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse config file {path}: {e}") from None
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a mapping of TrainConfig fields, got {type(d).__name__}")
    return d


def apply_override(d: dict, item: str) -> None:
    """Apply one ``key=value`` (or ``dictfield.key=value``) to the config dict ``d``, in place."""
    key, sep, text = item.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise ValueError(f"an override must look like key=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    head, dot, sub = key.partition(".")
    if dot:
        refuse_unknown("TrainConfig", [head], _KINDS)
        if _KINDS[head] is not dict:
            raise ValueError(f"override {item!r}: only dict fields (clex, rope) take dotted keys")
        if head == "clex":  # checked here too, so the message names the override
            refuse_unknown("TrainConfig.clex", [sub], CLEXConfig.field_names())
        d[head] = {**(d.get(head) or {}), sub: value}
    else:
        refuse_unknown("TrainConfig", [head], _KINDS)
        d[head] = value


def _kind(annotation: str):
    return {
        "str": str,
        "str | None": (str, None),
        "float | None": (float, None),
        "int": int,
        "float": float,
        "bool": bool,
        "dict": dict,
        "list": list,
    }[annotation]


_KINDS = {f.name: _kind(f.type) for f in fields(TrainConfig)}


def _coerce(name: str, value, kind):
    """Check and normalise one field: ints from integral floats, floats from numbers or numeric strings
    (YAML reads 1e-3 as a string), str | None, lists from a single string."""

    def bad(expected):
        raise ValueError(f"TrainConfig.{name} must be {expected}, got {value!r}")

    if kind == (float, None):
        return None if value is None else _coerce(name, value, float)
    if kind == (str, None):
        return None if value is None else (str(value) if isinstance(value, (str, Path)) else bad("a string or null"))
    if kind is bool:
        return value if isinstance(value, bool) else bad("true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            bad("an integer")
        return int(value)
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                bad("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad("a finite number")
        return float(value)
    if kind is dict:
        return dict(value or {}) if isinstance(value, (dict, type(None))) else bad("a mapping")
    if kind is list:
        return (
            [value] if isinstance(value, str) else (list(value) if isinstance(value, (list, tuple)) else bad("a list"))
        )
    return value if isinstance(value, str) else bad("a string")
