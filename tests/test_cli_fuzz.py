"""Bad input found by a search: Hypothesis generates option values, drop-set JSON, texts files, damaged model folders,
damaged cache records and damaged run folders (copies of the smoke run) for the CLI's commands.  Every run must end with exit 0 and a result on stdout, or exit 2
and one error line on stderr that names the input (argparse's usage may come before it, calibdrop's warnings too);
never a traceback, never a hang, and the process must end at once after its error.

Each example runs ``calibdrop`` in a forked child of a warm server (this file run as a script: it imports torch,
transformers and every command's modules once).  The child ends as ``python -m analysis`` does: after ``main``
returns it joins its non-daemon threads and runs the thread and atexit hooks (executors included), as the
interpreter's shutdown does, then exits; only the unloading of modules is skipped.  The server kills a child that
outlives its timeout and reports how long the child took to end after ``main`` returned.  The models are tiny
(tests/tiny.py) and the distributions are three local text files, so nothing is downloaded.

A longer search: ``CALIBDROP_FUZZ_SCALE=20 pytest tests/test_cli_fuzz.py`` (20 times the examples).  Failing examples
are not shrunk (each is a process; shrinking one takes minutes): the report lists the labelled draws instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_TIMEOUT = 120  # seconds a command may take before it counts as a hang (a loaded 2-core machine)
EXIT_LIMIT = 10  # seconds from main's return to the process's end


# ---------------------------------------------------------------- the server (this file run as a script)

def _run_child(request: dict, folder: Path) -> None:
    """In the forked child: run one command with stdout and stderr to files, then end as the interpreter would."""
    import atexit
    import threading
    import traceback

    os.setsid()
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.update(request.get("env", {}))
    if request.get("fake_builtin"):
        _fake_builtin(Path(request["fake_builtin"]))
    from analysis.cli import main

    code = 1
    try:
        code = main(request["argv"])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    (folder / "returned").write_text(repr(time.time()))
    threading._shutdown()  # what Py_Finalize does first: join non-daemon threads, run executors' exit hooks
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fake_builtin(checkpoint: Path) -> None:
    """Stand-in for dequantising a built-in's GGUF: its float32 cache becomes a copy of ``checkpoint`` with a fresh
    record."""
    from analysis.models import loading

    def build(name):
        target = loading.dequantised_dir(name)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint, target)
        record = {"builtin": name, "checkpoint_sha256": loading.checkpoint_sha256(target)}
        (target / loading.RECORD).write_text(json.dumps(record))

    loading._build_dequantised_cache = build


def serve(warm: Path) -> None:
    """Load the checkpoint ``warm`` once (transformers imports a family's modules on its first load), then read one JSON
    request a line ({"argv", "env", "fake_builtin"}), run it in a forked child and answer one JSON line."""
    import analysis.cli.commands  # noqa: F401  (and below: what the commands import when they run)
    import analysis.evaluation.check  # noqa: F401
    import analysis.evaluation.heldout  # noqa: F401
    import analysis.evaluation.routing  # noqa: F401
    import analysis.importance.scoring  # noqa: F401
    import analysis.models.loading  # noqa: F401
    import analysis.pipeline  # noqa: F401
    import analysis.report.plots  # noqa: F401
    import analysis.report.sections  # noqa: F401

    import datasets.packaged_modules.json.json  # noqa: F401
    import datasets.packaged_modules.text.text  # noqa: F401

    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # no loader threads in the parent of every fork
    analysis.models.loading.load_model(str(warm))
    del os.environ["HF_DEACTIVATE_ASYNC_LOAD"]
    print("ready", flush=True)
    for number, line in enumerate(sys.stdin):
        request = json.loads(line)
        folder = Path(request["folder"])
        folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(request, folder)
        killed, status = False, 0
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() - started > request.get("timeout", EXAMPLE_TIMEOUT):
                os.killpg(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                killed = True
                break
            time.sleep(0.02)
        ended = time.time()
        returned = folder / "returned"
        answer = {
            "code": os.waitstatus_to_exitcode(status), "killed": killed, "seconds": ended - started,
            "exit_seconds": ended - float(returned.read_text()) if returned.exists() else None,
            "stdout": (folder / "stdout").read_text(errors="backslashreplace"),
            "stderr": (folder / "stderr").read_text(errors="backslashreplace"),
        }
        print(json.dumps(answer), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    sys.path.insert(0, str(ROOT))
    serve(Path(sys.argv[2]))
    sys.exit(0)


# ---------------------------------------------------------------- the tests

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from analysis.presets import CONSENSUS_METHODS, MODULE_KINDS, PRESETS, PROXY_METRICS  # noqa: E402

SCALE = float(os.environ.get("CALIBDROP_FUZZ_SCALE", "1"))  # more examples for a longer search: CALIBDROP_FUZZ_SCALE=20


def search(examples: int):
    """Hypothesis settings: ``examples`` (times CALIBDROP_FUZZ_SCALE) examples, no deadline, no example database, and no
    shrinking (each example is a process: shrinking one failure takes minutes; the draws are labelled instead)."""
    return settings(max_examples=max(1, round(examples * SCALE)), deadline=None, database=None,
                    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck), print_blob=True)
DISTRIBUTIONS = ("fz-a", "fz-b", "fz-c")


class Server:
    """The warm server: ``run(argv)`` → the child's exit code, stdout, stderr, whether it was killed and how long it
    took to end after ``main`` returned."""

    def __init__(self, env: dict, cwd: Path, warm: Path):
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", str(warm)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
        assert self.process.stdout.readline().strip() == "ready"
        self.cwd, self.count = cwd, 0

    def run(self, argv, **request) -> dict:
        self.count += 1
        request = {"argv": [str(a) for a in argv], "folder": str(self.cwd / "runs" / str(self.count)), **request}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return {**json.loads(self.process.stdout.readline()), "argv": request["argv"]}

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _words(seed: int, n: int) -> list[str]:
    """``n`` lines of pseudo-random words over an alphabet of its own per seed (the distributions differ)."""
    import random

    rng = random.Random(seed)
    alphabet = "etaoinshrdlu" if seed == 0 else ("0123456789+-*/=" if seed == 1 else "{}();:=<>abcxyz")
    word = lambda: "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7)))  # noqa: E731
    return [" ".join(word() for _ in range(14)) for _ in range(n)]


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A tiny llama checkpoint, three local distributions, texts, per-sample scores and a drop set, and the server."""
    import torch
    import yaml
    from tiny import CONFIGS, byte_tokenizer
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fuzz")
    tiny = root / "tiny"
    torch.manual_seed(0)
    config = CONFIGS["llama"]()
    config.num_hidden_layers, config.pad_token_id = 6, 0  # six blocks: sets that keep block 0 exist, `route` can run
    AutoModelForCausalLM.from_config(config).save_pretrained(tiny)
    byte_tokenizer().save_pretrained(tiny)
    for seed, name in enumerate(DISTRIBUTIONS):
        (root / f"{name}.txt").write_text("\n".join(_words(seed, 40)) + "\n")
        manifest = {"name": name, "description": f"{name}: local text", "document": "one line", "rendering": "plain",
                    "sources": [{"id": "local", "registry": "local", "license": "test", "recipe": "local_files",
                                 "options": {"data_files": str(root / f"{name}.txt")}}],
                    "split": {"rule": "document sha256 order", "heldout_fraction": 0.25}}
        (root / "manifests").mkdir(exist_ok=True)
        (root / "manifests" / f"{name}.yaml").write_text(yaml.safe_dump(manifest))
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": line}) + "\n" for line in _words(3, 8)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "CALIBDROP_CACHE": str(root / "cache"), "CALIBDROP_MANIFESTS": str(root / "manifests"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf-datasets"),
           "MPLBACKEND": "Agg"}
    (root / "work").mkdir()
    server = Server(env, root / "work", tiny)
    results = root / "results"
    made = server.run(["score", "--distributions", ",".join(DISTRIBUTIONS), "--samples", 6, "--seq-len", 24,
                       "--model", tiny, "--metrics", "cosine,angular", "--out", results / "scores.parquet"])
    assert made["code"] == 0, made["stderr"]
    made = server.run(["consensus", results, "--k", 1, "--out", root / "set.json"])
    assert made["code"] == 0, made["stderr"]
    yield {"root": root, "tiny": tiny, "texts": texts, "results": results, "set": root / "set.json", "server": server}
    server.close()


def fresh(space: dict, kind: str) -> Path:
    """A new empty folder for one example."""
    (space["root"] / kind).mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(dir=space["root"] / kind))


def assert_one_clear_outcome(result: dict, *named: str) -> None:
    """Exit 0 with something on stdout, or exit 2 with one error line naming the input (an argument, a file or a
    folder given); never a traceback or a hang, and the process ends at once after ``main`` returns."""
    shown = (f"calibdrop {' '.join(result['argv'])}\nstdout:\n{result['stdout'][-2000:]}\n"
             f"stderr:\n{result['stderr'][-3000:]}")
    assert not result["killed"], f"did not end within {EXAMPLE_TIMEOUT} s: {shown}"
    assert "Traceback" not in result["stderr"] and result["code"] in (0, 2), shown
    assert result["exit_seconds"] < EXIT_LIMIT, f"ended {result['exit_seconds']:.1f} s after main returned: {shown}"
    if result["code"] == 0:
        assert result["stdout"].strip(), shown
        return
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    usage = lines[0].startswith("usage:") if lines else False
    errors = [line for line in lines if "error:" in line]
    others = [line for line in lines if line not in errors and not line.startswith("calibdrop: warning:")]
    assert len(errors) == 1 and lines[-1] == errors[0], shown
    assert usage or not others, f"lines on stderr besides calibdrop's warnings and its error: {others}\n{shown}"
    named = named_inputs(result["argv"] + list(named))
    assert any(token in errors[0] for token in named), f"the error names no input: {shown}"


def named_inputs(argv: list[str]) -> set[str]:
    """How an error line may name an input: an option, a path (or its file name), a value as given or quoted."""
    tokens = set()
    for token in argv:
        option, _, value = token.partition("=") if token.startswith("--") else ("", "", token)
        tokens |= {option, f"{option[2:].replace('-', '_')}="} if option else set()
        tokens |= {repr(value), repr(value.strip()), f'"{value}"'} | {repr(item.strip()) for item in value.split(",")}
        tokens |= {value} if len(value.strip()) > 2 else set()
        tokens |= {Path(value).name} if "/" in value and len(Path(value).name) > 2 else set()
    return {token for token in tokens if token.strip()}


# ---------------------------------------------------------------- option values

JUNK = st.sampled_from(["", " ", "x", "-1", "0", "1.5", "1e3", "nan", "inf", "-inf", "0x10", ",", "1,", "4,,8",
                        "\u0661", "--", "99999999999999999999", "é", "a b", "🙂"])
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10)
SMALL = st.one_of(st.integers(-3, 6).map(str), JUNK)  # counts whose every valid value is cheap
SIZE = st.one_of(st.integers(-3, 6).map(str), JUNK, st.sampled_from(["100000", "3000"]))  # large: fails fast or cheap
SEED = st.one_of(st.integers(-3, 2**33).map(str), JUNK)
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.floats(0, 1).map(repr), JUNK)
REAL_NAMES = {"all", "code", "math", "general", "chat", "multilingual"}  # real distributions: they would be downloaded


def names(*valid: str):
    return st.one_of(st.sampled_from(valid), JUNK, TEXT)


def name_lists(*valid: str):
    return st.lists(st.one_of(st.sampled_from(valid), JUNK, TEXT), min_size=1, max_size=3).map(",".join)


def distribution_lists():
    spec = name_lists(*DISTRIBUTIONS, "fz-a/x", "poetry", "fz-b ")
    return spec.filter(lambda text: not {part.strip() for part in text.split(",")} & REAL_NAMES)


KINDS, METRICS = tuple(MODULE_KINDS), tuple(PROXY_METRICS)
BASES = {  # a command's base arguments: {texts}, {tiny}, {set}, {results} from the workspace, {out} a new folder
    "score-texts": "score --texts {texts} --model {tiny} --metrics cosine --out {out}/s.parquet",
    "score-distributions": "score --distributions fz-a,fz-b --samples 4 --seq-len 16 --model {tiny} --metrics cosine "
                           "--out {out}/s.parquet",
    "consensus": "consensus {results} --k 1 --out {out}/set.json",
    "compare": "compare {results} --modules attn --k 1 --n-boot 40 --n-perm 4 --out {out}/cmp",
    "prune": "prune --model {tiny} --drop-set {set} --out {out}/pruned",
    "check": "check --model {tiny} --drop-set {set} --texts {texts} --n-perm 10 --out {out}/check",
    "evaluate": "evaluate --model {tiny} --drop-sets {set} --distributions fz-a --samples 2 --seq-len 16 "
                "--out {out}/evaluate",
    "route": "route {results} --model {tiny} --k 1 --calibration-samples 4 --calibration-seq-len 16 --samples 2 "
             "--seq-len 16 --n-boot 40 --out {out}/route",
}
OPTIONS = {  # the options a search sets, and their values
    "score-texts": {"--seq-len": SIZE, "--batch-size": SIZE, "--metrics": name_lists(*METRICS),
                    "--preset": names(*PRESETS), "--dtype": names("float32", "bfloat16", "fp32", "int8", "float64"),
                    "--device": names("cpu", "cuda", "cuda:1", "mps", "meta")},
    "score-distributions": {"--distributions": distribution_lists(), "--samples": SIZE, "--seq-len": SIZE,
                            "--seed": SEED, "--batch-size": SIZE, "--metrics": name_lists(*METRICS),
                            "--device-map": names("auto", "cpu", "balanced")},
    "consensus": {"--k": SIZE, "--module": names(*KINDS), "--method": names(*CONSENSUS_METHODS),
                  "--metric": names(*METRICS)},
    "compare": {"--k": name_lists("1", "2", "0", "-1", "40"), "--modules": name_lists(*KINDS), "--n-boot": SMALL,
                "--n-perm": SMALL},
    "prune": {"--dtype": names("float32", "bfloat16", "float16", "x"),
              "--model": names("smollm2-135m-x", "", "a/b/c", "no such")},
    "check": {"--loss-samples": SMALL, "--max-length": SIZE, "--batch-size": SIZE, "--alpha": NUMBER,
              "--tolerance": NUMBER, "--n-perm": SMALL, "--seed": SEED, "--metric": names(*METRICS),
              "--consensus-method": names(*CONSENSUS_METHODS)},
    "evaluate": {"--samples": SIZE, "--seq-len": SIZE, "--distributions": distribution_lists(), "--limit": SMALL,
                 "--k": name_lists("1", "0", "x", "40"), "--methods": name_lists(*CONSENSUS_METHODS),
                 "--module": names(*KINDS), "--metric": names(*METRICS),
                 "--tasks": name_lists("nosuchtask", "arc-easy")},
    "route": {"--k": SIZE, "--module": names(*KINDS), "--metric": names(*METRICS),
              "--methods": name_lists(*CONSENSUS_METHODS), "--classifier": names("centroid", "logistic"),
              "--calibration-samples": SIZE, "--calibration-seq-len": SIZE, "--samples": SIZE, "--seq-len": SIZE,
              "--batch-size": SIZE, "--n-boot": SMALL, "--seed": SEED},
}
LISTINGS = ("models", "models list --json", "models --wide", "data list", "data list --json", "data list --wide")


def base_argv(command: str, space: dict, out: Path) -> list[str]:
    """``BASES[command]`` with the workspace's paths and ``out`` filled in."""
    paths = {key: space[key] for key in ("texts", "tiny", "set", "results")}
    return [word.format(out=out, **paths) for word in BASES[command].split()]


@search(24)
@given(data=st.data())
def test_option_values_give_a_result_or_one_clear_line(space, data):
    command = data.draw(st.sampled_from([*sorted(BASES), *LISTINGS]), label="command")
    if command in LISTINGS:
        assert_one_clear_outcome(space["server"].run(command.split()))
        return
    options = OPTIONS[command]
    argv = base_argv(command, space, fresh(space, "out"))
    chosen = data.draw(st.lists(st.sampled_from(sorted(options)), max_size=2, unique=True), label="options")
    argv += [f"{option}={data.draw(options[option], label=option)}" for option in chosen]
    if data.draw(st.booleans(), label="odd --out"):
        argv += ["--out", data.draw(st.sampled_from([str(space["texts"] / "x"), "/proc/calibdrop/x"]), label="--out")]
    assert_one_clear_outcome(space["server"].run(argv))


# ---------------------------------------------------------------- drop-set and texts files

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
DEEP = st.integers(60, 200_000).flatmap(lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n]))
SURROGATE = st.sampled_from(['"\\ud800"', '"a\\udfff"', '"\\udc80x"'])


def drop_set_files(record: dict):
    """Drop-set file contents: the good record with a field removed or replaced, any JSON, deep nesting, lone
    surrogates, a truncated record, bytes."""
    text = json.dumps(record)
    replaced = st.tuples(st.sampled_from(sorted(record) + ["extra"]), JSON).map(
        lambda pair: json.dumps({**record, pair[0]: pair[1]}))
    removed = st.sampled_from(sorted(record)).map(lambda key: json.dumps({k: v for k, v in record.items() if k != key}))
    spliced = st.tuples(st.sampled_from(sorted(record)), st.one_of(DEEP, SURROGATE)).map(
        lambda pair: text.replace(f'"{pair[0]}": ', f'"{pair[0]}": {pair[1]}, "was_{pair[0]}": ', 1))
    truncated = st.integers(0, len(text)).map(lambda n: text[:n])
    return st.one_of(replaced, removed, spliced, JSON.map(json.dumps), DEEP, truncated,
                     st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                     st.just(text.replace('"attn"', '"joint"')))


@search(10)
@given(data=st.data())
def test_drop_set_files_give_a_result_or_one_clear_line(space, data):
    record = json.loads(space["set"].read_text())
    content = data.draw(drop_set_files(record), label="drop-set file")
    path = fresh(space, "drop_sets") / "set.json"
    path.write_bytes(content.encode("utf-8", "surrogatepass"))
    command = data.draw(st.sampled_from(["prune", "check", "evaluate"]), label="command")
    argv = base_argv(command, space, fresh(space, "out"))
    argv[argv.index(str(space["set"]))] = str(path)
    assert_one_clear_outcome(space["server"].run(argv), str(path))


LINES = st.one_of(
    TEXT.map(lambda t: json.dumps({"text": t})),
    st.text(max_size=30).map(lambda t: json.dumps({"text": t})),  # lone surrogates among the characters
    JSON.map(json.dumps), DEEP, SURROGATE.map(lambda s: '{"text": ' + s + "}"), st.just(""), st.just('{"text": ""}'),
    st.binary(min_size=1, max_size=12).map(lambda b: b.decode("latin-1")),
)


@search(8)
@given(data=st.data())
def test_texts_files_give_a_result_or_one_clear_line(space, data):
    good = space["texts"].read_text().splitlines()
    lines = data.draw(st.lists(st.one_of(st.sampled_from(good), LINES), min_size=1, max_size=6), label="lines")
    path = fresh(space, "texts") / "texts.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    command = data.draw(st.sampled_from(["score-texts", "check"]), label="command")
    argv = base_argv(command, space, fresh(space, "out"))
    argv[argv.index(str(space["texts"]))] = str(path)
    assert_one_clear_outcome(space["server"].run(argv), str(path))


# ---------------------------------------------------------------- damaged model folders and cache records

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")
CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "model_type",
               "calibdrop_pruning", "torch_dtype", "max_position_embeddings")


def damage(data, folder: Path, files=CHECKPOINT_FILES) -> str:
    """Damage one file of ``folder`` as drawn: truncate it, delete it, replace it with bytes or any JSON, or set one
    config entry to a drawn value.  Returns what was done."""
    name = data.draw(st.sampled_from(files), label="file")
    path = folder / name
    kinds = ["truncate", "delete", "bytes", "json", "deep", "config entry", "nan weights"]
    how = data.draw(st.sampled_from(kinds), label="damage")
    if how == "nan weights":  # loads, then fails mid-run: the error path while a background thread cuts windows
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
        tensors[name] = tensors[name].fill_(float("nan"))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: data.draw(st.integers(0, path.stat().st_size - 1), label="keep")])
    elif how == "delete":
        path.unlink()
    elif how == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=64), label="bytes"))
    elif how in ("json", "deep"):
        path.write_text(data.draw(JSON.map(json.dumps) if how == "json" else DEEP, label=how))
    else:
        config = json.loads((folder / "config.json").read_text())
        key = data.draw(st.sampled_from(CONFIG_KEYS), label="key")
        values = st.one_of(st.integers(-2, 300), JSON, st.sampled_from(["llama", "bert", "gpt2"]))
        value = data.draw(values, label="value")
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        name = f"config.json[{key}]"
    return f"{how} {name}"


@search(10)
@given(data=st.data())
def test_damaged_model_folders_give_a_result_or_one_clear_line(space, data):
    folder = fresh(space, "models") / "checkpoint"
    shutil.copytree(space["tiny"], folder)
    damage(data, folder)
    command = data.draw(st.sampled_from(["score-texts", "score-distributions", "prune"]), label="command")
    argv = base_argv(command, space, fresh(space, "out"))
    argv[argv.index(str(space["tiny"]))] = str(folder)
    assert_one_clear_outcome(space["server"].run(argv), str(folder))


@search(4)
@given(data=st.data())
def test_a_damaged_builtin_cache_is_reported_once_and_rebuilt(space, data):
    from analysis.models import loading

    cache = fresh(space, "caches")
    directory = cache / "models" / "smollm2-135m" / "float32"
    shutil.copytree(space["tiny"], directory)
    record = directory / loading.RECORD
    record.write_text(json.dumps({"builtin": "smollm2-135m", "checkpoint_sha256": loading.checkpoint_sha256(directory)},
                                 indent=2))
    if data.draw(st.booleans(), label="damage the record"):
        good = record.read_text()
        record.write_text(data.draw(st.one_of(st.just("[]"), JSON.map(json.dumps), DEEP, SURROGATE,
                                              st.integers(0, len(good) - 1).map(lambda n: good[:n])), label="record"))
    else:
        damage(data, directory, ("model.safetensors", "config.json", "tokenizer.json"))
    out = fresh(space, "out")
    result = space["server"].run(["score", "--texts", space["texts"], "--model", "smollm2-135m", "--metrics", "cosine",
                                  "--seq-len", 128, "--out", out / "s.parquet"],
                                 env={"CALIBDROP_CACHE": str(cache)}, fake_builtin=str(space["tiny"]))
    assert_one_clear_outcome(result)
    assert result["code"] == 0, result["stderr"]
    warnings = [line for line in result["stderr"].splitlines() if line.startswith("calibdrop: warning:")]
    assert len(warnings) == 1 and "rebuilding it" in warnings[0] and str(directory) in warnings[0], result["stderr"]
    assert json.loads(record.read_text())["checkpoint_sha256"] == loading.checkpoint_sha256(directory)


# ---------------------------------------------------------------- damaged run folders

RUN_READERS = {  # the commands that read a run folder ({run}) without a model, {out} a new folder
    "report": "report {run} --no-figures",
    "summary": "summary {run} --out {out}",
    "consensus": "consensus {run} --k 2 --out {out}/set.json",
    "compare": "compare {run} --modules attn --k 2 --n-boot 4 --n-perm 4 --out {out}/compare",
}
PER_SAMPLE = ("scores.per_sample.parquet", "scores.per_sample.json")
SUMMARY_TABLES = ("scores", "bootstrap_pairs", "split_half", "drop_sets", "validity", "decomposition", "transfer",
                  "comparisons", "claims")
READ_FILES = {  # what each command reads (the report: every table of its sections); None: every file
    "report": None, "consensus": PER_SAMPLE, "compare": PER_SAMPLE,
    "summary": ("run_summary.json", *(f"{name}{suffix}" for name in SUMMARY_TABLES for suffix in (".parquet", ".json"))),
}
TABLE_DAMAGE = ("bytes", "truncate", "delete", "drop column", "rename column", "change kind", "NaN")
JSON_DAMAGE = ("bytes", "truncate", "delete", "any JSON", "remove entry", "replace entry", "rename entry", "NaN")
KIND_CHANGES = ("str", "int", "float", "bool", "list")


def json_paths(value, prefix=(), depth: int = 4) -> list[tuple]:
    """Every path of keys and indices into a parsed JSON value, down to ``depth`` levels."""
    if depth == 0 or not isinstance(value, (dict, list)) or not value:
        return []
    items = value.items() if isinstance(value, dict) else enumerate(value[:3])
    return [path for key, child in items for path in [(*prefix, key), *json_paths(child, (*prefix, key), depth - 1)]]


def damage_json(data, path: Path) -> str:
    """Damage a JSON file (run_summary.json or a sidecar) as drawn; returns what was done."""
    text = path.read_text()
    how = data.draw(st.sampled_from(JSON_DAMAGE), label="damage")
    if how == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=64), label="bytes"))
    elif how == "truncate":
        path.write_text(text[: data.draw(st.integers(0, len(text) - 1), label="keep")])
    elif how == "delete":
        path.unlink()
    elif how == "any JSON":
        path.write_text(json.dumps(data.draw(JSON, label="json")))
    else:
        record = json.loads(text)
        *parents, key = data.draw(st.sampled_from(json_paths(record)), label="entry")
        holder = record
        for part in parents:
            holder = holder[part]
        if how == "remove entry":
            del holder[key]
        elif how == "rename entry" and isinstance(holder, dict):
            holder[f"{key}_renamed"] = holder.pop(key)
        else:
            holder[key] = float("nan") if how == "NaN" else data.draw(JSON, label="value")
        path.write_text(json.dumps(record))  # NaN as the token NaN, which Python's json reads
        how = f"{how} {'/'.join(map(str, [*parents, key]))}"
    return how


def damage_table(data, path: Path) -> str:
    """Damage a Parquet table as drawn: bytes, cut short, deleted, or (with a sidecar checksum that matches, or not, as
    drawn) a column dropped, renamed, turned into another kind or set to NaN."""
    import hashlib

    import numpy as np
    import pandas as pd

    how = data.draw(st.sampled_from(TABLE_DAMAGE), label="damage")
    if how == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=64), label="bytes"))
        return how
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: data.draw(st.integers(0, path.stat().st_size - 1), label="keep")])
        return how
    if how == "delete":
        path.unlink()
        return how
    frame = pd.read_parquet(path)
    column = data.draw(st.sampled_from(list(frame.columns)), label="column")
    if how == "drop column":
        frame = frame.drop(columns=column)
    elif how == "rename column":
        frame = frame.rename(columns={column: f"{column}_renamed"})
    elif how == "change kind":
        kind = data.draw(st.sampled_from(KIND_CHANGES), label="kind")
        values = {"str": lambda v: str(v), "int": lambda v: len(str(v)), "float": lambda v: float(len(str(v))) + 0.5,
                  "bool": lambda v: bool(len(str(v)) % 2), "list": lambda v: [str(v)]}[kind]
        frame[column] = [values(v) for v in frame[column]]
    else:
        rows = data.draw(st.sampled_from(["all", "first", "half"]), label="rows")
        chosen = {"all": slice(None), "first": slice(0, 1), "half": slice(0, len(frame) // 2 + 1)}[rows]
        frame[column] = frame[column].astype(object)
        frame.loc[frame.index[chosen], column] = np.nan
        how = f"NaN ({rows} rows)"
    data_bytes = frame.to_parquet(index=False)
    path.write_bytes(data_bytes)
    if data.draw(st.booleans(), label="sidecar checksum updated"):
        sidecar = path.with_suffix(".json")
        record = json.loads(sidecar.read_text())
        record["content_sha256"] = hashlib.sha256(data_bytes).hexdigest()
        sidecar.write_text(json.dumps(record))
    return f"{how} {column}"


@search(10)
@given(data=st.data())
def test_damaged_run_folders_give_a_result_or_one_clear_line(space, smoke_run, data):
    folder = fresh(space, "run_folders") / "run"
    shutil.copytree(smoke_run, folder, ignore=shutil.ignore_patterns("figures", "parts", "report.*"))
    command = data.draw(st.sampled_from(sorted(RUN_READERS)), label="command")
    names = READ_FILES[command] or sorted(path.name for path in folder.iterdir() if path.suffix in (".parquet", ".json"))
    name = data.draw(st.sampled_from(names), label="file")
    (damage_table if name.endswith(".parquet") else damage_json)(data, folder / name)
    argv = [word.format(run=folder, out=fresh(space, "out")) for word in RUN_READERS[command].split()]
    assert_one_clear_outcome(space["server"].run(argv), str(folder / name))
