"""The command line: the parser (:mod:`.parser`, whose ``main`` is the console script) and the commands it runs
(:mod:`.commands`), each importing what it needs only when it runs, so ``--help`` answers at once."""

from .parser import main

__all__ = ["main"]
