"""`memcli sweep --executor ray` on the tiny model: Ray tasks train the cells the local executor trains, to the
same results, where the sweep's relative paths say (not in the folder the Ray workers started in); a failing cell
ends the sweep with one error line."""

import json
import os
import shutil
import tempfile

import pytest
from helpers import run_cli

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[test,ray]')")


pytestmark = pytest.mark.slow  # starts a Ray instance


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this process's own (never one RAY_ADDRESS or /tmp/ray points at), in its own short temp
    folder (Ray's socket paths have a length limit), shut down after the module."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    address = os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if address is not None:
            os.environ["RAY_ADDRESS"] = address


def test_ray_sweep_matches_local(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # after ray.init: the workers start elsewhere, the sweep's paths are relative
    assert run_cli("data", "random", "--tokens", "16", "--model", "tiny", "--out", "r16.jsonl").exit_code == 0
    args = ["r16.jsonl", "--model", "tiny", "--ranks", "1,2", "--answer-tokens", "12", "--max-steps", "3",
            "--batch-size", "1", "--check-every", "3", "--gguf", "off"]
    result = run_cli("sweep", *args, "--out", "local")
    assert result.exit_code == 0, result.output
    result = run_cli("sweep", *args, "--out", "ray", "--executor", "ray")
    assert result.exit_code == 0, result.output
    for cell in ("rank1-l12", "rank2-l12"):
        local = json.loads((tmp_path / "local" / cell / "summary.json").read_text())
        remote = json.loads((tmp_path / "ray" / cell / "summary.json").read_text())
        assert remote["steps"] == 3 and remote.keys() == local.keys()
        for key, value in local.items():
            if key == "wall_seconds":
                continue
            expected = pytest.approx(value, abs=1e-5) if isinstance(value, float) else value
            assert remote[key] == expected, (cell, key, remote[key], value)
        assert (tmp_path / "ray" / cell / "config.yaml").read_text() == \
            (tmp_path / "local" / cell / "config.yaml").read_text()

    (tmp_path / "bad.jsonl").write_text('{"key": "a", "value": \n')
    result = run_cli("sweep", "bad.jsonl", "--model", "tiny", "--ranks", "1,2", "--answer-tokens", "4",
                     "--max-steps", "1", "--gguf", "off", "--out", "bad", "--executor", "ray")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sweep cell rank"), result.stderr
    assert "bad.jsonl:1: malformed JSON" in lines[0], result.stderr
