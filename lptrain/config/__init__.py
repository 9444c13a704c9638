"""Recipe files, typed: YAML parsed once into frozen dataclasses, every problem a ConfigError
naming its key path. The bottom of the trainer's stack: it imports only the libraries.

    schema.py       TrainConfig and the pretraining sections, the generic parser, `--set`
    finetune.py     the init, qat, bitswitch and adapters sections (library configs by name)
    precision.py    precision.recipe: a named or inline recipe, resolved once
    init_source.py  init.from: what a path names (run, checkpoint, Hugging Face directory)
    inherit.py      what a fine-tune takes from its base (config, tokenizer)
    reference.py    docs/config.md, generated from the dataclasses
"""

from lptrain.config.schema import TrainConfig, apply_override, load, parse, to_yaml
from lptrain.errors import ConfigError

__all__ = ["ConfigError", "TrainConfig", "apply_override", "load", "parse", "to_yaml"]
