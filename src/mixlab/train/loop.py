"""The reference training loop. It owns the model, the optimizer, the data and the schedule;
the mixer only plans mixtures and observes signals.

One step, in order::

    plan   = mixer.plan(step)                      # mixture (or exact counts) for this step
    batch  = sampler.next_batch(plan)               # the global batch, this rank's slice
    losses = per-sample losses, weighted by w_i / q_i when the plan re-weights the loss
    skip the update if the loss is NaN/inf (counted; the mixer never sees it)
    clip, AdamW step at lr_at(step)
    mixer.observe(step, signals)                    # signals computed only when asked for
    log / evaluate / checkpoint
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixlab import __version__
from mixlab.config import to_dict
from mixlab.data.format import DataDir, write_json_atomic
from mixlab.errors import CheckpointError, ConfigError, MixlabError, Stopped
from mixlab.model import build_model, count_parameters, per_sample_loss, token_losses
from mixlab.report.runs import with_input_steps
from mixlab.train import fsdp
from mixlab.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_model,
    load_run_model,
    save_checkpoint,
    save_model,
)
from mixlab.train.config import TrainConfig
from mixlab.train.distributed import (
    DistInfo,
    all_reduce_max,
    any_rank,
    barrier,
    gather_objects,
    init_from_env,
)
from mixlab.train.evaluate import mean_losses
from mixlab.train.memory import check_memory
from mixlab.train.preempt import StopRequests
from mixlab.train.schedule import lr_at
from mixlab.train.session import (
    DEFAULT_PROVIDES,
    ActiveStep,
    MixingSession,
    RunView,
    StepResult,
    check_batch,
)
from mixlab.train.trackers import MetricsWriter, require_trackers

__all__ = ["TIMING_KEYS", "Trainer", "build_optimizer", "load_run_model", "train"]

# Fields of summary.json that measure time and so differ between otherwise identical runs.
TIMING_KEYS = ("wall_time_s", "tokens_per_s")


@dataclass
class LoopState:
    """Counters of the loop, saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    elapsed_s: float = 0.0
    weights_sum: list[float] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = '{name}' but CUDA is not available; use 'cpu' or 'auto'.")
    return dev


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (biases, norms and 1-D params are not decayed)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    o = cfg.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )


class Trainer:
    """One training run. ``Trainer(cfg, out_dir).run()`` returns the summary dict."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        self.dist = dist_info or init_from_env(self.device.type)
        rank, world_size = self.dist.rank, self.dist.world_size
        self.rank, self.world = rank, world_size
        self.is_main = self.dist.is_main
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast: Callable[[], contextlib.AbstractContextManager] = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if use_bf16
            else contextlib.nullcontext
        )
        check_batch(cfg, world_size)

        require_trackers(cfg.log)  # a missing tracker package fails before any data is read
        self.data = DataDir.open(cfg.data.dir)
        seq = cfg.data.seq_len
        # Refuse a config that cannot fit before allocating anything (the kernel would kill it).
        check_memory(cfg, self.data.vocab_size, self.device, world_size, use_bf16)

        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, self.data.vocab_size, seq).to(self.device)
        # The module that trains: DDP averages gradients over ranks. Everything else (eval,
        # alignment, checkpoints) uses the bare model, identical on every rank.
        self.train_model: torch.nn.Module = self.model
        # FSDP shards the model in place: then self.model *is* the sharded module, every use of
        # it is a collective, and the helpers of mixlab.train.fsdp stand in where that matters.
        self.sharded = self.dist.enabled and t.parallel == "fsdp"
        if self.sharded:
            fsdp.shard_model(self.model, self.dist)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.model, cfg)
        # Everything about mixing (samplers, mixer, eval and target sets, reference, DWM,
        # signals) lives in the session; the loop hands it a view of the model and optimizer.
        view = RunView(
            model=self.model, device=self.device, dist=self.dist, autocast=self.autocast,
            optimizer=self.optimizer, lr_at=lambda step: lr_at(step, **self._lr_args()),
            mean_losses=fsdp.mean_losses if self.sharded else mean_losses,
            provides=fsdp.PROVIDES if self.sharded else DEFAULT_PROVIDES,
            new_optimizer=lambda branch: build_optimizer(branch, cfg),
        )
        self.session = MixingSession(cfg, view, self.data)
        self.domains = self.session.domains
        self.m = self.session.m

        self.state = LoopState(weights_sum=[0.0] * self.m)
        self.window = _LogWindow(self.m)
        self.config_dict = to_dict(cfg)

    # ---------------------------------------------------------------- the loop

    def _lr_args(self) -> dict[str, Any]:
        o = self.cfg.optim
        return {
            "lr": o.lr,
            "warmup_steps": o.warmup_steps,
            "total_steps": self.cfg.train.steps,
            "min_lr_ratio": o.min_lr_ratio,
        }

    def train_step(self, step: int) -> tuple[ActiveStep, StepResult | None]:
        """Optimizer step ``step``: the session's step, and its result (None if skipped)."""
        t = self.cfg.train
        st = self.session.begin_step(step, t.grad_accum)
        for group in self.optimizer.param_groups:
            group["lr"] = st.lr
        self.optimizer.zero_grad(set_to_none=True)
        # DoReMi's per-token excess reads the token losses of this very forward (pre-step θ).
        keep_tokens = self.session.wants_token_losses
        for k in range(t.grad_accum):
            tokens = st.tokens(k).to(self.device, non_blocking=True)
            last = k == t.grad_accum - 1
            # Gradients are averaged over ranks once, on the last micro-batch.
            if last or not self.dist.enabled:
                sync: contextlib.AbstractContextManager = contextlib.nullcontext()
            else:
                sync = fsdp.no_sync(self.model) if self.sharded else self.train_model.no_sync()
            with sync:
                tok = None
                with self.autocast():
                    if keep_tokens:  # token_losses(...).mean(1) is per_sample_loss's ops
                        tok = token_losses(self.train_model(tokens[:, :-1]), tokens[:, 1:])
                        losses = tok.mean(dim=1)
                    else:
                        losses = per_sample_loss(self.train_model, tokens)
                loss = self.session.loss(st, k, losses, tok)
                # Every rank must take the same branch, or the gradient all-reduce would hang.
                if any_rank(not bool(torch.isfinite(loss)), self.dist):
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.sharded:  # earlier micro-batches' gradients, not yet reduced
                        fsdp.drop_unsynced_grads(self.model)
                    return st, None
                loss.backward()
        self.session.before_optimizer_step(st)
        if self.cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            if not torch.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                return st, None
        self.optimizer.step()
        return st, self.session.end_step(st)

    def evaluate(self, split: str = "val") -> dict[str, Any]:
        return self.session.evaluate(split)

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            # FSDP: the full state gathered to rank 0, in the one-process layout.
            "optimizer": (fsdp.full_optimizer_state(self.model, self.optimizer) if self.sharded
                          else self.optimizer.state_dict()),
            **self.session.state_dict(),
            # Dropout streams differ per rank, so every rank's generator state is kept.
            "rng": {"torch": gather_objects(torch.get_rng_state(), self.dist)},
            "log_window": self.window.state_dict(),
            "loop": {
                "step": s.step,
                "tokens": s.tokens,
                "nonfinite_total": s.nonfinite_total,
                "nonfinite_streak": s.nonfinite_streak,
                "elapsed_s": s.elapsed_s,
                "weights_sum": list(s.weights_sum),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sharded:
            fsdp.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.session.load_state_dict(state)
        rng = state["rng"]["torch"]
        if len(rng) != self.world:
            raise CheckpointError(
                f"the checkpoint was written by {len(rng)} processes and this run has "
                f"{self.world}; resume with --nproc_per_node {len(rng)}."
            )
        torch.set_rng_state(rng[self.rank])
        self.window.load_state_dict(state["log_window"])
        self.state = LoopState(**state["loop"])

    def checkpoint(self) -> Path | None:
        state = self.state_dict()  # collective under DDP: every rank takes part
        weights = self._model_weights()
        path = None
        if self.is_main:
            path = save_checkpoint(
                self.out / "checkpoints", self.state.step, weights, state,
                self.config_dict, self.cfg.checkpoint.keep,
            )
        barrier(self.dist)
        return path

    def _model_weights(self) -> torch.nn.Module | dict[str, torch.Tensor]:
        """What rank 0 saves as model.safetensors: the model, or under FSDP its full state
        gathered to rank 0 (a collective: every rank calls this)."""
        return fsdp.full_model_state(self.model) if self.sharded else self.model

    def _resume(self) -> bool:
        ckpts = list_checkpoints(self.out / "checkpoints")
        if not ckpts:
            return False
        _, state = load_checkpoint(ckpts[-1], self.config_dict)
        if self.sharded:
            fsdp.load_full_model_state(self.model, ckpts[-1] / "model.safetensors")
        else:
            load_model(self.model, ckpts[-1] / "model.safetensors")
        self.load_state_dict(state)
        if self.is_main:  # one writer: two ranks replacing the same file race (seen in CI)
            _truncate_metrics(self.out / "metrics.jsonl", self.state.step)
        return True

    def _prepare_out_dir(self, resume: bool) -> bool:
        """Create the run dir; returns True when resuming from a checkpoint."""
        self.out.mkdir(parents=True, exist_ok=True)
        has_ckpt = bool(list_checkpoints(self.out / "checkpoints"))
        has_metrics = (self.out / "metrics.jsonl").exists()
        if not resume and (has_ckpt or has_metrics or (self.out / "summary.json").exists()):
            raise MixlabError(
                f"run dir '{self.out}' already holds a run; pass --resume to continue it or "
                "choose another --out."
            )
        barrier(self.dist)  # every rank has looked before rank 0 writes anything
        if self.is_main:
            import tomli_w

            (self.out / "config.toml").write_text(tomli_w.dumps(self.config_dict), encoding="utf-8")
        resumed = self._resume() if resume else False
        if resume and not resumed and has_metrics and self.is_main:
            (self.out / "metrics.jsonl").unlink()  # a killed run with no checkpoint starts over
        return resumed

    def _one_step(self, metrics: MetricsWriter, bar: Any, t0: float, log: Callable[[str], None]) -> None:
        """Plan, train, observe, log and evaluate one step (checkpoints are the caller's)."""
        t = self.cfg.train
        step = self.state.step
        st, result = self.train_step(step)
        plan = st.plan
        self.state.step += 1
        self.state.tokens += t.batch_size * self.cfg.data.seq_len
        self.state.weights_sum = [a + float(b) for a, b in zip(self.state.weights_sum, plan.weights)]
        if result is None:
            self.state.nonfinite_total += 1
            self.state.nonfinite_streak += 1
            log(f"step {step + 1}: non-finite loss, update skipped")
            if self.state.nonfinite_streak >= t.max_nonfinite:
                self.state.elapsed_s = time.perf_counter() - t0
                ckpt = self.checkpoint()
                raise MixlabError(
                    f"{self.state.nonfinite_streak} consecutive steps had a NaN/inf loss "
                    f"(at step {step + 1}); stopped with a checkpoint at {ckpt}. Lower "
                    "optim.lr or check the data, then resume with --resume."
                )
        else:
            self.state.nonfinite_streak = 0
            self.window.add(result.loss, result.sample_losses, result.domains)
        done = self.state.step
        elapsed = time.perf_counter() - t0
        if done % t.log_every == 0 or done == t.steps:
            rec = self.window.flush(self.domains)
            rec.update(
                kind="train", step=done, tokens=self.state.tokens,
                lr=lr_at(step, **self._lr_args()),
                weights=dict(zip(self.domains, map(float, plan.weights))),
                phase=plan.phase, nonfinite=self.state.nonfinite_total,
                tokens_per_s=self.state.tokens / max(elapsed, 1e-9), elapsed_s=elapsed,
            )
            if plan.loss_weights is not None:
                rec["loss_weights"] = dict(zip(self.domains, map(float, plan.loss_weights)))
            rec.update(self.session.report(done))
            metrics.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}" if rec["loss"] is not None else "nan",
                            tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
        if (self.cfg.eval.every and done % self.cfg.eval.every == 0) or done == t.steps:
            ev = self.evaluate("val")
            metrics.write({"kind": "eval", "step": done, "tokens": self.state.tokens, "split": "val", **ev})
        bar.update(1)

    def run(self, resume: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Train to the end (or resume) and return the summary; writes the run dir."""
        log = log or (lambda _msg: None)
        summary_path = self.out / "summary.json"
        if resume and summary_path.exists():
            log(f"run '{self.out}' is already finished.")
            return json.loads(summary_path.read_text(encoding="utf-8"))
        resumed = self._prepare_out_dir(resume)
        t = self.cfg.train
        log(
            f"{'resuming' if resumed else 'training'} {self.cfg.model.kind} model with "
            f"{count_parameters(self.model) / 1e6:.2f}M parameters on {self.m} domains, "
            f"mixer '{self.cfg.mixer.name}', {t.steps} steps x {t.batch_size} x "
            f"{self.cfg.data.seq_len} tokens, device {self.device}"
            + (f" (from step {self.state.step})" if resumed else "")
        )
        for note in self.data.notes:
            log(f"note: {note}")
        if not resumed:
            self.session.start()
        metrics = MetricsWriter(self.out / "metrics.jsonl", self.is_main, self.cfg.log,
                                config=self.config_dict, resumed=resumed)
        bar = _progress(t.steps, self.state.step, t.progress and self.is_main)
        t0 = time.perf_counter() - self.state.elapsed_s
        last_ckpt = time.perf_counter()
        # Any way out of the loop ends the tracker runs: finished, killed (a signal) or failed
        # (the non-finite abort or an error), so no W&B or MLflow run is left RUNNING.
        with metrics:
            with StopRequests("mixlab train") as stops:
                while self.state.step < t.steps:
                    self._one_step(metrics, bar, t0, log)
                    # Checkpoints and stops happen here, between steps, where the loop's state (model,
                    # optimizer, sampler, mixer, log window) is whole: resuming is bit-identical.
                    done, now = self.state.step, time.perf_counter()
                    every, minutes = self.cfg.checkpoint.every, self.cfg.checkpoint.minutes
                    due = bool(every and done % every == 0) or bool(minutes and now - last_ckpt >= 60 * minutes)
                    signum = stops.signum or 0
                    if self.dist.enabled:  # one rank's clock or signal decides for all
                        due_all, signum = all_reduce_max(np.array([float(due), float(signum)]), self.dist)
                        due, signum = bool(due_all), int(signum)
                    if done < t.steps and (due or signum):
                        self.state.elapsed_s = now - t0
                        ckpt = self.checkpoint()
                        last_ckpt = time.perf_counter()
                        if signum:
                            bar.close()
                            name = signal.Signals(signum).name
                            raise Stopped(
                                f"{name}: stopped after step {done} with a checkpoint at {ckpt}; "
                                "continue with the same command and --resume.", signum)
            bar.close()
        self.state.elapsed_s = time.perf_counter() - t0
        self.checkpoint()
        # The steps of the runs this one read (DoReMi's reference, Aioli's prior_run) are the
        # method's extra compute: counted here, once, where every caller of train() gets them.
        summary = with_input_steps(self._summary(), self.config_dict)
        weights = self._model_weights()
        if self.is_main:
            save_model(weights, self.out / "model.safetensors")
            self.session.save_weighting(self.out)
            write_json_atomic(summary_path, summary)
        log(f"done: average test perplexity {summary['test']['avg_ppl']:.3f}; run dir {self.out}")
        return summary

    def _summary(self) -> dict[str, Any]:
        s = self.state
        val = self.evaluate("val")
        test = self.evaluate("test")
        avg = np.asarray(s.weights_sum) / max(1, s.step)
        return {
            "mixlab_version": __version__,
            "mixer": self.cfg.mixer.name,
            "seed": self.cfg.train.seed,
            "steps": s.step,
            "tokens": s.tokens,
            "domains": self.domains,
            "parameters": count_parameters(self.model),
            "test": test,
            "val": val,
            "weights_final": dict(zip(self.domains, map(float, self.session.mixer.plan(s.step).weights))),
            "weights_avg": dict(zip(self.domains, map(float, avg))),
            "tokens_per_domain": dict(zip(self.domains, map(int, self.session.sampler.tokens_drawn))),
            "epochs_per_domain": dict(zip(self.domains, map(float, self.session.sampler.epochs))),
            "nonfinite_steps": s.nonfinite_total,
            "extra_steps": self.session.extra_steps,
            **({"weighting": self.session.weighting.summary()} if self.session.weighting is not None else {}),
            "wall_time_s": s.elapsed_s,
            "tokens_per_s": s.tokens / max(s.elapsed_s, 1e-9),
        }


class _LogWindow:
    """Averages of the train loss, overall and per domain, since the last log line."""

    def __init__(self, m: int):
        self.m = m
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.n = 0.0, 0
        self.dom_sum = np.zeros(self.m)
        self.dom_n = np.zeros(self.m)

    def add(self, loss: float, sample_losses: np.ndarray, domains: np.ndarray) -> None:
        self.loss_sum += loss
        self.n += 1
        self.dom_sum += np.bincount(domains, weights=sample_losses, minlength=self.m)
        self.dom_n += np.bincount(domains, minlength=self.m)

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "n": self.n, "dom_sum": self.dom_sum.tolist(),
                "dom_n": self.dom_n.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.n = state["loss_sum"], state["n"]
        self.dom_sum = np.asarray(state["dom_sum"], dtype=np.float64)
        self.dom_n = np.asarray(state["dom_n"], dtype=np.float64)

    def flush(self, names: list[str]) -> dict[str, Any]:
        rec = {
            "loss": self.loss_sum / self.n if self.n else None,
            "domain_loss": {
                d: (float(self.dom_sum[i] / self.dom_n[i]) if self.dom_n[i] else None)
                for i, d in enumerate(names)
            },
        }
        self.reset()
        return rec


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after checkpoint ``step`` (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    os.replace(tmp, path)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    """The step bar, on a terminal only: in a log file its carriage returns are noise."""
    import sys

    from tqdm.auto import tqdm

    on_tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(total=total, initial=initial, disable=not (enabled and on_tty), unit="step",
                dynamic_ncols=True, leave=False)


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) one training run; returns the summary written to ``out_dir/summary.json``."""
    return Trainer(cfg, out_dir).run(resume=resume, log=log)
