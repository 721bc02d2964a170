"""OPV2V layout: writing and reading scenarios, PCD files, plain OPV2V files, bad input, and the
``cpstream world`` commands that use them."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from agents.frames import AgentKind, ObjectClass
from agents.opv2v import (CORDS_FROM_CV, DatasetError, OPV2VDataset, read_agent_frame, read_pcd, write_pcd,
                          write_scene_frame)
from agents.world import SyntheticWorld, WorldConfig
from launch.cli import main
from models.geometry import opv2v_pose_to_matrix

WORLD = WorldConfig(
    seed=5, agents=3, frames=2,
    camera={"count": 2, "width_px": 64, "height_px": 48},
    lidar={"azimuth_steps": 360},
    traffic={"moving_vehicles": 10, "parked_vehicles": 10, "pedestrians": 5},
    noise={"pose_xy_m": 0.3, "pose_yaw_deg": 1.0, "calibration_deg": 1.0},
)
SCENARIO = "synthetic_seed5"
TINY_WORLD_YAML = {"lidar": {"azimuth_steps": 360}, "camera": {"width_px": 64, "height_px": 48},
                   "traffic": {"moving_vehicles": 10, "parked_vehicles": 10, "pedestrians": 5}}


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(WORLD)


@pytest.fixture(scope="module")
def written(world: SyntheticWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset root holding the world's two frames (read-only: tests that damage it copy it)."""
    root = tmp_path_factory.mktemp("opv2v")
    for frame in world:
        write_scene_frame(root, frame)
    return root


@pytest.fixture
def scenario(written: Path, tmp_path: Path) -> Path:
    """A private copy of the written scenario folder."""
    return Path(shutil.copytree(written / SCENARIO, tmp_path / "data" / SCENARIO))


# --- writing and reading back -----------------------------------------------------------------


def test_file_layout(written: Path) -> None:
    files = {str(p.relative_to(written)) for p in written.rglob("*") if p.is_file()}
    expected = {f"{SCENARIO}/{agent}/{stamp}{suffix}" for agent in (0, 1, -1) for stamp in ("000000", "000001")
                for suffix in (".yaml", ".pcd", "_camera0.png", "_camera1.png")}
    assert files == expected


def test_yaml_is_plain_opv2v(world: SyntheticWorld, written: Path) -> None:
    agent = world.frame(1).agents[0]
    doc = yaml.safe_load((written / SCENARIO / "0" / "000001.yaml").read_text())
    pose = doc["lidar_pose"]
    assert len(pose) == 6 and all(isinstance(v, float) for v in pose)
    np.testing.assert_allclose(opv2v_pose_to_matrix(pose), agent.world_from_lidar, atol=1e-12)

    vehicles = {o.object_id: o for o in agent.objects if o.object_class == ObjectClass.VEHICLE}
    assert set(doc["vehicles"]) == set(vehicles)
    for object_id, entry in doc["vehicles"].items():
        assert {"location", "center", "extent", "angle"} <= entry.keys()
        x, y, z, length, width, height, yaw = vehicles[object_id].box_world
        np.testing.assert_allclose(entry["location"], [x, y, 0.0], atol=1e-12)  # on the ground
        np.testing.assert_allclose(entry["center"], [0.0, 0.0, height / 2])
        np.testing.assert_allclose(entry["extent"], [length / 2, width / 2, height / 2])
        np.testing.assert_allclose(entry["angle"], [0.0, math.degrees(yaw), 0.0])

    for name in ("camera0", "camera1"):
        assert len(doc[name]["cords"]) == 6
        assert np.asarray(doc[name]["extrinsic"]).shape == (4, 4)
        np.testing.assert_allclose(doc[name]["intrinsic"], agent.cameras[0].intrinsic)
    assert "camera2" not in doc
    ours = doc["cpstream"]
    assert ours["kind"] == "vehicle"
    assert ours["timestamp_s"] == pytest.approx(0.1)
    np.testing.assert_allclose(opv2v_pose_to_matrix(ours["true_lidar_pose"]), agent.true_world_from_lidar,
                               atol=1e-12)
    assert set(ours["pedestrians"]) == {o.object_id for o in agent.objects
                                        if o.object_class == ObjectClass.PEDESTRIAN}


def test_round_trip_keeps_everything(world: SyntheticWorld, written: Path) -> None:
    dataset = OPV2VDataset(written)
    assert [s.name for s in dataset.scenarios] == [SCENARIO]
    assert dataset.scenarios[0].agent_ids == (0, 1, -1)
    assert len(dataset) == 2
    for original, loaded in zip(world, dataset, strict=True):
        assert (loaded.scenario, loaded.frame_index) == (SCENARIO, original.frame_index)
        assert loaded.timestamp_s == pytest.approx(original.timestamp_s)
        assert set(loaded.agents) == set(original.agents)
        for agent_id, want in original.agents.items():
            got = loaded.agents[agent_id]
            assert got.kind == want.kind
            assert not np.allclose(want.world_from_lidar, want.true_world_from_lidar)  # noise is on
            np.testing.assert_allclose(got.world_from_lidar, want.world_from_lidar, atol=1e-9)
            np.testing.assert_allclose(got.true_world_from_lidar, want.true_world_from_lidar, atol=1e-9)
            assert got.points.dtype == np.float32
            assert np.array_equal(got.points, want.points)
            want_objects = {o.object_id: o for o in want.objects}
            got_objects = {o.object_id: o for o in got.objects}
            assert got_objects.keys() == want_objects.keys()
            for object_id, obj in want_objects.items():
                assert got_objects[object_id].object_class == obj.object_class
                np.testing.assert_allclose(got_objects[object_id].box_world, obj.box_world, atol=1e-9)
                assert got_objects[object_id].speed_mps == pytest.approx(obj.speed_mps)
            assert [c.name for c in got.cameras] == [c.name for c in want.cameras]
            for got_cam, want_cam in zip(got.cameras, want.cameras):
                assert np.array_equal(got_cam.intrinsic, want_cam.intrinsic)
                assert np.array_equal(got_cam.lidar_from_camera, want_cam.lidar_from_camera)
                assert np.array_equal(got_cam.true_lidar_from_camera, want_cam.true_lidar_from_camera)
                assert got_cam.image_rgb.dtype == np.uint8
                assert np.array_equal(got_cam.image_rgb, want_cam.image_rgb)


def test_without_our_key_the_opv2v_entries_give_the_same_frame(world: SyntheticWorld, scenario: Path) -> None:
    """What plain OPV2V tooling reads (cords, lidar_pose, vehicles) agrees with what we add."""
    want = world.frame(0).agents[1]
    path = scenario / "1" / "000000.yaml"
    doc = yaml.safe_load(path.read_text())
    del doc["cpstream"]
    path.write_text(yaml.safe_dump(doc))
    got = read_agent_frame(scenario / "1", "000000", load_images=False)
    np.testing.assert_allclose(got.world_from_lidar, want.world_from_lidar, atol=1e-9)
    assert got.true_world_from_lidar is None
    assert got.kind == AgentKind.VEHICLE
    for got_cam, want_cam in zip(got.cameras, want.cameras, strict=True):
        np.testing.assert_allclose(got_cam.lidar_from_camera, want_cam.lidar_from_camera, atol=1e-9)
        assert got_cam.true_lidar_from_camera is None
        assert got_cam.image_rgb is None
    assert {o.object_id for o in got.objects} == {o.object_id for o in want.objects
                                                  if o.object_class == ObjectClass.VEHICLE}


def test_our_key_may_be_empty(scenario: Path) -> None:
    path = scenario / "-1" / "000000.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["cpstream"] = None
    path.write_text(yaml.safe_dump(doc))
    got = read_agent_frame(scenario / "-1", "000000")
    assert got.kind == AgentKind.ROADSIDE_UNIT  # from the negative id
    assert got.true_world_from_lidar is None
    assert len(got.cameras) == 2


def test_hand_written_opv2v_frame(tmp_path: Path) -> None:
    folder = tmp_path / "2021_08_16_22_26_54" / "650"
    folder.mkdir(parents=True)
    lidar_pose = [1.0, 2.0, 1.9, 0.5, 30.0, -1.0]  # x, y, z, roll, yaw, pitch (degrees)
    (folder / "000068.yaml").write_text(yaml.safe_dump({
        "ego_speed": 18.2,
        "lidar_pose": lidar_pose,
        "true_ego_pos": [1.0, 2.0, 0.0, 0.0, 30.0, 0.0],
        "vehicles": {641: {"location": [10, 0, 0], "center": [0, 0, 0.8], "extent": [2, 1, 0.8],
                           "angle": [0, 90, 0], "speed": 36.0}},
        "camera0": {"cords": lidar_pose, "extrinsic": np.eye(4).tolist(),
                    "intrinsic": [[100.0, 0.0, 32.0], [0.0, 100.0, 24.0], [0.0, 0.0, 1.0]]},
    }))
    points = np.array([[1.0, 2.0, 3.0, 0.5], [4.0, 5.0, 6.0, 0.25]], dtype=np.float32)
    write_pcd(folder / "000068.pcd", points)
    bgr = np.zeros((48, 64, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's channel order
    cv2.imwrite(str(folder / "000068_camera0.png"), bgr)

    frame = next(iter(OPV2VDataset(tmp_path)))
    assert (frame.scenario, frame.frame_index, frame.ego_id) == ("2021_08_16_22_26_54", 68, 650)
    agent = frame.agents[650]
    assert agent.kind == AgentKind.VEHICLE
    np.testing.assert_array_equal(agent.world_from_lidar, opv2v_pose_to_matrix(lidar_pose))
    assert agent.true_world_from_lidar is None
    assert np.array_equal(agent.points, points)
    (vehicle,) = agent.objects
    assert (vehicle.object_id, vehicle.object_class) == (641, ObjectClass.VEHICLE)
    np.testing.assert_allclose(vehicle.box_world, [10.0, 0.0, 0.8, 4.0, 2.0, 1.6, math.pi / 2])
    assert vehicle.speed_mps == pytest.approx(10.0)  # OPV2V speeds are km/h
    (camera,) = agent.cameras
    np.testing.assert_allclose(camera.lidar_from_camera, CORDS_FROM_CV, atol=1e-12)  # camera at the LiDAR
    assert camera.image_rgb[0, 0].tolist() == [0, 0, 255]  # read back as RGB


# --- PCD files --------------------------------------------------------------------------------


def test_pcd_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    points = np.column_stack([rng.normal(0.0, 30.0, (500, 3)), rng.uniform(0.0, 1.0, 500)])  # float64 in
    write_pcd(tmp_path / "a.pcd", points)
    assert (tmp_path / "a.pcd").read_bytes().startswith(b"# .PCD")
    back = read_pcd(tmp_path / "a.pcd")
    assert back.dtype == np.float32
    assert np.array_equal(back, points.astype(np.float32))


def test_pcd_round_trip_of_an_empty_cloud(tmp_path: Path) -> None:
    write_pcd(tmp_path / "empty.pcd", np.zeros((0, 4), np.float32))
    back = read_pcd(tmp_path / "empty.pcd")
    assert back.shape == (0, 4) and back.dtype == np.float32


ASCII_HEADER = ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z{extra}\nSIZE 4 4 4{size}\n"
                "TYPE F F F{type}\nCOUNT 1 1 1{count}\nWIDTH 3\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 3\nDATA ascii\n")


def test_ascii_pcd_with_intensity(tmp_path: Path) -> None:
    path = tmp_path / "ascii.pcd"
    path.write_text(ASCII_HEADER.format(extra=" intensity", size=" 4", type=" F", count=" 1")
                    + "1 2 3 0.5\n-4 5.5 6 0.25\n0 0 -1 1\n")
    np.testing.assert_array_equal(read_pcd(path), [[1, 2, 3, 0.5], [-4, 5.5, 6, 0.25], [0, 0, -1, 1]])


def test_ascii_pcd_without_intensity_reads_zero_intensity(tmp_path: Path) -> None:
    path = tmp_path / "ascii.pcd"
    path.write_text(ASCII_HEADER.format(extra="", size="", type="", count="") + "1 2 3\n-4 5.5 6\n0 0 -1\n")
    np.testing.assert_array_equal(read_pcd(path), [[1, 2, 3, 0], [-4, 5.5, 6, 0], [0, 0, -1, 0]])


def test_short_ascii_pcd_is_truncated_not_garbage(tmp_path: Path) -> None:
    path = tmp_path / "short.pcd"
    path.write_text(ASCII_HEADER.format(extra="", size="", type="", count="") + "1 2 3\n-4 5.5 6\n")
    with pytest.raises(DatasetError, match="truncated") as caught:
        read_pcd(path)
    assert str(path) in str(caught.value)


# --- bad input --------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _edit_yaml(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        doc = yaml.safe_load(path.read_text())
        change(doc)
        path.write_text(yaml.safe_dump(doc))
    return edit


# (file to damage, how, what the error must say). Frame 000001 is damaged; frame 000000 is fine.
BAD_INPUT = {
    "missing pcd": ("1/000001.pcd", Path.unlink, r"cannot read: No such file"),
    "truncated pcd": ("1/000001.pcd", _truncate, r"truncated: header declares \d+ points"),
    "garbage pcd": ("1/000001.pcd", lambda p: p.write_bytes(b"\x00\x01garbage\nnot a header\n" + bytes(range(256))),
                    r"not a PCD file"),
    "unterminated yaml": ("1/000001.yaml", lambda p: p.write_text("lidar_pose: [1, 2\n"), r"malformed yaml"),
    "no lidar_pose": ("1/000001.yaml", _edit_yaml(lambda d: d.pop("lidar_pose")), r"missing key 'lidar_pose'"),
    "5-number lidar_pose": ("1/000001.yaml", _edit_yaml(lambda d: d.update(lidar_pose=[1.0, 2.0, 3.0, 4.0, 5.0])),
                            r"lidar_pose should have shape \(6,\), has \(5,\)"),
    "text in lidar_pose": ("1/000001.yaml", _edit_yaml(lambda d: d.update(lidar_pose=[1, 2, 3, 4, 5, "six"])),
                           r"lidar_pose is not numeric"),
    "vehicle without extent": ("1/000001.yaml", _edit_yaml(lambda d: next(iter(d["vehicles"].values())).pop("extent")),
                               r"vehicles\[\d+\] lacks one of location, extent, angle"),
    "text for a speed": ("1/000001.yaml", _edit_yaml(lambda d: next(iter(d["vehicles"].values())).update(speed="fast")),
                         r"malformed value"),
    "camera entry not a mapping": ("1/000001.yaml", _edit_yaml(lambda d: d.update(camera0=[1, 2, 3])),
                                   r"malformed value"),
    "unknown agent kind": ("1/000001.yaml", _edit_yaml(lambda d: d["cpstream"].update(kind="drone")),
                           r"malformed value"),
    "other agent lacks the frame": ("-1/000001.yaml", Path.unlink, r"missing \(agent -1 has no frame 000001\)"),
    "missing camera image": ("-1/000001_camera1.png", Path.unlink, r"missing camera image"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_names_the_file_and_the_problem(scenario: Path, case: str) -> None:
    relative, damage, message = BAD_INPUT[case]
    damage(scenario / relative)
    dataset = OPV2VDataset(scenario.parent)
    frames = iter(dataset)
    assert next(frames).frame_index == 0  # the undamaged frame still reads
    with pytest.raises(DatasetError, match=message) as caught:
        next(frames)
    assert str(scenario / relative) in str(caught.value)


def test_folder_without_agent_folders(tmp_path: Path) -> None:
    scenario = tmp_path / "root" / "empty_scenario"
    (scenario / "camera_dump").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no agent folders") as caught:
        OPV2VDataset(tmp_path / "root")
    assert str(scenario) in str(caught.value)


def test_empty_or_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no scenario folders"):
        OPV2VDataset(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        OPV2VDataset(tmp_path / "nowhere")


def test_scenario_of_roadside_units_only(tmp_path: Path) -> None:
    (tmp_path / "scenario" / "-1").mkdir(parents=True)
    with pytest.raises(DatasetError, match="only roadside units"):
        OPV2VDataset(tmp_path)


# --- the command line -------------------------------------------------------------------------


def _generate(tmp_path: Path, *extra: str) -> int:
    config = tmp_path / "world.yaml"
    config.write_text(yaml.safe_dump(TINY_WORLD_YAML))
    return main(["world", "generate", "--out", str(tmp_path / "data"), "--config", str(config), "--seed", "3",
                 "--agents", "3", "--frames", "2", "--cameras", "0", *extra])


@pytest.fixture
def generated(tmp_path: Path) -> Path:
    assert _generate(tmp_path) == 0
    return tmp_path / "data" / "synthetic_seed3"


def test_cli_generate_writes_the_layout(generated: Path) -> None:
    assert sorted(p.name for p in generated.iterdir()) == ["-1", "0", "1"]
    for agent in ("-1", "0", "1"):
        assert sorted(p.name for p in (generated / agent).iterdir()) == [
            "000000.pcd", "000000.yaml", "000001.pcd", "000001.yaml"]
    doc = yaml.safe_load((generated / "0" / "000000.yaml").read_text())
    assert "camera0" not in doc


def test_cli_stats_reports_visibility(generated: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats" / "visibility.json"
    assert main(["world", "stats", str(generated), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["frames"] == 2
    assert report["frames_skipped"] == 0
    assert report["objects"] > 0
    assert 0.0 <= report["ego_visible_pct"] <= report["union_visible_pct"] <= 100.0
    assert report["gap_pct_points"] == pytest.approx(report["union_visible_pct"] - report["ego_visible_pct"])
    assert sum(c["objects"] for c in report["by_class"].values()) == report["objects"]


def test_cli_stats_fails_on_a_bad_file_with_one_line(generated: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = generated / "1" / "000001.pcd"
    _truncate(bad)
    capsys.readouterr()
    assert main(["world", "stats", str(generated), "--json", str(tmp_path / "s.json")]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert str(bad) in errors[0] and "truncated" in errors[0]
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "s.json").exists()


def test_cli_stats_skips_a_bad_frame_when_asked(generated: Path, tmp_path: Path) -> None:
    bad = generated / "1" / "000001.pcd"
    _truncate(bad)
    out = tmp_path / "s.json"
    assert main(["world", "stats", str(generated), "--json", str(out), "--skip-bad"]) == 0
    report = json.loads(out.read_text())
    assert (report["frames"], report["frames_skipped"]) == (1, 1)
    assert str(bad) in report["skipped"][0]


def test_cli_error_keeps_brackets_in_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "runs[v2]"  # rich would read "[v2]" as markup and drop it
    assert main(["world", "stats", str(missing)]) == 2
    assert f"error: {missing}: not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "words"), [
    (["--agents", "1"], ["agents", "greater than or equal to 2"]),
    (["--pose-noise", "abc"], ["--pose-noise", "'abc'"]),
    (["--agents", "2", "--roadside-units", "2"], ["roadside_units"]),
])
def test_cli_generate_refuses_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                           words: list[str]) -> None:
    capsys.readouterr()
    assert _generate(tmp_path, *flags) == 2
    captured = capsys.readouterr()
    (line,) = [line for line in captured.err.splitlines() if line.startswith("error:")]
    for word in words:
        assert word in line
    assert "Traceback" not in captured.err
    assert not (tmp_path / "data").exists()
