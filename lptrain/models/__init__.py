"""The model a run trains: the Llama-style decoder (decoder.py) or a Hugging Face causal LM
(hf.py), its `init.from` weights (init_from.py), and the converters that turn it into what
trains, in a fixed order: init -> precision -> qat -> bitswitch -> adapters (converters.py,
bitswitch.py).
"""

from lptrain.models.converters import ConvertContext, apply, build
from lptrain.models.decoder import Decoder, build_model, count_params
from lptrain.models.hf import HFCausalLM

__all__ = [
    "ConvertContext",
    "Decoder",
    "HFCausalLM",
    "apply",
    "build",
    "build_model",
    "count_params",
]
