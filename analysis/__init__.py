"""calibdrop: is a layer-importance ranking a property of the model, or of its calibration data?

The public names below are imported on first use (``analysis.score_texts`` loads torch then),
so ``import analysis`` and the command line's ``--help`` start at once.
"""

from importlib import import_module

_HOMES = {
    "models.adapters": ("ADAPTERS", "Adapter", "adapter_for", "decoder_layers"),
    "study.consensus": ("consensus_drop_set", "leave_one_out", "regret_table"),
    "data.documents": ("load_distribution",),
    "study.dropsets": ("DropSet", "drop_set_family", "read_drop_set"),
    "errors": ("CalibdropError",),
    "evaluation.heldout": ("transfer_matrix", "zero_shot_accuracy"),
    "io": ("read_table", "write_table"),
    "models.loading": ("BUILTINS", "fetch_builtin", "load_model"),
    "pipeline": ("run",),
    "presets": ("PRESETS", "RunSettings"),
    "models.pruning": ("drop_modules", "save_pruned"),
    "export": ("export_checkpoint", "paper_drop_lists"),
    "data.samples": ("calibration_samples",),
    "importance.scoring": ("MODULES", "aggregate_importance", "score_distributions", "score_texts",
                           "score_token_batches"),
    "study.stability": ("bootstrap", "convergence", "importance_matrix", "permutation_test", "rank_agreement",
                        "split_half_reliability"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name: str):
    """Import a public name's module on first use."""
    if name not in _HOME_OF:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    return getattr(import_module(f".{_HOME_OF[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
