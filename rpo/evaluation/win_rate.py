"""Win rate of pairwise judgements, ties counted half, with a Wilson score 95% confidence interval."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Two-sided 95% normal quantile, Φ⁻¹(0.975).
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class WinRate:
    wins: int
    losses: int
    ties: int
    invalid: int  # judgements whose verdict could not be read; excluded from n and reported
    n: int  # wins + losses + ties
    win_rate: float  # (wins + ties / 2) / n
    ci_low: float
    ci_high: float
    ci_method: str = "wilson"
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(p_hat: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion p_hat observed over n trials.

    With ties scored 0.5 the per-comparison scores vary less than Bernoulli draws, so the interval is
    slightly conservative (wider than the truth), never optimistic.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1 comparisons, got n={n}")
    if not 0.0 <= p_hat <= 1.0:
        raise ValueError(f"wilson_interval needs 0 <= p_hat <= 1, got {p_hat}")
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p_hat + z2 / (2 * n)) / denom
    half_width = z * math.sqrt(p_hat * (1.0 - p_hat) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def win_rate(wins: int, losses: int, ties: int, invalid: int = 0) -> WinRate:
    """Win rate (wins + ties/2) / (wins + losses + ties) and its Wilson 95% interval."""
    for name, value in (("wins", wins), ("losses", losses), ("ties", ties), ("invalid", invalid)):
        if value < 0:
            raise ValueError(f"win_rate: {name} must be >= 0, got {value}")
    n = wins + losses + ties
    if n == 0:
        raise ValueError(
            f"win_rate: no valid judgement to count ({invalid} invalid verdicts); check the judge's output"
        )
    p_hat = (wins + 0.5 * ties) / n
    low, high = wilson_interval(p_hat, n)
    return WinRate(wins=wins, losses=losses, ties=ties, invalid=invalid, n=n, win_rate=p_hat, ci_low=low, ci_high=high)
