"""``cpstream bench pose``: fusion AP under pose noise, with and without the fusion node's online correction.

The held-out world is generated once; each noise level then replaces every agent's reported pose by
the true one with Gaussian errors (position in metres, heading in degrees, turned about the agent),
the same unit draws scaled by the level, so levels differ only in size. Agents report the covariance
of their pose error, as a GNSS/INS does. Each level runs twice over the frames:

* open loop: every agent builds its BEV frame at its noisy pose and detects alone; the corrector
  (:class:`fusion.alignment.PoseCorrector`) registers their object lists and matches their registration
  scans, and intermediate and late fusion run on the reported, the corrected and the exact relative
  poses (the ``ablation``);
* closed loop (``correction: true`` in ``runs``): what the live system does. Every agent tracks its own
  pose (:class:`agents.pose.TrackedPose`: its odometry, its GNSS and every estimate the node sent back,
  ``--feedback-delay`` frames after its frame) and builds its BEV frame there; the node corrects as
  above, weighing each agent's own GNSS fix, and fuses.

Agents send registration scans as ``launch/pose-noise.yaml`` has them sent (the ego's with every frame,
the others' in turns every ``--scan-every`` frames), packed and unpacked as on the wire.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from agents import SceneFrame
from agents.node import bev_input, ground_points, ground_pose
from agents.odometry import LidarOdometry, OdometryConfig, OdometryStep
from agents.pose import CorrectionRefused, PoseCorrectionConfig, TrackedPose
from fusion.alignment import (AgentView, CorrectionConfig, FilterConfig, PlanarSigma, PoseCorrector, PoseFilter,
                              planar_delta)
from launch.console import console, progress
from launch.datasets import HELD_OUT_SEED, scene_frames
from launch.eval_cmd import REPO_ROOT
from launch.samples import coop_sample
from launch.world_cmd import world_config
from models.bev import aligned_bev_frame
from models.cooperative import merge_late
from models.detector import BevDetector, load_checkpoint
from models.geometry import invert_se3, perturb_pose, transform_boxes
from models.scan import ScanConfig, pack_scan, scan_due, thin_scan, unpack_scan
from models.metrics import APAccumulator

NOISE_DRAW = 7919
POSE_CHECKPOINT = REPO_ROOT / "models" / "checkpoints" / "mobiledet_tiny_jitter.pt"
"""The default detector here: trained with every agent's frame moved off the feature lattice
(train_mobiledet_tiny_jitter.yaml), as noisy poses move it; higher AP@0.7 than mobiledet_tiny.pt on held-out
worlds with and without noise."""
"""Mixed into each agent's noise seed, apart from the world's own streams."""


def noisy_frame(frame: SceneFrame, sigma: float, seed: int) -> SceneFrame:
    """``frame`` with every agent's reported pose redrawn around its true pose (``sigma`` metres and degrees)."""
    agents = {}
    for agent_id, agent in frame.agents.items():
        rng = np.random.default_rng([seed, frame.frame_index, agent_id + 100, NOISE_DRAW])
        pose = perturb_pose(agent.true_world_from_lidar, sigma, sigma, rng)
        agents[agent_id] = replace(agent, world_from_lidar=pose)
    return replace(frame, agents=agents)


def true_ego_from_agent(frame: SceneFrame, order: list[int], lattice_m: float) -> np.ndarray:
    """``[A, 4, 4]`` where each agent's BEV frame (built from its reported pose) really is, in the ego's."""
    true_world_from_bev = []
    for agent_id in order:
        agent = frame.agents[agent_id]
        _, bev_from_ground = aligned_bev_frame(ground_pose(agent), lattice_m)
        true_world_from_bev.append(ground_pose(agent, true=True) @ invert_se3(bev_from_ground))
    ego_from_world = invert_se3(true_world_from_bev[0])
    return np.stack([ego_from_world @ m for m in true_world_from_bev])


def pose_error(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(metres, degrees) between two poses of the same frame, at its origin."""
    delta = planar_delta(invert_se3(truth) @ estimate)
    return float(np.hypot(delta[0], delta[1])), float(np.rad2deg(abs(delta[2])))


METHODS = ("reported", "registration", "odometry", "odometry+registration", "odometry+registration+scans", "exact")
"""Open loop (every agent builds its BEV frame at its noisy GNSS pose), poses fused: as reported; corrected by
object registration frame by frame; each agent's pose filtered with its odometry alone; relative poses tracked
with odometry and object registration; the same with the agents' registration scans matched too, on the frames
that carry one; the exact relative poses (the ceiling of any open-loop correction: each agent's BEV frame still
sits at its noisy pose, off the ego's lattice, so its features are resampled and blurred)."""
OPEN_CORRECTED = "odometry+registration+scans"
CORRECTED = "closed loop"
CLOSED = (CORRECTED, "closed loop, exact")
"""Closed loop (what the live system does, and what ``correction: true`` means in the result): each agent tracks
its own pose with its odometry, its GNSS and every estimate the fusion node sends back
(:class:`agents.pose.TrackedPose`), and builds its BEV frame there; the node corrects as in
``odometry+registration+scans``, weighing each agent's own GNSS fix (not its tracked pose, which carries the
node's own estimates); ``closed loop, exact`` fuses the same frames with the exact relative poses."""


@torch.no_grad()
def odometry_track(frames: list[SceneFrame], config: OdometryConfig, detector: BevDetector | None = None
                   ) -> dict[tuple[int, int], OdometryStep]:
    """Each agent's scan-to-scan odometry over the frames, keyed by (frame index, agent id); with a
    ``detector``, each sweep's match leaves out the vehicles the agent detects in it (as an agent does)."""
    tracks = {a: LidarOdometry(config) for a in frames[0].agents}
    detect = detector is not None and config.exclude_detections
    device = next(detector.parameters()).device if detect else None
    with progress() as bar:
        task = bar.add_task("lidar odometry", total=len(frames))
        out = {}
        for frame in frames:
            for agent_id, agent in frame.agents.items():
                detections = None
                if detect:
                    _, bev_from_ground, points = bev_input(agent, detector.feature_cell_m)
                    found = detector.detect(detector.features([torch.from_numpy(points).to(device)]))[0]
                    detections = transform_boxes(invert_se3(bev_from_ground), found[:, :8].cpu().numpy())
                out[(frame.frame_index, agent_id)] = tracks[agent_id].step(ground_points(agent), detections)
            bar.advance(task)
    return out


@torch.no_grad()
def _sense(detector: BevDetector, frame: SceneFrame) -> tuple:
    """Every agent's points in its BEV frame (its reported pose's), the agents' order (the ego first), where
    their frames really are relative to the ego's, which agents sensed anything, their features and their
    own detections."""
    device = next(detector.parameters()).device
    sample = coop_sample(frame, detector.grid, detector.feature_cell_m)
    order = [frame.ego_id] + [a for a in sorted(frame.agents) if a != frame.ego_id]
    truth = true_ego_from_agent(frame, order, detector.feature_cell_m)
    sensing = [k for k, p in enumerate(sample.points) if len(p)]
    features = detector.features([torch.from_numpy(sample.points[k]).to(device) for k in sensing])
    per_agent = [d[:, :8].cpu().numpy().astype(np.float64) for d in detector.detect(features)]
    return sample, order, truth, sensing, features, per_agent


@torch.no_grad()
def _frame_runs(detector: BevDetector, frame: SceneFrame, sigma: float, state: dict, odometry: dict, seed: int):
    """Detections per (fusion, method) for one frame, its ground truth and the pose errors."""
    device = next(detector.parameters()).device
    noisy = noisy_frame(frame, sigma, seed)
    sample, order, truth, sensing, features, per_agent = _sense(detector, noisy)
    report = PlanarSigma(sigma, float(np.deg2rad(sigma)))
    filtered, odom_from_agent = {}, {}
    for agent_id in order:
        world_from_bev, bev_from_ground = aligned_bev_frame(ground_pose(noisy.agents[agent_id]), detector.feature_cell_m)
        step = odometry[(frame.frame_index, agent_id)]
        odom_from_agent[agent_id] = (step.odom_from_ground @ invert_se3(bev_from_ground),
                                     PlanarSigma(step.sigma_xy_m, step.sigma_yaw_rad))
        filtered[agent_id] = state["filters"][agent_id].update(frame.frame_index, world_from_bev, report,
                                                              *odom_from_agent[agent_id])
    ego_from_world = invert_se3(filtered[order[0]].world_from_agent)
    poses = {"reported": sample.ego_from_agent[sensing],
             "odometry": np.stack([ego_from_world @ filtered[order[k]].world_from_agent for k in sensing])}
    scans = {}  # as agents send them: packed and unpacked, the ego's with every frame (its local link)
    for k in sensing:
        config = state["scan_config"].model_copy(update={"every_frames": 1}) if k == 0 else state["scan_config"]
        if scan_due(config, order[k], frame.frame_index):
            scans[order[k]] = unpack_scan(pack_scan(thin_scan(sample.points[k], config), config))
    applied = {}
    for name, with_odometry, with_scans in (("registration", False, False), ("odometry+registration", True, False),
                                            (OPEN_CORRECTED, True, True)):
        views = [AgentView(order[k], poses["reported"][i], per_agent[i], report, frame.frame_index,
                           *(odom_from_agent[order[k]] if with_odometry else (None, None)),
                           scan=scans.get(order[k]) if with_scans else None)
                 for i, k in enumerate(sensing)]
        corrections = state[name].correct(views[0], views[1:]) if sensing[0] == 0 else {}
        poses[name] = np.stack([corrections[v.agent_id].ref_from_agent if v.agent_id in corrections
                                else v.ref_from_agent for v in views])
        applied[name] = [bool(corrections.get(v.agent_id) and corrections[v.agent_id].applied) for v in views]
    poses["exact"] = truth[sensing]
    out = {}
    for method in METHODS:
        merged = detector.fuse(features, torch.as_tensor(poses[method], dtype=torch.float32, device=device))
        out[("intermediate", method)] = detector.detect(merged, fused=True)[0][:, :8].cpu().numpy()
        out[("late", method)] = merge_late(per_agent, poses[method], detector.config.nms_iou_threshold)
    errors = {m: [(*pose_error(poses[m][i], truth[k]), applied.get(m, [True] * len(sensing))[i])
                  for i, k in enumerate(sensing) if i > 0] for m in METHODS}
    return out, sample.gt_boxes, errors


@torch.no_grad()
def _closed_loop_frame(detector: BevDetector, frame: SceneFrame, sigma: float, loop: dict, odometry: dict,
                       seed: int):
    """One frame of the closed loop: every agent tracks its own pose (:class:`agents.pose.TrackedPose`: its
    GNSS draw, its odometry and the node's earlier estimates), builds its BEV frame there, and the node
    corrects, fuses and sends each agent its estimate, which arrives ``loop["delay"]`` frames later."""
    device = next(detector.parameters()).device
    index = frame.frame_index
    for _due, agent_id, sequence, world_from_frame, covariance in [m for m in loop["inbox"] if m[0] <= index]:
        try:
            loop["tracked"][agent_id].on_correction(sequence, world_from_frame, covariance)
        except CorrectionRefused:
            pass  # counted by the agent's TrackedPose
    loop["inbox"] = [m for m in loop["inbox"] if m[0] > index]
    noisy = noisy_frame(frame, sigma, seed)
    report = PlanarSigma(sigma, float(np.deg2rad(sigma)))
    agents, sigmas, bev, own_fix = {}, {}, {}, {}
    for agent_id, agent in noisy.agents.items():
        step = odometry[(index, agent_id)]
        used, used_sigma, _ = loop["tracked"][agent_id].report(
            index, agent.world_from_lidar, report, step.odom_from_ground, PlanarSigma(step.sigma_xy_m, step.sigma_yaw_rad))
        agents[agent_id] = replace(agent, world_from_lidar=used)
        sigmas[agent_id] = used_sigma
        bev[agent_id] = aligned_bev_frame(ground_pose(agents[agent_id]), detector.feature_cell_m)
        loop["tracked"][agent_id].remember_frame(index, bev[agent_id][0], used)
        own_fix[agent_id] = agent.world_from_lidar @ invert_se3(used) @ bev[agent_id][0]  # the frame where GNSS puts it
    sample, order, truth, sensing, features, per_agent = _sense(detector, replace(noisy, agents=agents))
    views = []
    for i, k in enumerate(sensing):
        agent_id = order[k]
        step = odometry[(index, agent_id)]
        config = loop["scan_config"].model_copy(update={"every_frames": 1}) if k == 0 else loop["scan_config"]
        scan = None
        if scan_due(config, agent_id, index, sigmas[agent_id].xy_m):
            blocks = pack_scan(thin_scan(sample.points[k], config), config)
            scan = unpack_scan(blocks)
            if k > 0:
                loop["scan_bytes"].append(sum(len(b) for b in blocks))
        views.append(AgentView(agent_id, sample.ego_from_agent[k], per_agent[i], sigmas[agent_id], index,
                               step.odom_from_ground @ invert_se3(bev[agent_id][1]),
                               PlanarSigma(step.sigma_xy_m, step.sigma_yaw_rad), scan=scan,
                               own_fix=invert_se3(bev[order[0]][0]) @ own_fix[agent_id], own_fix_sigma=report))
    corrections = loop["corrector"].correct(views[0], views[1:]) if sensing[0] == 0 else {}
    poses = np.stack([corrections[v.agent_id].ref_from_agent if v.agent_id in corrections else v.ref_from_agent
                      for v in views])
    world_from_ego = bev[order[0]][0]
    for v in views[1:]:
        c = corrections.get(v.agent_id)
        if c is not None and c.applied and c.measured:
            loop["inbox"].append((index + loop["delay"], v.agent_id, index, world_from_ego @ c.ref_from_agent,
                                  c.covariance))
    out = {}
    for name, placed in zip(CLOSED, (poses, truth[sensing])):
        merged = detector.fuse(features, torch.as_tensor(placed, dtype=torch.float32, device=device))
        out[("intermediate", name)] = detector.detect(merged, fused=True)[0][:, :8].cpu().numpy()
        out[("late", name)] = merge_late(per_agent, placed, detector.config.nms_iou_threshold)
    errors = [(*pose_error(poses[i], truth[k]), bool(corrections.get(order[k]) and corrections[order[k]].applied))
              for i, k in enumerate(sensing) if i > 0]
    return out, sample.gt_boxes, {CORRECTED: errors}


@torch.no_grad()
def latency_runs(detector: BevDetector, frames: list[SceneFrame], delays: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    """Intermediate-fusion AP when the other agents' newest frames are ``delay`` frames old: their features
    placed with the pose of their own capture (what the fusion node does: every frame carries its pose) or,
    naively, with the agents' current poses (as if captured now). Exact poses; objects keep moving."""
    device = next(detector.parameters()).device
    lattice = detector.feature_cell_m
    scores = {(d, comp): APAccumulator() for d in (0, *delays) for comp in (True, False)}
    past: list[tuple[dict, dict]] = []  # per frame: agent -> world_from_bev, agent -> features [1, C, h, w]
    with progress() as bar:
        task = bar.add_task("delayed agents", total=len(frames))
        for frame in frames:
            sample = coop_sample(frame, detector.grid, lattice)
            order = [frame.ego_id] + [a for a in sorted(frame.agents) if a != frame.ego_id]
            poses = {a: aligned_bev_frame(ground_pose(frame.agents[a]), lattice)[0] for a in order}
            features = detector.features([torch.from_numpy(p).to(device) for p in sample.points])
            past = (past + [(poses, {a: features[i:i + 1] for i, a in enumerate(order)})])[-(max(delays) + 1):]
            ego_from_world = invert_se3(poses[order[0]])
            for d in (0, *delays):
                if d >= len(past):
                    continue
                then_poses, then_features = past[-1 - d]
                stack = torch.cat([features[:1]] + [then_features[a] for a in order[1:]])
                for comp in (True, False):
                    placed = [np.eye(4)] + [ego_from_world @ (then_poses[a] if comp else poses[a]) for a in order[1:]]
                    merged = detector.fuse(stack, torch.as_tensor(np.stack(placed), dtype=torch.float32, device=device))
                    det = detector.detect(merged, fused=True)[0][:, :8].cpu().numpy()
                    det = det[detector.grid.contains(det[:, :2])] if len(det) else det
                    scores[(d, comp)].add_frame(det, sample.gt_boxes)
            bar.advance(task)
    out = []
    for (d, comp), acc in scores.items():
        if d == 0 and not comp:
            continue
        ap = {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in acc.result().items()}
        out.append({"delay_ms": d * 100, "pose_at": "capture" if comp else "now", "ap": ap, "frames": acc.frames})
        console.print(f"others {d * 100} ms late, placed with the pose {'at capture' if comp else 'of now'}: AP {ap}")
    return out


def _residual(errors: dict[str, list[tuple]], sigma: float) -> dict:
    """Median pose error of the non-ego agents relative to the ego, per method."""

    def stats(rows: np.ndarray) -> dict:
        if not len(rows):
            return {"xy_m": None, "yaw_deg": None}
        return {"xy_m": round(float(np.median(rows[:, 0])), 4), "yaw_deg": round(float(np.median(rows[:, 1])), 4)}

    out = {"noise": sigma}
    for method, rows in errors.items():
        e = np.array([r[:2] for r in rows]).reshape(-1, 2)
        out[method] = {**stats(e), "agent_frames": len(e),
                       "applied_share": round(float(np.mean([r[2] for r in rows])), 4) if rows else None}
    return out


def bench_pose(args: argparse.Namespace) -> dict:
    levels = [float(x) for x in str(args.noise_levels).split(",") if x.strip()]
    detector = load_checkpoint(args.checkpoint or POSE_CHECKPOINT)[0].eval()
    if args.seed is None:
        args.seed = HELD_OUT_SEED
    args.pose_noise = None
    config = world_config(args)
    world = config.model_copy(update={"camera": config.camera.model_copy(update={"count": 0})})
    total, frames_iter = scene_frames(None, world)
    with progress() as bar:
        task = bar.add_task("generating the world", total=total)
        frames = []
        for frame in frames_iter:
            frames.append(frame)
            bar.advance(task)
    odometry = odometry_track(frames, OdometryConfig(enabled=True), detector)
    scan_config = ScanConfig(enabled=True, every_frames=args.scan_every)
    runs, ablation, residuals, scan_bytes = [], [], [], []
    for sigma in levels:
        state = {"filters": {a: PoseFilter(FilterConfig()) for a in frames[0].agents},
                 "registration": PoseCorrector(CorrectionConfig()),
                 "odometry+registration": PoseCorrector(CorrectionConfig()),
                 OPEN_CORRECTED: PoseCorrector(CorrectionConfig()), "scan_config": scan_config}
        loop = {"tracked": {a: TrackedPose(PoseCorrectionConfig()) for a in frames[0].agents}, "inbox": [],
                "corrector": PoseCorrector(CorrectionConfig()), "scan_config": scan_config,
                "delay": args.feedback_delay, "scan_bytes": scan_bytes}
        scores = {(mode, m): APAccumulator() for mode in ("intermediate", "late") for m in (*METHODS, *CLOSED)}
        errors = {m: [] for m in (*METHODS, CORRECTED)}
        for name, step in (("agents as reported", _frame_runs), ("closed loop", _closed_loop_frame)):
            with progress() as bar:
                task = bar.add_task(f"pose noise {sigma:g} m / {sigma:g} deg, {name}", total=len(frames))
                for frame in frames:
                    out, gt, frame_errors = step(detector, frame, sigma, state if step is _frame_runs else loop,
                                                 odometry, args.seed)
                    for key, det in out.items():
                        det = det[detector.grid.contains(det[:, :2])] if len(det) else det
                        scores[key].add_frame(det, gt)
                    for m, rows in frame_errors.items():
                        errors[m].extend(rows)
                    bar.advance(task)
        for (mode, method), acc in scores.items():
            ap = {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in acc.result().items()}
            ablation.append({"noise": sigma, "fusion": mode, "poses": method, "ap": ap})
            if method in ("reported", CORRECTED):
                runs.append({"noise": sigma, "fusion": mode, "correction": method != "reported", "ap": ap})
            console.print(f"noise {sigma:g}: {mode:>12} {method:>28}: AP {ap}")
        residuals.append(_residual(errors, sigma))
        residuals[-1]["corrector"] = {a: c.as_dict() for a, c in loop["corrector"].counters.items()}
        residuals[-1]["agents"] = {a: {"estimates_used": t.applied, "estimates_refused": t.refused,
                                       "last_refusal": t.last_error} for a, t in loop["tracked"].items()}
        console.print(f"noise {sigma:g}: pose error {residuals[-1]}")
    top = max(residuals, key=lambda r: r["noise"])
    result = {"data": f"synthetic seed {args.seed}", "agents": world.agents, "frames": len(frames),
              "checkpoint": Path(args.checkpoint or POSE_CHECKPOINT).name, "runs": runs,
              "residual": {"xy_m": top[CORRECTED]["xy_m"], "yaw_deg": top[CORRECTED]["yaw_deg"],
                           "noise": top["noise"], "statistic": "median over non-ego agent-frames",
                           "as_reported": {k: top["reported"][k] for k in ("xy_m", "yaw_deg")}},
              "scans": {"every_frames": args.scan_every, "count": len(scan_bytes),
                        "median_bytes": int(np.median(scan_bytes)) if scan_bytes else 0,
                        "bytes_per_agent_frame": round(float(np.sum(scan_bytes)) / max(
                            len(levels) * len(frames) * (world.agents - 1), 1), 1),
                        "note": "the non-ego agents' scans in the closed loop (the ego's go over its local link)"},
              "residual_by_noise": residuals, "ablation": ablation,
              "latency": latency_runs(detector, frames) if args.latency else []}
    if args.plot is not None:
        plot_pose(result, args.plot)
    return result


def plot_pose(result: dict, path: Path) -> None:
    """AP@0.5 and AP@0.7 against pose noise, with and without correction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, iou in zip(axes, ("0.5", "0.7")):
        for mode, colour in (("intermediate", "tab:blue"), ("late", "tab:orange")):
            for fixed, style in ((True, "-"), (False, "--")):
                rows = [r for r in result["runs"] if r["fusion"] == mode and r["correction"] == fixed]
                ax.plot([r["noise"] for r in rows], [r["ap"][iou] for r in rows], style, color=colour, marker="o",
                        label=f"{mode}, {'corrected' if fixed else 'as reported'}")
        ax.set_title(f"AP@{iou}")
        ax.set_xlabel("pose noise σ (m and degrees)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AP")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['data']}, {result['agents']} agents, {result['frames']} frames")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
