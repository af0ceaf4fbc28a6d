"""The Visual Decathlon score and the `python -m training` command line."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from training.__main__ import main
from training.decathlon import BASELINE_ACCURACY, canonical_domain, decathlon_score, domain_score

# DAN (Rosenfeld & Tsotsos), as published with the challenge results: S = 2851.
DAN = {
    "imnet": 57.74,
    "aircraft": 64.12,
    "c100": 80.07,
    "dped": 91.30,
    "dtd": 56.54,
    "gtsrb": 98.46,
    "flowers": 86.05,
    "omniglot": 89.67,
    "svhn": 96.77,
    "ucf": 49.38,
}


def test_dan_published_score():
    scores = decathlon_score(DAN)
    assert abs(scores["total"] - 2851) < 3
    assert set(scores) == set(BASELINE_ACCURACY) | {"total"}
    assert scores["total"] == pytest.approx(sum(v for k, v in scores.items() if k != "total"))


def test_fractions_equal_percentages():
    percent = decathlon_score(DAN)
    fraction = decathlon_score({k: v / 100 for k, v in DAN.items()})
    assert fraction == pytest.approx(percent)


def test_baseline_scores_250_and_perfect_1000():
    for domain, accuracy in BASELINE_ACCURACY.items():
        assert domain_score(domain, accuracy) == pytest.approx(250.0)
        assert domain_score(domain, 100.0) == pytest.approx(1000.0)
    assert decathlon_score(BASELINE_ACCURACY)["total"] == pytest.approx(2500.0)


def test_twice_the_baseline_error_scores_zero():
    for domain, accuracy in BASELINE_ACCURACY.items():
        doubled = 100.0 - 2 * (100.0 - accuracy)
        assert domain_score(domain, max(doubled, 0.0)) == pytest.approx(0.0, abs=1e-9)
        assert domain_score(domain, max(doubled - 5, 0.0)) == 0.0
    assert decathlon_score({"svhn": 90.0})["total"] == 0.0  # baseline error 3.45: 10 > 6.9


def test_aliases_and_errors():
    assert canonical_domain(" ImNet ") == "imagenet12"
    assert canonical_domain("vgg_flowers") == "vgg-flowers"
    with pytest.raises(ValueError, match="Unknown Decathlon domain 'mnist'"):
        decathlon_score({"mnist": 99.0})
    with pytest.raises(ValueError, match="at least one"):
        decathlon_score({})
    with pytest.raises(ValueError, match=r"percentage in \[0, 100\]"):
        decathlon_score({"dtd": 120.0, "svhn": 96.0})


# ----- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [[], ["pretrain"], ["scratch"], ["adapt"], ["finetune"], ["evaluate"], ["decathlon-score"]]
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m training")
    if argv in (["pretrain"], ["scratch"]):
        assert "--width" in out and "--input-size" in out and "--backbone" not in out
    if argv in (["adapt"], ["finetune"]):
        assert "--backbone" in out and "--source" in out and "--wd-adapter" in out
    if not argv:
        assert all(c in out for c in ("pretrain", "adapt", "finetune", "scratch", "evaluate", "decathlon-score"))


def test_missing_required_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["adapt", "--data", "x", "--domain", "d", "--out", "o"])  # no --backbone
    assert info.value.code == 2
    assert "--backbone" in capsys.readouterr().err


def test_decathlon_score_json(capsys):
    argv = ["decathlon-score", "--json"] + [f"--acc={k}={v}" for k, v in DAN.items()]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(result["total"] - 2851) < 3
    assert result["imagenet12"] == pytest.approx(decathlon_score(DAN)["imagenet12"], abs=0.01)


def test_decathlon_score_from_file_and_table(tmp_path, capsys):
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"dtd": 55.53, "svhn": 96.55}))
    assert main(["decathlon-score", "--accuracies", str(path), "--acc", "ucf=100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: float(line.split()[1]) for line in lines}
    assert table == {"dtd": 250.0, "svhn": 250.0, "ucf101": 1000.0, "total": 1500.0}


def test_decathlon_score_errors_are_reported(capsys):
    assert main(["decathlon-score", "--acc", "mnist=99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown Decathlon domain") and "Traceback" not in err
    assert main(["decathlon-score"]) == 2
    assert capsys.readouterr().err.startswith("error: Give at least one")


def test_bad_data_path(tmp_path, capsys):
    code = main(
        [
            "pretrain",
            "--data",
            str(tmp_path / "nowhere"),
            "--domain",
            "x",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--epochs",
            "1",
        ]
    )
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "does not exist" in captured.err
    assert "Traceback" not in captured.err


def test_bad_data_content(tmp_path, capsys):
    (tmp_path / "only" / "a").mkdir(parents=True)
    code = main(
        ["scratch", "--data", str(tmp_path / "only"), "--domain", "x", "--out", str(tmp_path / "out"), "--no-progress"]
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("error: The class folder")


def test_evaluate_missing_files(tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--backbone",
            str(tmp_path / "b.safetensors"),
            "--bundle",
            str(tmp_path / "d.safetensors"),
            "--data",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_truncated_idx_is_an_error_not_a_crash(tmp_path, capsys):
    root = tmp_path / "mnist"
    root.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8).tobytes()  # incompressible
    compressed = gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 4, 8, 8) + pixels)
    (root / "train-images-idx3-ubyte.gz").write_bytes(compressed[: len(compressed) // 2])
    labels = bytes([0, 0, 8, 1]) + struct.pack(">I", 4) + bytes([0, 1, 0, 1])
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    code = main(
        [
            "pretrain",
            "--data",
            str(root),
            "--domain",
            "x",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--epochs",
            "1",
            "--width",
            "0.125",
            "--input-size",
            "8",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("error: ")
