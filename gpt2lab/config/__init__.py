"""The config: typed schemas for every group (``schemas``), and the config tree and its composition (``tree``)."""

from gpt2lab.config.schemas import (
    ChatSchema,
    EvaluateSchema,
    ExportSchema,
    GenerateSchema,
    ModelBaseSchema,
    PathsSchema,
    TrainerSchema,
    TrainSchema,
    register_schemas,
    schema_from_signature,
)
from gpt2lab.config.tree import (
    compose_train,
    config_groups,
    config_path,
    config_tree,
    given_on_command_line,
    group_options,
    hydra_string,
    literal_overrides,
    null_group_overrides,
)
from gpt2lab.model.adapter import TRUSTED_TARGETS

__all__ = [
    "TRUSTED_TARGETS",
    "ChatSchema",
    "EvaluateSchema",
    "ExportSchema",
    "GenerateSchema",
    "ModelBaseSchema",
    "PathsSchema",
    "TrainSchema",
    "TrainerSchema",
    "compose_train",
    "config_groups",
    "config_path",
    "config_tree",
    "given_on_command_line",
    "group_options",
    "hydra_string",
    "literal_overrides",
    "null_group_overrides",
    "register_schemas",
    "schema_from_signature",
]
