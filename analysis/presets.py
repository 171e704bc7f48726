"""What a run computes unless told otherwise: the one table of presets and the names a user types.

This module imports nothing heavy (no torch, pandas or scipy), so the command line can build its
``--help`` from it at once; the pipeline, the scoring command and the tests read the same table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m"
SCORED_MODULES = ("attn", "mlp", "block")  # the kinds scored directly, in the order of every score array
MODULE_KINDS = (*SCORED_MODULES, "joint")  # joint: attention and MLP sublayers ranked together
CONSENSUS_METHODS = ("borda", "median", "mean", "minimax")
PROXY_METRICS = ("cosine", "angular", "relative_update")
PRIMARY_METRIC = "cosine"
GROUND_TRUTH = "ablation"
PRIMARY = "{primary}"  # in a drop-set label of ``accuracy_sets``: the run's ``primary_metric``
ANSWERS = "{answers}"  # in ``accuracy_sets``: every module kind and budget's resolved answer on held-out text
RESULTS_DIR = "results"
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's names
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "rte", "winogrande")


@dataclass(frozen=True)
class RunSettings:
    """What ``calibdrop run`` computes; the presets fix these.

    ``distributions`` empty means every top-level distribution of the manifests.  ``primary_metric`` (a proxy of
    ``metrics``) is the metric the study's single-metric parts rank by: its own and random sets, the paired comparisons
    on held-out text, the check, the routing baseline, leave-one-out's baseline and nearness, the Verdict's agreement
    claim and the report's agreement, membership, regret and sample-size sections.  ``check_module``
    and ``route_module`` (``None``: skip) name the module kind whose primary-metric drop sets at its largest
    evaluated budget the run checks on each distribution's held-out windows and routes between.  ``unseen`` names
    the test-only distributions every evaluated set is also scored on (``None``: every manifest whose ``role`` is
    ``test``; ``()``: none): held-out columns only, never read by a stage that calibrates, selects or compares.
    ``batch_size`` and ``heldout_batch_size`` are windows per forward pass of the scoring, ablation and greedy stages
    and of the held-out evaluation (small on a CPU, large on a GPU).
    ``accuracy_sets`` names the drop sets evaluated for zero-shot accuracy; ``{primary}`` in a name stands for
    ``primary_metric`` (:attr:`accuracy_labels` resolves it) and ``{answers}`` for each module kind and budget's
    resolved answer (the recommended set, or the suggested member of an equivalent group), whatever built it.
    ``lodo`` adds leave-one-distribution-out on real held-out loss (stages ``lodo_sets``, ``lodo_windows``, ``lodo``),
    judging nearness from the first ``lodo_probes`` held-out windows of the distribution left out.
    ``unseen_samples`` is held-out windows per test-only distribution (``None``: ``transfer_samples``).
    ``route_truth_own`` routes between the ablation's own sets too (the family ``own``; their windows are evaluated
    for routing alone unless ``own_set_metrics`` names the ablation).
    ``matmul_precision`` is how every float32 matrix product of the run is computed
    (:func:`analysis.models.loading.float32_matmul_precision`: ``highest``, ``high`` = TensorFloat-32 on a GPU,
    ``medium``); any other than ``highest`` is part of every stage's key.
    ``equivalence_margin`` is how far apart (relative, on the worst-case held-out perplexity ratio) two drop sets
    may be and still serve alike: sets shown within it of the best form an equivalent group
    (:mod:`analysis.study.recommend`).
    ``heldout_budget`` (set-windows per calibration distribution, summed over the distinct sets; 0: a fixed design,
    every set on ``transfer_samples`` windows) turns on the sequential held-out evaluation
    (:mod:`analysis.evaluation.sequential`): every set gets ``heldout_looks[0]`` windows, the sets whose answer is still
    open more, look by look, until the answer is decided, the last look or the budget; the test-only distributions
    then evaluate only the sets still in the race and the baselines.
    """

    distributions: tuple[str, ...] = ()
    subsets: bool = True
    metrics: tuple[str, ...] = (*PROXY_METRICS, GROUND_TRUTH)
    primary_metric: str = PRIMARY_METRIC
    samples: int = 32
    seq_len: int = 512
    ablation_samples: int = 4
    ablation_seq_len: int = 128
    greedy_module: str = "attn"
    greedy_shortlist: int | None = 4
    subset_samples: int = 16
    subset_seq_len: int = 256
    batch_size: int = 8
    heldout_batch_size: int = 4
    seed: int = 0
    n_boot: int = 1000
    n_perm: int = 1000
    budgets: dict = field(default_factory=lambda: {"attn": (4, 8), "mlp": (2, 4), "block": (2, 4), "joint": (4, 8)})
    transfer_modules: tuple[str, ...] = ("attn", "mlp", "block", "joint")
    transfer_k: tuple[int, ...] = (8,)
    own_set_metrics: tuple[str, ...] = (PRIMARY_METRIC,)
    transfer_samples: int = 32
    transfer_seq_len: int = 128
    random_seeds: tuple[int, ...] = (0, 1)
    tasks: tuple[str, ...] = ("arc_easy", "piqa")
    task_limit: int | None = 100
    accuracy_sets: tuple[str, ...] = ("none", ANSWERS)
    check_module: str | None = "attn"
    route_module: str | None = "attn"
    route_truth_own: bool = True
    unseen: tuple[str, ...] | None = None
    unseen_samples: int | None = None
    lodo: bool = False
    lodo_probes: int = 8
    matmul_precision: str = "highest"
    equivalence_margin: float = 0.02
    heldout_budget: int = 0
    heldout_looks: tuple[int, ...] = (8, 32, 128)

    @property
    def own_metrics(self) -> tuple[str, ...]:
        """The metrics whose per-distribution own sets are evaluated: the primary metric, then ``own_set_metrics``."""
        return tuple(dict.fromkeys((self.primary_metric, *self.own_set_metrics)))

    @property
    def unseen_windows(self) -> int:
        """Held-out windows per test-only distribution: ``unseen_samples``, else ``transfer_samples``."""
        return self.transfer_samples if self.unseen_samples is None else self.unseen_samples

    @property
    def accuracy_labels(self) -> tuple[str, ...]:
        """The drop-set labels evaluated for zero-shot accuracy: ``accuracy_sets`` with ``{primary}`` replaced by
        ``primary_metric``."""
        return tuple(label.replace(PRIMARY, self.primary_metric) for label in self.accuracy_sets)

    @property
    def truth_tokens(self) -> int:
        """Ground-truth tokens per distribution: ``ablation_samples × ablation_seq_len``."""
        return self.ablation_samples * self.ablation_seq_len

    def budget(self, module: str) -> tuple[int, ...]:
        """The drop-set sizes evaluated on held-out text for ``module``: ``transfer_k`` for attention, else the largest
        budget of ``module``."""
        if module == "attn":
            return self.transfer_k
        sizes = self.budgets.get(module, ())
        return (max(sizes),) if sizes else ()


PRESETS: dict[str, RunSettings] = {
    # The default spends a CPU's time where the decision is (36.7 and 31.9 min on 2 cores before, 30 min wanted): the
    # held-out windows of the calibration distributions, which pick and separate the sets, are 128 tokens each.  The
    # proxies get 16 x 512 tokens (split-half reliability 0.99 at 32 x 512 on smollm2, about 0.98 at half by
    # Spearman-Brown, against 0.71-0.88 for the 4 x 128 ground truth they are judged by), the sub-distributions 8 x
    # 256, the test-only distributions 8 held-out windows (their claims name the windows they rest on); the
    # ablation's own sets are too noisy at this ground truth to decide anything, so they are not routed between
    # (135 s); one random set per budget.
    # The held-out windows are spent sequentially (:mod:`analysis.evaluation.sequential`): every set gets 8 per
    # calibration distribution, the sets whose answer is still open 32, then 128, within 512 set-windows per
    # distribution (the fixed design of 32 windows spent about 1,050 on smollm2-135m's 33 distinct sets); routing and
    # the check use the first look's 8, which every set has (a set short of them would be evaluated again).
    "default": RunSettings(samples=16, subset_samples=8, route_truth_own=False, unseen_samples=8, random_seeds=(0,),
                           transfer_samples=8, heldout_budget=512),
    "quick": RunSettings(
        subsets=False, samples=16, seq_len=256, ablation_samples=4, ablation_seq_len=64, greedy_shortlist=4, n_boot=200,
        n_perm=200,
        budgets={"attn": (4, 8), "mlp": (4,), "block": (4,), "joint": (8,)}, transfer_modules=("attn",),
        transfer_k=(8,),
        transfer_samples=8, transfer_seq_len=128, random_seeds=(0,), tasks=("arc_easy", "piqa"), task_limit=20,
        accuracy_sets=("none", f"{PRIMARY}/attn-8:borda"),
    ),
    # Every stage of a run on the real default model in a minute or two, for the test suite (tests/test_cli.py): three
    # distributions (leave-one-out needs three; code has subsets) and one unseen, tiny windows (4 per distribution: the
    # convergence curves and the check's split halves need four), one budget per module kind, 2 items of one task.  Its
    # numbers are checked against independent computations, not read as findings.
    "smoke": RunSettings(
        distributions=("code", "math", "general"), samples=4, seq_len=32, ablation_samples=4, ablation_seq_len=8,
        greedy_shortlist=4, subset_samples=2, subset_seq_len=16, batch_size=8, n_boot=50, n_perm=50,
        budgets={"attn": (2,), "mlp": (2,), "block": (2,), "joint": (2,)}, transfer_modules=("attn",), transfer_k=(2,),
        transfer_samples=4, transfer_seq_len=32, random_seeds=(0,), tasks=("arc_easy",), task_limit=2,
        accuracy_sets=("none", f"{PRIMARY}/attn-2:borda"), unseen=("legal",),
    ),
    # The paper's calibration: 256 windows x 2048 tokens per distribution for the proxies.  The rest is this
    # project's own and sized so the GPU stages of a 7B model fit 30 minutes on one H100 (estimated at 78 min
    # before, benchmarks/results/paper-preset-stages-llama7b-bf16-h100.json): the exact greedy search (2,280
    # trials, 64% of the time) tries the 4 candidates of smallest single-drop ablation cost per step, as the
    # default preset does (about 7x fewer trials); the ablation ground truth and the greedy paths use 16
    # windows x 2048 tokens (32 before: 13% of the time, and the greedy trials' cost scales with it); held-out
    # evaluation uses 32 windows x 2048 per distribution (64 before: 20%), still paired across drop sets.
    "paper": RunSettings(
        samples=256, seq_len=2048, ablation_samples=16, ablation_seq_len=2048, greedy_shortlist=4, subset_samples=64,
        subset_seq_len=2048,
        transfer_k=(4, 8), transfer_samples=32, transfer_seq_len=2048, random_seeds=(0, 1, 2), tasks=PAPER_TASKS,
        task_limit=None,
        accuracy_sets=("none", f"{PRIMARY}/attn-4:borda", f"{PRIMARY}/attn-8:borda", f"{PRIMARY}/attn-8:minimax",
                       "ablation/attn-8:greedy:robust", f"{PRIMARY}/attn-8:random:0"),
    ),
    # Sized on real weights on one H200 so the ablation ground truth is resolved: its split-half reliability was
    # 0.96-0.99 for attention at 32 x 512 per distribution (0.72-0.82 at the default's 4 x 128), and the held-out
    # comparisons rest on 64 x 512 windows per distribution (32 x 128 in the default).  Proxies 64 x 512; greedy
    # paths on the ablation's windows with the default's shortlist of 4; no zero-shot tasks (their data is not on
    # the GPU machine); GPU-sized batches; TensorFloat-32 products on the GPU (float32 weights and activations).
    # The committed studies are under reference/<model>/.
    "reference": RunSettings(
        samples=64, seq_len=512, ablation_samples=32, ablation_seq_len=512, greedy_shortlist=4, transfer_samples=64,
        transfer_seq_len=512,
        batch_size=32, heldout_batch_size=32, tasks=(), lodo=True, matmul_precision="high",
    ),
}


def preset(name: str) -> RunSettings:
    """The settings of preset ``name``; an unknown name is a ``ValueError`` listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def describe(settings: RunSettings) -> str:
    """``"32 x 512 tokens per distribution"``: the scoring size of a preset, as help texts print it."""
    return f"{settings.samples} x {settings.seq_len} tokens per distribution"


__all__ = ["CONSENSUS_METHODS", "DEFAULT_MODEL", "GROUND_TRUTH", "MODULE_KINDS", "PAPER_TASKS", "PRESETS",
           "PRIMARY_METRIC", "PROXY_METRICS", "SCORED_MODULES",
           "RESULTS_DIR", "RunSettings", "describe", "preset"]
