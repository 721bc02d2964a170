"""Pose correction in the fusion node, with real agents' frames (in memory, no network).

Agents compute real frames of a synthetic world; the test hands them to a fusion node's receive
path, fuses each slot and hands the node's ``Control`` messages back to the agents, as the gRPC
stream would.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pytest

from agents import AgentNode, AgentNodeConfig, FrameSource, SourceConfig, WorldConfig
from agents.node import bev_input
from agents.odometry import OdometryConfig
from agents.pose import PoseCorrectionConfig, TrackedPose
from models.scan import ScanConfig
from fusion import FusionConfig, FusionNode
from fusion.alignment import CorrectionConfig, correction_matrix, planar_delta
from models.codec_train import load_codec
from models.detector import load_checkpoint
from models.geometry import invert_se3, perturb_pose
from protos import CameraCalibration
from transport import pose_from_proto

ROOT = Path(__file__).resolve().parent.parent
WORLD = WorldConfig(seed=5, agents=3, frames=24, camera={"count": 0})
PERIOD_NS = 100_000_000
MOUNT_ERROR = correction_matrix(np.array([0.0, 0.7, np.deg2rad(0.6)]), np.zeros(2))
"""Agent 1's LiDAR is mounted 0.7 m and 0.6 degrees off what it believes."""
STATED = np.diag([0.5 ** 2, 0.5 ** 2, 0.0, 0.0, 0.0, np.deg2rad(0.5) ** 2])


class _Mounted(FrameSource):
    """The world's frames, with a mount error and the pose covariance an INS would state."""

    def __init__(self, agent_id: int, error: np.ndarray, world: WorldConfig = WORLD) -> None:
        super().__init__(SourceConfig(world=world), agent_id)
        self.error = error

    def frame(self, index: int):
        agent = super().frame(index)
        return dataclasses.replace(agent, world_from_lidar=agent.world_from_lidar @ invert_se3(self.error),
                                   pose_covariance=STATED)


@pytest.fixture(scope="module")
def models():
    detector, _ = load_checkpoint(ROOT / "models/checkpoints/mobiledet_tiny.pt")
    codec, _ = load_codec(ROOT / "models/checkpoints/codec_mobiledet_tiny.pt", detector.config)
    return detector.eval(), codec.eval()


def _agents(models, errors: dict[int, np.ndarray], world: WorldConfig = WORLD, track: bool = False
            ) -> dict[int, AgentNode]:
    """Agents with odometry; ``track``: they track their pose and fold in every estimate (else a steady offset)."""
    detector, codec = models
    return {a: AgentNode(AgentNodeConfig(agent_id=a, source=SourceConfig(world=world),
                                         odometry=OdometryConfig(enabled=True),
                                         pose_correction=PoseCorrectionConfig(track=track)),
                         detector, codec, _Mounted(a, errors.get(a, np.eye(4)), world)) for a in (0, 1, -1)}


def _node(models, **config) -> FusionNode:
    detector, codec = models
    return FusionNode(FusionConfig(listen="127.0.0.1:0", allow_any_agent=True, rate_hz=10, **config), detector, codec)


def _error(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    d = planar_delta(invert_se3(truth) @ estimate)
    return float(np.hypot(d[0], d[1])), float(np.degrees(abs(d[2])))


async def test_a_mount_error_is_found_sent_back_and_applied_by_the_agent(models) -> None:
    agents = _agents(models, {1: MOUNT_ERROR})
    node = _node(models, correction=CorrectionConfig(feedback_min_frames=8))
    start = (time.time_ns() // PERIOD_NS) * PERIOD_NS
    corrected_slots = []
    try:
        for a, agent in agents.items():
            node._state(a, "grpc").send_control = agent._on_control  # the Control stream, in memory
        for k in range(WORLD.frames):
            for a, agent in agents.items():
                frame = agent.compute(k, start + k * PERIOD_NS)
                await node._receive(node.agents[a], frame, frame.ByteSize())
            fused, _ = node.fuse_slot(node.slot_of(start + k * PERIOD_NS))
            node._send_corrections()
            one = next(c for c in fused.contributions if c.agent_id == 1)
            corrected_slots.append(one.pose_corrected and one.matched_objects >= 3)
    finally:
        node._torch_thread.shutdown()
        for agent in agents.values():
            agent._compute_thread.shutdown()
    assert sum(corrected_slots) >= WORLD.frames // 2
    assert node.agents[1].corrections_sent >= 1 and agents[1].pose.applied >= 1
    assert agents[1].report()["pose_corrections"]["applied"] == agents[1].pose.applied
    metres, degrees = _error(agents[1].pose.agent_from_corrected, MOUNT_ERROR)  # found the mount error
    assert metres < 0.25 and degrees < 0.25, (metres, degrees)
    assert agents[0].pose.applied == 0  # the ego is the reference: never corrected
    assert node.counters()["pose_correction"]["1"]["applied"] >= WORLD.frames // 2


async def test_bad_odometry_covariance_and_calibration_are_set_aside_and_counted(models) -> None:
    agents = _agents(models, {})
    node = _node(models)
    start = (time.time_ns() // PERIOD_NS) * PERIOD_NS
    try:
        frames = {a: [agent.compute(k, start + k * PERIOD_NS) for k in range(2)] for a, agent in agents.items()}
        bad = frames[1][1]
        bad.odometry.x_m = math.nan
        bad.pose.ClearField("covariance")
        bad.pose.covariance.extend([1.0] + [0.5] + [0.0] * 34)  # not symmetric
        bad.calibration.cameras.append(CameraCalibration(name="camera0", width_px=400, height_px=300,
                                                         intrinsic=[-100, 0, 200, 0, 100, 150, 0, 0, 1]))
        bad.calibration.cameras[0].agent_from_camera.row_major.extend(np.eye(4).ravel().tolist())
        bad.own_pose.yaw_rad = math.inf
        for k in range(2):
            for a in agents:
                await node._receive(node._state(a, "grpc"), frames[a][k], frames[a][k].ByteSize())
        fused, _ = node.fuse_slot(node.slot_of(start + PERIOD_NS))
    finally:
        node._torch_thread.shutdown()
        for agent in agents.values():
            agent._compute_thread.shutdown()
    one = next(c for c in fused.contributions if c.agent_id == 1)
    assert one.tiles_fresh == frames[1][1].tile_count  # the frame itself was fused
    set_aside = node.counters()["agents"]["1"]["set_aside"]
    assert set_aside == {"pose covariance": 1, "odometry": 1, "own pose": 1, "calibration": 1}, set_aside
    assert node.agents[1].frames_refused == 0


async def test_a_missing_ego_frame_is_stood_in_for_at_the_slot_time(models) -> None:
    """Every other frame of the ego never arrives: the fused frame is placed where the ego was at the slot's
    time (from its pose history), not where it was at its last frame. BEV frames sit on the feature lattice
    (their origins are within half a cell of the ego), so this is compared over several slots."""
    world = WORLD.model_copy(update={"seed": 8, "frames": 21})  # the ego drives at about 8 m/s
    agents = _agents(models, {}, world)
    nodes = {True: _node(models), False: _node(models, latency_compensation=False)}
    start = (time.time_ns() // PERIOD_NS) * PERIOD_NS
    errors = {True: [], False: []}
    try:
        frames = {a: [agent.compute(k, start + k * PERIOD_NS) for k in range(21)] for a, agent in agents.items()}
        for compensate, node in nodes.items():
            for k in range(21):
                for a in agents:
                    if a != 0 or k % 2 == 0:
                        await node._receive(node._state(a, "grpc"), frames[a][k], frames[a][k].ByteSize())
                if k % 2:
                    fused, _ = node.fuse_slot(node.slot_of(start + k * PERIOD_NS))
                    truth = agents[0].source._world.true_world_from_lidar(k, 0)
                    errors[compensate].append(_error(pose_from_proto(fused.reference_pose), truth)[0])
                    assert fused.capture_time_ns == (start + k * PERIOD_NS if compensate else
                                                     max(frames[a][k].capture_time_ns for a in (1, -1)))
    finally:
        for node in nodes.values():
            node._torch_thread.shutdown()
        for agent in agents.values():
            agent._compute_thread.shutdown()
    assert np.mean(errors[False]) > 0.8  # the ego moves about 0.8 m per frame: its last frame is well off
    assert np.mean(errors[True]) < 0.7 * np.mean(errors[False]), errors


async def test_registration_scans_travel_with_frames_and_are_matched_and_a_bad_one_is_set_aside(models) -> None:
    """The ego sends a registration scan with every frame, the others every other frame (on odd frames: their
    turn is their id modulo 2); the node matches agent 1's onto the ego's (its mount error is found to
    centimetres), and a damaged scan block costs only that frame's scan."""
    detector, codec = models
    agents = {a: AgentNode(AgentNodeConfig(agent_id=a, source=SourceConfig(world=WORLD),
                                           odometry=OdometryConfig(enabled=True),
                                           pose_correction=PoseCorrectionConfig(track=False),
                                           registration_scan=ScanConfig(enabled=True, every_frames=1 if a == 0 else 2)),
                           detector, codec, _Mounted(a, MOUNT_ERROR if a == 1 else np.eye(4))) for a in (0, 1, -1)}
    node = _node(models)
    start = (time.time_ns() // PERIOD_NS) * PERIOD_NS
    frames = 8
    try:
        for k in range(frames):
            for a, agent in agents.items():
                frame = agent.compute(k, start + k * PERIOD_NS)
                assert bool(frame.scan_blocks) == (a == 0 or k % 2 == 1)
                if a == -1 and k == 5:
                    frame.scan_blocks[0] = frame.scan_blocks[0][:-1] + b"\x00"  # fails its CRC
                await node._receive(node.agents[a] if a in node.agents else node._state(a, "grpc"), frame,
                                    frame.ByteSize())
            fused, _ = node.fuse_slot(node.slot_of(start + k * PERIOD_NS))
    finally:
        node._torch_thread.shutdown()
        for agent in agents.values():
            agent._compute_thread.shutdown()
    counters = node.counters()
    assert counters["pose_correction"]["1"]["scans_matched"] >= 3, counters["pose_correction"]
    assert counters["agents"]["-1"]["set_aside"] == {"scan": 1}
    one = next(c for c in fused.contributions if c.agent_id == 1)
    assert one.pose_corrected and one.tiles_fresh == agents[1].compute(0, start).tile_count
    # The node's track of agent 1 now holds its mount error: the reported pose moved by it.
    track = node.corrector._tracks[1]
    ego = node.agents[0].latest.world_from_agent
    reported = invert_se3(ego) @ node.agents[1].latest.world_from_agent
    _, bev_from_ground, _ = bev_input(agents[1].source.frame(frames - 1), detector.feature_cell_m)
    truth = reported @ bev_from_ground @ MOUNT_ERROR @ invert_se3(bev_from_ground)  # its mount error, in its BEV frame
    metres, degrees = _error(track.state, truth)
    assert metres < 0.06 and degrees < 0.05, (metres, degrees)  # object lists alone: 0.09 m, 0.09 deg here


class _Noisy(FrameSource):
    """The world's frames with a fresh GNSS error every frame (0.6 m and 0.6 degrees), stated in the covariance."""

    SIGMA = 0.6

    def __init__(self, agent_id: int, world: WorldConfig = WORLD) -> None:
        super().__init__(SourceConfig(world=world), agent_id)

    def frame(self, index: int):
        agent = super().frame(index)
        rng = np.random.default_rng([index, self.agent_id + 100])
        stated = np.diag([self.SIGMA ** 2, self.SIGMA ** 2, 0.0, 0.0, 0.0, np.deg2rad(self.SIGMA) ** 2])
        return dataclasses.replace(agent, world_from_lidar=perturb_pose(agent.world_from_lidar, self.SIGMA, self.SIGMA, rng),
                                   pose_covariance=stated)


async def test_agents_that_track_their_pose_take_every_estimate_and_send_frames_that_line_up(models) -> None:
    """White GNSS noise: an offset learnt from one frame cannot fix the next, so the node sends a tracking agent
    every estimate it measured; the agent carries each to its next frame with its odometry and builds that frame
    there. The frames it sends then sit close to where they really are relative to the ego's (what lets the
    node warp them by whole cells), and each carries the agent's own GNSS fix apart."""
    detector, codec = models
    agents = {a: AgentNode(AgentNodeConfig(agent_id=a, source=SourceConfig(world=WORLD),
                                           odometry=OdometryConfig(enabled=True),
                                           registration_scan=ScanConfig(enabled=True, every_frames=1 if a == 0 else 2)),
                           detector, codec, _Noisy(a)) for a in (0, 1, -1)}
    assert all(isinstance(agent.pose, TrackedPose) for agent in agents.values())  # odometry on: tracked by default
    node = _node(models)
    start = (time.time_ns() // PERIOD_NS) * PERIOD_NS
    sent_errors, own_errors = [], []
    try:
        for a, agent in agents.items():
            node._state(a, "grpc").send_control = agent._on_control
        for k in range(WORLD.frames):
            frames = {}
            for a, agent in agents.items():
                frames[a] = agent.compute(k, start + k * PERIOD_NS)
                assert frames[a].HasField("own_pose")
                await node._receive(node.agents[a] if a in node.agents else node._state(a, "grpc"), frames[a],
                                    frames[a].ByteSize())
            fused, _ = node.fuse_slot(node.slot_of(start + k * PERIOD_NS))
            node._send_corrections()
            # The fused frame is the ego's; where the ego's own fix puts it goes with it (for ground truth).
            assert np.allclose(pose_from_proto(fused.reference_own_pose), pose_from_proto(frames[0].own_pose), atol=1e-6)
            truth = {}  # where each sent frame really is: its own fix moved by the fix's true error
            for a in (0, 1):
                own = agents[a].source.frame(k)
                true_lidar = agents[a].source._world.true_world_from_lidar(k, a)
                truth[a] = true_lidar @ invert_se3(own.world_from_lidar) @ pose_from_proto(frames[a].own_pose)
            sent = invert_se3(pose_from_proto(frames[0].pose)) @ pose_from_proto(frames[1].pose)
            own_fix = invert_se3(pose_from_proto(frames[0].own_pose)) @ pose_from_proto(frames[1].own_pose)
            real = invert_se3(truth[0]) @ truth[1]
            sent_errors.append(_error(sent, real))
            own_errors.append(_error(own_fix, real))
    finally:
        node._torch_thread.shutdown()
        for agent in agents.values():
            agent._compute_thread.shutdown()
    assert node.agents[1].corrections_sent >= WORLD.frames // 2
    assert agents[1].pose.applied >= WORLD.frames // 2 and agents[1].pose.refused == 0
    assert agents[0].pose.applied == 0  # the ego is the reference
    late = np.array(sent_errors[8:])
    own = np.array(own_errors[8:])
    assert np.median(own[:, 0]) > 0.5  # two GNSS fixes of 0.6 m apart
    assert np.median(late[:, 0]) < 0.25 and np.median(late[:, 1]) < 0.15, late
