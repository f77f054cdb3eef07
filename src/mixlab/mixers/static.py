"""Static baselines: the mixture is fixed before training starts.

- ``stratified``: uniform, p_i = 1/m.
- ``natural``: proportional to the tokens in each domain's train split.
- ``temperature``: p_i ∝ n_i^(1/tau) (tau = 1 is natural, tau → ∞ is stratified).
- ``fixed``: weights given by the user, per domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mixlab.errors import ConfigError
from mixlab.mixers.base import Mixer, MixerContext, Plan, check_distribution, normalize, register


def temperature_weights(tokens: np.ndarray, tau: float) -> np.ndarray:
    """p ∝ n^(1/tau) for token counts n [m]; computed in log space so huge counts do not overflow."""
    if tau <= 0:
        raise ConfigError(f"temperature tau must be > 0, got {tau}.")
    n = np.asarray(tokens, dtype=np.float64)
    if np.any(n <= 0):
        raise ConfigError("temperature sampling needs every domain to have tokens.")
    z = np.log(n) / tau
    e = np.exp(z - z.max())
    return e / e.sum()


class _Static(Mixer):
    def __init__(self, config, ctx: MixerContext):
        super().__init__(config, ctx)
        self.weights = check_distribution(self.compute(), f"mixer '{self.name}' weights")

    def compute(self) -> np.ndarray:
        raise NotImplementedError

    def plan(self, step: int) -> Plan:
        return Plan(weights=self.weights)


@register("stratified")
class Stratified(_Static):
    """Uniform over domains."""

    def compute(self) -> np.ndarray:
        return np.full(self.ctx.m, 1.0 / self.ctx.m)


@register("natural")
class Natural(_Static):
    """Proportional to the train tokens of each domain."""

    def compute(self) -> np.ndarray:
        return normalize(self.ctx.train_tokens)


@register("temperature")
class Temperature(_Static):
    """p ∝ n_i^(1/tau)."""

    @dataclass
    class Config:
        tau: float = 2.0
        """Temperature; 1 = natural proportions, larger values flatten toward uniform."""

        def __post_init__(self) -> None:
            if self.tau <= 0:
                raise ConfigError(f"tau must be > 0, got {self.tau}.")

    def compute(self) -> np.ndarray:
        return temperature_weights(self.ctx.train_tokens, self.config.tau)


@register("fixed")
class Fixed(_Static):
    """Weights given per domain; they must be non-negative and sum to 1."""

    @dataclass
    class Config:
        weights: dict[str, float] = field(default_factory=dict)
        """Weight of each domain, e.g. {code = 0.5, legal = 0.5}; every domain must be listed."""

    def compute(self) -> np.ndarray:
        given = self.config.weights
        unknown = sorted(set(given) - set(self.ctx.domains))
        if unknown:
            raise ConfigError(
                f"mixer.options.weights names unknown domain(s) {unknown}; "
                f"domains are {self.ctx.domains}."
            )
        missing = [d for d in self.ctx.domains if d not in given]
        if missing:
            raise ConfigError(f"mixer.options.weights is missing domain(s) {missing}.")
        return np.array([given[d] for d in self.ctx.domains], dtype=np.float64)
