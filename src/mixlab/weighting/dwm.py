"""The stateful Data Weighting Model of a run: weights, bi-level updates, stages, analysis, files.

The trainer asks it for the weights of each micro-batch (``weights``), hands it the factorised
hypergradient at the steps where it trains (``trains_at`` / ``update``), and tells it which
weights each step used (``record``) for the per-stage analysis. Everything it keeps is in
``state_dict`` (a resumed run continues bit for bit). ``save`` writes the network with what it
needs to be checked on load (its shape, the tokenizer's hash, the domains); ``load_net`` reads
it back for transfer to another run, typically one with a bigger LM.

It is the weighter registered as ``"dwm"`` (``[weighting] name = "dwm"``), its options
``[weighting.options]`` checked against ``DWMConfig`` (``mixlab.weighting.config``). It draws
its validation windows itself; the session computes the hypergradient it trains on
(``WeightingSignals.hypergradient``, with ``mixlab.weighting.bilevel``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mixlab import __version__
from mixlab.data.sampler import MixtureSampler
from mixlab.errors import CheckpointError, ConfigError
from mixlab.weighting.base import Weighter, WeighterContext, WeightingSignals, register_weighter
from mixlab.weighting.config import DWMConfig
from mixlab.weighting.model import NetSpec, WeightingNet, batch_weights, standardise

MODEL_FILE = "dwm.safetensors"
ANALYSIS_FILE = "dwm.json"
FORMAT = 1
SNIPPET_TOKENS = 48
SEED_OFFSET = 4_099
VAL_SEED_OFFSET = 2_000_029
"""The validation windows of ``validation = 'val'`` come from a stream seeded ``seed + VAL_SEED_OFFSET``."""


def spec_from_config(cfg: DWMConfig, vocab_size: int, n_domains: int) -> NetSpec:
    return NetSpec(
        vocab_size=vocab_size, n_domains=n_domains, d_embed=cfg.d_embed, kernel=cfg.kernel,
        hidden=cfg.hidden, max_tokens=cfg.max_tokens, use_domain=cfg.use_domain,
        use_loss=cfg.use_loss, use_progress=cfg.use_progress,
    )


def _resolve_model_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.exists():
        raise ConfigError(
            f"weighting.options.load: no weighting model at '{p}'; give a run dir trained with "
            f"weighting.name = 'dwm' (it holds {MODEL_FILE}) or the file itself."
        )
    return p


def canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` with ``metadata``, the same for equal inputs.

    safetensors (0.8) serialises its header from a Rust HashMap: the order of the metadata keys
    changes from one call to the next, in one process too, so equal models gave files with
    different hashes. The header is rewritten as canonical JSON (keys sorted, no spaces, padded
    with spaces to a multiple of 8 bytes as safetensors pads it); the data section and its
    offsets are safetensors' own (tensors laid out by dtype, then name), so the file reads back
    with any safetensors loader.
    """
    from safetensors.torch import save

    raw = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=dict(metadata))
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def save_net(net: WeightingNet, path: Path, tokenizer_sha256: str, domains: list[str],
             updates: int) -> None:
    """Write the network and its metadata atomically (safetensors), byte for byte the same for
    the same network and metadata (``canonical_safetensors``)."""
    meta = {
        "format": str(FORMAT),
        "mixlab_version": __version__,
        "spec": json.dumps(net.spec.__dict__, sort_keys=True),
        "tokenizer_sha256": tokenizer_sha256,
        "domains": json.dumps(domains),
        "updates": str(updates),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(canonical_safetensors(net.state_dict(), meta))
    tmp.replace(path)


def load_net(path: str | Path, tokenizer_sha256: str, domains: list[str]) -> tuple[WeightingNet, dict[str, Any]]:
    """Read a saved weighting model; refuse one that does not fit this data (tokenizer, domains)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = _resolve_model_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"cannot read the weighting model '{p}': {e}") from None
    if meta.get("format") != str(FORMAT):
        raise CheckpointError(
            f"'{p}' is a weighting model of format {meta.get('format')!r}; this mixlab "
            f"({__version__}) reads format {FORMAT}."
        )
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise ConfigError(
            f"the weighting model '{p}' was trained with a different tokenizer (sha256 "
            f"{str(meta.get('tokenizer_sha256'))[:12]}…, this data dir's is {tokenizer_sha256[:12]}…): "
            "its token embeddings would read other tokens. Prepare the data with the same "
            "tokenizer (mixlab prepare --tokenizer) or train a new weighting model."
        )
    spec = NetSpec(**json.loads(meta["spec"]))
    saved_domains = json.loads(meta.get("domains", "[]"))
    if spec.use_domain and saved_domains != domains:
        raise ConfigError(
            f"the weighting model '{p}' reads the domain and was trained on domains "
            f"{saved_domains}; this run has {domains}."
        )
    if not spec.use_domain and spec.n_domains != len(domains):
        spec = NetSpec(**{**spec.__dict__, "n_domains": len(domains)})
    net = WeightingNet(spec)
    # Files written before the head lost its bias (a shift common to the batch, which the
    # softmax ignores) carry a 'head.bias': dropping it leaves every weight unchanged.
    tensors.pop("head.bias", None)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"the weighting model '{p}' does not match its recorded shape: {e}") from None
    return net, meta


class _StageStats:
    """Per-stage analysis: weight sums per domain and the extreme samples (plain lists)."""

    @staticmethod
    def new(m: int) -> dict[str, Any]:
        return {"weight_sum": [0.0] * m, "count": [0] * m, "top": [], "bottom": []}

    @staticmethod
    def add(stats: dict[str, Any], weights: np.ndarray, domains: np.ndarray) -> None:
        ws = np.bincount(domains, weights=weights, minlength=len(stats["count"]))
        cs = np.bincount(domains, minlength=len(stats["count"]))
        stats["weight_sum"] = [a + float(b) for a, b in zip(stats["weight_sum"], ws)]
        stats["count"] = [a + int(b) for a, b in zip(stats["count"], cs)]

    @staticmethod
    def keep_extremes(stats: dict[str, Any], entries: list[dict[str, Any]], k: int) -> None:
        if k == 0:
            return
        # Ties broken by step then domain, so the kept samples do not depend on arrival order.
        stats["top"] = sorted(stats["top"] + entries, key=lambda e: (-e["weight"], e["step"], e["index"]))[:k]
        stats["bottom"] = sorted(stats["bottom"] + entries, key=lambda e: (e["weight"], e["step"], e["index"]))[:k]


@register_weighter("dwm")
class DataWeighter(Weighter):
    """The Data Weighting Model of one run (see the module docstring)."""

    Config: ClassVar[type] = DWMConfig
    needs: ClassVar[frozenset[str]] = frozenset({"full_model"})
    needs_hint: ClassVar[str] = (
        "or use a trained weighting model frozen (weighting.options.load + "
        "weighting.options.frozen = true)"
    )

    @classmethod
    def needs_for(cls, config: DWMConfig) -> frozenset[str]:
        # Bi-level updates measure per-sample alignments on the whole LM; a frozen model only
        # scores samples.
        return frozenset() if config.frozen else cls.needs

    def __init__(self, config: DWMConfig, ctx: WeighterContext):
        super().__init__(config, ctx)
        cfg = config
        self.domains = list(ctx.domains)
        self.tokenizer_sha256 = ctx.tokenizer_sha256
        self.total_steps = ctx.total_steps
        self.loaded_from = ""
        mode = cfg.validation
        if mode == "auto":
            mode = "target" if ctx.target_probe is not None else "val"
        if mode == "target" and ctx.target_probe is None:
            raise ConfigError(
                "weighting.options.validation = 'target' needs a target set (target.path or target.domain)."
            )
        self.mode = mode
        self.val_batch = cfg.val_batch or ctx.batch_size
        if self.val_batch % ctx.world:
            raise ConfigError(
                f"weighting.options.val_batch {self.val_batch} must be divisible by the number of "
                f"processes {ctx.world}."
            )
        # Built under its own seed, so adding a weighting model does not move the LM's init or
        # dropout streams.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + SEED_OFFSET)
            if cfg.load:
                self.net, _ = load_net(cfg.load, ctx.tokenizer_sha256, self.domains)
                self.loaded_from = str(_resolve_model_file(cfg.load))
            else:
                self.net = WeightingNet(spec_from_config(cfg, ctx.vocab_size, len(self.domains)))
        if self.net.spec.vocab_size != ctx.vocab_size:
            raise ConfigError(
                f"the weighting model reads {self.net.spec.vocab_size} token ids; the data has "
                f"{ctx.vocab_size}."
            )
        self.net.to(ctx.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.updates = 0
        self.skipped = 0
        m = len(self.domains)
        self.stages: list[dict[str, Any]] = [_StageStats.new(m) for _ in range(cfg.stages)]
        self._window = _StageStats.new(m)
        self.last_hyper_norm = 0.0
        # The validation windows of 'val': every domain equally, from their own stream (so the
        # LM's data order does not move); 'target' draws from the probe windows by step.
        self.val_sampler: MixtureSampler | None = None
        if mode == "val" and ctx.data is not None:
            self.val_sampler = MixtureSampler(
                ctx.data, "val", ctx.seq_len, self.val_batch, ctx.seed + VAL_SEED_OFFSET,
                ctx.rank, ctx.world, self.domains,
            )

    # ----------------------------------------------------------------- schedule

    def stage_start(self, s: int) -> int:
        return s * self.total_steps // self.config.stages

    def stage(self, step: int) -> int:
        """The last stage s with ``stage_start(s) <= step``: floor(s·T/S) <= step holds exactly
        when s < (step + 1)·S/T."""
        return min(self.config.stages - 1, ((step + 1) * self.config.stages - 1) // self.total_steps)

    def trains_at(self, step: int) -> bool:
        """True at the first ``updates_per_stage`` steps of each stage (never when frozen)."""
        if self.config.frozen:
            return False
        return step - self.stage_start(self.stage(step)) < self.config.updates_per_stage

    @property
    def training_updates(self) -> int:
        """Bi-level updates the schedule asks for over the whole run."""
        if self.config.frozen:
            return 0
        return sum(
            min(self.config.updates_per_stage, self.stage_start(s + 1) - self.stage_start(s))
            for s in range(self.config.stages)
        )

    # ----------------------------------------------------------------- weights and updates

    def scores(self, tokens: torch.Tensor, domains: torch.Tensor | None, losses: torch.Tensor | None,
               step: int, group: int = 0) -> torch.Tensor:
        """[b] scores of ``tokens`` [b, T+1] (losses standardised within groups of ``group``)."""
        dev = next(self.net.parameters()).device
        feat = standardise(losses.to(dev), group) if losses is not None and self.net.spec.use_loss else None
        return self.net(
            tokens[:, :-1].to(dev), None if domains is None else domains.to(dev), feat,
            step / max(1, self.total_steps),
        )

    def weights(self, step: int, tokens: torch.Tensor, domains: torch.Tensor,
                losses: torch.Tensor) -> torch.Tensor:
        """[b] weights (mean 1, no graph) of one micro-batch: ``tokens`` [b, T+1], ``domains``
        [b], ``losses`` [b] the LM's per-sample losses (read only if the model uses them)."""
        with torch.no_grad():
            return batch_weights(self.scores(tokens, domains, losses, step).float(), self.config.tau,
                                 max_weight=self.config.max_weight)

    def val_tokens(self, step: int) -> torch.Tensor:
        """This rank's share [val_batch / world, T+1] of the validation windows for ``step``."""
        ctx = self.ctx
        if self.mode == "val":
            if self.val_sampler is None:
                raise ConfigError("DWM with validation = 'val' needs the run's data dir (WeighterContext.data).")
            m = len(self.domains)
            return self.val_sampler.next_batch(weights=np.full(m, 1.0 / m)).tokens
        probe = ctx.target_probe
        assert probe is not None  # checked in __init__
        # Seeded by the step, so it needs no state to resume exactly.
        rng = np.random.default_rng([ctx.seed, 13, step])
        idx = rng.integers(0, probe.shape[0], self.val_batch)
        per = self.val_batch // ctx.world
        return probe[torch.from_numpy(idx[ctx.rank * per : (ctx.rank + 1) * per])]

    def update(self, step: int, signals: WeightingSignals) -> bool:
        """The bi-level update at ``step``: the session's hypergradient of this step's weights
        against the validation windows, then one Adam step of the network."""
        cfg = self.config
        hyper = signals.hypergradient(
            self.val_tokens(step), self.weights, eta=cfg.lookahead_lr or signals.lr,
            precondition=cfg.precondition, method=cfg.method,
        )
        return self.apply_hypergradient(hyper, signals.tokens, signals.domains, signals.losses, step,
                                        signals.micro, signals.reduce_grads)

    def apply_hypergradient(self, hyper: torch.Tensor, tokens: torch.Tensor, domains: torch.Tensor,
                            losses: torch.Tensor, step: int, group: int,
                            reduce_grads: Callable[[nn.Module], None] | None = None) -> bool:
        """One step of the weighting model from ``hyper`` [b] = ∂L_val/∂w (this rank's samples,
        normalised in consecutive groups of ``group``). ``reduce_grads`` sums the network's
        gradients over ranks. Returns False (and changes nothing) for a non-finite hypergradient."""
        hyper = hyper.detach().float()
        finite = bool(torch.isfinite(hyper).all())
        if not finite:
            self.skipped += 1
            return False
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            w = batch_weights(self.scores(tokens, domains, losses, step, group).float(), self.config.tau, group,
                              self.config.max_weight)
            (w * hyper.to(w.device)).sum().backward()
        if reduce_grads is not None:
            reduce_grads(self.net)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.last_hyper_norm = float(hyper.norm())
        return True

    def record(self, step: int, weights: np.ndarray, domains: np.ndarray,
               local_tokens: torch.Tensor | None = None, local_weights: np.ndarray | None = None,
               local_domains: np.ndarray | None = None) -> None:
        """Add one step's weights [B] and domains [B] (the global batch) to the analysis; the
        extreme samples come from ``local_tokens`` [b, T+1] (this rank's slice)."""
        w = np.asarray(weights, dtype=np.float64)
        d = np.asarray(domains, dtype=np.int64)
        stats = self.stages[self.stage(step)]
        _StageStats.add(stats, w, d)
        _StageStats.add(self._window, w, d)
        if local_tokens is not None and local_weights is not None and local_domains is not None:
            k = self.config.snippets
            order = np.argsort(local_weights, kind="stable")
            pick = sorted(set(order[:k].tolist()) | set(order[-k:].tolist())) if k else []
            entries = [
                {"weight": float(local_weights[i]), "step": step, "index": int(i),
                 "domain": self.domains[int(local_domains[i])],
                 "tokens": local_tokens[i, :SNIPPET_TOKENS].tolist()}
                for i in pick
            ]
            _StageStats.keep_extremes(stats, entries, k)

    def report(self, step: int) -> dict[str, Any]:
        """A log line's view: stage, whether it trains, mean weight per domain since the last one."""
        win = self._window
        mean = {
            d: (s / c if c else None) for d, s, c in zip(self.domains, win["weight_sum"], win["count"])
        }
        self._window = _StageStats.new(len(self.domains))
        return {"stage": self.stage(max(0, step - 1)), "updates": self.updates,
                "hyper_norm": self.last_hyper_norm, "mean_weight": mean}

    def summary(self) -> dict[str, Any]:
        return {"updates": self.updates, "skipped_updates": self.skipped,
                "scheduled_updates": self.training_updates, "validation": self.mode,
                "loaded_from": self.loaded_from, "frozen": self.config.frozen}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.net.parameters())

    # ----------------------------------------------------------------- analysis and files

    def analysis(self, decode: Callable[[list[int]], str]) -> dict[str, Any]:
        """The per-stage analysis with text snippets (``decode`` turns token ids into text)."""
        stages = []
        for s, st in enumerate(self.stages):
            mean = {d: (w / c if c else None) for d, w, c in zip(self.domains, st["weight_sum"], st["count"])}

            def snip(e: dict[str, Any]) -> dict[str, Any]:
                return {"weight": e["weight"], "step": e["step"], "domain": e["domain"], "text": decode(e["tokens"])}

            stages.append({
                "stage": s, "steps": [self.stage_start(s), self.stage_start(s + 1)],
                "samples": dict(zip(self.domains, st["count"])), "mean_weight": mean,
                "highest": [snip(e) for e in st["top"]], "lowest": [snip(e) for e in st["bottom"]],
            })
        return {"format": FORMAT, "domains": self.domains, "updates": self.updates,
                "skipped_updates": self.skipped, "loaded_from": self.loaded_from,
                "frozen": self.config.frozen, "stages": stages}

    def save(self, run_dir: Path, decode: Callable[[list[int]], str]) -> None:
        from mixlab.data.format import write_json_atomic

        save_net(self.net, run_dir / MODEL_FILE, self.tokenizer_sha256, self.domains, self.updates)
        write_json_atomic(run_dir / ANALYSIS_FILE, self.analysis(decode))

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
            "skipped": self.skipped,
            "stages": [dict(s) for s in self.stages],
            "window": dict(self._window),
            "last_hyper_norm": self.last_hyper_norm,
            **({"val_sampler": self.val_sampler.state_dict()} if self.val_sampler is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
        self.skipped = int(state["skipped"])
        self.stages = [dict(s) for s in state["stages"]]
        self._window = dict(state["window"])
        self.last_hyper_norm = float(state["last_hyper_norm"])
        if self.val_sampler is not None:
            self.val_sampler.load_state_dict(state["val_sampler"])
