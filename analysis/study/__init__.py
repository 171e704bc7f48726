"""The study: stability, consensus, validity, drop sets and the greedy selection by real loss."""
