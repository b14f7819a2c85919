"""Type I error of the random-readers random-cases test (pneumoscan.readerstudy.mrmc) under the null, on
studies simulated with the Roe–Metz model (Roe & Metz, Acad Radiol 1997):

    score = μ·truth + R_r + C_c + (RC)_rc + (TR)_tr + (TC)_tc + (TRC)_trc (+ the same for the error)

with no treatment effect (the same μ in both treatments), so every rejection at α is a false one.
Variance components: Roe & Metz's "HH"-like setting by default (reader 0.011, case 0.1, reader ×
case 0.2, each treatment interaction as large, error 0.2; μ = 1.5, an AUC near 0.85).

    python benchmarks/mrmc_null.py --studies 2000 --readers 5 --normal 50 --abnormal 50

Prints the share of studies whose RRRC p-value is below α, with its binomial 95 % interval, and
the time taken; a correct test lies near α (the issue's target: 0.03–0.07 at α = 0.05).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pneumoscan.readerstudy.mrmc import analyse
from pneumoscan.readerstudy.ratings import Ratings


def simulate(rng: np.random.Generator, readers: int, normal: int, abnormal: int, mu: float,
             var: dict[str, float]) -> Ratings:
    cases = normal + abnormal
    truth = np.r_[np.zeros(normal, int), np.ones(abnormal, int)]

    def draw(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return rng.normal(0.0, np.sqrt(var[key]), shape)

    r, c, rc = draw("r", (1, readers, 1)), draw("c", (1, 1, cases)), draw("rc", (1, readers, cases))
    tr, tc, trc = draw("tr", (2, readers, 1)), draw("tc", (2, 1, cases)), draw("trc", (2, readers, cases))
    scores = mu * truth[None, None, :] + r + c + rc + tr + tc + trc
    return Ratings(scores, truth, ["A", "B"], [str(k) for k in range(readers)], [str(k) for k in range(cases)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--readers", type=int, default=5)
    parser.add_argument("--normal", type=int, default=50)
    parser.add_argument("--abnormal", type=int, default=50)
    parser.add_argument("--mu", type=float, default=1.5)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    var = {"r": 0.011, "c": 0.1, "rc": 0.2, "tr": 0.011, "tc": 0.1, "trc": 0.2}
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    p_values = np.array([analyse(simulate(rng, args.readers, args.normal, args.abnormal, args.mu, var))["rrrc"]["p"]
                         for _ in range(args.studies)])
    seconds = time.perf_counter() - started
    rate = float((p_values < args.alpha).mean())
    half = 1.96 * np.sqrt(rate * (1 - rate) / args.studies)
    print(f"{args.studies} null studies ({args.readers} readers, {args.normal}+{args.abnormal} cases, μ {args.mu}): "
          f"RRRC type I error at α {args.alpha} = {rate:.4f} (95 % CI {rate - half:.4f}–{rate + half:.4f}); "
          f"{seconds:.0f} s ({1000 * seconds / args.studies:.1f} ms a study)")


if __name__ == "__main__":
    main()
