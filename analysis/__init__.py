"""calibdrop: is a layer-importance ranking a property of the model, or of its calibration data?"""

from .adapters import ADAPTERS, Adapter, adapter_for, decoder_layers
from .data import calibration_samples, load_distribution
from .errors import CalibdropError
from .io import read_table, write_table
from .models import BUILTINS, fetch_builtin, load_model
from .scoring import MODULES, aggregate_importance, score_distributions, score_texts, score_token_batches

__all__ = [
    "ADAPTERS",
    "BUILTINS",
    "Adapter",
    "CalibdropError",
    "MODULES",
    "adapter_for",
    "aggregate_importance",
    "calibration_samples",
    "decoder_layers",
    "fetch_builtin",
    "load_distribution",
    "load_model",
    "read_table",
    "write_table",
    "score_distributions",
    "score_texts",
    "score_token_batches",
]
