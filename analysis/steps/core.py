"""A run's study: its model, settings, stage store and results, and what a stage is (name, reads, settings,
compute); the stage functions of :mod:`analysis.steps` take a :class:`Study`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from ..data.documents import subsets
from ..data.manifests import load_manifest, top_level, unseen_distributions
from ..data.samples import token_batches
from ..importance.ablation import TrialCache
from ..importance.metrics import check_metrics, get_metric
from ..importance.scoring import calibration_windows, score_distributions
from ..presets import RunSettings
from ..stages import StageStore, stage_key


STABILITY_TABLES = ("agreement", "bootstrap_importance", "bootstrap_pairs", "bootstrap_pair_mean", "split_half",
                    "permutation", "convergence", "convergence_summary")


def top_level_distributions(settings: RunSettings) -> tuple[str, ...]:
    """The distributions a run scores: the settings' own, or every top-level distribution of the manifests."""
    return settings.distributions or tuple(top_level())


def unseen_of(settings: RunSettings) -> tuple[str, ...]:
    """The test-only distributions a run evaluates its sets on: the settings' own, or every test-only manifest."""
    return tuple(unseen_distributions()) if settings.unseen is None else tuple(settings.unseen)


@dataclass(frozen=True)
class Stage:
    """One named step: the earlier stages it reads, the settings it depends on, and how it computes its table(s)."""

    name: str
    reads: tuple[str, ...]
    settings: tuple[str, ...]
    compute: Callable[["Study"], pd.DataFrame | dict]
    tables: tuple[str, ...] = ()
    when: Callable[[RunSettings], bool] = lambda settings: True
    work: Callable[["Study"], float] = lambda study: 0.0

    @property
    def outputs(self) -> tuple[str, ...]:
        """The tables it saves: ``tables``, or one named like the stage."""
        return self.tables or (self.name,)


class Study:
    """One run's model, settings, store and results; stages read earlier results from :attr:`results`."""

    def __init__(self, model, tokenizer, settings: RunSettings, store: StageStore, progress: bool):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.store, self.progress = store, progress
        self.distributions = top_level_distributions(settings)
        self.manifests = {name: load_manifest(name)["_sha256"] for name in self.distributions}
        self.unseen = unseen_of(settings)
        self.unseen_manifests = {name: load_manifest(name)["_sha256"] for name in self.unseen}
        record = store.model_record
        # float32 at the default precision keys stages as before the setting existed; another precision is in every key
        precision = [] if settings.matmul_precision == "highest" else [settings.matmul_precision]
        self.base = [record.get("weights_sha256"), record.get("dtype"), *precision]
        # every greedy path of the run measures real loss on the same ablation windows (ablation_batches): one cache
        # lets the greedy stage's paths and leave-one-out's share each (distribution, dropped set, candidate) trial
        self.trials = TrialCache()
        self.results: dict[str, object] = {}
        self.keys: dict[str, str] = {}
        self.running = ""

    def key(self, stage: Stage) -> str:
        """sha256 of the stage name, the model, the settings it reads, the manifests and the keys of the stages it reads
        (a stage that reads ``unseen`` is keyed by the test-only manifests it evaluates on, the others never are;
        one that reads ``accuracy_sets`` by the labels they resolve to)."""
        fields = {name: getattr(self.settings, name) for name in stage.settings}
        if "unseen" in fields:
            fields["unseen"] = self.unseen_manifests
        if "accuracy_sets" in fields:
            fields["accuracy_sets"] = self.settings.accuracy_labels
        return stage_key(stage.name, self.base, fields, self.manifests,
                         {name: self.keys.get(name) for name in stage.reads})

    def part(self, kind: str, name: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """A saved part (``parts/<kind>-<name>``: one distribution, one objective, one drop set) of the running stage,
        keyed by that stage's key and ``name``."""
        return self.store.table(f"parts/{kind}-{name}", stage_key(self.keys[self.running], name), compute)

    def score(self, names, samples: int, seq_len: int, metrics, keep=None) -> pd.DataFrame:
        """Per-sample scores of ``names``, each distribution a saved part under ``parts/scores`` (``keep``: see
        :func:`~analysis.importance.scoring.score_distributions`)."""
        parts = StageStore(self.store.folder / "parts" / "scores", self.store.model_record, self.store.log)
        return score_distributions(self.model, self.tokenizer, names, n_samples=samples, seq_len=seq_len,
                                   batch_size=self.settings.batch_size, seed=self.settings.seed, metrics=metrics,
                                   store=parts, progress=self.progress, keep=keep)

    def ablation_batches(self) -> dict[str, list]:
        """Every distribution's calibration windows of the ablation's size (``ablation_samples`` x
        ``ablation_seq_len``) in batches of ``batch_size``: the windows the greedy paths measure real loss on."""
        s = self.settings
        return {name: list(token_batches(calibration_windows(name, self.tokenizer, n_samples=s.ablation_samples,
                                                             seq_len=s.ablation_seq_len, seed=s.seed), s.batch_size))
                for name in self.distributions}

    def proxies(self) -> tuple[str, ...]:
        return tuple(m for m in check_metrics(self.settings.metrics) if get_metric(m).is_proxy)

    def run_stage(self, stage: Stage) -> None:
        """Reuse the stage's saved tables when every one matches its key, else compute and save them."""
        key = self.keys[stage.name] = self.key(stage)
        self.running = stage.name
        computed: dict = {}

        def table(name):
            def compute():
                if not computed:
                    value = stage.compute(self)
                    computed.update(value if isinstance(value, dict) else {stage.name: value})
                return computed[name]
            return self.store.table(name, key, compute)

        tables = {name: table(name) for name in stage.outputs}
        self.results.update(tables)


def subset_names(study: Study) -> list[str]:
    return [s for name in study.distributions for s in subsets(name)]


def budgets_union(settings: RunSettings) -> tuple[int, ...]:
    return tuple(sorted({k for values in settings.budgets.values() for k in values}))
