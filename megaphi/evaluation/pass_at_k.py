"""Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k) for n samples with c correct.

Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the (huge) binomials.
"""

from typing import Dict, Iterable, Sequence

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n is correct."""
    n, c = int(num_samples), int(num_correct)
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= num_correct <= num_samples, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= num_samples, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(counts: Iterable[Sequence[int]], ks: Iterable[int]) -> Dict[str, float]:
    """counts: (n, c) per problem. Returns {"pass@k": mean over problems} for each k <= every n."""
    counts = [(int(n), int(c)) for n, c in counts]
    if not counts:
        return {}
    smallest_n = min(n for n, _ in counts)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks if 1 <= k <= smallest_n}
