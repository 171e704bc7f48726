"""Evaluation: held-out loss of pruned models, zero-shot accuracy, checking a set on new texts, routing."""
