"""calibdrop: is a layer-importance ranking a property of the model, or of its calibration data?"""

from .adapters import ADAPTERS, Adapter, adapter_for, decoder_layers
from .consensus import consensus_drop_set, leave_one_out, regret_table, standard_drop_sets
from .documents import load_distribution
from .errors import CalibdropError
from .evaluation import transfer_matrix, zero_shot_accuracy
from .io import read_table, write_table
from .models import BUILTINS, fetch_builtin, load_model
from .pruning import drop_modules, save_pruned
from .samples import calibration_samples
from .scoring import MODULES, aggregate_importance, score_distributions, score_texts, score_token_batches
from .stability import bootstrap, convergence, importance_matrix, permutation_test, rank_agreement, split_half_reliability

__all__ = [
    "ADAPTERS",
    "BUILTINS",
    "Adapter",
    "CalibdropError",
    "MODULES",
    "adapter_for",
    "aggregate_importance",
    "bootstrap",
    "calibration_samples",
    "consensus_drop_set",
    "convergence",
    "decoder_layers",
    "drop_modules",
    "fetch_builtin",
    "importance_matrix",
    "leave_one_out",
    "load_distribution",
    "load_model",
    "permutation_test",
    "rank_agreement",
    "read_table",
    "regret_table",
    "save_pruned",
    "score_distributions",
    "score_texts",
    "score_token_batches",
    "split_half_reliability",
    "standard_drop_sets",
    "transfer_matrix",
    "write_table",
    "zero_shot_accuracy",
]
