"""Rebuild the built-in GGUF files on the GPU machine from the numbered chunks that device calls brought.

The sender concatenated the GGUF files of ``MODELS`` in that order and split the stream into ``CHUNK``-byte files
``NN`` (``split -b CHUNK -d -a 2``); each call copies the chunks it carried into ``$CHUNKS``.  For every model whose
bytes are all there and whose GGUF is not yet in ``$CALIBDROP_CACHE/models/<name>/``, this writes it, checks its
sha256 against the built-in's pin and moves it into place (so calibdrop finds it as fetched).
"""

import hashlib
import os
import sys
from pathlib import Path

from analysis.models.builtin import BUILTINS

# 40 MB: a chunk and the checkout (17 MB by now) must fit one 64 MiB device call.
CHUNK = 40_000_000
MODELS = {"smollm2-135m": 98362432, "gemma3-270m": 253113024, "qwen2.5-coder-0.5b": 491400064}


def read_range(chunks: Path, start: int, size: int):
    """The stream's bytes ``start .. start + size - 1``, block by block, from the chunk files."""
    while size > 0:
        index, within = divmod(start, CHUNK)
        with open(chunks / f"{index:02d}", "rb") as handle:
            handle.seek(within)
            block = handle.read(min(size, CHUNK - within))
        yield block
        start, size = start + len(block), size - len(block)


def main() -> None:
    chunks, cache = Path(os.environ.get("CHUNKS", "/tmp/chunks")), Path(os.environ["CALIBDROP_CACHE"])
    offset = 0
    for name, size in MODELS.items():
        spec = BUILTINS[name]
        target = cache / "models" / name / spec.gguf_name
        needed = range(offset // CHUNK, (offset + size - 1) // CHUNK + 1)
        if not target.exists() and all((chunks / f"{i:02d}").exists() for i in needed):
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, partial = hashlib.sha256(), target.with_suffix(f".{os.getpid()}.partial")
            with open(partial, "wb") as out:
                for block in read_range(chunks, offset, size):
                    out.write(block)
                    digest.update(block)
            if digest.hexdigest() != spec.sha256:
                sys.exit(f"{name}: sha256 {digest.hexdigest()} is not the pinned {spec.sha256}")
            os.replace(partial, target)
        print(f"{name}: {'ready' if target.exists() else 'waiting for chunks ' + ','.join(map(str, needed))}")
        offset += size


if __name__ == "__main__":
    main()
