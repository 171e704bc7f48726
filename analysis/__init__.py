"""calibdrop: is a layer-importance ranking a property of the model, or of its calibration data?"""

from .adapters import ADAPTERS, Adapter, adapter_for, decoder_layers
from .errors import CalibdropError
from .scoring import MODULES, aggregate_importance, score_texts, score_token_batches

__all__ = [
    "ADAPTERS",
    "Adapter",
    "CalibdropError",
    "MODULES",
    "adapter_for",
    "aggregate_importance",
    "decoder_layers",
    "score_texts",
    "score_token_batches",
]
