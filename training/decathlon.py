"""The Visual Decathlon score (Rebuffi et al. 2017).

    S = sum over domains d of 1000 * (max(0, Emax_d - E_d) / Emax_d) ** 2,  Emax_d = 2 * baseline error

where E_d is the test error in percent and the baseline is the challenge's published one
(ResNet-26 fine-tuned per domain). A method that halves no error scores 0 on a domain; a perfect
one scores 1000, so 10 domains give at most 10,000.
"""

from __future__ import annotations

from collections.abc import Mapping

# Baseline top-1 accuracies (%) published with the challenge, by the devkit's domain names.
BASELINE_ACCURACY = {
    "imagenet12": 59.87,
    "aircraft": 60.34,
    "cifar100": 82.12,
    "daimlerpedcls": 92.82,
    "dtd": 55.53,
    "gtsrb": 97.53,
    "vgg-flowers": 81.41,
    "omniglot": 87.69,
    "svhn": 96.55,
    "ucf101": 51.20,
}
ALIASES = {
    "imnet": "imagenet12",
    "imagenet": "imagenet12",
    "c100": "cifar100",
    "dped": "daimlerpedcls",
    "flowers": "vgg-flowers",
    "vgg_flowers": "vgg-flowers",
    "ucf": "ucf101",
}


def canonical_domain(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BASELINE_ACCURACY:
        raise ValueError(
            f"Unknown Decathlon domain {name!r}; use one of {sorted(BASELINE_ACCURACY)} (aliases {sorted(ALIASES)})."
        )
    return key


def domain_score(domain: str, accuracy: float) -> float:
    """Points for one domain from its top-1 accuracy in percent."""
    error_max = 2.0 * (100.0 - BASELINE_ACCURACY[canonical_domain(domain)])
    error = 100.0 - accuracy
    return 1000.0 * (max(0.0, error_max - error) / error_max) ** 2


def decathlon_score(accuracies: Mapping[str, float]) -> dict[str, float]:
    """Per-domain points and their sum under `total`. Accuracies in percent, or all as fractions <= 1."""
    if not accuracies:
        raise ValueError("Give at least one domain's accuracy.")
    as_fraction = all(0.0 <= a <= 1.0 for a in accuracies.values())
    points = {}
    for name, accuracy in accuracies.items():
        percent = accuracy * 100.0 if as_fraction else accuracy
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"Accuracy for {name!r} must be a percentage in [0, 100]; got {accuracy}.")
        points[canonical_domain(name)] = domain_score(name, percent)
    return {**points, "total": sum(points.values())}
