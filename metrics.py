"""
Sample-quality yardsticks: numbers to compare runs, samplers, CFG scales and checkpoints by.

- Frechet distance (FD) between two sets of features, each summarised as a Gaussian (mean, covariance):
  |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2) (Heusel et al. 2017, as FID). FD is biased
  upwards at small N, so every figure is printed with the sample counts it came from.
"""
import numpy as np


def gaussian_stats(features):
    """(mean, covariance) of features [N, D], in float64 (the unbiased covariance, as FID implementations use)."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 samples, got {len(f)}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FD between N(mu1, sigma1) and N(mu2, sigma2), in float64. tr((S1 S2)^1/2) is computed as the sum of the
    square roots of the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2 (same eigenvalues as S1 S2):
    no complex numbers from a general matrix square root, and no negative round-off under the root."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^1/2, symmetric
    m = root1 @ s2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)
