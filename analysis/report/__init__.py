"""The report: its sections, figures, captions and the summary across models."""
