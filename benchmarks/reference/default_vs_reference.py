"""Does a run's report agree with a reference study of the same model wherever it says resolved?

Compares a run folder (typically ``calibdrop run`` with the default preset on a CPU) with a reference folder
(``calibdrop run --preset reference``, committed under ``reference/<model>/``), both read from their tables alone:

(a) **Claims.**  Every claim of the run's ``claims`` table (:mod:`analysis.study.resolution`) is matched with the
    reference's claim on the same question, and each claim the run marks resolved gets an ``outcome``:
    ``agree`` (the reference resolves it and reaches the same verdict), ``disagree`` (the reference resolves it the
    other way), ``reference unresolved`` (the reference has it but cannot resolve it) or ``missing`` (the reference
    has no such claim).  Question and verdict per kind of claim:

    * *recommended set*: per module kind and budget, judged set by set, by members, in the reference's own held-out
      evaluation (:func:`recommendation_outcome`): ``agree`` when the reference's best set lies in the run's group
      (its answer and the sets not separated from it), or the run's pick is the reference's best or lies within the
      margin of it by the reference's paired ratio; ``disagree`` when the reference separates the pick from its best
      by more than the margin; ``reference unresolved`` when it does neither; ``missing`` when the reference did
      not evaluate those members.
    * *answer vs baseline*: per module kind, budget and baseline; the verdict is how the answer fares against it.
    * *a loses less than b*, *consensus vs own set*, *routing*: per comparison (the ``subject``); the verdict is
      the side whose paired 95% CI says it loses less (``a``: CI below 1, ``b``: above 1, ``same``: the same loss on
      every window, ``neither``).  A comparison the reference does not name is matched by its two sets' members and
      the distribution it rests on (the worst case or one distribution), the sides swapped where the reference
      pairs them the other way round.
    * *proxy vs ground truth*: per module kind and proxy; the verdict is on how many distributions the proxy ranks
      unlike the ground truth beyond noise (``all``, ``some``, ``none``;
      :func:`analysis.study.resolution.corrected_validity`).
    * *data or metric*: per module kind; ``data`` (CI of mean ρ across proxies − across distributions above 0),
      ``metric`` (below 0), ``neither`` (CI [0, 0]), ``not separated``.
    * *data changes the ranking*: per module kind and proxy; resolved means some pair of distributions differs
      beyond noise, so two resolved claims agree.

(b) **Top group.**  Per module kind and budget in both ``set_groups`` tables: whether the run's best set (lowest
    worst-case held-out perplexity ratio, rank 1), by its members, is one of the reference's top group (the sets
    ``set_groups`` marks ``in_group``: not separated from the reference's best by the paired CI), and where the
    reference ranks those members (its rank and paired ratio best / it), if the reference evaluated them.

(c) **Time.**  The run's seconds per stage from its ``run_summary.json`` (one invocation: a resumed run counts only
    the stages it computed last), the CPUs of the machine this script runs on (run it on the machine of the run) and,
    with ``--load-log``, the load averages sampled during the run (lines ``<ISO time> <1 min>, <5 min>, <15 min>``).

Writes ``<out>.json`` (every claim row, the top groups, the times and this command) and ``<out>.md`` (the counts,
each resolved claim that does not agree, the top groups, the largest stages).  Exit 2 with one line when a folder
lacks a table it needs.

  python benchmarks/reference/default_vs_reference.py /work/wt/defaultref-run reference/smollm2-135m \\
      --load-log /work/wt/defaultref-load.log --note "2 cores shared with other jobs, OMP_NUM_THREADS=1"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from analysis.errors import InputError  # noqa: E402
from analysis.io import read_table  # noqa: E402
from analysis.study import resolution  # noqa: E402
from benchmarks.reference.results_file import write_comparison  # noqa: E402

COMPARISONS = ("a loses less than b", "consensus vs own set", "routing")
OUTCOMES = ("agree", "disagree", "reference unresolved", "missing")
NEEDED = ("claims", "set_groups", "pruned", "comparisons", "validity", "split_half")
SIZES = ("samples", "seq_len", "ablation_samples", "ablation_seq_len", "transfer_samples", "transfer_seq_len",
         "greedy_shortlist", "n_boot")
LOAD_LINE = re.compile(r"^(\S+)\s+([\d.]+),\s*([\d.]+),\s*([\d.]+)\s*$")


# ---------------------------------------------------------------- reading


def load_folder(folder: Path) -> dict:
    """The tables of :data:`NEEDED` and ``run_summary.json`` of a run folder (:class:`InputError` if one is absent)."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder: give a `calibdrop run` output folder")
    missing = [name for name in NEEDED if not (folder / f"{name}.parquet").exists()]
    if missing or not (folder / "run_summary.json").exists():
        absent = [f"{m}.parquet" for m in missing] + ([] if (folder / "run_summary.json").exists() else
                                                      ["run_summary.json"])
        raise InputError(f"{folder} has no {', '.join(absent)}: give a finished run folder (with its resolution stage)")
    tables = {name: read_table(folder / f"{name}.parquet") for name in NEEDED}
    tables["summary"] = json.loads((folder / "run_summary.json").read_text(encoding="utf-8"))
    return tables


def members(pruned: pd.DataFrame) -> dict[str, tuple[str, ...]]:
    """Drop-set label → its members as sorted strings (so attention layers and ``attn:5`` of joint sets compare)."""
    return {label: tuple(sorted(map(str, indices), key=_order)) for label, indices in
            zip(pruned["drop_set"], pruned["indices"])}


def _order(member: str):
    kind, _, layer = member.rpartition(":")
    return (kind, int(layer)) if layer.isdigit() else (kind, 0, layer)


# ---------------------------------------------------------------- verdicts


def comparison_side(ci_low: float, ci_high: float) -> str:
    """Which side of a paired ratio ``a / b`` loses less: ``a`` (CI below 1), ``b`` (above 1), ``same`` (the CI is
    [1, 1]: the same loss on every window) or ``neither``."""
    if ci_low == ci_high == 1:
        return "same"
    return "a" if ci_high < 1 else "b" if ci_low > 1 else "neither"


def data_or_metric_side(ci_low: float, ci_high: float) -> str:
    """``data`` when the CI of mean ρ across proxies − across distributions lies above 0, ``metric`` below 0,
    ``neither`` when it is [0, 0], else ``not separated``."""
    if ci_low == ci_high == 0:
        return "neither"
    return "data" if ci_low > 0 else "metric" if ci_high < 0 else "not separated"


def beyond_noise_counts(tables: dict) -> dict[tuple[str, str], str]:
    """(module, proxy) → on how many distributions the proxy ranks unlike the ground truth beyond noise:
    ``all``, ``some`` or ``none``."""
    marked = resolution.corrected_validity(tables["validity"], tables["split_half"])
    out = {}
    for (module, metric), part in marked.groupby(["module", "metric"]):
        beyond = int(part["beyond_noise"].sum())
        out[(module, metric)] = "all" if beyond == len(part) else "some" if beyond else "none"
    return out


def keyed_claims(tables: dict) -> pd.DataFrame:
    """The ``claims`` table with ``key`` (the question, comparable across runs) and ``verdict`` (the answer)."""
    claims = tables["claims"].copy()
    sets, validity = members(tables["pruned"]), beyond_noise_counts(tables)
    keys, verdicts = [], []
    for row in claims.itertuples():
        if row.claim == "recommended set":
            keys.append((row.claim, row.module, int(row.k)))
            verdicts.append(" ".join(sets.get(row.subject, ())))
        elif row.claim == "answer vs baseline":
            keys.append((row.claim, row.module, int(row.k), row.subject.split(":")[0]))
            verdicts.append(row.finding.split(":")[0])
        elif row.claim in COMPARISONS:
            keys.append((row.claim, row.subject))
            verdicts.append(comparison_side(row.ci_low, row.ci_high))
        elif row.claim == "proxy vs ground truth":
            keys.append((row.claim, row.module, row.subject))
            verdicts.append(validity.get((row.module, row.subject), "unknown"))
        elif row.claim == "data or metric":
            keys.append((row.claim, row.module))
            verdicts.append(data_or_metric_side(row.ci_low, row.ci_high))
        elif row.claim == "data changes the ranking":
            keys.append((row.claim, row.module, row.subject.split(",")[0]))
            verdicts.append("changes" if row.resolved else "not shown")
        else:
            raise InputError(f"claim kind {row.claim!r} has no rule in benchmarks/reference/default_vs_reference.py: add one")
    return claims.assign(key=keys, verdict=verdicts)


def comparison_pairs(tables: dict) -> dict[str, tuple[tuple, tuple, str]]:
    """Headline comparison → (members of a, members of b, the distribution it rests on)."""
    sets = members(tables["pruned"])
    rows = resolution.headline_comparisons(tables["comparisons"])
    return {row.comparison: (sets.get(row.a), sets.get(row.b), row.distribution) for row in rows.itertuples()
            if row.a in sets and row.b in sets}


# ---------------------------------------------------------------- (a) claims


def reference_outcome(row, match, verdict: str | None) -> str:
    """The outcome of one claim the run resolves (:data:`OUTCOMES`) other than a recommendation."""
    if match is None:
        return "missing"
    if match.resolved:
        return "agree" if verdict == row.verdict else "disagree"
    return "reference unresolved"


def _part(groups: pd.DataFrame, module: str, k: int) -> pd.DataFrame:
    return groups[(groups["module"] == module) & (groups["k"] == k)].sort_values("rank")


def recommendation_outcome(run: dict, reference: dict, module: str, k: int, margin: float) -> tuple[str, str]:
    """``(outcome, why)`` of the run's answer for one module kind and budget, by members, in the reference's own
    held-out evaluation (the module docstring's rule)."""
    run_sets, ref_sets = members(run["pruned"]), members(reference["pruned"])
    ours, theirs = _part(run["set_groups"], module, k), _part(reference["set_groups"], module, k)
    if not len(theirs):
        return "missing", "the reference evaluated no sets of this kind and budget"
    candidates = ours[ours["role"] == "candidate"] if "role" in ours else ours
    group = {run_sets.get(label) for label in candidates.loc[candidates["in_group"], "drop_set"]}
    ref_best = ref_sets.get(theirs["drop_set"].iloc[0])
    if ref_best in group:
        return "agree", f"the reference's best {theirs['drop_set'].iloc[0]} is in the run's group"
    pick = run_sets.get(ours["drop_set"].iloc[0])
    same = theirs[[ref_sets.get(label) == pick for label in theirs["drop_set"]]]
    if not len(same):
        return "missing", "the reference did not evaluate the pick's members"
    row = same.iloc[0]
    ratio = f"best / it {row['ratio_to_best']:.3f} [{row['pair_ci_low']:.3f}, {row['pair_ci_high']:.3f}]"
    if row["rank"] == 1:
        return "agree", f"the pick is the reference's best ({row['drop_set']})"
    if row["ratio_to_best"] >= 1 / (1 + margin):
        return "agree", f"the pick ({row['drop_set']}) is within {margin:.0%} of the reference's best: {ratio}"
    if not row["in_group"]:
        return "disagree", f"the reference separates the pick ({row['drop_set']}) from its best: {ratio}"
    return "reference unresolved", f"the pick ({row['drop_set']}) is not separated from the reference's best but " \
        f"not within {margin:.0%}: {ratio}"


def compare_claims(run: dict, reference: dict) -> pd.DataFrame:
    """One row per run claim: the run's claim and verdict beside the reference's, and for a claim the run resolves
    its ``outcome`` (:data:`OUTCOMES`; empty for an unresolved one)."""
    ours, theirs = keyed_claims(run), keyed_claims(reference)
    by_key = dict(zip(theirs["key"], theirs.itertuples()))
    by_subject = {row.subject: row for row in theirs.itertuples() if row.claim in COMPARISONS}
    by_members = {}
    for comparison, (a, b, distribution) in comparison_pairs(reference).items():
        by_members[(a, b, distribution)] = (comparison, False)
        by_members.setdefault((b, a, distribution), (comparison, True))
    settings = run.get("summary", {}).get("provenance", {}).get("settings", {})
    run_pairs, margin = comparison_pairs(run), settings.get("equivalence_margin", 0.02)
    rows = []
    for row in ours.itertuples():
        match, how, swapped = by_key.get(row.key), "question", False
        if match is None and row.subject in run_pairs and row.claim in COMPARISONS:
            subject, swapped = by_members.get(run_pairs[row.subject], (None, False))
            match, how = by_subject.get(subject), "members"
        verdict = None if match is None else {"a": "b", "b": "a"}.get(match.verdict, match.verdict) if swapped \
            else match.verdict
        outcome, why = ("", "") if not row.resolved else recommendation_outcome(
            run, reference, row.module, int(row.k), margin) if row.claim == "recommended set" else (
            reference_outcome(row, match, verdict), "")
        rows.append({"claim": row.claim, "module": row.module, "k": None if pd.isna(row.k) else int(row.k),
                     "subject": row.subject, "run_finding": row.finding, "run_estimate": _num(row.estimate),
                     "run_ci": [_num(row.ci_low), _num(row.ci_high)], "run_verdict": row.verdict,
                     "run_status": getattr(row, "status", None) or None,
                     "run_resolved": bool(row.resolved),
                     "reference_subject": None if match is None else match.subject,
                     "reference_finding": None if match is None else match.finding,
                     "reference_estimate": None if match is None else _num(match.estimate),
                     "reference_ci": None if match is None else [_num(match.ci_low), _num(match.ci_high)],
                     "reference_verdict": verdict,
                     "reference_resolved": None if match is None else bool(match.resolved),
                     "matched_by": None if match is None else how,
                     "outcome": outcome, "why": why})
    return pd.DataFrame(rows).astype({"k": "Int64"})


def _num(value) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), 4)


# ---------------------------------------------------------------- (b) top group


def top_groups(run: dict, reference: dict) -> list[dict]:
    """Per module kind and budget in both ``set_groups``: the run's best set and whether its members are in the
    reference's top group, with the reference's rank and paired ratio best / it for those members."""
    ours, theirs = run["set_groups"], reference["set_groups"]
    run_sets, ref_sets = members(run["pruned"]), members(reference["pruned"])
    rows = []
    for (module, k), part in ours.groupby(["module", "k"], sort=False):
        ref = theirs[(theirs["module"] == module) & (theirs["k"] == k)]
        if not len(ref):
            continue
        best = part.sort_values("rank").iloc[0]
        chosen = run_sets.get(best["drop_set"])
        ref_members = [ref_sets.get(label) for label in ref["drop_set"]]
        same = ref[[m == chosen for m in ref_members]].sort_values("rank")
        group = ref[ref["in_group"]]
        rows.append({
            "module": module, "k": int(k), "run_best": best["drop_set"], "run_members": list(chosen or ()),
            "run_ratio": [_num(best["ppl_ratio"]), _num(best["ci_low"]), _num(best["ci_high"])],
            "run_resolved": bool(best["resolved"]),
            "run_group": part.loc[part["in_group"], "drop_set"].tolist(),
            "reference_best": ref.sort_values("rank")["drop_set"].iloc[0],
            "reference_resolved": bool(ref["resolved"].iloc[0]),
            "reference_group": [{"drop_set": label, "members": list(ref_sets.get(label) or ()),
                                 "ppl_ratio": _num(ratio)} for label, ratio in zip(group["drop_set"],
                                                                                   group["ppl_ratio"])],
            "in_reference_group": bool(len(same) and same["in_group"].any()),
            "evaluated_in_reference": bool(len(same)),
            "reference_rank": int(same["rank"].iloc[0]) if len(same) else None,
            "reference_name": same["drop_set"].iloc[0] if len(same) else None,
            "reference_ratio_to_best": [_num(same[c].iloc[0]) for c in ("ratio_to_best", "pair_ci_low",
                                                                       "pair_ci_high")] if len(same) else None})
    return rows


# ---------------------------------------------------------------- (c) time


def read_load_log(path: Path) -> list[dict]:
    """Rows ``<ISO time> <1 min>, <5 min>, <15 min>`` of a load log (other lines skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := LOAD_LINE.match(line.strip()):
            rows.append({"time": m.group(1), "load_1": float(m.group(2)), "load_5": float(m.group(3)),
                         "load_15": float(m.group(4))})
    return rows


def cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else None


def where_run(machine: dict) -> str:
    return machine.get("description") or f"{machine['cpus']} CPUs ({machine['cpu_model']})"


def timing(run: dict, load_log: Path | None, note: str, machine: str | None = None) -> dict:
    """The run's total and per-stage seconds, the machine (``machine``, else this one's CPUs) and the load during the
    run."""
    summary = run["summary"]
    load = read_load_log(load_log) if load_log else []
    one = [row["load_1"] for row in load]
    return {"seconds": summary.get("seconds"), "timings": summary.get("timings", {}),
            "stages_computed": len(summary.get("stages_computed", [])),
            "stages_reused": len(summary.get("stages_reused", [])),
            "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "note": note} if machine is None
            else {"description": machine, "note": note},
            "load": load, "load_1min_mean": round(float(np.mean(one)), 2) if one else None,
            "load_1min_max": max(one) if one else None}


# ---------------------------------------------------------------- report


def compare(run_folder: Path, reference_folder: Path, load_log: Path | None = None, note: str = "",
            machine: str | None = None) -> dict:
    """Everything the JSON holds but the command."""
    run, reference = load_folder(run_folder), load_folder(reference_folder)
    claims = compare_claims(run, reference)
    resolved = claims[claims["run_resolved"]]
    settings = {name: {size: tables["summary"]["provenance"]["settings"].get(size) for size in SIZES}
                for name, tables in (("run", run), ("reference", reference))}
    return {"run": str(run_folder), "reference": str(reference_folder),
            "model": run["summary"]["provenance"]["model"].get("spec"), "settings": settings,
            "counts": {"run_claims": len(claims), "run_resolved": len(resolved),
                       **{o: int((resolved["outcome"] == o).sum()) for o in OUTCOMES}},
            "claims": json.loads(claims.to_json(orient="records")), "top_groups": top_groups(run, reference),
            "time": timing(run, load_log, note, machine)}


def markdown(result: dict) -> str:
    """The short Markdown view of :func:`compare`'s result."""
    c, t = result["counts"], result["time"]
    lines = [f"# {result['model']}: `{result['run']}` against `{result['reference']}`", "",
             f"Command: `{result['command']}`", "",
             "| run claims | resolved in the run | agree | disagree | reference unresolved | not in the reference |",
             "|---|---|---|---|---|---|",
             f"| {c['run_claims']} | {c['run_resolved']} | {c['agree']} | {c['disagree']} | "
             f"{c['reference unresolved']} | {c['missing']} |", ""]
    answers = [row for row in result["claims"] if row["claim"] == "recommended set"]
    if answers:
        lines += ["The run's answers, set by set in the reference's own evaluation:", "",
                  "| set | run's answer | outcome | why |", "|---|---|---|---|"]
        lines += [f"| {row['module']}-{row['k']} | {row.get('run_status') or ''} {row['run_finding']} | "
                  f"{row['outcome'] or 'not resolved in the run'} | {row.get('why') or ''} |" for row in answers]
        lines.append("")
    odd = [row for row in result["claims"] if row["run_resolved"] and row["outcome"] != "agree"]
    if odd:
        lines += ["Resolved in the run, not agreed by the reference:", "",
                  "| claim | question | run | reference | outcome |", "|---|---|---|---|---|"]
        for row in odd:
            question = row["subject"] if row["k"] is None else f"{row['module']}-{row['k']}"
            theirs = "—" if row["reference_finding"] is None else \
                f"{row['reference_finding']} ({'' if row['reference_resolved'] else 'not '}resolved)"
            outcome = f"{row['outcome']}: {row['why']}" if row.get("why") else row["outcome"]
            lines.append(f"| {row['claim']} | {question} | {row['run_finding']} | {theirs} | {outcome} |")
        lines.append("")
    lines += ["| set | run's best (members) | run resolved | in the reference's top group | reference rank, "
              "best / it | reference group |", "|---|---|---|---|---|---|"] if result["top_groups"] else \
        ["No module kind and budget is in both `set_groups` tables."]
    for g in result["top_groups"]:
        where = "not evaluated" if g["reference_rank"] is None else \
            "{}, {} [{}, {}]".format(g["reference_rank"], *g["reference_ratio_to_best"])
        group = "; ".join(f"{s['drop_set']} {{{', '.join(s['members'])}}}" for s in g["reference_group"])
        lines.append(f"| {g['module']}-{g['k']} | {g['run_best']} {{{', '.join(g['run_members'])}}} | "
                     f"{g['run_resolved']} | {g['in_reference_group']} | {where} | {group} |")
    slowest = sorted(t["timings"].items(), key=lambda item: -item[1])[:6]
    load = "" if t["load_1min_mean"] is None else \
        f", 1-min load average mean {t['load_1min_mean']} (max {t['load_1min_max']}) over {len(t['load'])} samples"
    lines += ["", f"Run time: {t['seconds']} s ({t['stages_computed']} stages computed, {t['stages_reused']} reused) "
              f"on {where_run(t['machine'])}{load}. {t['machine']['note']}", "",
              "| stage | seconds |", "|---|---|", *[f"| {name} | {sec} |" for name, sec in slowest]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the run folder (e.g. a default-preset CPU run)")
    parser.add_argument("reference", type=Path, help="the reference folder, e.g. reference/smollm2-135m")
    parser.add_argument("--load-log", type=Path, help="load averages sampled during the run")
    parser.add_argument("--note", default="", help="how the run was made (threads, what else ran)")
    parser.add_argument("--machine", help="the machine the run was made on, when not this one (e.g. 'one NVIDIA H200')")
    parser.add_argument("--out", type=Path, help="output path without suffix (default: benchmarks/results/"
                                                 "default-vs-reference-<model>)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.run, args.reference, args.load_log, args.note, args.machine)
    except InputError as error:
        print(f"default_vs_reference: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    out = args.out or ROOT / "benchmarks" / "results" / f"default-vs-reference-{result['model']}"
    result = write_comparison(out, result, markdown, "benchmarks/reference/default_vs_reference.py",
                              argv or sys.argv[1:])
    c = result["counts"]
    print(f"{c['run_resolved']} resolved claims: {c['agree']} agree, {c['disagree']} disagree, "
          f"{c['reference unresolved']} unresolved in the reference, {c['missing']} missing; wrote {out}.json, .md")


if __name__ == "__main__":
    main()
