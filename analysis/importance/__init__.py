"""Importance: the metrics and the scoring passes (proxies in one hooked pass, the ablation ground truth, the
first-order ``taylor`` estimate)."""
