"""The lines a citation run ends with: accuracy before and after training, per method."""

from __future__ import annotations

from rbp.apps.citation.summary import accuracy_lines


def test_accuracy_lines_before_and_after() -> None:
    unit = {"curves": {"val_acc": [0.1, 0.5], "test_acc": [0.2, 0.4]}, "best_val_acc": 0.5,
            "test_acc": 0.4}
    other = {"curves": {"val_acc": [0.3, 0.7], "test_acc": [0.4, 0.6]}, "best_val_acc": 0.7,
             "test_acc": 0.6}
    results = {"datasets": {"cora": {
        "models": {"ppr": {"rbp": {"per_seed": [unit, other]}}},
        "baselines": {"logreg": {"per_seed": [{"test_acc": 0.38}]}}}}}
    assert list(accuracy_lines(results)) == [
        "cora ppr/rbp: val acc 20.0 % untrained -> 60.0 %, test acc 30.0 % -> 50.0 % (at the "
        "best validation epoch; 2 seed(s))",
        "cora baseline logreg: test acc 38.0 % (1 seed(s))",
    ]
    assert list(accuracy_lines({})) == []


def test_a_quick_citation_run_ends_with_its_accuracies(tmp_path, capsys) -> None:
    import pytest

    pytest.importorskip("scipy")
    from rbp.runner import cli, read_json

    out = tmp_path / "q"
    assert cli.main(["citation", "--quick", "--dataset", "cora", "--method", "neumann",
                     "--set", "baselines=[]", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    res = read_json(out / "results.json")
    models = res["datasets"]["cora"]["models"]
    for model in models:
        assert f"cora {model}/neumann: val acc " in err, err
    assert err.count("untrained -> ") == sum(len(m) for m in models.values())
