"""What identifies a checkpoint folder: the sha256 of every file that decides its outputs, and the record a
built-in's cached checkpoint is checked against on every load."""

from __future__ import annotations

from pathlib import Path

from ..errors import ChecksumError, InputError
from ..io import read_json_file, sha256_file, sha256_of_listing


RECORD = "calibdrop_source.json"


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def checkpoint_listing(directory: Path) -> dict[str, str]:
    """``{name: sha256}`` of every file that decides a checkpoint's outputs: weights, config, tokenizer,
    generation config, chat template (all files in the folder but hidden ones and calibdrop's record)."""
    files = [
        p for p in sorted(Path(directory).iterdir()) if p.is_file() and not p.name.startswith(".") and p.name != RECORD]
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise InputError(f"{directory} is not a model checkpoint: it has no *.safetensors or *.bin weight files")
    return {p.name: sha256_file(p) for p in files}


def checkpoint_sha256(directory: Path) -> str:
    """The checksum of a checkpoint directory: :func:`sha256_of_listing` of :func:`checkpoint_listing`."""
    return sha256_of_listing(checkpoint_listing(directory))


def _record_matches(record: dict, listing: dict[str, str]) -> bool:
    """Whether a built-in's cached checkpoint has the checksum its record holds (records written before
    calibdrop hashed config and tokenizer hold only the weights')."""
    if "checkpoint_sha256" in record:
        return sha256_of_listing(listing) == record["checkpoint_sha256"]
    weights = {name: digest for name, digest in listing.items() if Path(name).suffix in WEIGHT_SUFFIXES}
    return sha256_of_listing(weights) == record.get("weights_sha256")


def _recorded_listing(directory: Path) -> dict[str, str]:
    """:func:`checkpoint_listing` of a cached checkpoint whose files match its record; else a :class:`ChecksumError`
    saying what is wrong (a record that is not a JSON object, missing weights, a mismatched checksum)."""
    try:
        record = read_json_file(directory / RECORD, "has a damaged record:", "")
        listing = checkpoint_listing(directory)
    except InputError as error:
        raise ChecksumError(str(error)) from None
    if not isinstance(record, dict):
        raise ChecksumError(f"has a damaged record: {RECORD} holds {type(record).__name__}, not a JSON object")
    if not _record_matches(record, listing):
        raise ChecksumError("does not match the checksum recorded when it was written (a file was damaged or edited)")
    return listing
