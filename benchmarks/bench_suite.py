"""The benchmark suite (issue 17): settings where the best fixed mixture beats stratified, every
method as a paired difference from stratified and as the share of that gain it captures.

Settings, all derived from the built-in corpus with its 2,048-id tokenizer (``mixlab demo``'s
``<cache>/builtin-v2048``; five real domains: code, legal, literature, medical, news):

* ``unlearnable``: the five domains plus ``noise``, documents of uniformly random token ids (no
  method can learn them; the best possible loss is ln(2047) = 7.62 nats). The reported average
  *excludes* ``noise``: a good mixture spends nothing on it.
* ``duplicate``: ``medical`` split into two domains ``medical_a``/``medical_b`` (alternate
  documents of every split: a near-duplicate pair), so stratified trains on medical text twice as
  much as on any other. The reported average counts each half with weight 1/2 (the five real
  distributions, each once).
* ``constrained``: ``news`` cut to ``--small-tokens`` training tokens (seeded choice of whole
  documents; val/test unchanged), so stratified reads it ~12 times in 300 steps, ~41 in 1,000. Also run with the
  repetition budget ``data.max_epochs`` (``--budget-epochs``, pace ``even``), and with a target
  set of held-out news documents (DGA's small-generic-set regime: importance sampling would read
  the small domain ~60 times).
* ``all5``: the five real domains as they are (the ``groups`` benchmark's "all 5"); also with a
  tiny target (4 probe documents of medical; DGA's tiny-target regime).

For each setting: ``mixlab sweep`` (Dirichlet mixtures around uniform, mixture 0 = uniform,
proxies as long as the final runs, on their own seed ``PROXY_SEED``) picks the mixture with the
lowest validation loss on the setting's reported objective; the data mixing law's optimum
from the same sweep is trained once more as a proxy and wins if its validation loss is lower.
That mixture, trained over the seeds, is ``best-fixed``. The methods (``ROWS``): stratified,
best-fixed, aioli (the demo's options), aioli with its probes but p frozen at uniform
(``eta = 0``: the cost of the probe steps alone), skillit, odm, doremi, doge; the target rows
(natural sampling, importance sampling, DGA, DGA + EMA, with and without the budget) report the
held-out target loss as a paired difference from natural sampling.

Every run: the demo's GPT (d64, 2 layers, 0.24M parameters), batch 16 x 128, ``--steps`` steps,
one torch thread (``train.threads = 1``, which ``mixlab compare --jobs`` keeps), test loss on
every test window of every domain (``eval.test_windows = 1024`` is more than any domain has).
Runs go through ``mixlab compare``'s scheduler, ``--jobs`` at a time; finished runs are reused,
so an interrupted suite continues where it stopped. Rows run in priority order (``--budget-min``
stops starting new rows after that many minutes), and the tables are built from whatever has
finished (``--report`` builds them without training anything).

Noise floor, both parts: (1) seed to seed, the standard error over seeds of paired differences;
(2) evaluation, the standard error of a run's test loss (and of a paired difference) over the
finite test windows, from per-window losses recomputed from each run's ``model.safetensors``
(i.i.d. windows, and batch means over blocks of ``BLOCK`` consecutive windows, which allows for
windows of one document being alike). Flattening: stratified's validation loss over the last 20%
of the steps.

    python benchmarks/bench_suite.py [--seeds 5] [--steps 1000] [--jobs 1] [--out runs/suite]
                                     [--settings unlearnable,duplicate,constrained,all5]
                                     [--rows stratified,aioli,...] [--budget-min 110] [--report]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.config import apply_overrides
from mixlab.data.format import (
    MANIFEST,
    TOKENIZER,
    DataDir,
    DomainInfo,
    Manifest,
    SplitInfo,
    atomic_dir,
    open_if_current,
    write_json_atomic,
    write_shard,
)
from mixlab.data.prepare import PrepareConfig, prepare
from mixlab.orchestrate.demo import cache_dir, load_demo_config

SPLITS = ("train", "val", "test")
PROXY_SEED = 100
"""train.seed of the sweep's proxy runs: apart from the evaluated seeds 0..n-1, so the chosen
mixture's seed-0 run is not the run it was chosen on."""
BLOCK = 16
"""Consecutive test windows per block in the batch-means standard error."""
DATA_VERSION = 1
"""Bumped when a derived data dir's recipe changes meaning (part of its inputs hash)."""


def say(text: str) -> None:
    print(f"[suite] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Statistics (pure).


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error = sample std / sqrt(n)) of ``xs``; SE 0 for one value."""
    x = np.asarray(xs, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    """Per-seed differences a[s] - b[s] over the seeds both have, in seed order."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def paired_test_delta(per_row: Mapping[str, Mapping[int, Mapping[str, Any]]], name: str,
               base: str = "stratified") -> list[float]:
    """Paired differences of average test loss, row ``name`` minus row ``base``, per common seed."""
    return paired({sd: v["test"] for sd, v in per_row[name].items()},
                  {sd: v["test"] for sd, v in per_row[base].items()})


def share_of_gain(method: Sequence[float], best: Sequence[float]) -> tuple[float, float]:
    """(r, SE) with r = mean(method) / mean(best): the share of the best fixed mixture's gain
    over the baseline that a method captures, from paired per-seed differences ``method`` and
    ``best`` (same seeds, same order). SE by the delta method with the pair's covariance:
    var(r) = (var(a) - 2 r cov(a, b) + r^2 var(b)) / (n mean(b)^2)."""
    a, b = np.asarray(method, np.float64), np.asarray(best, np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"share_of_gain needs paired, non-empty lists, got {a.size} and {b.size}.")
    mb = float(b.mean())
    if mb == 0.0:
        return math.nan, math.nan
    r = float(a.mean()) / mb
    if a.size < 2:
        return r, 0.0
    c = np.cov(a, b, ddof=1)
    var = (c[0, 0] - 2 * r * c[0, 1] + r * r * c[1, 1]) / (a.size * mb * mb)
    return r, float(math.sqrt(max(var, 0.0)))


def window_se(per_window: Mapping[str, np.ndarray], weights: Mapping[str, float],
              block: int = 1) -> float:
    """Standard error, over the finite test windows, of the weighted average loss
    ``sum_d w_d mean(x_d)``: ``sqrt(sum_d w_d^2 var_d / n_d)``. ``per_window[d]`` [n_d] holds one
    loss (or one paired difference) per window, in text order. ``block > 1``: batch means, var_d
    and n_d of the means of consecutive blocks of ``block`` windows (a last partial block is
    dropped), which allows for neighbouring windows being correlated."""
    total = 0.0
    for d, w in weights.items():
        if w == 0:
            continue
        x = np.asarray(per_window[d], dtype=np.float64)
        if block > 1:
            k = x.size // block
            x = x[: k * block].reshape(k, block).mean(axis=1)
        if x.size < 2:
            return math.nan
        total += w * w * float(x.var(ddof=1)) / x.size
    return math.sqrt(total)


def weighted_loss(losses: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """``sum_d w_d losses[d]`` over the weighted domains (weights sum to 1)."""
    return float(sum(w * float(losses[d]) for d, w in weights.items() if w))


def last_fraction_change(curve: Sequence[tuple[int, float]], fraction: float = 0.2) -> tuple[float, float]:
    """(change, share): the loss at the last point minus the loss at step (1 - fraction) * T
    (linear interpolation between evaluations; T = the last step), and that change as a share of
    the whole change from the first point. ``curve``: (step, loss) in step order."""
    steps = np.array([s for s, _ in curve], dtype=np.float64)
    loss = np.array([v for _, v in curve], dtype=np.float64)
    if steps.size < 2:
        return math.nan, math.nan
    at = float(np.interp((1 - fraction) * steps[-1], steps, loss))
    change = float(loss[-1] - at)
    whole = float(loss[-1] - loss[0])
    return change, (change / whole if whole else math.nan)


def verdict(mean: float, se: float, want_negative: bool = True) -> str:
    """'reproduced' when the difference has the claimed sign and |mean| > 2 SE, 'not
    reproduced here' when it has the other sign beyond 2 SE, else 'within noise'."""
    if not math.isfinite(mean) or not math.isfinite(se) or abs(mean) <= 2 * se:
        return "within noise"
    return "reproduced" if (mean < 0) == want_negative else "not reproduced here"


# ---------------------------------------------------------------------------------------------
# Derived data dirs (pure document builders, then one writer).

Docs = dict[str, list[np.ndarray]]
"""split -> documents (int64 token ids, each ending in EOS)."""


def random_documents(n_tokens: int, doc_len: int, vocab: int, eos: int, seed: Sequence[int]) -> list[np.ndarray]:
    """Documents of ``doc_len`` uniformly random ids in [0, vocab) other than ``eos``, each
    followed by ``eos``, ``ceil(n_tokens / (doc_len + 1))`` of them (an unlearnable domain:
    every next token is uniform over vocab - 1 ids, whatever came before)."""
    rng = np.random.default_rng(list(seed))
    n_docs = max(1, -(-n_tokens // (doc_len + 1)))
    out = []
    for _ in range(n_docs):
        ids = rng.integers(0, vocab - 1, size=doc_len, dtype=np.int64)
        ids[ids >= eos] += 1
        out.append(np.append(ids, eos))
    return out


def split_alternate(docs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(even-indexed, odd-indexed) documents: one domain as two near-duplicate halves."""
    return list(docs[0::2]), list(docs[1::2])


def take_tokens(docs: Sequence[np.ndarray], n_tokens: int, seed: Sequence[int]) -> list[np.ndarray]:
    """Whole documents in a seeded order until they hold at least ``n_tokens`` tokens, returned
    in their original order."""
    order = np.random.default_rng(list(seed)).permutation(len(docs))
    kept, total = [], 0
    for j in order:
        if total >= n_tokens:
            break
        kept.append(int(j))
        total += len(docs[j])
    return [docs[j] for j in sorted(kept)]


def read_docs(data: DataDir, domain: str) -> Docs:
    """Every document of every split of ``domain``."""
    out = {}
    for s in SPLITS:
        sp = data.split(domain, s)
        out[s] = [sp.document(j) for j in range(sp.n_docs)]
    return out


def write_derived(base: DataDir, out: Path, recipe: dict[str, Any],
                  build: Callable[[DataDir], dict[str, Docs]]) -> DataDir:
    """The data dir ``out``: the domains ``build(base)`` returns (name -> split -> documents),
    with ``base``'s tokenizer. Rebuilt only when missing, damaged or made from another recipe
    or base (its inputs hash); written atomically."""
    digest = hashlib.sha256(json.dumps(
        {"v": DATA_VERSION, "base": base.manifest.inputs_hash, "recipe": recipe}, sort_keys=True
    ).encode()).hexdigest()
    current = open_if_current(out, digest)
    if current is not None:
        return current
    domains = build(base)
    dtype = np.dtype(base.manifest.dtype)
    with atomic_dir(out) as tmp:
        infos = []
        for name, splits in domains.items():
            si = {}
            for s in SPLITS:
                sh = write_shard(tmp, f"shards/{name}/{s}-00000.bin", splits[s], dtype)
                si[s] = SplitInfo(docs=sh.docs, tokens=sh.tokens, shards=[sh])
            infos.append(DomainInfo(name=name, splits=si, source=f"derived from {base.root}"))
        shutil.copyfile(base.root / TOKENIZER, tmp / TOKENIZER)
        m = base.manifest
        manifest = Manifest(domains=infos, vocab_size=m.vocab_size, eos_id=m.eos_id, dtype=m.dtype,
                            tokenizer_sha256=m.tokenizer_sha256, created_by="benchmarks/bench_suite.py",
                            command="python benchmarks/bench_suite.py", source=str(base.root),
                            inputs_hash=digest, seed=m.seed, extra={"recipe": recipe})
        write_json_atomic(tmp / MANIFEST, manifest.to_json())
    return DataDir.open(out)


def unlearnable_domains(base: DataDir, noise_tokens: Mapping[str, int], doc_len: int) -> dict[str, Docs]:
    doms = {d: read_docs(base, d) for d in base.domains}
    doms["noise"] = {s: random_documents(noise_tokens[s], doc_len, base.vocab_size, base.eos_id,
                                         (2017, i)) for i, s in enumerate(SPLITS)}
    return doms


def duplicate_domains(base: DataDir, which: str) -> dict[str, Docs]:
    doms: dict[str, Docs] = {}
    for d in base.domains:
        docs = read_docs(base, d)
        if d != which:
            doms[d] = docs
            continue
        halves = {s: split_alternate(docs[s]) for s in SPLITS}
        doms[f"{d}_a"] = {s: halves[s][0] for s in SPLITS}
        doms[f"{d}_b"] = {s: halves[s][1] for s in SPLITS}
    return doms


def constrained_domains(base: DataDir, which: str, n_tokens: int) -> dict[str, Docs]:
    doms = {d: read_docs(base, d) for d in base.domains}
    doms[which] = {**doms[which], "train": take_tokens(doms[which]["train"], n_tokens, (2017, 3))}
    return doms


# ---------------------------------------------------------------------------------------------
# Settings and rows.


@dataclass(frozen=True)
class Setting:
    key: str
    title: str
    domains: list[str]
    report: dict[str, float]
    """Weights of the reported average test loss (and of the sweep's objective)."""
    target: dict[str, Any] = field(default_factory=dict)
    """The [target] table of this setting's target rows (empty: no target rows)."""
    regime: str = ""


REAL = ["code", "legal", "literature", "medical", "news"]
DUP = ["code", "legal", "literature", "medical_a", "medical_b", "news"]


def settings(small_tokens: int) -> dict[str, Setting]:
    uni = {d: 1 / 5 for d in REAL}
    return {
        "unlearnable": Setting("unlearnable", "(a) 5 real + 1 unlearnable (random tokens)",
                               [*REAL, "noise"], {**uni, "noise": 0.0}),
        "duplicate": Setting("duplicate", "(b) medical present twice (split in 2 halves)",
                             DUP, {**{d: w for d, w in uni.items() if d != "medical"},
                                   "medical_a": 0.1, "medical_b": 0.1}),
        "constrained": Setting(
            "constrained", f"(c) news cut to {small_tokens // 1000}k training tokens", REAL, uni,
            target={"domain": "news", "docs": 40, "probe_fraction": 0.5},
            regime="small generic set: target = held-out news (20 probe / 20 eval docs)"),
        "all5": Setting(
            "all5", "(d) the 5 real domains", REAL, uni,
            target={"domain": "medical", "docs": 40, "probe_fraction": 0.1},
            regime="tiny target: 4 probe medical docs (36 eval)"),
    }


@dataclass(frozen=True)
class Row:
    """One method of the suite: a compare dir per (setting, group); rows of group 'main' share
    one (so DoReMi finds the stratified run of its seed as its reference)."""

    name: str
    mixer: str
    group: str
    priority: int
    options: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    target: bool = False
    budget: bool = False
    only: tuple[str, ...] = ()
    """Settings this row runs in (empty = every setting)."""
    report_weights: bool = False
    """A fixed mixture equal to the setting's reported-average weights (uniform over the real
    distributions: nothing on ``noise``, each medical half at 1/10), instead of the sweep's pick."""


DGA = {"update_every": 10, "target_windows": 8, "align_samples": 32}
TARGET_SETTINGS = ("constrained", "all5")
ROWS: list[Row] = [
    Row("stratified", "stratified", "main", 1),
    Row("aioli", "aioli", "main", 1),
    Row("aioli-frozen", "aioli", "aioli-frozen", 1, options={"eta": 0.0}),
    Row("best-fixed", "fixed", "best-fixed", 2),
    Row("natural", "natural", "t-natural", 3, target=True, only=TARGET_SETTINGS),
    Row("importance", "importance", "t-importance", 3, target=True, only=TARGET_SETTINGS),
    Row("dga", "dga", "t-dga", 3, options=DGA, target=True, only=TARGET_SETTINGS),
    Row("dga+ema", "dga", "t-dga-ema", 3, options={**DGA, "ema": 0.9}, target=True,
        only=TARGET_SETTINGS),
    Row("importance+budget", "importance", "t-importance-budget", 3, target=True, budget=True,
        only=("constrained",)),
    Row("dga+budget", "dga", "t-dga-budget", 3, options=DGA, target=True, budget=True,
        only=("constrained",)),
    Row("dga+ema+budget", "dga", "t-dga-ema-budget", 5, options={**DGA, "ema": 0.9}, target=True,
        budget=True, only=("constrained",)),
    Row("stratified+budget", "stratified", "stratified-budget", 3, budget=True, only=("constrained",)),
    Row("aioli-branch", "aioli", "aioli-branch", 3, options={"probes": "branch"}),
    Row("report-uniform", "fixed", "report-uniform", 4, report_weights=True,
        only=("unlearnable", "duplicate")),
    Row("odm", "odm", "main", 4),
    Row("skillit", "skillit", "main", 4),
    Row("doremi", "doremi", "main", 4),
    Row("doge", "doge", "main", 5),
    Row("aioli+budget", "aioli", "aioli-budget", 6, budget=True, only=("constrained",)),
    Row("stratified+dwm", "stratified", "dwm", 6, overrides=("weighting.name=dwm",),
        only=("unlearnable",)),
]
"""Priority order (1 first; within a priority, row by row, each in every setting): what the
claims need (stratified, Aioli and its frozen-p diagnostic), the best fixed mixture (the gain to
capture), the target regimes and budgets (DGA vs importance sampling) and Aioli with its probes
on branch copies (``probes = "branch"``: the variant the frozen-p diagnostic called for), then the other mixers,
DoGE last of them (in issue 17's first measurement the noisiest: +3.8 +- 9.2 PPL), then the
extra rows."""


def base_raw(steps: int, data_dir: Path, domains: list[str], extra: Sequence[str] = ()) -> dict[str, Any]:
    """The demo config at ``steps`` steps with the methods' options scaled to it (the demo's are
    for 500 steps), on ``domains`` of ``data_dir``."""
    f = steps / 500
    raw = apply_overrides(load_demo_config(), [
        f"train.steps={steps}",
        "train.threads=1",
        "train.progress=false",
        "train.log_every=10",
        f"optim.warmup_steps={max(1, round(50 * f))}",
        f"eval.every={max(1, steps // 5)}",
        "eval.windows=64",
        "eval.signal_windows=16",
        "eval.test_windows=1024",
        # Aioli: 3 rounds; each probes every domain in 2 sweeps of 2 steps (m * 4 of 100 steps).
        f"mixers.aioli.options.round_steps={max(1, steps // 3)}",
        f"mixers.skillit.options.graph_steps={max(1, round(25 * f))}",
        f"mixers.skillit.options.graph_at_step={max(1, round(100 * f))}",
        f"mixers.skillit.options.update_every={max(1, round(100 * f))}",
        f"mixers.skillit.options.eval_every={max(1, round(50 * f))}",
        *extra,
    ])
    raw.pop("demo", None)
    raw.pop("target", None)
    raw["data"]["dir"] = str(data_dir)
    raw["data"]["domains"] = list(domains)
    return raw


def row_raw(row: Row, setting: Setting, general: dict[str, Any], budget_epochs: float,
            fixed: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The compare config of ``row`` in ``setting`` (``general``: ``base_raw``)."""
    raw = apply_overrides(copy.deepcopy(general), list(row.overrides))
    demo_mixers = raw.pop("mixers", {})
    table = copy.deepcopy(demo_mixers.get(row.mixer, {}))
    table.setdefault("options", {}).update(row.options)
    if row.mixer == "fixed":
        table = {"options": {"weights": dict(fixed or {})}}
    mixers = {row.mixer: table}
    if row.group == "main":
        mixers = {k: v for k, v in demo_mixers.items() if k in ("aioli", "odm", "skillit", "doremi", "doge")}
    raw["mixers"] = mixers
    if row.target:
        raw["target"] = dict(setting.target)
    if row.budget:
        raw["data"]["max_epochs"] = budget_epochs
        raw["data"]["budget_pace"] = "even"
    return raw


def run_dir(out: Path, setting: str, row: Row, seed: int) -> Path:
    return out / setting / row.group / "runs" / row.mixer / f"seed{seed}"


# ---------------------------------------------------------------------------------------------
# Running.


def run_row(row: Row, setting: Setting, general: dict[str, Any], out: Path, args: argparse.Namespace,
            fixed: Mapping[str, float] | None = None) -> None:
    from mixlab.orchestrate.compare import compare, plan_compare
    from mixlab.orchestrate.scheduler import Progress

    raw = row_raw(row, setting, general, args.budget_epochs, fixed)
    mixers = [row.mixer] if row.group != "main" else ["stratified", row.mixer]
    mixers = list(dict.fromkeys(mixers))
    plan = plan_compare(None, out / setting.key / row.group, mixers=mixers, seeds=args.seeds, raw=raw)
    say(f"{setting.key} / {row.name}: {len(plan.specs)} run(s) -> {plan.out}")
    compare(plan, jobs=args.jobs, launcher=launcher(args), progress=Progress(),
            title=f"suite: {setting.key} {row.name}")


def launcher(args: argparse.Namespace) -> Any:
    """With --jobs 1, runs train in this process, one after the other (``inline_launcher``: no
    interpreter start-up and data-dir check per run, ~2-3 s of a ~25 s run); else subprocesses,
    ``--jobs`` at a time. Same configs, so the same results."""
    from mixlab.orchestrate.launch import Finished, inline_launcher, subprocess_launcher

    if args.jobs != 1:
        return subprocess_launcher

    def inline(spec: Any, resume: bool, threads: int) -> Any:
        # A run that fails is reported as failed (exit 1), as a subprocess would be, instead of
        # stopping the whole suite.
        try:
            return inline_launcher(spec, resume, threads)
        except Exception as exc:  # any failure of one run
            say(f"run {spec.run_dir} failed: {type(exc).__name__}: {exc}")
            return Finished(1)

    return inline


def best_fixed(setting: Setting, general: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The sweep of a setting and its chosen mixture (cached in ``<setting>/best-fixed.json``)."""
    from mixlab.orchestrate.compare import compare, plan_compare
    from mixlab.orchestrate.scheduler import Progress
    from mixlab.orchestrate.sweep import plan_sweep, sweep

    path = out / setting.key / "best-fixed.json"
    sdir = out / setting.key / "sweep"
    m = len(setting.domains)
    n = args.sweep_n or m + 2
    raw = copy.deepcopy(general)
    raw.pop("mixers", None)
    sp = plan_sweep(None, sdir, n, raw=raw, mode="dirichlet", prior="uniform", concentration=1.0,
                    proxy_overrides=[f"train.seed={PROXY_SEED}"])
    say(f"{setting.key}: sweep of {n} proxy runs -> {sp.out}")
    objective = {d: w for d, w in setting.report.items() if w}
    result = sweep(sp, method="best", objective=objective, jobs=args.jobs, launcher=launcher(args),
                   progress=Progress())
    cands = [{"from": f"sweep best ({result['methods']['best']['run']})",
              "weights": result["methods"]["best"]["weights"],
              "val_objective": result["methods"]["best"]["observed_objective"]}]
    if "dml" in result["methods"]:
        w = result["methods"]["dml"]["weights"]
        draw = copy.deepcopy(raw)
        draw["train"]["seed"] = PROXY_SEED
        draw["mixers"] = {"fixed": {"options": {"weights": w}}}
        plan = plan_compare(None, out / setting.key / "sweep-dml", mixers=["fixed"], seeds=1, raw=draw)
        compare(plan, jobs=args.jobs, launcher=launcher(args), progress=Progress(),
                title=f"suite: {setting.key} dml proxy")
        summ = _summary(plan.specs[0].run_dir)
        if summ is not None:
            cands.append({"from": "data mixing law (dml), trained as one more proxy", "weights": w,
                          "val_objective": weighted_loss(summ["val"]["loss"], objective),
                          "predicted": result["methods"]["dml"].get("predicted_objective")})
    chosen = min(cands, key=lambda c: c["val_objective"])
    info = {"chosen": chosen, "candidates": cands, "proxy_runs": n + (len(cands) > 1),
            "proxy_steps": int(result["extra_steps"]) + (args.steps if len(cands) > 1 else 0),
            "sweep_dir": str(sp.out)}
    write_json_atomic(path, info)
    say(f"{setting.key}: best fixed = {chosen['from']}: {chosen['weights']}")
    return info


def build_data(args: argparse.Namespace) -> dict[str, Path]:
    root = Path(args.data_dir) if args.data_dir else cache_dir()
    base = prepare(PrepareConfig(source="builtin", out=str(root / "builtin-v2048"), vocab_size=2048))
    noise = {"train": 400_000, "val": 60_000, "test": 60_000}
    unl = write_derived(base, root / "suite-unlearnable-v2048", {"noise": noise, "doc_len": 1000},
                        lambda b: unlearnable_domains(b, noise, 1000))
    dup = write_derived(base, root / "suite-duplicate-v2048", {"duplicate": "medical"},
                        lambda b: duplicate_domains(b, "medical"))
    con = write_derived(base, root / f"suite-constrained{args.small_tokens // 1000}k-v2048",
                        {"small": "news", "tokens": args.small_tokens},
                        lambda b: constrained_domains(b, "news", args.small_tokens))
    return {"unlearnable": unl.root, "duplicate": dup.root, "constrained": con.root, "all5": base.root}


def train_all(args: argparse.Namespace, sets: dict[str, Setting], rows: list[Row], dirs: dict[str, Path]) -> None:
    out = Path(args.out)
    start = time.monotonic()
    general = {k: base_raw(args.steps, dirs[k], s.domains) for k, s in sets.items()}
    for prio in sorted({r.priority for r in rows}):
        for row in [r for r in rows if r.priority == prio]:
            for key, s in sets.items():
                if row.only and key not in row.only:
                    continue
                minutes = (time.monotonic() - start) / 60
                if args.budget_min and minutes > args.budget_min:
                    say(f"time budget of {args.budget_min} min spent ({minutes:.0f} min): not starting "
                        f"{key} / {row.name} or anything after it")
                    return
                fixed = None
                if row.report_weights:
                    fixed = dict(s.report)
                elif row.mixer == "fixed":
                    fixed = best_fixed(s, general[key], out, args)["chosen"]["weights"]
                run_row(row, s, general[key], out, args, fixed)
                if row.mixer == "fixed" and not row.report_weights:
                    _account(out, key, row, args.seeds)


def _account(out: Path, key: str, row: Row, seeds: int) -> None:
    """best-fixed's summaries count the sweep's proxy steps as extra steps (``account_final``)."""
    from mixlab.orchestrate.sweep import account_final

    info = json.loads((out / key / "best-fixed.json").read_text(encoding="utf-8"))
    for seed in range(seeds):
        d = run_dir(out, key, row, seed)
        if (d / "summary.json").is_file():
            account_final(d, {"extra_steps": info["proxy_steps"], "method": info["chosen"]["from"],
                              "objective": "reported average", "runs": info["proxy_runs"]},
                          Path(info["sweep_dir"]))


# ---------------------------------------------------------------------------------------------
# Collecting.


def _summary(d: Path) -> dict[str, Any] | None:
    p = d / "summary.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def collect(out: Path, sets: dict[str, Setting], rows: list[Row], seeds: int) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """setting -> row -> seed -> numbers of every finished run."""
    res: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for key, s in sets.items():
        for row in rows:
            if row.only and key not in row.only:
                continue
            for seed in range(seeds):
                summ = _summary(run_dir(out, key, row, seed))
                if summ is None:
                    continue
                res.setdefault(key, {}).setdefault(row.name, {})[seed] = {
                    "test": weighted_loss(summ["test"]["loss"], s.report),
                    "val": weighted_loss(summ["val"]["loss"], s.report),
                    "target": summ["test"].get("target_loss"),
                    "wall": float(summ["wall_time_s"]),
                    "extra": int(summ.get("extra_steps") or 0),
                    "epochs": summ["epochs_per_domain"],
                    "weights_avg": summ["weights_avg"],
                }
    return res


def per_window_losses(d: Path, cache: Path) -> dict[str, np.ndarray]:
    """The final model's loss on every test window of every domain [n_d] (cached as .npz), as
    the trainer's evaluation scores them (``EvalSet`` with the run's seed and test_windows)."""
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    import torch

    from mixlab.model import build_model, per_sample_loss
    from mixlab.train.checkpoint import load_model
    from mixlab.train.config import load_config
    from mixlab.train.evaluate import EvalSet

    torch.set_num_threads(1)
    cfg = load_config(d / "config.toml")
    data = DataDir.open(cfg.data.dir)
    domains = list(cfg.data.domains or data.domains)
    model = build_model(cfg.model, data.vocab_size, cfg.data.seq_len)
    load_model(model, d / "model.safetensors")
    model.eval()
    ev = EvalSet.from_data(data, domains, "test", cfg.eval.test_windows, cfg.data.seq_len, cfg.train.seed)
    out = {}
    with torch.no_grad():
        for name, w in ev.windows.items():
            parts = [per_sample_loss(model, w[i : i + 256]).double().numpy() for i in range(0, len(w), 256)]
            out[name] = np.concatenate(parts)
    summ = _summary(d) or {}
    for name, x in out.items():  # the rescoring must be the trainer's own test loss
        ref = float(summ["test"]["loss"][name])
        if abs(float(x.mean()) - ref) > 1e-4:
            raise RuntimeError(f"{d}: rescored {name} test loss {x.mean():.6f} != summary's {ref:.6f}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(cache)
    return out


def eval_noise(out: Path, sets: dict[str, Setting], seeds: int, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per setting: the evaluation SE of stratified's runs (mean over seeds), and for each row in
    ``names`` the evaluation SE of its paired difference from stratified, per seed (mean) and
    of the difference averaged over seeds (the part averaging seeds cannot remove: every seed is
    scored on the same test windows), i.i.d. windows and batch means."""
    by_name = {r.name: r for r in ROWS}
    res: dict[str, dict[str, Any]] = {}
    def windows(key: str, row: Row, seed: int) -> dict[str, np.ndarray] | None:
        d = run_dir(out, key, row, seed)
        if not (d / "summary.json").is_file():
            return None
        return per_window_losses(d, out / "_windows" / key / f"{row.name}-seed{seed}.npz")

    for key, s in sets.items():
        base = {sd: windows(key, by_name["stratified"], sd) for sd in range(seeds)}
        base = {sd: w for sd, w in base.items() if w is not None}
        if not base:
            continue
        entry: dict[str, Any] = {
            "run_iid": float(np.mean([window_se(w, s.report) for w in base.values()])),
            "run_block": float(np.mean([window_se(w, s.report, BLOCK) for w in base.values()])),
            "windows": {d: int(next(iter(base.values()))[d].size) for d in s.domains},
            "diff": {},
        }
        for name in names:
            if name == "stratified":
                continue
            other = {sd: windows(key, by_name[name], sd) for sd in base}
            pairs = {sd: {d: other[sd][d] - base[sd][d] for d in s.domains}
                     for sd in base if other.get(sd) is not None}
            if not pairs:
                continue
            avg = {d: np.mean([p[d] for p in pairs.values()], axis=0) for d in s.domains}
            entry["diff"][name] = {
                "per_seed_iid": float(np.mean([window_se(p, s.report) for p in pairs.values()])),
                "per_seed_block": float(np.mean([window_se(p, s.report, BLOCK) for p in pairs.values()])),
                "mean_iid": window_se(avg, s.report),
                "mean_block": window_se(avg, s.report, BLOCK),
                "seeds": len(pairs),
            }
        res[key] = entry
    return res


def curves(out: Path, key: str, s: Setting, seeds: int) -> list[list[tuple[int, float]]]:
    """Stratified's validation curve (reported average, per evaluation) of each finished seed."""
    res = []
    row = next(r for r in ROWS if r.name == "stratified")
    for seed in range(seeds):
        p = run_dir(out, key, row, seed) / "metrics.jsonl"
        if not (p.parent / "summary.json").is_file():
            continue
        pts = []
        for line in p.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "eval":
                pts.append((int(rec["step"]), weighted_loss(rec["loss"], s.report)))
        res.append(pts)
    return res


# ---------------------------------------------------------------------------------------------
# Tables.


def fmt(mean: float, se: float, digits: int = 4) -> str:
    return f"{mean:+.{digits}f} ± {se:.{digits}f}" if math.isfinite(mean) else "—"


FIXED_ROWS = ("best-fixed", "report-uniform", "natural")
"""Rows that train one fixed mixture: the candidates for the gain to capture."""


def best_fixed_row(per_row: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> str | None:
    """The fixed row (``best-fixed``, ``report-uniform``, or ``natural``: sampling by size is a
    fixed mixture too, known before training) with the lowest mean validation loss over its seeds
    (validation, so the test losses being compared play no part in the choice)."""
    cands = {n: float(np.mean([v["val"] for v in per_row[n].values()]))
             for n in FIXED_ROWS if len(per_row.get(n, {})) >= 2}
    return min(cands, key=cands.__getitem__) if cands else None


def report(args: argparse.Namespace, sets: dict[str, Setting], rows: list[Row]) -> str:
    out = Path(args.out)
    res = collect(out, sets, rows, args.seeds)
    lines: list[str] = []
    add = lines.append
    add(f"Average test loss (nats/token, reported domains; see settings), {args.steps} steps, "
        f"seeds 0..{args.seeds - 1}. Cells: paired Δ vs stratified, mean ± SE over seeds "
        "[seeds with a lower loss / seeds]; negative = better.\n")
    keys = [k for k in sets if k in res and "stratified" in res[k]]
    general = [r for r in rows if not r.target]
    add("| method | " + " | ".join(sets[k].title for k in keys) + " |")
    add("|---|" + "---|" * len(keys))
    cells: dict[str, dict[str, tuple[float, float, int, int]]] = {}
    for r in general:
        row_cells = []
        for k in keys:
            base = {sd: v["test"] for sd, v in res[k]["stratified"].items()}
            if r.name not in res[k]:
                row_cells.append("not run" if (not r.only or k in r.only) else "")
                continue
            if r.name == "stratified":
                mu, se = mean_se(list(base.values()))
                row_cells.append(f"{mu:.4f} ± {se:.4f} (absolute) [{len(base)}]")
                continue
            diffs = paired_test_delta(res[k], r.name)
            mu, se = mean_se(diffs)
            wins = sum(d < 0 for d in diffs)
            cells.setdefault(r.name, {})[k] = (mu, se, wins, len(diffs))
            row_cells.append(f"{fmt(mu, se)} [{wins}/{len(diffs)}]")
        if any(row_cells):
            add(f"| {r.name} | " + " | ".join(row_cells) + " |")

    gain_row = {k: best_fixed_row(res[k]) for k in keys}
    add("\nShare of the best fixed mixture's gain captured: mean(Δ method) / mean(Δ best fixed), "
        "SE by the delta method over the paired seeds (1 = all of it, < 0 = worse than stratified). "
        "The best fixed mixture of a setting is the fixed row (the sweep's pick `best-fixed`, "
        "`report-uniform`, or `natural` where it ran) with the lowest mean validation loss over "
        "the seeds: "
        + ", ".join(f"{k}: {gain_row[k] or '—'}" for k in keys) + ".\n")
    add("| method | " + " | ".join(sets[k].key for k in keys) + " |")
    add("|---|" + "---|" * len(keys))
    for r in general:
        if r.name in ("stratified",) or r.name not in cells:
            continue
        row_cells = []
        for k in keys:
            g = gain_row[k]
            if r.name not in res[k] or g is None:
                row_cells.append("—")
                continue
            base = {sd: v["test"] for sd, v in res[k]["stratified"].items()}
            a = {sd: v["test"] - base[sd] for sd, v in res[k][r.name].items() if sd in base}
            b = {sd: v["test"] - base[sd] for sd, v in res[k][g].items() if sd in base}
            common = sorted(set(a) & set(b))
            if len(common) < 2:
                row_cells.append("—")
                continue
            rr, se = share_of_gain([a[sd] for sd in common], [b[sd] for sd in common])
            gmu, gse = mean_se([b[sd] for sd in common])
            flag = "" if abs(gmu) > 2 * gse and gmu < 0 else " (gain unresolved)"
            row_cells.append(f"{rr:+.2f} ± {se:.2f}{flag}")
        add(f"| {r.name} | " + " | ".join(row_cells) + " |")

    add("\nWall time vs stratified (mean ratio over paired seeds; shared, loaded CPU: ±30%) and "
        "extra steps per run.\n")
    add("| method | " + " | ".join(sets[k].key for k in keys) + " |")
    add("|---|" + "---|" * len(keys))
    for r in general:
        row_cells = []
        for k in keys:
            if r.name not in res[k]:
                row_cells.append("—")
                continue
            base = res[k]["stratified"]
            ratios = [v["wall"] / base[sd]["wall"] for sd, v in res[k][r.name].items() if sd in base]
            extra = max(v["extra"] for v in res[k][r.name].values())
            row_cells.append(f"{np.mean(ratios):.2f}× +{extra}" if ratios else "—")
        add(f"| {r.name} | " + " | ".join(row_cells) + " |")

    # Best fixed mixtures.
    add("\nBest fixed mixtures (chosen on validation loss of the reported objective, proxies on seed "
        f"{PROXY_SEED}):\n")
    for k in keys:
        p = out / k / "best-fixed.json"
        if p.is_file():
            info = json.loads(p.read_text(encoding="utf-8"))
            c = info["chosen"]
            w = ", ".join(f"{d} {v:.3f}" for d, v in c["weights"].items())
            others = "; ".join(f"{x['from']}: val {x['val_objective']:.4f}" for x in info["candidates"])
            add(f"- {k}: {w} ({c['from']}; candidates: {others}; {info['proxy_runs']} proxy runs, "
                f"{info['proxy_steps']} steps)")

    # Epochs of the small domain in the constrained setting.
    if "constrained" in res:
        add("\nConstrained setting: passes over the small domain (news) per run (mean over seeds):\n")
        add("| method | news epochs | news share of training |")
        add("|---|---|---|")
        for name, per in res["constrained"].items():
            ep = np.mean([v["epochs"]["news"] for v in per.values()])
            sh = np.mean([v["weights_avg"]["news"] for v in per.values()])
            add(f"| {name} | {ep:.1f} | {sh:.1%} |")

    # Target regimes.
    for k in keys:
        if not sets[k].target or "natural" not in res[k]:
            continue
        add(f"\nTarget rows, {sets[k].key}: {sets[k].regime}. Held-out target loss (nats), paired Δ vs "
            "natural sampling (mean ± SE) [seeds better]; Δ vs importance sampling; and Δ avg test "
            "loss vs stratified.\n")
        add("| method | target loss | Δ vs natural | Δ vs importance | Δ avg test vs stratified |")
        add("|---|---|---|---|---|")
        nat = {sd: v["target"] for sd, v in res[k]["natural"].items()}
        imp = {sd: v["target"] for sd, v in res[k].get("importance", {}).items()}
        for r in [r for r in rows if r.target]:
            if r.name not in res[k]:
                continue
            t = {sd: v["target"] for sd, v in res[k][r.name].items()}
            mu, se = mean_se(list(t.values()))
            dn = paired(t, nat)
            di = paired(t, imp) if r.name != "importance" else []
            dt = paired_test_delta(res[k], r.name)
            cell_n = "baseline" if r.name == "natural" else f"{fmt(*mean_se(dn))} [{sum(d < 0 for d in dn)}/{len(dn)}]"
            cell_i = f"{fmt(*mean_se(di))} [{sum(d < 0 for d in di)}/{len(di)}]" if di else "—"
            add(f"| {r.name} | {mu:.4f} ± {se:.4f} | {cell_n} | {cell_i} | {fmt(*mean_se(dt))} |")

    # Noise floor.
    noise = eval_noise(out, {k: sets[k] for k in keys}, args.seeds, [*FIXED_ROWS, "aioli", "aioli-frozen", "aioli-branch"])
    add("\nNoise floor. Seed-to-seed: SE over seeds of stratified's loss and of paired Δ. Evaluation: "
        f"SE over the test windows (i.i.d. windows / batch means of {BLOCK} consecutive windows) of "
        "one run's loss, of one seed's paired Δ, and of the Δ averaged over the seeds (every seed "
        "is scored on the same windows, so averaging seeds does not shrink this part).\n")
    add("| setting | test windows | stratified: seed SD / seed SE | stratified: eval SE of a run | "
        "row | paired Δ: seed SE | eval SE of one seed's Δ | eval SE of the mean Δ | "
        "both: √(seed² + eval²), batch means |")
    add("|---|---|---|---|---|---|---|---|---|")
    for k in keys:
        if k not in noise:
            continue
        e = noise[k]
        base = [v["test"] for v in res[k]["stratified"].values()]
        sd = float(np.std(base, ddof=1)) if len(base) > 1 else math.nan
        first = True
        for name, dd in e["diff"].items():
            seed_se = mean_se(paired_test_delta(res[k], name))[1] if name in res[k] else None
            head = (f"| {k} | {sum(e['windows'].values())} | {sd:.4f} / {sd / math.sqrt(len(base)):.4f} | "
                    f"{e['run_iid']:.4f} / {e['run_block']:.4f} |") if first else "| | | | |"
            first = False
            # Every seed is scored on the same windows, so the evaluation part of the mean Δ does
            # not shrink with more seeds: the whole error bar adds it to the seed part.
            add(f"{head} {name} | {seed_se:.4f} | {dd['per_seed_iid']:.4f} / {dd['per_seed_block']:.4f} | "
                f"{dd['mean_iid']:.4f} / {dd['mean_block']:.4f} | {math.hypot(seed_se, dd['mean_block']):.4f} |"
                if seed_se is not None else f"{head} {name} | — | — | — | — |")

    # Flattening.
    add("\nFlattening of stratified's validation loss (reported average): loss change over the last 20% "
        "of the steps, and that change as a share of the change since the first evaluation.\n")
    add("| setting | curve (seed 0): step → val loss | last-20% change (mean ± SE over seeds) | share of the whole drop |")
    add("|---|---|---|---|")
    for k in keys:
        cs = curves(out, k, sets[k], args.seeds)
        if not cs:
            continue
        ch = [last_fraction_change(c) for c in cs]
        c0 = ", ".join(f"{st}: {v:.3f}" for st, v in cs[0])
        add(f"| {k} | {c0} | {fmt(*mean_se([c[0] for c in ch]))} | {np.mean([c[1] for c in ch]):.1%} |")

    # Claims.
    add("\nClaims (automatic reading; 'within noise' = |mean| <= 2 SE):\n")
    if cells.get("aioli"):
        parts = [f"{k} {fmt(*cells['aioli'][k][:2])} → {verdict(*cells['aioli'][k][:2])}"
                 for k in keys if k in cells["aioli"]]
        verdicts = {verdict(*cells["aioli"][k][:2]) for k in keys if k in cells["aioli"]}
        overall = ("reproduced" if verdicts == {"reproduced"} else
                   "not reproduced here" if "not reproduced here" in verdicts else "within noise")
        add(f"- Aioli vs stratified in every setting (claim: better in all, never worse): {overall}; "
            + "; ".join(parts))
    if cells.get("aioli-frozen"):
        parts = []
        for k in keys:
            if "aioli" in res[k] and "aioli-frozen" in res[k]:
                d = paired_test_delta(res[k], "aioli", base="aioli-frozen")
                parts.append(f"{k}: probes alone (frozen p) {fmt(*cells['aioli-frozen'][k][:2])}, "
                             f"Aioli's mixture on top (aioli − frozen) {fmt(*mean_se(d))}")
        add("- Where Aioli's difference comes from (diagnostic): " + "; ".join(parts))
    if cells.get("aioli-branch"):
        parts = [f"{k} {fmt(*cells['aioli-branch'][k][:2])} → {verdict(*cells['aioli-branch'][k][:2])}"
                 for k in keys if k in cells["aioli-branch"]]
        add("- Aioli with its probes on branch copies (probes = 'branch') vs stratified: " + "; ".join(parts))
    for k in keys:
        if "dga" in res.get(k, {}) and "importance" in res[k]:
            for name in ("dga", "dga+ema", "dga+budget", "dga+ema+budget"):
                if name not in res[k]:
                    continue
                t = {sd: v["target"] for sd, v in res[k][name].items()}
                imp = {sd: v["target"] for sd, v in res[k]["importance"].items()}
                mu, se = mean_se(paired(t, imp))
                add(f"- {name} vs importance sampling, {k} ({sets[k].regime}): target Δ {fmt(mu, se)} → "
                    f"{verdict(mu, se)} (claim: DGA better)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    ap.add_argument("--steps", type=int, default=1000,
                    help="steps of every run, proxies included (default 1000; seed noise is ~10x lower than at 300)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each (default 1)")
    ap.add_argument("--out", default="runs/suite", help="where the runs go (default runs/suite)")
    ap.add_argument("--data-dir", default=None, help="where the data dirs go (default $MIXLAB_CACHE or data/)")
    ap.add_argument("--settings", default="unlearnable,duplicate,constrained,all5")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all); stratified always")
    ap.add_argument("--max-priority", type=int, default=99, help="run rows up to this priority only")
    ap.add_argument("--small-tokens", type=int, default=10_000, help="training tokens of news in (c)")
    ap.add_argument("--budget-epochs", type=float, default=4.0, help="data.max_epochs of the budget rows")
    ap.add_argument("--sweep-n", type=int, default=0, help="proxy runs per sweep (default m + 2, the fewest the mixing law fits)")
    ap.add_argument("--budget-min", type=float, default=0.0,
                    help="start no new row after this many minutes (0 = no limit)")
    ap.add_argument("--report", action="store_true", help="only print the tables of what has finished")
    args = ap.parse_args()
    sets = settings(args.small_tokens)
    sets = {k: sets[k] for k in args.settings.split(",") if k in sets}
    asked = {r for r in args.rows.split(",") if r}
    rows = [r for r in ROWS if (not asked or r.name in asked or r.name == "stratified")
            and r.priority <= args.max_priority]
    if not args.report:
        dirs = build_data(args)
        try:
            train_all(args, sets, rows, dirs)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the runs wrote their checkpoints
            say("stopped; run the same command again to continue")
            return 130
    table = report(args, sets, [r for r in ROWS if not asked or r.name in asked or r.name == "stratified"])
    print(table)
    (Path(args.out) / "suite_table.md").write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
