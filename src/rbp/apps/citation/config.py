"""The settings of ``rbp citation``: which (dataset, model, method, seed) units to train and
how, checked before any work starts (:meth:`CitationConfig.validate`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import rbp
from rbp.data import PLANETOID_NAMES
from rbp.runner import ConfigError
from rbp.runner.config import MAX_SEED, coerce, config_fields, type_name
from rbp.runner.device import resolve_device

from .baselines import BASELINES, GCN_BACKENDS
from .model import truncation_for

__all__ = ["BATCHED_MODELS", "FIXED_POINT_MODELS", "MODELS", "CitationConfig"]

#: ``ppr`` and ``ignn`` are contractions by construction (rate ``1 - fp_alpha`` / ``fp_kappa``).
FIXED_POINT_MODELS = ("ppr", "ignn")
MODELS = ("paper", "injected", *FIXED_POINT_MODELS)
#: Models whose seeds train as one batched model (``seed_batch``); the others one at a time.
BATCHED_MODELS = ("paper", "ppr")


@dataclass
class CitationConfig:
    """Settings of ``rbp citation``; the packaged YAML holds the paper's protocol."""

    #: Settings that choose which units run, not what a unit computes: a unit's checkpoint
    #: written by a run over other seeds, datasets, models or methods resumes here (workers
    #: over disjoint seeds share their finished units).
    UNIT_SELECTORS: ClassVar[frozenset[str]] = frozenset({
        "seed", "seeds", "num_seeds", "dataset_seeds", "dataset", "models", "methods",
        "baselines", "injected_methods", "fp_methods"})
    #: Settings read once for the whole run, which ``overrides`` may not set per dataset.
    WHOLE_RUN: ClassVar[frozenset[str]] = frozenset({
        "dataset", "device", "threads", "checkpoint_every", "interrupt_after"})

    methods: list[str] = field(default_factory=lambda: list(rbp.METHODS))
    seed: int = 0
    seeds: list[int] | None = None        # None: num_seeds consecutive seeds from `seed`
    num_seeds: int = 10
    dataset_seeds: dict[str, list[int]] = field(default_factory=dict)  # per-dataset override
    dataset: list[str] = field(default_factory=lambda: ["cora", "pubmed"])
    models: list[str] = field(default_factory=lambda: list(MODELS))
    data_dir: str | None = None
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    # paper model (GG-NN)
    hidden: dict[str, int] = field(
        default_factory=lambda: {"cora": 64, "pubmed": 16, "citeseer": 64})
    steps: int = 100
    truncate: int = 5
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 2000
    val_every: int = 20
    # injected model
    injected_methods: list[str] | None = field(default_factory=lambda: ["neumann"])
    injected_hidden: int = 64
    injected_steps: int = 20
    injected_truncate: int = 10
    injected_dropout: float = 0.5
    injected_lr: float = 0.01
    injected_weight_decay: float = 5e-4
    injected_epochs: int = 200
    injected_val_every: int = 5
    # fixed-point GNNs (ours): ppr  Z <- (1-a) Â Z + a MLP(x);  ignn  Z <- relu(Â Z W^T + B x)
    fp_methods: list[str] | None = None   # None: every method in `methods`
    fp_alpha: float = 0.05                # ppr: teleport a, contraction rate 1 - a
    fp_kappa: float = 0.9                 # ignn: ||W||_2 <= kappa, contraction rate kappa
    fp_bound: float = 1e-3                # K: smallest with rate^(K+1) / (1 - rate) <= bound
    fp_truncate: int | None = None        # None: from fp_bound; else K explicitly
    fp_steps: int | None = None           # None: K + 1 forward steps
    fp_backward_tol: float | None = 1e-3  # implicit backward solves stop at this rel. increment
    fp_tol: float | None = None           # ppr: forward to this rel. residual (fp_steps: budget)
    fp_warm_start: bool = False           # ppr: each training forward starts at the last one's
    fp_hidden: int = 64
    fp_dropout: float = 0.5
    fp_row_normalise: bool = False        # features x_i / sum_j x_ij
    fp_lr: float = 0.01
    fp_weight_decay: float = 5e-4
    fp_epochs: int = 200
    fp_val_every: int = 5
    # GCN baseline
    gcn_epochs: int = 200
    gcn_hidden: int = 128                 # tuned on Cora validation (Kipf & Welling: 16, 0.5)
    gcn_dropout: float = 0.7
    gcn_lr: float = 0.01
    gcn_weight_decay: float = 5e-4
    gcn_row_normalise: bool = False
    gcn_backend: str = "torch"            # torch: sparse features (~10x faster); pyg; auto
    # per-dataset settings overriding the above; Pubmed's: tuned on Pubmed validation (seeds 0-4,
    # 8 configs per model, docs/citation.md), where they differ from the Cora choice
    overrides: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "pubmed": {"fp_alpha": 0.2, "gcn_row_normalise": True}})
    # bookkeeping
    trace_points: int = 3                 # forward traces per unit (first, middle, last eval)
    on_failure: str = "ignore"
    checkpoint_every: int = 100           # epochs
    interrupt_after: int | None = None    # testing hook: Ctrl-C after this many epochs
    threads: int = 1
    device: str = "auto"                  # auto (CUDA when available, else CPU), cpu, cuda:N
    # seeds trained together as one batched model (paper, ppr, the GCN baseline); None: all
    # of a run's seeds on a GPU, one at a time on the CPU (where a batch is no faster)
    seed_batch: int | None = None

    def seed_list(self, dataset: str | None = None) -> list[int]:
        """The seeds to run (on ``dataset``, when ``dataset_seeds`` names it)."""
        if dataset is not None and dataset in self.dataset_seeds:
            return list(self.dataset_seeds[dataset])
        return list(self.seeds) if self.seeds is not None else [
            self.seed + i for i in range(self.num_seeds)]

    def fp_rate(self, model: str) -> float:
        """Contraction rate of a fixed-point model: ``1 - fp_alpha`` (ppr) or ``fp_kappa``."""
        return 1.0 - self.fp_alpha if model == "ppr" else self.fp_kappa

    def fp_K(self, model: str) -> int:
        """Backward iterations K (and TBPTT's truncation) of a fixed-point model."""
        if self.fp_truncate is not None:
            return self.fp_truncate
        return truncation_for(self.fp_rate(model), self.fp_bound)

    @staticmethod
    def settle_layers(merged: dict[str, Any], layer_of: dict[str, int]) -> dict[str, Any]:
        """A setting given in a later layer than ``overrides`` (``--set fp_alpha=0.1`` over the
        packaged Pubmed choice) applies to every dataset: it is dropped from the overrides,
        instead of being silently beaten by them on the datasets they name."""
        over = merged.get("overrides")
        if not isinstance(over, dict):
            return merged
        base = layer_of.get("overrides", -1)
        later = {k for k, rank in layer_of.items() if rank > base and k != "overrides"}
        if not later:
            return merged
        def drop(o: Any) -> Any:  # a malformed entry is left for validate() to name
            return {k: v for k, v in o.items() if k not in later} if isinstance(o, dict) else o

        settled = {ds: drop(o) for ds, o in over.items()}
        return {**merged, "overrides": settled}

    def for_dataset(self, name: str) -> CitationConfig:
        """This config with ``overrides[name]`` applied."""
        return dataclasses.replace(self, **self.overrides.get(name, {}))

    def validate(self) -> None:
        """Reject impossible settings before any work starts."""
        for key in ("dataset", "models"):
            names = [str(n).lower() for n in getattr(self, key)]
            if not names:
                raise ConfigError(f"setting '{key}' is empty; name at least one")
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ConfigError(f"setting '{key}' repeats {', '.join(repeated)}; list each once")
        for key in ("baselines", "injected_methods", "fp_methods"):  # may be empty or null
            names = [str(n).lower() for n in getattr(self, key) or []]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:  # each would be trained again and counted as more seeds
                raise ConfigError(f"setting '{key}' repeats {', '.join(repeated)}; list each once")
        for key in ("hidden", "dataset_seeds"):
            bad = sorted(set(getattr(self, key)) - set(PLANETOID_NAMES))
            if bad:
                raise ConfigError(f"setting '{key}' names unknown dataset(s) {', '.join(bad)} "
                                  f"(valid: {', '.join(PLANETOID_NAMES)})")
        if self.seeds is None and self.seed + self.num_seeds - 1 > MAX_SEED:
            raise ConfigError(f"seeds {self.seed}..{self.seed + self.num_seeds - 1} (seed + "
                              f"num_seeds - 1) pass {MAX_SEED}; choose a smaller seed")
        for ds, ds_seeds in self.dataset_seeds.items():
            if len(set(ds_seeds)) != len(ds_seeds):
                raise ConfigError(f"setting 'dataset_seeds' repeats a seed for {ds}; list each "
                                  "once")
        known = {f.name for f in dataclasses.fields(self)} - {"overrides"}
        for ds, over in self.overrides.items():
            if ds not in PLANETOID_NAMES:
                raise ConfigError(f"overrides: unknown dataset '{ds}' "
                                  f"(valid: {', '.join(PLANETOID_NAMES)})")
            if not isinstance(over, dict):
                raise ConfigError(f"overrides.{ds} must map setting names to values, got {over!r}")
            bad = sorted(set(over) - known)
            if bad:
                raise ConfigError(f"overrides.{ds}: unknown setting(s) {bad}")
            whole_run = sorted(set(over) & self.WHOLE_RUN)
            if whole_run:  # read once for the whole run: per dataset it would be ignored
                raise ConfigError(f"overrides.{ds}: {', '.join(whole_run)} cannot differ per "
                                  "dataset (the run reads it once); set it at the top level")
            hints = config_fields(type(self))
            for key, value in over.items():  # typed like the settings they override
                ok, converted = coerce(value, hints[key])
                if not ok:
                    raise ConfigError(f"overrides.{ds}.{key} expects {type_name(hints[key])}, "
                                      f"got {value!r} ({type(value).__name__})")
                over[key] = converted
        for over in self.overrides.values():
            dataclasses.replace(self, **over, overrides={})._validate_one()
        self._validate_one()

    def _validate_one(self) -> None:
        for name in self.dataset:
            if name.lower() not in PLANETOID_NAMES:
                raise ConfigError(
                    f"unknown dataset '{name}' (valid: {', '.join(PLANETOID_NAMES)})")
        for m in self.models:
            if m not in MODELS:
                raise ConfigError(f"unknown model '{m}' (valid: {', '.join(MODELS)})")
        for b in self.baselines:
            if b not in BASELINES:
                raise ConfigError(f"unknown baseline '{b}' (valid: {', '.join(BASELINES)})")
        for m in [*self.methods, *(self.injected_methods or []), *(self.fp_methods or [])]:
            if m not in rbp.METHODS:
                raise ConfigError(f"unknown method '{m}' (valid: {', '.join(rbp.METHODS)})")
        bad = {d: h for d, h in self.hidden.items() if not isinstance(h, int) or h < 1}
        if bad:
            raise ConfigError(f"setting 'hidden' must be a whole number >= 1 for each dataset, "
                              f"got {bad}")
        if "paper" in self.models:
            missing = [d for d in self.dataset if d.lower() not in self.hidden]
            if missing:
                raise ConfigError(f"setting 'hidden' has no size for {missing}")
        if not self.seed_list():
            raise ConfigError(f"no seeds to run: num_seeds must be >= 1, got {self.num_seeds}")
        empty = sorted(ds for ds, v in self.dataset_seeds.items() if not v)
        if empty:
            raise ConfigError(f"setting 'dataset_seeds' gives no seeds for {', '.join(empty)}; "
                              "name at least one, or drop the entry to use 'seeds'")
        self._validate_method_lists()
        ints = {"steps": self.steps, "truncate": self.truncate, "epochs": self.epochs,
                "val_every": self.val_every, "injected_steps": self.injected_steps,
                "injected_truncate": self.injected_truncate,
                "injected_epochs": self.injected_epochs,
                "injected_val_every": self.injected_val_every,
                "injected_hidden": self.injected_hidden, "threads": self.threads}
        for key, value in ints.items():
            if value < 1:
                raise ConfigError(f"setting '{key}' must be >= 1, got {value}")
        if self.truncate > self.steps or self.injected_truncate > self.injected_steps:
            raise ConfigError("truncate must not exceed steps (TBPTT back-propagates K steps)")
        if not 0.0 <= self.injected_dropout < 1.0:
            raise ConfigError("injected_dropout must be in [0, 1)")
        for key in ("fp_dropout", "gcn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"setting '{key}' must be in [0, 1), got {getattr(self, key)}")
        for key in ("fp_alpha", "fp_kappa"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"setting '{key}' must be in (0, 1) (the contraction rate is "
                                  f"below 1 only then), got {getattr(self, key)}")
        for key in ("fp_bound", "fp_lr", "gcn_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"setting '{key}' must be positive, got {getattr(self, key)}")
        if self.fp_backward_tol is not None and not self.fp_backward_tol > 0:
            raise ConfigError("setting 'fp_backward_tol' must be positive or null")
        if self.fp_tol is not None and not self.fp_tol > 0:
            raise ConfigError("setting 'fp_tol' must be positive or null")
        if self.fp_warm_start and self.fp_tol is None:
            raise ConfigError("fp_warm_start needs fp_tol: with a fixed number of steps a warm "
                              "start changes the state reached, not the work done")
        if (self.fp_tol is not None or self.fp_warm_start) and "ignn" in self.models:
            raise ConfigError("fp_tol and fp_warm_start apply to the ppr model only; drop ignn "
                              "from models or unset them")
        fp_ints = {"fp_hidden": self.fp_hidden, "fp_epochs": self.fp_epochs,
                   "fp_val_every": self.fp_val_every, "gcn_hidden": self.gcn_hidden,
                   "gcn_epochs": self.gcn_epochs, "fp_truncate": self.fp_truncate,
                   "fp_steps": self.fp_steps}
        for key, value in fp_ints.items():  # fp_truncate, fp_steps: also null
            if value is not None and value < 1:
                raise ConfigError(f"setting '{key}' must be >= 1, got {value}")
        if self.trace_points < 0:
            raise ConfigError(f"setting 'trace_points' must be >= 0 (0: no traces), got "
                              f"{self.trace_points}")
        self._validate_optimisers()
        for model in FIXED_POINT_MODELS:
            if model in self.models and self.fp_steps is not None \
                    and self.fp_K(model) > self.fp_steps:
                raise ConfigError(f"fp_steps={self.fp_steps} is below K={self.fp_K(model)} for "
                                  f"'{model}' (TBPTT back-propagates K steps): raise fp_steps "
                                  "or set fp_truncate")
        if self.gcn_backend not in GCN_BACKENDS:
            raise ConfigError(f"gcn_backend must be one of {', '.join(map(repr, GCN_BACKENDS))}, "
                              f"got {self.gcn_backend!r}")
        if self.on_failure not in ("raise", "warn", "ignore"):
            raise ConfigError("on_failure must be 'raise', 'warn' or 'ignore'")
        if self.seed_batch is not None and self.seed_batch < 1:
            raise ConfigError(f"setting 'seed_batch' must be >= 1 or null, got {self.seed_batch}")
        batched = set(BATCHED_MODELS) & set(self.models) or (
            "gcn" in self.baselines and self.gcn_backend == "torch")
        if self.seed_batch is not None and not batched:
            raise ConfigError(
                f"seed_batch={self.seed_batch} applies to the models {', '.join(BATCHED_MODELS)} "
                "and the torch GCN baseline, and this run trains none of them (models "
                f"{list(self.models)}, baselines {list(self.baselines)}): leave it unset")
        resolve_device(self.device)

    def _validate_method_lists(self) -> None:
        """An empty ``injected_methods`` / ``fp_methods`` would silently train every method in
        ``methods`` (null's meaning) where its model runs."""
        for key, models in (("injected_methods", ("injected",)),
                            ("fp_methods", FIXED_POINT_MODELS)):
            running = [m for m in models if m in self.models]
            if getattr(self, key) == [] and running:
                raise ConfigError(f"setting '{key}' is empty but models has {running[0]}; name "
                                  f"its methods, null for every method in 'methods', or drop "
                                  f"{running[0]} from models")

    def _validate_optimisers(self) -> None:
        """Learning rates, SGD's momentum and the weight decays (torch refuses some only
        after the data are loaded, takes others and diverges)."""
        for key in ("lr", "injected_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"setting '{key}' must be positive, got {getattr(self, key)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"setting 'momentum' must be in [0, 1), got {self.momentum}")
        for key in ("weight_decay", "injected_weight_decay", "fp_weight_decay",
                    "gcn_weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"setting '{key}' must be >= 0, got {getattr(self, key)}")
