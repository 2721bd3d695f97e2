"""A run started before a setting existed still resumes when the setting is at its default."""

from __future__ import annotations

import dataclasses

from rbp.apps.citation.config import CitationConfig
from rbp.runner.config import config_to_dict
from rbp.runner.resume import settings_differences, with_new_defaults


def test_a_setting_added_since_the_run_started_is_taken_at_its_default() -> None:
    cfg = CitationConfig()
    old = config_to_dict(cfg)
    del old["fp_warm_start"], old["fp_tol"]          # the run started before they existed
    assert settings_differences(old, config_to_dict(cfg)) == ["fp_tol", "fp_warm_start"]
    assert settings_differences(with_new_defaults(old, cfg), config_to_dict(cfg)) == []
    # the same setting given another value is a real difference
    other = dataclasses.replace(cfg, fp_tol=1e-4)
    assert settings_differences(with_new_defaults(old, other), config_to_dict(other)) == [
        "fp_tol"]
    # a setting the old run recorded keeps its recorded value
    old["lr"] = 0.5
    assert "lr" in settings_differences(with_new_defaults(old, cfg), config_to_dict(cfg))
