"""``cpstream eval`` and ``cpstream bench codec`` end to end on a tiny held-out world (committed weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.cli import main
from launch.train_cmd import load_train_config
from models.detector import DetectorConfig

TINY_WORLD = ["--seed", "11", "--frames", "2", "--agents", "2"]


def test_eval_with_the_codec_reports_wire_bytes_and_dumps_what_it_scored(tmp_path: Path) -> None:
    out, dump = tmp_path / "eval.json", tmp_path / "dump.jsonl"
    assert main(["eval", "--fusion", "intermediate", "--rate-level", "0", "--json", str(out), "--dump", str(dump),
                 *TINY_WORLD]) == 0
    result = json.loads(out.read_text())
    assert result["frames"] == 2 and result["rate_level"] == 0 and result["codec_id"].startswith("ib-")
    assert set(result["ap"]) == {"0.3", "0.5", "0.7"}
    assert 100 < result["bytes_per_frame"] < 640_000 / 100  # framing included, far below raw fp32
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(lines) == 2 and all({"frame", "gt", "det"} <= set(line) for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["--fusion", "late", "--rate-level", "0"], "needs --fusion intermediate"),
    (["--fusion", "intermediate", "--rate-level", "9"], "the codec has levels 0..4"),
])
def test_eval_refuses_a_rate_level_it_cannot_use(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    assert main(["eval", *argv, "--json", str(tmp_path / "x.json"), *TINY_WORLD]) == 2
    assert message in capsys.readouterr().err


def test_eval_scores_with_the_peak_rule_asked_for_and_refuses_a_ratio_outside_0_1(tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--fusion", "late", "--peak-ratio", "1", "--json", str(out), *TINY_WORLD]) == 0
    result = json.loads(out.read_text())
    assert result["decoder"] == {"peak_window": 3, "peak_ratio": 1.0}
    assert result["frames"] == 2 and result["ms_per_frame"] > 0  # the median wall time of one frame's detection
    with pytest.raises(SystemExit):
        main(["eval", "--fusion", "late", "--peak-ratio", "1.5", *TINY_WORLD])
    assert "must be between 0 and 1, got 1.5" in capsys.readouterr().err


def test_bench_codec_writes_the_documented_json_and_a_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "codec.json", tmp_path / "codec.png"
    assert main(["bench", "codec", "--json", str(out), "--plot", str(png), *TINY_WORLD]) == 0
    result = json.loads(out.read_text())
    assert result["raw_fp32_bytes_per_frame"] == 64 * 50 * 50 * 4
    assert set(result["uncompressed"]["ap"]) == {"0.3", "0.5", "0.7"} and "bytes_per_frame" in result["late"]
    levels = result["levels"]
    assert [lv["level"] for lv in levels] == list(range(5))
    assert all({"bytes_per_frame", "ap", "encode_ms", "decode_ms"} <= set(lv) for lv in levels)
    assert set(result["baselines"]) == {"raw_fp16", "int8_zstd", "topk_fp16"}
    for runs in result["baselines"].values():
        assert all({"bytes_per_frame", "ap"} <= set(run) for run in runs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_committed_detector_is_written_by_a_training_config_whose_chain_starts_from_scratch() -> None:
    """The README's reproduction commands hold together: each committed detector checkpoint is some config's
    output, built with that config's detector, and its ``init_from`` chain ends in a run from scratch."""
    root = Path(__file__).resolve().parent.parent
    configs = {p.name: load_train_config(p) for p in sorted((root / "launch" / "configs").glob("*.yaml"))
               if not p.name.startswith("codec_")}
    writers = {config.checkpoint: name for name, config in configs.items()}
    assert len(writers) == len(configs), "two configs write the same checkpoint"
    committed = sorted(p for p in (root / "models" / "checkpoints").glob("*.pt") if not p.name.startswith("codec_"))
    assert len(committed) >= 4
    for path in committed:
        name = writers.get(Path("models/checkpoints") / path.name)
        assert name is not None, f"no config in launch/configs writes {path.name}"
        saved = DetectorConfig.model_validate(torch.load(path, map_location="cpu", weights_only=True)["config"])
        assert saved == configs[name].detector, f"{path.name} was not built with {name}'s detector"
        chain = [name]
        while (start := configs[chain[-1]].init_from) is not None:
            assert start in writers, f"{chain[-1]} starts from {start}, which no config writes"
            assert writers[start] not in chain, f"{chain} loops"
            chain.append(writers[start])


def test_training_worlds_take_their_agent_counts_in_turn_and_a_count_the_world_refuses_is_named() -> None:
    from pydantic import ValidationError

    from launch.train_cmd import TrainDataConfig

    data = TrainDataConfig(first_seed=1200, worlds=5, agent_counts=[3, 5], world={"frames": 2, "roadside_units": 1})
    worlds = data.world_configs()
    assert [(w.seed, w.agents, w.frames, w.roadside_unit_count) for w in worlds] == [
        (1200, 3, 2, 1), (1201, 5, 2, 1), (1202, 3, 2, 1), (1203, 5, 2, 1), (1204, 3, 2, 1)]
    assert [w.agents for w in TrainDataConfig(worlds=2, world={"agents": 6}).world_configs()] == [6, 6]
    with pytest.raises(ValidationError, match="agent_counts is empty"):
        TrainDataConfig(agent_counts=[])
    with pytest.raises(ValidationError, match="agents"):
        TrainDataConfig(agent_counts=[3, 9])
    with pytest.raises(ValidationError, match="roadside_units=2"):  # 2 agents, both roadside units: no vehicle
        TrainDataConfig(agent_counts=[4, 2], world={"roadside_units": 2})
