"""The export CLI's contract: one-line errors with exit code 2 for bad input, exit 1 on a parity
failure, and never a half-written version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export import cli
from export.parity import ParityError
from export.repository import next_version

pytestmark = pytest.mark.unit


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_checkpoint_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, last = run(capsys, "--model", str(tmp_path / "nope"), "--repository", str(tmp_path / "repo"))
    assert code == 2 and last.startswith("error: ") and "Traceback" not in last


def test_not_a_gpt2_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "bert"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    code, last = run(capsys, "--model", str(ckpt), "--repository", str(tmp_path / "repo"))
    assert code == 2 and "not a GPT-2" in last


def test_unwritable_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    code, last = run(capsys, "--random-config", "tiny", "--repository", str(blocker / "repo"))
    assert code == 2 and "not writable" in last


def test_parity_failure_exits_1_and_leaves_no_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*_args: object, **_kwargs: object) -> None:
        raise ParityError("logits differ from transformers by 1 (tolerance 1e-4)")

    monkeypatch.setattr(cli, "check_parity", failing)
    repo = tmp_path / "repo"
    code, last = run(capsys, "--random-config", "tiny", "--repository", str(repo), "--name", "m")
    assert code == 1 and "parity check failed" in last
    model_dir = repo / "m"
    assert not model_dir.exists() or not any(model_dir.iterdir())


def test_versions_count_up_and_metadata_records_parity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    for _ in range(2):
        args = ["--random-config", "tiny", "--repository", str(repo), "--name", "m", "--max-context", "64"]
        code, _ = run(capsys, *args)
        assert code == 0
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2", "config.pbtxt"]
    assert next_version(repo / "m") == 3
    meta = json.loads((repo / "m" / "2" / "metadata.json").read_text())
    assert meta["version"] == 2 and meta["max_context"] == 64 and meta["eos_token_id"] == meta["vocab_size"] - 1
    assert meta["parity"]["max_abs_error"] < 1e-4 and meta["source"].startswith("random:tiny")
    for name in (
        "model.onnx",
        "model.py",
        "step_model/engine.py",
        "step_model/contract/__init__.py",
        "step_model/contract/graph_io.py",
        "step_model/contract/model_config.py",
        "tokenizer",
        "metadata.json",
    ):
        assert (repo / "m" / "2" / name).exists()
    code, last = run(capsys, "--random-config", "tiny", "--repository", str(repo), "--name", "m", "--version", "2")
    assert code == 2 and "already exists" in last


def test_kv_partitions_default_by_device_and_must_divide_the_capacity(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--random-config", "tiny"]
    assert cli.parse_args(base).kv_partitions == 1  # the CPU, or a device only known when served
    assert cli.parse_args([*base, "--device", "cuda"]).kv_partitions == 2
    assert cli.parse_args([*base, "--device", "cuda", "--kv-capacity", "7"]).kv_partitions == 1
    assert cli.parse_args([*base, "--kv-partitions", "4"]).kv_partitions == 4
    for bad in ("0", "3"):
        with pytest.raises(SystemExit):
            cli.parse_args([*base, "--kv-capacity", "16", "--kv-partitions", bad])
    assert "--kv-partitions must be >= 1 and divide --kv-capacity" in capsys.readouterr().err


def test_instances_serve_the_new_version_on_each_instance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    args = ["--random-config", "tiny", "--repository", str(repo), "--name", "m", "--max-context", "64"]
    code, _ = run(capsys, *args, "--instances", "2", "--gpus", "0,1", "--skip-parity")
    assert code == 0
    assert (repo / "m_1" / "1" / "metadata.json").exists() and (repo / "m_1" / "1").is_symlink()
    assert "gpus: [ 1 ]" in (repo / "m_1" / "config.pbtxt").read_text()
    assert "gpus: [ 0 ]" in (repo / "m" / "config.pbtxt").read_text()
    for bad, why in ((["--instances", "0"], "--instances must be >= 1"), (["--gpus", "first"], "--gpus")):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*args, *bad])
        assert exit_.value.code == 2 and why in capsys.readouterr().err
