"""DoReMi end to end, ``mixlab doremi``'s pipeline (Xie et al. 2023; the mixer is
``mixlab.mixers.doremi``): three ordinary mixlab runs chained in one call::

    DIR/reference/   stage 1: the reference model, trained on the reference mixture
                     (``--reference-mixer``, stratified by default), or an existing finished
                     run given with ``--reference RUN_DIR`` (then nothing is trained here)
    DIR/proxy/       stage 2: ``mixer.name = "doremi"``, ``mixer.reference`` = the reference;
                     its ``weights_final`` is the average α over the run: the learned weights
    DIR/final/       stage 3: ``mixer.name = "fixed"`` with the learned weights; the run whose
                     results count
    DIR/doremi.json  what was chained: stage dirs, steps, what each call did, learned weights

One config serves every stage (data, model, optimizer, evaluation, seed). Its ``[mixer]`` table
configures the proxy: ``name`` may only be ``doremi`` (or absent) and ``options`` are DoReMi's
(``--set mixer.options.eta=0.5``); the command sets ``reference`` itself. A ``mixlab compare``
config works as is: ``[compare]`` is ignored, ``[mixers.doremi]`` goes on top of ``[mixer]``
for the proxy, and ``[mixers.<reference mixer>.options]`` configures the reference run. ``--reference-steps``
and ``--proxy-steps`` default to ``train.steps``; ``--final-set KEY=VALUE`` applies to stage 3
only (DoReMi trains the real, larger model on the learned weights: ``--final-set
model.d_model=512``).

Reuse, as ``mixlab compare`` does: a stage whose dir holds ``summary.json`` and whose
``config.toml`` matches is reused without building a trainer; one with a checkpoint is resumed
(bit-identical to an uninterrupted run); otherwise it is trained. A stage dir made with another
config is an error, or with ``--force`` is deleted and redone. The proxy also depends on the
reference *model*, which its config names only by path: ``doremi.json`` records the sha256 of
the reference's ``summary.json`` before the proxy starts, and a proxy made from another
reference is treated like a changed config. (The final run depends on the proxy only through
the weights, which are in its config.)

Accounting: ``extra_steps`` in the final run's ``summary.json`` counts the training steps the
method consumed outside that run (docs/architecture.md): reference steps + proxy steps (each
with the ``extra_steps`` they counted themselves) + the final run's own. The trainer writes
summary.json; the pipeline rewrites it once, atomically, adding that total and a ``doremi``
block with the breakdown (``final_own_extra_steps`` keeps the trainer's own count, so the rewrite
is idempotent). The proxy's own summary counts the reference model's steps as its extra steps,
as any run with ``mixer.reference`` does (``mixlab.report.runs.with_input_steps``): the proxy is
a DoReMi run too, and ``mixlab report DIR/proxy`` then reads the same number as the file says.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mixlab.errors import ConfigError, MixlabError
from mixlab.report.runs import CONFIG, SUMMARY, counted_steps, own_extra_steps

STATE_FILE = "doremi.json"

StageStatus = Literal["reused", "resumed", "trained", "given"]


def _log(msg: str) -> None:
    print(f"[doremi] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class PipelinePlan:
    out: Path
    base: dict[str, Any]
    """The shared config (no [mixer] table), overrides applied, data.dir absolute."""
    proxy_options: dict[str, Any]
    final_overrides: list[str]
    reference_steps: int
    proxy_steps: int
    reference_mixer: str
    reference_options: dict[str, Any]
    given_reference: Path | None

    @property
    def reference_dir(self) -> Path:
        return self.given_reference or self.out / "reference"

    @property
    def proxy_dir(self) -> Path:
        return self.out / "proxy"

    @property
    def final_dir(self) -> Path:
        return self.out / "final"

    def reference_config(self) -> Any:
        mixer = {"name": self.reference_mixer, "options": self.reference_options}
        return _config(self.base, mixer, self.reference_steps)

    def proxy_config(self) -> Any:
        mixer = {"name": "doremi", "reference": str(self.reference_dir), "options": self.proxy_options}
        return _config(self.base, mixer, self.proxy_steps)

    def final_config(self, weights: dict[str, float]) -> Any:
        from mixlab.config import apply_overrides

        base = _absolute_data_dir(apply_overrides(self.base, self.final_overrides))
        return _config(base, {"name": "fixed", "options": {"weights": dict(weights)}}, None)


def _absolute_data_dir(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with data.dir absolute, so stage configs name the same data whatever the working
    dir of a later call."""
    data = dict(raw.get("data", {}))
    data["dir"] = str(Path(data.get("dir", "data/builtin")).expanduser().resolve())
    return {**raw, "data": data}


def _config(base: dict[str, Any], mixer: dict[str, Any], steps: int | None) -> Any:
    from mixlab.config import from_dict
    from mixlab.train.config import TrainConfig

    data = {**base, "mixer": mixer}
    if steps is not None:
        data["train"] = {**base.get("train", {}), "steps": steps}
    return from_dict(TrainConfig, data)


def plan_pipeline(
    config_path: str | Path | None,
    out: str | Path,
    overrides: list[str] | None = None,
    final_overrides: list[str] | None = None,
    reference_steps: int | None = None,
    proxy_steps: int | None = None,
    reference_mixer: str = "stratified",
    reference: str | Path | None = None,
) -> PipelinePlan:
    """Resolve the three stage configs and validate them all before anything trains."""
    from mixlab.config import apply_overrides, load_toml
    from mixlab.mixers.base import mixer_class

    raw = load_toml(config_path) if config_path else {}
    raw = apply_overrides(raw, overrides or [])
    mixer = raw.pop("mixer", {})
    # A `mixlab compare` config works too: [compare] is not ours, [mixers.doremi] goes on top
    # of [mixer] for the proxy, and [mixers.<reference mixer>] configures the reference run.
    raw.pop("compare", None)
    per_mixer = raw.pop("mixers", {})
    if not isinstance(mixer, dict) or not isinstance(per_mixer, dict):
        raise ConfigError("[mixer] and [mixers] must be tables.")
    own = per_mixer.get("doremi", {})
    ref_table = per_mixer.get(reference_mixer, {})
    tables = (own, ref_table, mixer.get("options", {}), own.get("options", {}),
              ref_table.get("options", {}))  # fmt: skip
    if not all(isinstance(t, dict) for t in tables):
        raise ConfigError("[mixers.<name>] and every options entry must be tables.")
    mixer = {**mixer, **own, "options": {**mixer.get("options", {}), **own.get("options", {})}}
    if mixer.get("name", "doremi") != "doremi":
        raise ConfigError(
            f"mixer.name = '{mixer['name']}': in `mixlab doremi` the [mixer] table configures the "
            "DoReMi proxy; remove the name (use --reference-mixer for the reference run's mixture)."
        )
    for key in ("reference", "apply"):
        if key in mixer:
            raise ConfigError(
                f"mixer.{key} is set by `mixlab doremi` itself; remove it "
                "(--reference RUN_DIR uses an existing reference run)."
            )
    unknown = sorted(set(mixer) - {"name", "options"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [mixer]; it takes name and options.")
    options = mixer["options"]
    if any(o.split("=", 1)[0].strip().startswith("mixer") for o in final_overrides or []):
        raise ConfigError("--final-set cannot change [mixer]: the final run trains with mixer "
                          "'fixed' on the learned weights.")  # fmt: skip
    raw = _absolute_data_dir(raw)
    default_steps = int(_config(raw, {"name": "stratified"}, None).train.steps)
    if reference is not None and (reference_steps is not None or reference_mixer != "stratified"):
        raise ConfigError("--reference uses an existing run; drop --reference-steps and "
                          "--reference-mixer.")  # fmt: skip
    given = None
    if reference is not None:
        given = Path(reference).expanduser().resolve()
        for name in (SUMMARY, "model.safetensors"):
            if not (given / name).is_file():
                raise ConfigError(
                    f"--reference '{reference}' has no {name}; give a finished mixlab run dir."
                )
    elif mixer_class(reference_mixer).needs_reference:
        raise ConfigError(f"--reference-mixer '{reference_mixer}' itself needs a reference model.")
    plan = PipelinePlan(
        out=Path(out).expanduser().resolve(),
        base=raw,
        proxy_options=options,
        final_overrides=list(final_overrides or []),
        reference_steps=default_steps if reference_steps is None else reference_steps,
        proxy_steps=default_steps if proxy_steps is None else proxy_steps,
        reference_mixer=reference_mixer,
        reference_options=dict(ref_table.get("options", {})),
        given_reference=given,
    )
    if given is None:
        plan.reference_config()
    plan.proxy_config()
    # The final config is complete only once the weights are learned; check the rest now with
    # placeholder weights, so a typo in --final-set fails before hours of training.
    _config(_absolute_data_dir(apply_overrides(raw, plan.final_overrides)),
            {"name": "stratified"}, None)  # fmt: skip
    return plan


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class PipelineResult:
    weights: dict[str, float]
    final: dict[str, Any]
    """The final run's summary, with the pipeline's extra_steps."""
    statuses: dict[str, StageStatus]
    reference_steps: int
    proxy_steps: int


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MixlabError(f"cannot read {path} ({exc}); delete it or rerun with --force.") from None
    if not isinstance(data, dict):
        raise MixlabError(f"{path} does not hold a JSON object.")
    return data


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prepare_stage(name: str, cfg: Any, run_dir: Path, force: bool, stale: str = "") -> StageStatus:
    """What to do with a stage dir ('reused', 'resumed' or 'trained'); clears it under --force
    when it was made with another config or ``stale`` says why it is out of date."""
    from mixlab.config import to_dict
    from mixlab.orchestrate.spec import config_differences
    from mixlab.train.config import load_config

    if run_dir.exists():
        reasons = []
        if (run_dir / CONFIG).is_file():
            diffs = config_differences(to_dict(cfg), to_dict(load_config(run_dir / CONFIG)))
            if diffs:
                reasons.append("it was made with another config (" + "; ".join(diffs[:3])
                               + ("; ..." if len(diffs) > 3 else "") + ")")  # fmt: skip
        elif any(run_dir.iterdir()):
            raise MixlabError(f"{run_dir} exists and is not a mixlab run dir; choose another --out.")
        if stale:
            reasons.append(stale)
        if reasons:
            if not force:
                raise MixlabError(
                    f"{name} stage {run_dir}: {' and '.join(reasons)}. Use another --out, or "
                    "--force to delete and redo it."
                )
            _log(f"{name}: deleting {run_dir} ({' and '.join(reasons)})")
            shutil.rmtree(run_dir)
    if (run_dir / SUMMARY).is_file():
        return "reused"
    ckpt = run_dir / "checkpoints"
    return "resumed" if ckpt.is_dir() and any(ckpt.iterdir()) else "trained"


def _run_stage(
    index: int, name: str, cfg: Any, run_dir: Path, force: bool, stale: str = ""
) -> tuple[dict[str, Any], StageStatus]:
    """Reuse, resume or train one stage; its summary.json counts the steps of the runs it
    read (the proxy: the reference model's) as extra steps, as ``mixlab train`` writes it."""
    from mixlab.config import to_dict
    from mixlab.report.runs import account_input_steps

    status = _prepare_stage(name, cfg, run_dir, force, stale)
    what = f"stage {index}/3 {name} ({cfg.mixer.name}, {cfg.train.steps} steps)"
    if status == "reused":
        _log(f"{what}: reusing the finished run {run_dir}")
        _read_json(run_dir / SUMMARY)  # a clear error for a damaged file
    else:
        from mixlab.train import loop  # torch: imported only when a stage trains

        _log(f"{what}: {'resuming' if status == 'resumed' else 'training'} in {run_dir}")
        loop.train(cfg, run_dir, resume=True, log=_log)
    # Idempotent: a summary that already counts its input runs is not rewritten.
    return account_input_steps(run_dir, to_dict(cfg)), status


def run_pipeline(plan: PipelinePlan, force: bool = False) -> PipelineResult:
    """Run (or reuse, or resume) the three stages; returns the learned weights and final summary."""
    from mixlab.data.format import write_json_atomic

    plan.out.mkdir(parents=True, exist_ok=True)
    state_path = plan.out / STATE_FILE
    state = _read_json(state_path) if state_path.is_file() else {}
    statuses: dict[str, StageStatus] = {}

    if plan.given_reference is not None:
        _log(f"stage 1/3 reference: using the given run {plan.given_reference}")
        _read_json(plan.given_reference / SUMMARY)  # a clear error for a damaged file
        statuses["reference"] = "given"
    else:
        _, statuses["reference"] = _run_stage(
            1, "reference", plan.reference_config(), plan.reference_dir, force
        )
    ref_hash = _sha256(plan.reference_dir / SUMMARY)
    recorded = state.get("reference_summary_sha256")
    stale = (
        "its reference model has changed since it was trained"
        if plan.proxy_dir.exists() and recorded not in (None, ref_hash) else ""
    )  # fmt: skip
    # Recorded before the proxy starts, so an interrupted proxy is checked on the next call.
    state.update(reference=str(plan.reference_dir), reference_summary_sha256=ref_hash)
    write_json_atomic(state_path, state)
    proxy_summary, statuses["proxy"] = _run_stage(
        2, "proxy", plan.proxy_config(), plan.proxy_dir, force, stale
    )

    weights = _learned_weights(proxy_summary, plan.proxy_dir)
    final_summary, statuses["final"] = _run_stage(
        3, "final", plan.final_config(weights), plan.final_dir, force
    )
    # The proxy's summary counts the reference's steps among its extra steps (the proxy read
    # it), so the final run's extra steps are the proxy's counted steps (each run once); the
    # breakdown splits them into the proxy's own share and the reference's.
    proxy_steps = int(proxy_summary.get("steps", 0)) + own_extra_steps(proxy_summary)
    ref_steps = counted_steps(proxy_summary) - proxy_steps
    # The trainer's own count: kept in the doremi block once the summary has been rewritten.
    block = final_summary.get("doremi")
    if isinstance(block, dict) and "final_own_extra_steps" in block:
        own = int(block["final_own_extra_steps"])
    else:
        own = int(final_summary.get("extra_steps", 0) or 0)
    updated = {
        **final_summary,
        "extra_steps": own + ref_steps + proxy_steps,
        "doremi": {
            "reference_run": str(plan.reference_dir),
            "proxy_run": str(plan.proxy_dir),
            "reference_steps": ref_steps,
            "proxy_steps": proxy_steps,
            "final_own_extra_steps": own,
        },
    }
    if updated != final_summary:
        write_json_atomic(plan.final_dir / SUMMARY, updated)
    state.update(
        proxy=str(plan.proxy_dir), final=str(plan.final_dir), weights=weights,
        reference_steps=ref_steps, proxy_steps=proxy_steps, last_call=statuses,
        final_avg_test_ppl=updated["test"]["avg_ppl"],
    )  # fmt: skip
    write_json_atomic(state_path, state)
    return PipelineResult(
        weights=weights, final=updated, statuses=statuses,
        reference_steps=ref_steps, proxy_steps=proxy_steps,
    )  # fmt: skip


def _learned_weights(proxy_summary: dict[str, Any], proxy_dir: Path) -> dict[str, float]:
    """The proxy's ``weights_final`` (the average α), renormalised so the sum is 1 to the bit
    the fixed mixer checks."""
    w = proxy_summary.get("weights_final")
    if not isinstance(w, dict) or not w:
        raise MixlabError(f"{proxy_dir / SUMMARY} has no weights_final; rerun with --force.")
    total = sum(float(v) for v in w.values())
    if not total > 0:
        raise MixlabError(f"{proxy_dir / SUMMARY}: weights_final {w} has no positive weight.")
    return {d: float(v) / total for d, v in w.items()}
