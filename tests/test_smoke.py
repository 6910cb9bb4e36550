"""The GPU smoke script's figures, on whatever device there is (here a CPU), with the tiny model."""

from __future__ import annotations

import re

import yaml

from tests.conftest import tiny_config


def test_smoke_prints_seconds_throughput_and_memory_per_stage(prefect_server, tiny_model, tmp_path, capsys):
    from selfplay.smoke import STAGES, main

    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_model, tmp_path / "runs", rounds=1)))
    assert main(["--recipe", str(recipe), "--name", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "smoke round on cpu" in out
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^(\w+)\s+([\d.]+)\s+(\S+)\s+(\S+)$", out, re.M)}
    assert set(rows) == set(STAGES)
    assert all(float(seconds) >= 0 for seconds, _, _ in rows.values())
    assert all(float(rows[stage][0]) > 0 for stage in ("sample", "judge", "train", "evaluate")), out
    assert float(rows["sample"][1]) > 0 and float(rows["train"][1]) > 0  # tokens per second
    assert all(peak == "-" for _, _, peak in rows.values())  # no GPU here
