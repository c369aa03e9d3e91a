"""Typed schemas for the config tree, so that a misspelled key or a wrong type fails at composition.

Each schema is derived from the signature of the class its group instantiates (``pl.Trainer``,
``GPT2DataModule``, ``GPT2Config``, ...): every argument of that class is a key, no other key is, and
the types OmegaConf can check are checked. The schemas are registered in Hydra's ConfigStore and
named first in ``conf/train.yaml``'s defaults list.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Optional, Union

import pytorch_lightning as pl
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from gpt2lab.data import GPT2DataModule
from gpt2lab.model import GPT2Config
from gpt2lab.tokenizers import TokenizerSpec

PRIMITIVES = (int, float, bool, str)


def _checked_type(hint: Any) -> Any:
    """The annotation OmegaConf can enforce: a primitive, Optional[primitive], else Any."""
    if hint in PRIMITIVES:
        return hint
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in PRIMITIVES:
            return Optional[args[0]]  # noqa: UP045 - OmegaConf needs typing.Optional
    return Any


def schema_from_signature(
    name: str,
    target: Any,
    target_path: str,
    exclude: tuple[str, ...] = (),
    partial: bool = False,
    bases: tuple[type, ...] = (),
) -> type:
    """A dataclass with ``_target_`` and one field per argument of ``target``."""
    init = target.__init__ if inspect.isclass(target) else target
    hints = typing.get_type_hints(init)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=target_path))]
    if partial:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    for pname, param in inspect.signature(init).parameters.items():
        if pname in ("self", *exclude) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = None if param.default is inspect.Parameter.empty else param.default
        hint = _checked_type(hints.get(pname, Any))
        if default is not None and not isinstance(default, PRIMITIVES):
            hint, default = Any, None  # non-primitive defaults (objects, lists) are left to the class
        fields.append((pname, hint, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(name, fields, bases=bases)


@dataclasses.dataclass
class ModelBaseSchema:
    """What every ``model`` option is; each option's own schema (below) names its keys, so that a key of another
    kind of model (``model.d_model`` with ``model=hf``) fails at composition like a misspelt one."""

    _target_: str = MISSING


ModelSchema = schema_from_signature("ModelSchema", GPT2Config, "gpt2lab.model.GPT2Config", bases=(ModelBaseSchema,))


@dataclasses.dataclass
class HFModelSchema(ModelBaseSchema):
    """``model=hf``: any transformers causal LM (``gpt2lab.hf.causal_lm``)."""

    _target_: str = "gpt2lab.hf.causal_lm"
    name_or_path: str = MISSING  # a local directory in Hugging Face format, or a Hub name
    pretrained: bool = True  # the weights found there; false: the architecture only, freshly initialised
    context_length: Optional[int] = None  # noqa: UP045 - null: the model's own (at most 1024)
    vocab_size: Optional[int] = None  # noqa: UP045 - null: the weights' (pretrained), else the tokenizer's
    trust_remote_code: bool = False  # transformers' option, for models whose code lives in their repository


@dataclasses.dataclass
class ModuleModelSchema(ModelBaseSchema):
    """``model=module``: your own nn.Module (``gpt2lab.model.adapter.CausalLM``)."""

    _target_: str = "gpt2lab.model.adapter.CausalLM"
    module: Any = MISSING  # _target_: your class, and its arguments
    context_length: int = MISSING  # the training window, in tokens
    vocab_size: Optional[int] = None  # noqa: UP045 - null: the tokenizer's; ${model.vocab_size} in module's arguments


# Stored when this module is imported: the model group's options name their schema in their defaults list
# (conf/model/gpt2.yaml: /schema/model/gpt2@_here_), and every app that composes that group needs it.
for _name, _schema in (("gpt2", ModelSchema), ("hf", HFModelSchema), ("module", ModuleModelSchema)):
    ConfigStore.instance().store(group="schema/model", name=_name, node=_schema, replace=True)
DataSchema = schema_from_signature("DataSchema", GPT2DataModule, "gpt2lab.data.GPT2DataModule", exclude=("tokenizer",))
TokenizerSchema = schema_from_signature("TokenizerSchema", TokenizerSpec, "gpt2lab.tokenizers.TokenizerSpec")


@dataclasses.dataclass
class TrainerExtras:
    """``trainer`` keys that are gpt2lab's, not ``pl.Trainer`` arguments: ``make_trainer`` takes them out."""

    # 90s, 10m, 2h, 1h30m or HH:MM:SS: max_steps from a measured throughput, so that warmup and cosine decay end
    # on time, and max_time at the budget (gpt2lab.train.plan.time_budget)
    time_budget: Optional[str] = None  # noqa: UP045


TrainerSchema = schema_from_signature("TrainerSchema", pl.Trainer, "pytorch_lightning.Trainer", bases=(TrainerExtras,))


@dataclasses.dataclass
class OptimizerBaseSchema:
    """What every ``optimizer`` option is; each option's own schema names its keys (as the model group's do)."""

    _target_: str = MISSING


@dataclasses.dataclass
class AdamWSchema(OptimizerBaseSchema):
    _target_: str = "torch.optim.AdamW"
    lr: float = 3e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01  # applied to 2-D weights only
    fused: Optional[bool] = None  # noqa: UP045 - None: fused on CUDA


@dataclasses.dataclass
class MuonSchema(OptimizerBaseSchema):
    """``optimizer=muon``: Muon for the hidden matrices, AdamW for the rest (``gpt2lab.lit.optimization``)."""

    _target_: str = "gpt2lab.lit.optimization.MuonWithAdamW"
    lr: float = 3e-3  # AdamW's: embeddings, output layer, biases, norms (optimizer=adamw's keys)
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW's, on the embedding (and any untied output) matrices
    fused: Optional[bool] = None  # noqa: UP045 - None: AdamW's fused kernel on CUDA
    muon_lr: float = 0.02  # Muon's: the hidden matrices
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    muon_weight_decay: float = 0.0
    adjust_lr_fn: Optional[str] = None  # noqa: UP045 - null/original, or match_rms_adamw


@dataclasses.dataclass
class SchedulerSchema:
    """What every schedule has (``warmup_cosine``'s keys); ``scheduler=null`` keeps a preset's values here, unused."""

    # Set by the scheduler group; without one (scheduler=null, ~scheduler) the learning rate is constant.
    _target_: Optional[str] = None  # noqa: UP045
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1


@dataclasses.dataclass
class WSDSchema(SchedulerSchema):
    """``scheduler=wsd``: warmup, stable, then a decay over the last ``decay_fraction`` of the steps."""

    decay_fraction: float = 0.3
    min_lr_ratio: float = 0.0


# The options of conf/optimizer/ and conf/scheduler/, by the _target_ a composed config or a checkpoint records
OPTIMIZER_OPTIONS = {AdamWSchema._target_: "adamw", MuonSchema._target_: "muon"}
SCHEDULE_OPTIONS = {"gpt2lab.lit.warmup_cosine": "warmup_cosine", "gpt2lab.lit.warmup_stable_decay": "wsd"}

for _group, _name, _schema in (
    ("optimizer", "adamw", AdamWSchema),
    ("optimizer", "muon", MuonSchema),
    ("scheduler", "warmup_cosine", SchedulerSchema),
    ("scheduler", "wsd", WSDSchema),
):
    ConfigStore.instance().store(group=f"schema/{_group}", name=_name, node=_schema, replace=True)


@dataclasses.dataclass
class PathsSchema:
    log_dir: str = "outputs"  # where run directories are created
    output_dir: str = "${hydra:runtime.output_dir}"  # this run's directory
    cache_dir: str = "~/.cache/gpt2lab"  # tokenizers, token files, Hugging Face downloads


@dataclasses.dataclass
class SampleSchema:
    prompt: str = "def"
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: Optional[int] = 50  # noqa: UP045


@dataclasses.dataclass
class ResumeSchema:
    # Refuse a checkpoint whose run had another tokenizer, data or batch layout (false: warn and go on)
    strict: bool = True


@dataclasses.dataclass
class TrainSchema:
    model: ModelBaseSchema = MISSING  # typed by the chosen option's schema (gpt2, hf, module)
    data: DataSchema = dataclasses.field(default_factory=DataSchema)
    tokenizer: TokenizerSchema = dataclasses.field(default_factory=TokenizerSchema)
    trainer: TrainerSchema = dataclasses.field(default_factory=TrainerSchema)
    optimizer: OptimizerBaseSchema = MISSING  # typed by the chosen option's schema (adamw, muon)
    scheduler: Optional[SchedulerSchema] = None  # noqa: UP045 - None: a constant learning rate
    paths: PathsSchema = dataclasses.field(default_factory=PathsSchema)
    sample: Optional[SampleSchema] = dataclasses.field(default_factory=SampleSchema)  # noqa: UP045
    callbacks: dict[str, Any] = dataclasses.field(default_factory=dict)
    logger: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 1234
    ckpt_path: Optional[str] = None  # noqa: UP045 - a .ckpt file, or "last" for the newest run's last.ckpt
    resume: ResumeSchema = dataclasses.field(default_factory=ResumeSchema)
    optimized_metric: str = "val/loss"
    compile: bool = False  # torch.compile the model
    compile_mode: Optional[str] = None  # noqa: UP045 - torch.compile's mode: max-autotune, reduce-overhead, ...
    # TorchInductor options, on top of the mode's own (e.g. coordinate_descent_tuning)
    compile_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Under DDP: split the compiled graph at the gradient buckets to overlap their all-reduce (torch's default)
    compile_optimize_ddp: bool = False
    float32_matmul_precision: str = "high"  # torch.set_float32_matmul_precision: high lets fp32 matmuls use TF32
    validate_at_start: bool = True  # log the step-0 validation loss before training
    test: bool = True  # evaluate the best checkpoint on the test split after training
    task_name: str = "train"
    optuna_trial: Optional[int] = None  # noqa: UP045 - set by the Optuna sweeper for each trial


@dataclasses.dataclass
class EvalSchema:
    stride: Optional[int] = None  # noqa: UP045 - null: non-overlapping windows; N: a window every N tokens
    compressors: bool = True  # gzip -9, bz2 -9 and xz -9e on the same bytes, beside the model


@dataclasses.dataclass
class HarnessSchema:
    """lm-evaluation-harness settings of ``gpt2lab evaluate tasks=[...]``."""

    batch_size: int = 16  # requests per forward pass (sorted by length, so a batch pads little)
    include_path: Optional[str] = None  # noqa: UP045 - a directory of task YAML files of your own
    device: str = "auto"  # auto (the GPU if there is one), cpu, cuda, cuda:N
    dtype: str = "float32"  # float32, bfloat16 or float16 forward passes (log-probabilities in float32)


@dataclasses.dataclass
class EvaluateSchema:
    ckpt: Optional[str] = None  # noqa: UP045 - a .ckpt file, a run directory (its best), last or best
    split: str = "test"  # train, validation, test or all
    data: Optional[DataSchema] = None  # noqa: UP045 - null: the data of the checkpoint's own run
    tokenizer: Optional[TokenizerSchema] = None  # noqa: UP045 - ignored: the checkpoint's tokenizer is used
    trainer: TrainerSchema = dataclasses.field(default_factory=TrainerSchema)
    paths: PathsSchema = dataclasses.field(default_factory=PathsSchema)
    eval: EvalSchema = dataclasses.field(default_factory=EvalSchema)
    callbacks: dict[str, Any] = dataclasses.field(default_factory=dict)
    logger: dict[str, Any] = dataclasses.field(default_factory=dict)  # where tasks' results are logged too
    tasks: Any = None  # lm-eval task names (one name, or a list) instead of the loss on data; checked at start
    limit: Optional[float] = None  # noqa: UP045 - with tasks: examples per task (below 1: a share of them)
    num_fewshot: Optional[int] = None  # noqa: UP045 - with tasks: examples in each prompt (null: the task's own)
    harness: HarnessSchema = dataclasses.field(default_factory=HarnessSchema)
    seed: int = 1234
    optimized_metric: str = "bits_per_byte"  # what a multirun of evaluations returns per job
    task_name: str = "evaluate"


@dataclasses.dataclass
class InferenceSchema:
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: Optional[int] = 50  # noqa: UP045
    top_p: Optional[float] = 0.95  # noqa: UP045
    repetition_penalty: float = 1.2
    do_sample: bool = True
    num_return_sequences: int = 1
    stream: bool = True
    stop: Any = dataclasses.field(default_factory=list)  # one string, or a list of them (checked at start)
    seed: Optional[int] = None  # noqa: UP045


@dataclasses.dataclass
class GenerateSchema:
    ckpt: Optional[str] = None  # noqa: UP045 - a .ckpt file, a run directory (its best), last or best
    onnx: Optional[str] = None  # noqa: UP045 - or an ONNX export directory, decoded by onnxruntime
    prompt: Optional[str] = None  # noqa: UP045
    prompts_file: Optional[str] = None  # noqa: UP045 - one prompt per line
    output: Optional[str] = None  # noqa: UP045 - a .jsonl file the samples are appended to
    device: str = "auto"
    inference: InferenceSchema = dataclasses.field(default_factory=InferenceSchema)
    paths: PathsSchema = dataclasses.field(default_factory=PathsSchema)
    task_name: str = "generate"


@dataclasses.dataclass
class ChatSchema:
    ckpt: Optional[str] = None  # noqa: UP045 - a .ckpt file, a run directory (its best), last or best
    device: str = "auto"
    inference: InferenceSchema = dataclasses.field(default_factory=InferenceSchema)
    paths: PathsSchema = dataclasses.field(default_factory=PathsSchema)
    task_name: str = "chat"


@dataclasses.dataclass
class ServeSettingsSchema:
    model_name: str = "gpt2lab"
    api_key: Optional[str] = None  # noqa: UP045 - required as "Authorization: Bearer <key>" when set
    max_batch_size: int = 32
    max_tokens: int = 256
    max_n: int = 8
    max_body_bytes: int = 1048576
    top_k: Optional[int] = None  # noqa: UP045
    devices: Any = "auto"  # auto, or a number of GPUs
    workers_per_device: int = 1
    log_level: str = "info"


@dataclasses.dataclass
class ServeSchema:
    ckpt: Optional[str] = None  # noqa: UP045 - a .ckpt file, a run directory (its best), last or best
    onnx: Optional[str] = None  # noqa: UP045 - or an ONNX export directory, decoded by onnxruntime
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    serve: ServeSettingsSchema = dataclasses.field(default_factory=ServeSettingsSchema)
    paths: PathsSchema = dataclasses.field(default_factory=PathsSchema)
    task_name: str = "serve"


@dataclasses.dataclass
class ONNXExportSchema:
    opset_version: int = 18  # 18 (torch.onnx's own) up to the newest opset the installed onnx knows
    optimize: str = "extended"  # onnxruntime's graph optimisation level, applied offline: none, basic, extended, all
    fp16: bool = False  # half precision, for GPU runtimes (inputs and outputs stay float32)
    quantize: Optional[str] = None  # noqa: UP045 - int8: int8 matrix weights (onnxruntime's dynamic quantization)


@dataclasses.dataclass
class TorchScriptExportSchema:
    method: str = "auto"  # script, trace, or auto: script, falling back to trace


@dataclasses.dataclass
class ExportSchema:
    ckpt: Optional[str] = None  # noqa: UP045 - a .ckpt file, a run directory (its best), last or best
    format: str = "all"  # hf, onnx, torchscript, or all (one subdirectory each)
    output_dir: Optional[str] = None  # noqa: UP045 - a directory that does not exist yet
    overwrite: bool = False  # replace output_dir if it exists
    validate: bool = True  # compare each export's outputs with the model's on random inputs
    tolerance: Optional[float] = None  # noqa: UP045 - largest difference allowed; null: 1e-4 (fp16 0.05, int8 1.0)
    benchmark: bool = False  # onnxruntime / TorchScript against PyTorch eager on this machine
    license: str = "mit"  # the model card's
    onnx: ONNXExportSchema = dataclasses.field(default_factory=ONNXExportSchema)
    torchscript: TorchScriptExportSchema = dataclasses.field(default_factory=TorchScriptExportSchema)
    paths: PathsSchema = dataclasses.field(default_factory=PathsSchema)
    task_name: str = "export"


def _if_hub(source: str, value: Any, otherwise: Any = None) -> Any:
    """``${if_hub:${.source},<for the Hub>,<else>}``: a data config's Hub dataset (and its columns) while
    data.source is hub, ``otherwise`` (null) once it is another: a task format's config names a Hub dataset for
    real runs and still reads data.source=files data.path=my.jsonl."""
    return value if source == "hub" else otherwise


def register_schemas() -> None:
    if not OmegaConf.has_resolver("if_hub"):
        OmegaConf.register_resolver("if_hub", _if_hub)
    ConfigStore.instance().store(name="train_schema", node=TrainSchema, replace=True)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateSchema, replace=True)
    ConfigStore.instance().store(name="generate_schema", node=GenerateSchema, replace=True)
    ConfigStore.instance().store(name="chat_schema", node=ChatSchema, replace=True)
    ConfigStore.instance().store(name="serve_schema", node=ServeSchema, replace=True)
    ConfigStore.instance().store(name="export_schema", node=ExportSchema, replace=True)
