"""Models: loading, the architecture adapters, the built-in models, pruning and distributed set-up."""
