"""Where a command may write: the one rule that keeps a user's results.

An output (a folder or a file) that holds another output is never overwritten: the command stops before any work with
one line saying what is there and how to go on (``--force``, or another ``--out``).  "Another output" is one written
by another command, or by the same command for another model, other inputs or other settings; writing the same output
again (resuming it) is allowed.  An output's *claim* is ``{"command": ..., "identity": ...}``, where the identity is
what decides its results (:func:`identity_of`); it is recorded where the output is:

- a folder of tables (compare, evaluate, check, route, summary): the hidden file :data:`MARKER` in it, written
  before any table;
- a table or drop-set file (score, consensus): the ``output`` field of its provenance;
- a run folder (``calibdrop run``): its ``run_summary.json`` (model and settings) and every stage table's
  ``stage_key`` (:func:`check_run_settings`, :func:`check_run_tables`); a run folder takes no other command's output;
- a checkpoint folder (prune, export): :data:`MARKER` lists the files calibdrop wrote, and a folder holding any other
  file is refused, as saving replaces the folder whole (:func:`check_checkpoint`, :func:`record_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import InputError
from .io import atomic_write_json

MARKER = ".calibdrop-output.json"
RUN_SUMMARY = "run_summary.json"
# arguments that do not change what a command writes, or say where and whether it writes
NOT_IDENTITY = frozenset({"func", "command", "out", "force", "device", "device_map", "no_figures", "models_command",
                          "data_command"})
HASHED_BYTES = 64 << 20  # input files up to this size are identified by content, larger ones by path and size


def _described(value):
    """An argument as it identifies an output: an input file by its sha256 (a large one by path and size), a folder by
    its absolute path, a list item by item, anything else as it is."""
    if isinstance(value, (list, tuple)):
        return [_described(item) for item in value]
    if not isinstance(value, str) or not value:
        return value
    try:
        path = Path(value)
        if path.is_file():
            size = path.stat().st_size
            if size <= HASHED_BYTES:
                return f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
            return f"file:{path.resolve()}:{size}"
        if path.is_dir():
            return f"folder:{path.resolve()}"
    except (OSError, ValueError):  # a name the file system refuses is no file
        pass
    return value


def identity_of(args) -> dict:
    """What decides a command's output, from its parsed arguments: every argument but :data:`NOT_IDENTITY`, each input
    file by content (:func:`_described`)."""
    return {key: _described(value) for key, value in sorted(vars(args).items()) if key not in NOT_IDENTITY}


def claim(command: str, identity: dict) -> dict:
    """The record of an output: the command that wrote it and what decided it, as JSON values."""
    return json.loads(json.dumps({"command": command, "identity": identity}, default=str))


def refusal(where: Path, what: str, command: str, *, effect: str = "would replace it") -> InputError:
    """The one line: what ``where`` holds, what ``command`` would do to it, and how to go on."""
    return InputError(f"{where} holds {what}; `calibdrop {command}` {effect}: give another --out, or add --force to "
                      "write there anyway")


def _json(path: Path):
    """The JSON value of ``path``, or ``None`` when it is missing or not JSON (a damaged record proves nothing)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_evidence(folder: Path) -> str | None:
    """Why ``folder`` is the folder of a ``calibdrop run`` (its summary, or a table saved by a stage), or ``None``."""
    folder = Path(folder)
    if (folder / RUN_SUMMARY).is_file():
        return f"a finished `calibdrop run` ({RUN_SUMMARY})"
    for sidecar in sorted(folder.glob("*.json")):
        record = _json(sidecar)
        if isinstance(record, dict) and "stage_key" in record and sidecar.with_suffix(".parquet").is_file():
            return f"the tables of a `calibdrop run` ({sidecar.with_suffix('.parquet').name} ...)"
    return None


def _differences(held: dict, wanted: dict) -> str:
    """The identity fields that differ, as ``name`` list (at most 4 named)."""
    names = sorted(k for k in {*held, *wanted} if held.get(k) != wanted.get(k))
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _holder(held, command: str, identity: dict) -> str:
    """What an output recorded as ``held`` is, said against the claim of ``command`` for ``identity``."""
    if not isinstance(held, dict) or "command" not in held:
        return "calibdrop results without a record of what wrote them"
    if held["command"] != command:
        return f"the output of `calibdrop {held['command']}`"
    return f"the output of `calibdrop {command}` for other inputs or settings " \
           f"({_differences(held.get('identity') or {}, identity)} differ)"


def _entries(folder: Path) -> list[Path]:
    """The files and folders directly in ``folder`` but the marker (none when it does not exist)."""
    return [p for p in Path(folder).iterdir() if p.name != MARKER] if Path(folder).is_dir() else []


def claim_folder(folder: Path, command: str, identity: dict, *, force: bool) -> None:
    """Check that ``command`` may write its tables into ``folder`` and record its claim there (:data:`MARKER`).

    Allowed: a new or empty folder, a folder of files calibdrop did not write (no table is replaced), one that
    ``command``
    wrote for the same ``identity``, anything with ``force`` (a run folder then gets no claim).  Refused
    (:class:`InputError`): a run folder, another command's or identity's output, tables without a record."""
    folder = Path(folder)
    wanted = claim(command, identity)
    evidence = run_evidence(folder)
    if not force and _entries(folder):
        if evidence:
            raise refusal(folder, evidence, command)
        held = _json(folder / MARKER)
        recorded = held is not None or any(folder.glob("*.parquet"))
        if recorded and held != wanted:
            raise refusal(folder, _holder(held, command, identity), command)
    if not evidence:  # a run folder stays one: its stage keys tell the tables another command replaced there
        atomic_write_json(folder / MARKER, wanted)


def recorded_claim(path: Path):
    """The claim a table or JSON file records: its sidecar's ``output`` (Parquet), its provenance's (JSON)."""
    path = Path(path)
    record = _json(path.with_suffix(".json") if path.suffix == ".parquet" else path)
    if isinstance(record, dict) and path.suffix != ".parquet":
        record = record.get("provenance")
    return record.get("output") if isinstance(record, dict) else None


def claim_file(path: Path, command: str, identity: dict, *, force: bool) -> dict:
    """Check that ``command`` may write the file ``path`` and return the claim to record in it (the ``output`` field of
    its provenance).  Refused (:class:`InputError`) without ``force``: any file in a run folder but one ``command``
    wrote there for the same ``identity``, and a file that records another claim or none."""
    path = Path(path)
    wanted = claim(command, identity)
    if force:
        return wanted
    held = recorded_claim(path) if path.exists() else None
    if held == wanted:
        return wanted
    evidence = run_evidence(path.parent)
    if evidence:
        raise refusal(path.parent, evidence, command, effect=f"would write {path.name} among its tables")
    if path.exists():
        raise refusal(path, _holder(held, command, identity), command)
    return wanted


def check_run_settings(folder: Path, settings: dict, *, force: bool) -> None:
    """Before a run loads its model: refuse (:class:`InputError`, unless ``force``) a folder holding another command's
    output, or a finished run whose recorded settings (the fields both know) differ from ``settings``."""
    folder = Path(folder)
    if force:
        return
    held = _json(folder / MARKER)
    if held is not None and _entries(folder):
        raise refusal(folder, _holder(held, "run", {}), "run")
    summary = _json(folder / RUN_SUMMARY)
    recorded = ((summary or {}).get("provenance") or {}).get("settings") if isinstance(summary, dict) else None
    if isinstance(recorded, dict):
        ours = json.loads(json.dumps(settings, default=str))
        common = recorded.keys() & ours.keys()
        held, wanted = ({k: record[k] for k in common} for record in (recorded, ours))
        if held != wanted:
            raise refusal(folder, f"a finished `calibdrop run` with other settings ({_differences(held, wanted)} "
                                  "differ)", "run")


def check_run_tables(folder: Path, model: dict, keys: dict[str, str], *, force: bool) -> None:
    """Once a run's model is loaded, before any stage: refuse (:class:`InputError`, unless ``force``) a finished run of
    another model or dtype, or any saved table whose recorded ``stage_key`` differs from the key ``keys`` gives it
    (``{table: key}`` for every table of the run): it was saved by another run or another command."""
    folder = Path(folder)
    if force:
        return
    summary = _json(folder / RUN_SUMMARY)
    recorded = ((summary or {}).get("provenance") or {}).get("model") if isinstance(summary, dict) else None
    if isinstance(recorded, dict):
        changed = [k for k in ("weights_sha256", "dtype") if recorded.get(k) != model.get(k)]
        if changed:
            raise refusal(folder, f"a finished `calibdrop run` of another model ({recorded.get('spec')}, "
                                  f"{' and '.join(changed)} differ)", "run")
    other = []
    for name, key in keys.items():
        record = _json(folder / f"{name}.json")
        if isinstance(record, dict) and (folder / f"{name}.parquet").is_file() and record.get("stage_key") != key:
            other.append(name)
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise refusal(folder, f"tables saved by another run or command ({shown}: their stage keys differ from this "
                              "run's)", "run")


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the marker, as sorted relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file() and p.name != MARKER)


def check_checkpoint(folder: Path, command: str, identity: dict, *, force: bool) -> None:
    """Before a checkpoint is saved into ``folder`` (which replaces it whole): refuse (:class:`InputError`, unless
    ``force``) a folder holding a file calibdrop did not record writing there, or the checkpoint of another command or
    identity.  A new or empty folder is allowed."""
    folder = Path(folder)
    if force or not _entries(folder):
        return
    held = _json(folder / MARKER)
    written = set(held.get("files", [])) if isinstance(held, dict) else set()
    foreign = [name for name in _files(folder) if name not in written]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise refusal(folder, f"files calibdrop did not write ({shown})", command)
    mine = claim(command, identity)
    if {k: held.get(k) for k in mine} != mine:
        raise refusal(folder, _holder(held, command, identity).replace("output", "checkpoint"), command)


def record_checkpoint(folder: Path, command: str, identity: dict) -> None:
    """After a checkpoint is saved into ``folder``: its claim and the files calibdrop wrote there (:data:`MARKER`;
    hidden, so it is not part of the checkpoint's checksum)."""
    atomic_write_json(Path(folder) / MARKER, {**claim(command, identity), "files": _files(folder)})
