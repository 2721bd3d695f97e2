"""Settings that are wrong end as one clear line naming the setting, before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rbp.runner import cli
from rbp.runner.config import (
    DATA_DIR_ENV,
    ConfigError,
    build_config,
    load_config,
    load_yaml_file,
)
from rbp.runner.registry import Experiment


@dataclass
class Cfg:
    methods: list[str] = field(default_factory=lambda: ["rbp"])
    seed: int = 0
    seeds: list[int] | None = None
    corrupt_seed: int | None = None
    num_seeds: int = 3
    dataset_seeds: dict[str, list[int]] = field(default_factory=dict)
    lr: float = 0.1
    data_dir: str | None = None
    sizes: list[int] = field(default_factory=lambda: [4, 4])


EXP = Experiment(name="cfgtoy", help="x", config_cls=Cfg, run=lambda c, x: {},
                 methods=("rbp", "cg", "neumann"))


def _build(*overrides: str, **kw: object) -> Cfg:
    return build_config(EXP, list(overrides), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=.nan", "setting 'lr' in --set must be finite"),
        ("lr=.inf", "setting 'lr' in --set must be finite"),
        ("lr=-.inf", "must be finite"),
        ("seed=4294967296", "seed 4294967296 is outside 0..4294967295"),
        ("seed=-1", "seed -1 is outside"),
        ("corrupt_seed=99999999999", "setting 'corrupt_seed'"),
        ("seeds=[0, 5000000000]", "setting 'seeds' in --set: seed 5000000000"),
        ("dataset_seeds={cora: [-3]}", "setting 'dataset_seeds' in --set: seed -3"),
        ("methods=[]", "setting 'methods' in --set is empty"),
        ("seeds=[1, 2, 1]", "setting 'seeds' in --set repeats 1"),
        ("methods=rbp,cg,rbp", "setting 'methods' in --set repeats rbp"),
        ("methods=all,foo", "unknown method 'foo' in setting 'methods'"),
        ("methods=cgg", "did you mean 'cg'"),
    ],
)
def test_bad_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _build(override)


def test_good_values_pass() -> None:
    cfg = _build("seed=4294967295", "seeds=[0, 1]", "num_seeds=1000000000000",
                 "sizes=[4, 4, 4]", "methods=all")
    assert cfg.seed == 2**32 - 1 and cfg.methods == ["rbp", "cg", "neumann"]
    assert cfg.sizes == [4, 4, 4]  # repeats are fine in other lists


def test_unknown_key_under_quick_is_an_error_even_without_quick(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("lr: 0.2\nquick:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'lrr' in 'quick:' section.*"
                                          r"did you mean 'lr'"):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match="lrr"):
        load_config(Cfg, path, quick=True)


def test_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("data_dir: from-file\n")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert _build().data_dir is None
    assert _build(config_file=user).data_dir == "from-file"
    monkeypatch.setenv(DATA_DIR_ENV, "from-env")
    assert _build().data_dir == "from-env"
    assert _build(config_file=user).data_dir == "from-env"       # env above files
    assert _build("data_dir=from-set", config_file=user).data_dir == "from-set"
    assert _build("data_dir=from-set", values={"data_dir": "flag"}).data_dir == "flag"
    monkeypatch.setenv(DATA_DIR_ENV, "")
    assert _build().data_dir is None  # empty means unset


def test_env_data_dir_is_not_forced_on_experiments_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    @dataclass
    class NoData:
        seed: int = 0

    monkeypatch.setenv(DATA_DIR_ENV, "/somewhere")
    exp = Experiment(name="nodata", help="x", config_cls=NoData, run=lambda c, x: {})
    assert build_config(exp, []).seed == 0


def test_citation_settings_lists_and_maps(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("scipy")
    cases = [
        (("--set", "dataset=[]"), "setting 'dataset' is empty"),
        (("--dataset", "cora,cora"), "setting 'dataset' repeats cora"),
        (("--seeds", "0,0"), "setting 'seeds' in command-line flags repeats 0"),
        (("--set", "hidden={cora: 64, pubmed: 16, coraa: 8}"),
         "setting 'hidden' names unknown dataset(s) coraa"),
        (("--set", "dataset_seeds={corra: [0]}"), "setting 'dataset_seeds' names unknown"),
        (("--set", "lr=.nan"), "setting 'lr' in --set must be finite"),
        (("--method", "all,foo"), "unknown method 'foo' in --method"),
    ]
    for extra, message in cases:
        code = cli.main(["citation", "--out", str(tmp_path / "x"), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 2, extra
        assert message in err and "Traceback" not in err, (extra, err)
        assert err.strip().splitlines()[-1].startswith("rbp citation: error:")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("app", ["hopfield", "hyperopt"])
def test_mnist_apps_reject_nan_lr_and_big_seeds(app: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    key = "lr" if app == "hopfield" else "meta_lr"
    for extra in (("--set", f"{key}=.nan"), ("--seed", str(2**40)), ("--set", "methods=[]")):
        assert cli.main([app, "--out", str(tmp_path / "x"), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert "error: setting '" in err and "Traceback" not in err, err


def test_a_key_given_twice_is_refused_with_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("lr: 0.2\nseed: 1\nlr: 0.5\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: key 'lr' is given twice "
                                          r"\(lines 1 and 3\)"):
        _build(config_file=path)
    path.write_text("lr: 0.2\nquick:\n  seed: 1\n  seed: 2\n")  # nested, even unused
    with pytest.raises(ConfigError, match="key 'seed' is given twice"):
        _build(config_file=path)
    with pytest.raises(ConfigError, match="--set dataset_seeds: key 'cora' is given twice"):
        _build("dataset_seeds={cora: [1], cora: [2]}")
    # a YAML merge key may be overridden: that is not a repeat
    path.write_text("base: &b {cora: [1]}\ndataset_seeds:\n  <<: *b\n  cora: [2]\n")
    assert load_yaml_file(path, "x")["dataset_seeds"] == {"cora": [2]}


def test_a_binary_config_file_is_named(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=r"weights\.bin is not a UTF-8 text file"):
        _build(config_file=path)
    assert cli.main(["hopfield", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "weights.bin is not a UTF-8 text file" in err and "codec" not in err, err


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("lr: [0.1\n", "line 2, column 1: expected ',' or ']'"),
        ("lr: 0.1\n---\nlr: 0.2\n", "but found another document"),
        ("? [1, 2]\n: 3\n", "line 1, column 3: found unhashable key"),
    ],
)
def test_damaged_yaml_is_one_line_naming_the_file(tmp_path: Path, text: str, where: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "damaged.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="cannot parse config file .*damaged.yaml") as info:
        _build(config_file=path)
    message = str(info.value)
    assert where in message and "\n" not in message and "<unicode string>" not in message
    assert cli.main(["hopfield", "--config", str(path), "--out", str(tmp_path / "o"),
                     "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rbp hopfield: error: cannot parse config file") and where in err[-1]


def test_an_unparsable_set_value_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"--set lr: cannot parse value '\[0.1' as YAML "
                                          r"\(line 1, column 5: expected") as info:
        _build("lr=[0.1")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("section", ["[]", "false", "0", "''"])
def test_a_quick_section_that_is_no_mapping_is_refused(tmp_path: Path, section: str) -> None:
    """``quick: []`` was silently an empty section (``quick: 5`` was refused)."""
    path = tmp_path / "q.yaml"
    path.write_text(f"lr: 0.2\nquick: {section}\n")
    with pytest.raises(ConfigError, match="'quick:' in config file .* must be a mapping"):
        _build(config_file=path)
    path.write_text("lr: 0.2\nquick:\n")  # nothing under it: no quick settings
    assert _build(config_file=path).lr == 0.2


def test_an_unused_quick_section_is_type_checked(tmp_path: Path) -> None:
    """A wrong type under ``quick:`` was found only on the first --quick run."""
    path = tmp_path / "q.yaml"
    for text, message in (("quick:\n  seed: abc\n", "setting 'seed' in 'quick:' section"),
                          ("quick:\n  lr: .nan\n", "'lr' in 'quick:' section .* finite"),
                          ("quick:\n  seed: -1\n", "seed -1 is outside")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            _build(config_file=path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("checkpoint_every=-5", "setting 'checkpoint_every' in --set must be >= 0, got -5"),
        ("interrupt_after=0", "setting 'interrupt_after' in --set must be >= 1, got 0"),
        ("interrupt_after=-1", "setting 'interrupt_after' in --set must be >= 1, got -1"),
    ],
)
def test_runner_step_counts_below_their_minimum_are_refused(override: str, message: str) -> None:
    """A negative checkpoint_every silently meant "never", interrupt_after <= 0 "at once"."""

    @dataclass
    class Control:
        checkpoint_every: int = 5
        interrupt_after: int | None = None

    with pytest.raises(ConfigError, match=message):
        load_config(Control, None, overrides=[override])
    cfg = load_config(Control, None, overrides=["checkpoint_every=0", "interrupt_after=1"])
    assert (cfg.checkpoint_every, cfg.interrupt_after) == (0, 1)
