"""The ``calibdrop`` command line (also ``python -m analysis``).

Only the argument parser is built at start-up (it reads :mod:`analysis.presets`, which imports
nothing heavy); each command imports torch, transformers and the study's modules when it runs,
so ``--help`` answers at once.  Outputs without ``--out`` go under ``./results`` and every
command prints where it wrote, in full.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from ..errors import CalibdropError, CalibdropWarning
from ..presets import (
    CONSENSUS_METHODS,
    DEFAULT_MODEL,
    GROUND_TRUTH,
    MATMUL_PRECISIONS,
    MODULE_KINDS,
    PAPER_TASKS,
    PRESETS,
    PROXY_METRICS,
    RESULTS_DIR,
    SCORED_MODULES,
)
from .commands import (
    cmd_compare,
    cmd_consensus,
    cmd_evaluate,
    cmd_prune,
    cmd_report,
    cmd_run,
    cmd_score,
    cmd_summary,
)
from .choose_command import cmd_choose
from .data_commands import cmd_data_fetch, cmd_data_list, cmd_models_fetch, cmd_models_list
from .export_command import cmd_export
from .use_commands import cmd_check, cmd_route


def integer(text: str) -> int:
    """argparse type: an integer, or argparse's error naming the text."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def bounded_int(low: int, high: float, message: str):
    """argparse type: an integer ``value`` with ``low <= value < high``, else ``message.format(value)``."""
    def bounded(text: str) -> int:
        value = integer(text)
        if not low <= value < high:
            raise argparse.ArgumentTypeError(message.format(value))
        return value

    bounded.__name__ = "integer"
    return bounded


# 0 is refused, never replaced by a default
positive_int = bounded_int(1, math.inf, "must be a positive integer, not {}")
# numpy's generators refuse negative seeds
seed_int = bounded_int(0, 2**32, "a seed must be an integer from 0 to 2**32 - 1, not {}")
non_negative_int = bounded_int(0, math.inf, "must be 0 or a positive integer, not {}")
# a 95% percentile interval of B resamples leaves 2.5% of them in each tail: B >= 40 puts one there; fewer give no
# interval (one resample gives [x, x], which its own estimate may lie outside)
MIN_BOOT = 40
boot_count = bounded_int(MIN_BOOT, math.inf,
                         f"a 95% bootstrap interval needs at least {MIN_BOOT} resamples (one in each 2.5% tail), "
                         "not {}")
# --force: the rule of analysis/outputs.py
REPLACE = "replace what --out holds: another command's output, or this command's for another model, inputs or settings"
APPLY_AND_REPLACE = f"apply a drop set made for a model with another checksum, and {REPLACE}"


def token_count(text: str) -> int:
    """argparse type: a length in tokens, an integer of at least 2 (a window needs a token and its successor)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 tokens, not {value}")
    return value


def finite_float(low: float, high: float, *, open_low: bool = False, open_high: bool = False):
    """argparse type: a finite number in ``[low, high]`` (``open_low``/``open_high``: that end excluded)."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        inside = (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
        if not inside:
            interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, not {text}")
        return value

    number.__name__ = "number"
    return number


PROBABILITY = finite_float(0, 1, open_low=True, open_high=True)
NON_NEGATIVE = finite_float(0, math.inf, open_high=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where it is ``None`` or a flag's ``False``."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _presets_help() -> str:
    return "; ".join(f"{name}: {s.samples} x {s.seq_len} tokens per distribution" for name, s in PRESETS.items())


def _add_model_options(parser, *, device: bool = True) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="built-in name (see `calibdrop models`), checkpoint folder, .gguf file or Hub id")
    parser.add_argument("--dtype", help="weights' dtype: float32 (the default on CPU), bfloat16 or float16")
    if device:
        parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu, or cuda:LOCAL_RANK under torchrun)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calibdrop", formatter_class=HelpFormatter,
                                     description="Is a layer-importance ranking a property of the model or of its "
                                                 "calibration data? (also: python -m analysis)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str):
        return commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    models_parser = command("models", "list or fetch the built-in models")
    models_parser.add_argument("--json", action="store_true", help="print the list as JSON")
    models_parser.add_argument("--wide", action="store_true", help="every column, not cut to 100 characters")
    models_parser.set_defaults(func=cmd_models_list)
    models_commands = models_parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    listing = models_commands.add_parser("list", help="built-ins and whether each is fetched",
                                         formatter_class=HelpFormatter)
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.add_argument("--wide", action="store_true", help="every column, not cut to 100 characters")
    listing.set_defaults(func=cmd_models_list)
    fetch = models_commands.add_parser("fetch", help="download, join and verify built-in GGUF models",
                                       formatter_class=HelpFormatter)
    fetch.add_argument("names", nargs="*", help=f"built-in names (default: {DEFAULT_MODEL})")
    fetch.add_argument("--dequantise", action="store_true", help="also build the float32 safetensors cache")
    fetch.set_defaults(func=cmd_models_fetch)

    score = command("score", "importance of every attention, MLP and block for a JSONL of texts or for distributions")
    _add_model_options(score)
    score.add_argument("--texts", help="JSONL file, one {\"text\": ...} object per line; each text is one sample")
    score.add_argument("--distributions", help="comma-separated distributions (code,math,code/go ...) or 'all' "
                                               "(see `calibdrop data list`)")
    score.add_argument("--out", default=f"{RESULTS_DIR}/scores.parquet",
                       help="Parquet file to write (a .json provenance sidecar goes beside it)")
    score.add_argument("--preset", choices=sorted(PRESETS), default="default",
                       help=f"samples x tokens per distribution ({_presets_help()})")
    score.add_argument("--samples", type=positive_int, help="samples per distribution (default: the preset's)")
    score.add_argument("--seq-len", type=token_count,
                       help="tokens per sample (default: the preset's; with --texts the longest kept)")
    score.add_argument("--seed", type=seed_int, default=0, help="seed of the sample windows")
    score.add_argument("--batch-size", type=positive_int, default=8, help="samples per forward pass")
    score.add_argument("--per-sample", action="store_true",
                       help="with --texts: one row per text and module instead of the aggregate")
    score.add_argument("--metrics", default=",".join(PROXY_METRICS),
                       help=f"comma-separated importance metrics; the proxies share one forward pass, taylor "
                            f"(first-order ΔNLL) adds a forward and backward pass, {GROUND_TRUTH} (the ground truth: "
                            f"the real NLL increase of dropping each module) re-runs blocks per module")
    score.add_argument("--device-map", help="shard the model over devices with accelerate, e.g. auto")
    score.add_argument("--force", action="store_true", help=REPLACE)
    score.set_defaults(func=cmd_score)

    run = command("run", "the whole study: score, compare, choose drop sets, prune, evaluate, report")
    _add_model_options(run)
    run.add_argument("--out", default=RESULTS_DIR,
                     help="folder for the tables, figures and report (reused stage by stage on a rerun)")
    run.add_argument("--preset", default="default", choices=list(PRESETS),
                     help=f"how much to compute ({_presets_help()}; "
                     "see analysis/presets.py for every setting)")
    run.add_argument("--no-figures", action="store_true",
                     help="draw no figures (`calibdrop report` draws them later from the tables)")
    run.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS,
                     help="float32 matrix products: highest (full float32), high (TensorFloat-32 on a GPU; on a CPU "
                          "the same as highest) or medium (bfloat16 products); default: the preset's")
    run.add_argument("--force", action="store_true", help=REPLACE)
    run.set_defaults(func=cmd_run)

    compare = command("compare", "stability tables and figures from per-sample scores")
    compare.add_argument("results", help="folder or .per_sample.parquet written by `calibdrop score --distributions`")
    compare.add_argument("--out", help="output folder (default: a 'compare' folder beside the results)")
    compare.add_argument("--modules", default=",".join(MODULE_KINDS), help="module kinds to compare, comma-separated")
    compare.add_argument("--k", default="4,8", help="drop-set sizes, comma-separated")
    compare.add_argument("--n-boot", type=boot_count, default=PRESETS["default"].n_boot,
                         help="bootstrap resamples of samples")
    compare.add_argument("--n-perm", type=positive_int, default=PRESETS["default"].n_perm,
                         help="permutation-test shuffles of sample labels")
    compare.add_argument("--force", action="store_true", help=REPLACE)
    compare.set_defaults(func=cmd_compare)

    agree = command("consensus", "a drop set agreed across distributions, as JSON")
    agree.add_argument("results", help="folder or .per_sample.parquet written by `calibdrop score --distributions`")
    agree.add_argument("--module", default="attn", choices=MODULE_KINDS, help="what to drop")
    agree.add_argument("--k", type=positive_int, default=8, help="how many modules to drop")
    agree.add_argument("--method", default="borda", choices=CONSENSUS_METHODS,
                       help="borda: mean rank; median: median rank; mean: mean min-max-scaled importance; minimax: "
                            "least worst-case regret")
    agree.add_argument("--metric",
                       help="importance metric of the ranking (default: cosine, or the table's only metric)")
    agree.add_argument("--out", help=f"JSON file to write (default: "
                                     f"{RESULTS_DIR}/drop_sets/<metric>-<module>-<k>-<method>.json)")
    agree.add_argument("--force", action="store_true", help=REPLACE)
    agree.set_defaults(func=cmd_consensus)

    prune = command("prune", "drop the modules of a drop set and save the pruned model")
    _add_model_options(prune, device=False)
    prune.add_argument("--drop-set", required=True, help="drop-set JSON from `calibdrop consensus`")
    prune.add_argument("--out", required=True, help="folder for the pruned checkpoint")
    prune.add_argument("--force", action="store_true", help=APPLY_AND_REPLACE)
    prune.set_defaults(func=cmd_prune)

    export = command("export", "a drop set as a pruned checkpoint that stock transformers loads, "
                               "or as the paper code's config keys")
    export.add_argument("--model", help="built-in name, checkpoint folder, .gguf file or Hub id; for --format paper "
                                        f"also a config.json (default: the model the drop set names, else "
                                        f"{DEFAULT_MODEL})")
    export.add_argument("--dtype", help="weights' dtype of the checkpoint: float32 (the default), bfloat16 or float16; "
                                        "gguf: float32 or float16 (default: the source GGUF's tensor types)")
    export.add_argument("--drop-set", required=True, help="drop-set JSON from `calibdrop consensus`")
    export.add_argument("--format", choices=("checkpoint", "gguf", "paper"), default="checkpoint",
                        help="checkpoint: weights, tokenizer and modeling_calibdrop.py, for "
                             "AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True); gguf: a GGUF file "
                             "for llama.cpp, from a built-in or .gguf --model (sublayer drops use llama.cpp's deci "
                             "architecture: llama and qwen2 files); paper: "
                             "drop_attn_list/drop_mlp_list of He et al.'s code, checked against the model's layer "
                             "count (read from its config, no weights loaded)")
    export.add_argument("--out", help="checkpoint: the folder to write (required); gguf: the .gguf file to write "
                                      "(required); paper: a JSON file to write "
                                      "(default: print only)")
    export.add_argument("--force", action="store_true", help=APPLY_AND_REPLACE)
    export.set_defaults(func=cmd_export)

    evaluate = command("evaluate", "held-out perplexity and zero-shot accuracy of drop sets")
    _add_model_options(evaluate)
    evaluate.add_argument("--drop-sets", nargs="*", help="drop-set JSON files")
    evaluate.add_argument("--from-scores",
                          help="per-sample scores: evaluate each distribution's own set, the consensus sets and random "
                               "sets")
    evaluate.add_argument("--module", default="attn", choices=MODULE_KINDS,
                          help="module kind of the --from-scores sets")
    evaluate.add_argument("--k", default="4,8", help="drop-set sizes for --from-scores, comma-separated")
    evaluate.add_argument("--methods", default="borda,minimax",
                          help=f"consensus methods for --from-scores ({', '.join(CONSENSUS_METHODS)})")
    evaluate.add_argument("--metric",
                          help="importance metric for --from-scores (default: cosine, or the table's only metric)")
    evaluate.add_argument("--distributions",
                          help="held-out perplexity on these distributions (comma-separated, or 'all')")
    evaluate.add_argument("--tasks", help=f"zero-shot tasks, comma-separated, from: {','.join(PAPER_TASKS)}")
    evaluate.add_argument("--limit", type=positive_int, help="examples per task (per MMLU subject); default: all")
    evaluate.add_argument("--samples", type=positive_int, default=32, help="held-out windows per distribution")
    evaluate.add_argument("--seq-len", type=token_count, default=512, help="tokens per held-out window")
    evaluate.add_argument("--out", default=f"{RESULTS_DIR}/evaluation",
                          help="folder for transfer.parquet and accuracy.parquet")
    evaluate.add_argument("--force", action="store_true", help=APPLY_AND_REPLACE.replace("a drop set", "drop sets"))
    evaluate.set_defaults(func=cmd_evaluate)

    checker = command("check", "does a drop set still hold on your texts? drift, regret and a recommendation")
    _add_model_options(checker)
    checker.add_argument("--drop-set", required=True,
                         help="drop-set JSON from `calibdrop consensus` (it names its source scores)")
    checker.add_argument("--texts", required=True,
                         help="your JSONL file, one {\"text\": ...} object per line; each text is one sample")
    checker.add_argument("--scores",
                         help="per-sample scores the drop set was built from, for drop sets that do not name them "
                                          "(default: the drop set's 'scores' entry)")
    checker.add_argument("--metric", help="importance metric (default: the drop set's)")
    checker.add_argument("--consensus-method", default="borda", choices=CONSENSUS_METHODS,
                         help="consensus set offered as the alternative")
    checker.add_argument("--loss-samples", type=non_negative_int, default=0,
                         help="measure the real perplexity of the sets on this many of your texts, at most half (0: "
                              "off)")
    checker.add_argument("--max-length", type=token_count, default=512, help="tokens per text, longer ones are cut")
    checker.add_argument("--batch-size", type=positive_int, default=8, help="texts per forward pass")
    checker.add_argument("--alpha", type=PROBABILITY, default=0.05,
                         help="significance level of the drift and loss tests")
    checker.add_argument("--tolerance", type=NON_NEGATIVE, default=0.1,
                         help="largest acceptable excess importance over your best set, as a fraction")
    checker.add_argument("--n-perm", type=positive_int, default=1000, help="permutations of the drift test")
    checker.add_argument("--seed", type=seed_int, default=0, help="seed of the resampling and the loss subsample")
    checker.add_argument("--out", default=f"{RESULTS_DIR}/check", help="folder for the tables")
    checker.add_argument("--force", action="store_true", help=APPLY_AND_REPLACE)
    checker.set_defaults(func=cmd_check)

    chooser = command("choose", "which of a run's drop sets to use for your texts: its leading sets and the "
                      "baselines by real loss, chosen on half your texts and confirmed on the other half")
    _add_model_options(chooser)
    chooser.set_defaults(model=None)
    chooser.add_argument("run", help="output folder of a finished `calibdrop run`")
    chooser.add_argument("--texts", required=True, help="your JSONL file, one {\"text\": ...} object per line")
    chooser.add_argument("--module", choices=MODULE_KINDS, help="one module kind (default: every kind the run "
                                                                 "evaluated)")
    chooser.add_argument("--top", type=positive_int, default=5,
                         help="the run's leading sets weighed per module kind and budget, besides its answer's group "
                              "and the baselines")
    chooser.add_argument("--seq-len", type=token_count, default=128, help="tokens per window cut from a text")
    chooser.add_argument("--margin", type=NON_NEGATIVE, default=PRESETS["default"].equivalence_margin,
                         help="sets within this fraction of the pick's perplexity ratio serve alike")
    chooser.add_argument("--alpha", type=PROBABILITY, default=0.05, help="error rate of each one-sided test")
    chooser.add_argument("--n-boot", type=boot_count, default=1000, help="bootstrap resamples of the windows")
    chooser.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    chooser.add_argument("--seed", type=seed_int, default=0, help="seed of the split into halves and the bootstrap")
    chooser.add_argument("--out", help="folder for the tables (default: print only)")
    chooser.add_argument("--force", action="store_true", help=REPLACE)
    chooser.set_defaults(func=cmd_choose)

    route = command("route",
                    "one model, several drop sets: route each input to a distribution's own set, against the static "
                    "sets")
    _add_model_options(route)
    route.add_argument("results",
                       help="output folder of `calibdrop run` or `calibdrop score` (its per-sample scores give the "
                            "drop sets)")
    route.add_argument("--module", default="attn", choices=SCORED_MODULES, help="module kind of the drop sets")
    route.add_argument("--k", type=positive_int, default=8, help="drop-set size")
    route.add_argument("--metric",
                       help="importance metric of the drop sets (default: cosine, or the table's only metric)")
    route.add_argument("--methods", default="borda,minimax",
                       help=f"consensus methods compared as static sets ({', '.join(CONSENSUS_METHODS)})")
    route.add_argument("--classifier", default="centroid", choices=("centroid", "logistic"),
                       help="the router's classifier")
    route.add_argument("--calibration-samples", type=positive_int, default=PRESETS["default"].samples,
                       help="calibration windows per distribution the router is trained on")
    route.add_argument("--calibration-seq-len", type=token_count, default=PRESETS["default"].seq_len,
                       help="tokens per calibration window")
    route.add_argument("--samples", type=positive_int, default=24, help="held-out windows per distribution in the mix")
    route.add_argument("--seq-len", type=token_count, default=256, help="tokens per held-out window")
    route.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    route.add_argument("--n-boot", type=boot_count, default=1000, help="bootstrap replicates of the CIs")
    route.add_argument("--seed", type=seed_int, default=0, help="seed of the windows and the resampling")
    route.add_argument("--out", help="folder for the tables (default: RESULTS/routing)")
    route.add_argument("--force", action="store_true", help=REPLACE)
    route.set_defaults(func=cmd_route)

    report = command("report",
                     "rewrite a run folder's report.md, report.html and figures from its saved tables alone (no model)")
    report.add_argument("results",
                        help="output folder of a finished `calibdrop run` (or a committed copy of its tables)")
    report.add_argument("--no-figures", action="store_true", help="rewrite the report only, without its figures")
    report.set_defaults(func=cmd_report)

    summary = command("summary", "one set of tables and figures across the results folders of several models")
    summary.add_argument("results", nargs="+",
                         help="output folders of `calibdrop run`, one per model (a run that stopped part-way adds what "
                              "it has)")
    summary.add_argument("--out", default=f"{RESULTS_DIR}/summary",
                         help="folder for the summary_*.parquet tables and figures/")
    summary.add_argument("--force", action="store_true", help=REPLACE)
    summary.set_defaults(func=cmd_summary)

    data_parser = command("data", "fetch or list the calibration distributions")
    data_commands = data_parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    data_fetch = data_commands.add_parser("fetch", help="download, verify and extract distributions",
                                          formatter_class=HelpFormatter)
    data_fetch.add_argument("names", nargs="*", help="distributions (default: every top-level one)")
    data_fetch.set_defaults(func=cmd_data_fetch)
    data_list = data_commands.add_parser("list", help="distributions with licenses and sizes per split",
                                         formatter_class=HelpFormatter)
    data_list.add_argument("--json", action="store_true", help="print the list as JSON")
    data_list.add_argument("--wide", action="store_true", help="every column: characters, sources and pinned versions")
    data_list.set_defaults(func=cmd_data_list)
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, CalibdropWarning):
        return f"calibdrop: warning: {message}\n"
    return _default_warning_format(message, category, filename, lineno, line)


_default_warning_format = warnings.formatwarning


def _quiet_library_progress() -> None:
    """Progress bars of transformers and huggingface_hub only on a terminal, like calibdrop's own: in a log or a pipe an
    error stays the one line on stderr."""
    if sys.stderr.isatty():
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run a command. The error boundary: calibdrop's own errors and failures of the user's files or
    environment (OSError) print one line and exit 2; Ctrl-C prints one line and exits 130; anything else is a bug and
    keeps its traceback."""
    parser = build_parser()
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--") and arg.endswith("=--"):  # argparse drops a "--" value and calls no type check
            parser.error(f"argument {arg.split('=')[0]}: '--' is not a value; give one after the '='")
    args = parser.parse_args(argv)
    warnings.formatwarning = _warning_line
    _quiet_library_progress()
    try:
        from ..models.distributed import init_distributed

        init_distributed()
        args.func(args)
    except CalibdropError as error:
        print(f"calibdrop: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every table is written atomically, so a rerun resumes from the saved ones
        print("calibdrop: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        reason = error.strerror or str(error).splitlines()[0]
        print(f"calibdrop: error:{where}: {reason}; check that the path exists and that you may read or write it",
              file=sys.stderr)
        return 2
    return 0
