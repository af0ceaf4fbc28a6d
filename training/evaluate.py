"""Score a bundle on a labelled test set through the inference engine, exactly as it would serve."""

from __future__ import annotations

import pathlib

import numpy as np

from model.backbone import load_backbone
from model.bundle import load_bundle
from model.engine import InferenceEngine
from training.data import DataError, load_data
from training.pipeline import eval_inputs

BATCH = 128


def evaluate(
    backbone_path: pathlib.Path, bundle_path: pathlib.Path, data_spec: str, out: pathlib.Path | None = None
) -> dict:
    """Top-1, per-class accuracy and the confusion matrix (PNG in `out` when given)."""
    backbone = load_backbone(backbone_path)
    bundle = load_bundle(bundle_path, backbone)
    data = load_data(data_spec, bundle.preprocessing.resize, bundle.domain, bundle.preprocessing.grayscale)
    labels = _align_labels(data.class_names, bundle.labels, data.labels)
    engine = InferenceEngine(backbone, capacity=1, class_capacity=bundle.num_classes)
    slot = engine.load(bundle)
    inputs = eval_inputs(data, bundle.preprocessing)
    predicted = np.concatenate(
        [np.argmax(np.stack(engine.predict(inputs[i : i + BATCH], slot)), -1) for i in range(0, len(inputs), BATCH)]
    )
    k = bundle.num_classes
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {
        name: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
        for i, name in enumerate(bundle.labels)
    }
    metrics = {
        "domain": bundle.domain,
        "test_top1": float(np.mean(predicted == labels)),
        "images": len(labels),
        "skipped": len(data.skipped),
        "per_class_top1": per_class,
        "confusion": confusion.tolist(),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        metrics["confusion_png"] = str(out / f"{bundle.domain}_confusion.png")
        save_confusion(confusion, bundle.labels, pathlib.Path(metrics["confusion_png"]), bundle.domain)
    return metrics


def _align_labels(data_names: tuple[str, ...], bundle_names: tuple[str, ...], labels: np.ndarray) -> np.ndarray:
    """Map the data's label indices onto the bundle's class order (by name)."""
    if tuple(data_names) == tuple(bundle_names):
        return labels
    missing = sorted(set(data_names) - set(bundle_names))
    if missing:
        raise DataError(f"The test data has classes the bundle does not know: {missing[:10]}.")
    index = {name: i for i, name in enumerate(bundle_names)}
    return np.asarray([index[data_names[y]] for y in labels], np.int64)


def save_confusion(confusion: np.ndarray, labels: tuple[str, ...], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    size = min(12, 2 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), labels, rotation=90)
        ax.set_yticks(range(k), labels)
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        str(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: confusion")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
