"""Importance: the metrics and the scoring passes (proxies in one pass, the ablation ground truth)."""
