"""Online pose correction: agents' object lists and registration scans registered against each other.

Agents do not know exactly where they are. Every frame carries the agent's own
detections, so the fusion node can see where the objects two agents both detect
disagree and move the agent until they agree: a RANSAC fit of a planar rigid
motion (x, y, heading) to matched box centres, refined by least squares over the
inliers. Every few frames an agent also sends a thinned copy of its sweep
(:mod:`models.scan`), which is matched onto the reference's by ICP: the walls and
vehicles both see fix the relative pose to centimetres, where boxes seen from
different sides agree only to about half a metre. Each fit is then weighed against
the pose the agent reported, with both covariances (a Kalman-style update), so that
a pose the agent knows well is barely moved and an uncertain fit is not applied at all.

All maths here is pure and planar; the stateful :class:`PoseCorrector` keeps a
sliding window of each agent's corrections, whose steady part (a mount or
calibration error) is sent back to the agent so that its later frames arrive
corrected.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.geometry import invert_se3, planar, transform_boxes, transform_points, wrap_angle_rad
from models.pose_filter import (CHI2_3DOF_999, QUARTER_TURN, FilteredPose, FilterConfig, PlanarSigma,  # noqa: F401
                                PoseFilter, correction_matrix, planar_error)  # (some re-exported)

log = logging.getLogger(__name__)



class CorrectionConfig(BaseModel):
    """How the fusion node corrects agents' poses (a launch file's ``fusion.correction`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    min_matches: int = Field(3, ge=2)
    """Objects both sides must detect before a correction is applied."""
    inlier_m: float = Field(0.6, gt=0.0)
    """Largest distance between two detections of the same object after the fit."""
    detection_sigma_m: float = Field(0.5, gt=0.0)
    """Least position error (per axis) assumed for a detection in the fit's covariance: two agents see an
    object from different sides, so their boxes disagree by more than their scatter about the fit shows."""
    min_score: float = Field(0.3, ge=0.0, le=1.0)
    """Detections below this score are not used for matching."""
    search_sigmas: float = Field(3.0, gt=0.0)
    """Candidate matches lie within this many standard deviations of the reported relative pose."""
    max_shift_m: float = Field(3.0, gt=0.0)
    """A correction that moves an agent by more than this is refused (and counted)."""
    max_turn_deg: float = Field(3.0, gt=0.0)
    """A correction that turns an agent by more than this is refused (and counted)."""
    default_sigma_xy_m: float = Field(1.0, ge=0.0)
    """Position uncertainty assumed for a pose that comes without a covariance."""
    default_sigma_yaw_deg: float = Field(1.0, ge=0.0)
    """Heading uncertainty assumed for a pose that comes without a covariance."""
    window: int = Field(30, ge=2)
    """Frames of each agent's corrections kept to estimate its steady error."""
    feedback_min_frames: int = Field(10, ge=2)
    """Applied corrections needed in the window before a steady error is sent back to the agent."""
    feedback_min_shift_m: float = Field(0.1, ge=0.0)
    feedback_min_turn_deg: float = Field(0.1, ge=0.0)
    scans: bool = True
    """Match agents' registration scans (when their frames carry one) onto the reference's."""
    scan_correspondence_m: tuple[float, ...] = (2.0, 1.0, 0.5)
    """ICP stages, coarse to fine: the farthest a scan point may be from its match in each."""
    scan_min_matches: int = Field(60, ge=10)
    """Matched points the last stage needs before its fit is used."""
    scan_min_fitness: float = Field(0.03, ge=0.0, le=1.0)
    """Share of the agent's scan points that must find a match in the last stage."""
    scan_sigma_m: float = Field(0.05, gt=0.0)
    """Least error assumed for one point-to-plane distance (voxels, quantisation, different viewpoints)."""
    scan_probe_m: float = Field(1.0, gt=0.0)
    """The fit is checked by starting ICP this far away along its least-constrained direction (both ways)."""
    scan_probe_anisotropy: float = Field(4.0, ge=1.0)
    """Probed only when the fit's variance one way is this many times the other's (walls mostly one way)."""
    scan_probe_tolerance_m: float = Field(0.05, gt=0.0)
    """Where those probes settle farther than this from the fit, the spread is added to its variance that way."""
    reopen_after: int = Field(2, ge=1)
    """After this many fits in a row (scans or objects) disagree with an agent's track, the track is reopened to
    the uncertainty of the agent's own fix and the fit tried again: a track that odometry led astray
    confidently (a wrong scan match it took as precise) would otherwise refuse every fit that could fix it."""
    scan_effective_points: int = Field(50, ge=1)
    """The fit's covariance counts the matches as at most this many independent ones (neighbouring
    points on one wall err alike)."""


@dataclass(frozen=True, slots=True)
class Registration:
    """A fit of an agent's detections onto the reference's, as a correction of its relative pose.

    The correction turns the agent by ``delta[2]`` about its origin, then moves it by ``delta[:2]``
    (metres, radians; in the reference frame). ``covariance`` ``[3, 3]`` is that of ``delta``.
    """

    delta: np.ndarray  # [3] dx_m, dy_m, dyaw_rad
    covariance: np.ndarray  # [3, 3]
    matches: int
    rms_m: float


@dataclass(frozen=True, slots=True)
class Correction:
    """What the corrector decided for one agent in one frame."""

    agent_id: int
    ref_from_agent: np.ndarray  # [4, 4] the pose to warp with (corrected, or as reported)
    applied: bool
    refused: bool
    """The fit was found but moved the agent beyond the configured bound (counted apart)."""
    reason: str
    """Why it was not applied ('' when applied)."""
    matches: int = 0
    delta: np.ndarray = field(default_factory=lambda: np.zeros(3))  # [3] the correction applied
    measured: bool = False
    """This frame's objects or scan fixed the estimate (not only the track carried it)."""
    covariance: np.ndarray | None = None
    """``[3, 3]`` of the estimate (x, y, heading at the agent's origin, the reference's axes), when applied."""


def fit_se2(source_xy: np.ndarray, target_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rotation ``[2, 2]`` and translation ``[2]`` with ``target ≈ R source + t`` (N >= 2)."""
    src_mean, dst_mean = source_xy.mean(axis=0), target_xy.mean(axis=0)
    cross = (source_xy - src_mean).T @ (target_xy - dst_mean)  # [2, 2]
    angle = np.arctan2(cross[0, 1] - cross[1, 0], cross[0, 0] + cross[1, 1])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return rotation, dst_mean - rotation @ src_mean


def relative_prior(ref: PlanarSigma, agent: PlanarSigma, origin_xy: np.ndarray) -> np.ndarray:
    """``[3, 3]`` covariance of an agent's pose relative to the reference, at the agent's origin.

    The agent's own errors move its origin and turn it about itself; the reference's heading error
    also swings the agent's origin about the reference's (the farther, the more).
    """
    lever = QUARTER_TURN @ origin_xy
    cov = np.zeros((3, 3))
    cov[:2, :2] = (ref.xy_m ** 2 + agent.xy_m ** 2) * np.eye(2) + ref.yaw_rad ** 2 * np.outer(lever, lever)
    cov[:2, 2] = cov[2, :2] = ref.yaw_rad ** 2 * lever
    cov[2, 2] = ref.yaw_rad ** 2 + agent.yaw_rad ** 2
    return cov


def _candidates(ref_xy: np.ndarray, agent_xy: np.ndarray, prior: np.ndarray, origin_xy: np.ndarray,
                sigmas: float) -> np.ndarray:
    """``[K, 2]`` (ref index, agent index) pairs close enough under the prior to be the same object."""
    arm = np.linalg.norm(agent_xy - origin_xy, axis=1)  # a heading error moves far boxes more
    spread = np.sqrt(np.trace(prior[:2, :2]) / 2 + prior[2, 2] * arm ** 2)  # [A]
    distance = np.linalg.norm(ref_xy[:, None] - agent_xy[None], axis=2)  # [R, A]
    return np.argwhere(distance <= sigmas * spread[None] + 0.5)


def _inliers(ref_xy: np.ndarray, moved_xy: np.ndarray, radius_m: float) -> list[tuple[int, int]]:
    """One-to-one matches within ``radius_m``, closest pairs first."""
    distance = np.linalg.norm(ref_xy[:, None] - moved_xy[None], axis=2)
    pairs = np.argwhere(distance <= radius_m)
    pairs = pairs[np.argsort(distance[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_r, used_a, out = set(), set(), []
    for r, a in pairs:
        if r not in used_r and a not in used_a:
            used_r.add(r), used_a.add(a)
            out.append((int(r), int(a)))
    return out


def _score(ref_xy: np.ndarray, moved_xy: np.ndarray, radius_m: float) -> tuple[int, float]:
    matches = _inliers(ref_xy, moved_xy, radius_m)
    residual = sum(np.sum((ref_xy[r] - moved_xy[a]) ** 2) for r, a in matches)
    return len(matches), -residual


def _hypotheses(ref_xy: np.ndarray, agent_xy: np.ndarray, pairs: np.ndarray,
                limit: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Rigid motions ``[H, 2, 2]``, ``[H, 2]``: a pure shift per candidate pair, then the motion through each two
    pairs whose spans agree (at most ``limit`` of those, in the order of ``itertools.combinations``)."""
    rotations = [np.repeat(np.eye(2)[None], len(pairs), axis=0)]
    shifts = [ref_xy[pairs[:, 0]] - agent_xy[pairs[:, 1]]]
    first, second = np.triu_indices(len(pairs), k=1)
    (r1, a1), (r2, a2) = pairs[first].T, pairs[second].T
    span_agent, span_ref = agent_xy[a2] - agent_xy[a1], ref_xy[r2] - ref_xy[r1]
    length = np.linalg.norm(span_agent, axis=1)
    keep = (r1 != r2) & (a1 != a2) & (length >= 2.0) & (np.abs(length - np.linalg.norm(span_ref, axis=1)) <= 1.0)
    keep = np.flatnonzero(keep)[:limit]
    u, v = span_agent[keep], span_ref[keep]
    angle = np.arctan2(u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0], np.sum(u * v, axis=1))  # turns u onto v
    c, s_ = np.cos(angle), np.sin(angle)
    turn = np.stack([np.stack([c, -s_], axis=1), np.stack([s_, c], axis=1)], axis=1)  # [K, 2, 2]
    mid_agent = (agent_xy[a1[keep]] + agent_xy[a2[keep]]) / 2
    mid_ref = (ref_xy[r1[keep]] + ref_xy[r2[keep]]) / 2
    rotations.append(turn)
    shifts.append(mid_ref - np.einsum("kij,kj->ki", turn, mid_agent))
    return np.concatenate(rotations), np.concatenate(shifts)


def _best_hypothesis(ref_xy: np.ndarray, agent_xy: np.ndarray, rotations: np.ndarray, shifts: np.ndarray,
                     radius_m: float) -> tuple[tuple[np.ndarray, np.ndarray] | None, int]:
    """The motion with the most one-to-one matches (then the least squared residual) and that count.

    Every hypothesis is first counted loosely at once (agent boxes with some reference box within
    ``radius_m``: never fewer than its one-to-one matches); the exact count is then taken in that
    order only until no looser count can beat the best exact one.
    """
    moved = np.einsum("hij,aj->hai", rotations, agent_xy) + shifts[:, None]  # [H, A, 2]
    nearest = np.linalg.norm(moved[:, :, None] - ref_xy[None, None], axis=3).min(axis=2)  # [H, A]
    loose = (nearest <= radius_m).sum(axis=1)  # [H]
    best, best_score = None, (0, 0.0)
    for h in np.argsort(-loose, kind="stable"):
        if loose[h] < best_score[0]:
            break
        score = _score(ref_xy, moved[h], radius_m)
        if score > best_score:
            best, best_score = (rotations[h], shifts[h]), score
    return best, best_score[0]


def register(ref_boxes: np.ndarray, agent_boxes: np.ndarray, origin_xy: np.ndarray, prior: np.ndarray,
             config: CorrectionConfig) -> Registration | None:
    """Fit the agent's detections (already placed in the reference frame by its reported pose) onto
    the reference's.

    Args:
        ref_boxes: ``[R, >=2]`` the reference's detections (x, y first), reference frame.
        agent_boxes: ``[A, >=2]`` the agent's detections moved into the reference frame.
        origin_xy: ``[2]`` the agent's origin in the reference frame (the correction turns about it).
        prior: ``[3, 3]`` covariance of the reported relative pose (:func:`relative_prior`).

    Returns:
        The best fit with at least ``config.min_matches`` matched objects, or None.
    """
    ref_xy, agent_xy = np.asarray(ref_boxes)[:, :2], np.asarray(agent_boxes)[:, :2]
    if len(ref_xy) < config.min_matches or len(agent_xy) < config.min_matches:
        return None
    pairs = _candidates(ref_xy, agent_xy, prior, origin_xy, config.search_sigmas)
    if len(pairs) == 0:
        return None
    best, matched = _best_hypothesis(ref_xy, agent_xy, *_hypotheses(ref_xy, agent_xy, pairs), config.inlier_m)
    if best is None or matched < config.min_matches:
        return None
    rotation, shift = best
    for _ in range(3):  # refine on all inliers, re-associating each time
        matches = _inliers(ref_xy, agent_xy @ rotation.T + shift, config.inlier_m)
        if len(matches) < config.min_matches:
            return None
        r_idx, a_idx = np.array(matches).T
        rotation, shift = fit_se2(agent_xy[a_idx], ref_xy[r_idx])
    return _registration(ref_xy[r_idx], agent_xy[a_idx], rotation, shift, origin_xy, config.detection_sigma_m)


def _registration(ref_xy: np.ndarray, agent_xy: np.ndarray, rotation: np.ndarray, shift: np.ndarray,
                  origin_xy: np.ndarray, detection_sigma_m: float) -> Registration:
    n = len(ref_xy)
    residual = ref_xy - (agent_xy @ rotation.T + shift)
    rms = float(np.sqrt(np.mean(np.sum(residual ** 2, axis=1))))
    sigma = max(rms * np.sqrt(n / max(n - 3, 1)) / np.sqrt(2), detection_sigma_m)  # per axis
    centroid = agent_xy.mean(axis=0)
    spread = float(np.sum((agent_xy - centroid) ** 2))
    var_yaw = sigma ** 2 / max(spread, 1e-6)
    lever = QUARTER_TURN @ (origin_xy - centroid)
    cov = np.zeros((3, 3))
    cov[:2, :2] = sigma ** 2 / n * np.eye(2) + var_yaw * np.outer(lever, lever)
    cov[:2, 2] = cov[2, :2] = var_yaw * lever
    cov[2, 2] = var_yaw
    moved_origin = rotation @ origin_xy + shift
    delta = np.array([*(moved_origin - origin_xy), np.arctan2(rotation[1, 0], rotation[0, 0])])
    return Registration(delta=delta, covariance=cov, matches=n, rms_m=rms)


def scan_cloud(points: np.ndarray, normals_radius_m: float = 3.0):
    """``[M, 3]`` scan points -> an open3d point cloud with normals (what :func:`register_scans` matches onto)."""
    import open3d as o3d  # only where scans are matched

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64).reshape(-1, 3)))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=normals_radius_m, max_nn=20))
    return cloud


def register_scans(reference, agent_points: np.ndarray, ref_from_agent: np.ndarray,
                   config: CorrectionConfig) -> Registration | None:
    """Match an agent's registration scan onto the reference's (point-to-plane ICP with a Tukey loss, coarse
    to fine, planar).

    Args:
        reference: the reference's scan as :func:`scan_cloud` made it (reference frame, with normals).
        agent_points: ``[M, 3]`` the agent's scan in its own frame.
        ref_from_agent: ``[4, 4]`` where the agent is believed to be (the ICP starts there).
        config: ``scan_*`` settings.

    Returns:
        The correction of ``ref_from_agent`` (turn about the agent's origin, then shift; see
        :class:`Registration`) with its covariance, or None when the last stage matched fewer than
        ``scan_min_matches`` points or ``scan_min_fitness`` of them. The covariance is the
        point-to-plane fit's (horizontal parts of the normals: a wall fixes the agent across it, not
        along it), with the matches counted as at most ``scan_effective_points`` independent ones.
    """
    import open3d as o3d

    registration = o3d.pipelines.registration
    source = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(agent_points, dtype=np.float64)))
    if len(source.points) < config.scan_min_matches or len(reference.points) < config.scan_min_matches:
        return None

    def icp(start: np.ndarray, stages: tuple[float, ...]):
        estimate, result = planar(start), None
        for distance in stages:  # a robust loss: points the other agent cannot see do not pull
            estimation = registration.TransformationEstimationPointToPlane(registration.TukeyLoss(k=distance / 2))
            result = registration.registration_icp(source, reference, distance, estimate, estimation,
                                                   registration.ICPConvergenceCriteria(max_iteration=20))
            estimate = planar(np.asarray(result.transformation))  # BEV frames have no tilt
        return estimate, result

    estimate, result = icp(ref_from_agent, config.scan_correspondence_m)
    matches = np.asarray(result.correspondence_set)
    if len(matches) < config.scan_min_matches or result.fitness < config.scan_min_fitness:
        return None
    moved = transform_points(estimate, np.asarray(source.points)[matches[:, 0]])  # [K, 3] reference frame
    target = np.asarray(reference.points)[matches[:, 1]]
    normals = np.asarray(reference.normals)[matches[:, 1]]
    residual = np.sum((moved - target) * normals, axis=1)  # [K] point-to-plane distances
    origin = estimate[:2, 3]
    # d(residual)/d(shift) = n_xy, d(residual)/d(turn about the origin) = n_xy . J (p - origin)
    jacobian = np.concatenate([normals[:, :2], np.sum(normals[:, :2] * ((moved[:, :2] - origin) @ QUARTER_TURN.T), axis=1,
                                                      keepdims=True)], axis=1)  # [K, 3]
    sigma = max(float(np.sqrt(np.mean(residual ** 2))), config.scan_sigma_m)
    information = jacobian.T @ jacobian / sigma ** 2 * min(1.0, config.scan_effective_points / len(matches))
    # Walls all one way fix nothing along them: a tiny prior keeps that direction's variance huge, not infinite.
    covariance = np.linalg.inv(information + 1e-6 * np.eye(3))
    # A street between two straight rows of walls fixes the agent across it, not along it: started a
    # little away along its least-constrained direction, ICP may settle elsewhere. Probe it, and let
    # the spread of where it settles bound the fit's certainty that way.
    variances, axes = np.linalg.eigh(covariance[:2, :2])
    if variances[1] > config.scan_probe_anisotropy * variances[0]:  # one way much weaker than the other
        weakest = axes[:, 1]
        settled = []
        for sign in (-1.0, 1.0):
            start = estimate.copy()
            start[:2, 3] += sign * config.scan_probe_m * weakest
            settled.append(icp(start, config.scan_correspondence_m[1:] or config.scan_correspondence_m)[0][:2, 3])
        spread = max(float(np.linalg.norm(p - origin)) for p in settled)
        if spread > config.scan_probe_tolerance_m:
            covariance[:2, :2] += spread ** 2 * np.outer(weakest, weakest)
    correction = estimate @ invert_se3(ref_from_agent)
    delta = np.array([*(origin - ref_from_agent[:2, 3]), np.arctan2(correction[1, 0], correction[0, 0])])
    return Registration(delta=delta, covariance=covariance, matches=len(matches),
                        rms_m=float(np.sqrt(np.mean(residual ** 2))))


def planar_delta(a_from_b: np.ndarray) -> np.ndarray:
    """``[3]`` (x_m, y_m, yaw_rad) of a transform's planar part."""
    return np.array([a_from_b[0, 3], a_from_b[1, 3], np.arctan2(a_from_b[1, 0], a_from_b[0, 0])])


@dataclass(slots=True)
class CorrectorCounters:
    """What the corrector did, per agent."""

    frames: int = 0
    applied: int = 0
    refused: int = 0
    not_applied: dict[str, int] = field(default_factory=dict)
    scans_matched: int = 0
    """Frames whose registration scan was matched and folded in."""
    scans_not_used: dict[str, int] = field(default_factory=dict)
    """Frames with a scan that was not used, by reason."""
    reopened: int = 0
    """Times the track was reopened after fits in a row disagreed with it."""

    def as_dict(self) -> dict:
        return {"frames": self.frames, "applied": self.applied, "refused": self.refused,
                "not_applied": dict(self.not_applied), "scans_matched": self.scans_matched,
                "scans_not_used": dict(self.scans_not_used), "reopened": self.reopened}


@dataclass(frozen=True, slots=True)
class AgentView:
    """One agent's frame as the corrector sees it."""

    agent_id: int
    ref_from_agent: np.ndarray  # [4, 4] as reported (the reference's reported pose composed with the agent's)
    detections: np.ndarray  # [K, >=8] x, y, z, l, w, h, yaw, score in the agent's frame
    sigma: PlanarSigma | None
    """The agent's reported pose uncertainty (None: unknown, the configured default is assumed)."""
    sequence: int = 0
    odom_from_agent: np.ndarray | None = None  # [4, 4] the agent's dead-reckoned pose (None: no odometry)
    odometry_sigma: PlanarSigma | None = None
    """Uncertainty of the agent's motion since its previous frame."""
    scan: np.ndarray | None = None
    """``[M, 3]`` the agent's registration scan in its frame (:mod:`models.scan`), when this frame carries one."""
    own_fix: np.ndarray | None = None
    """``[4, 4]`` where the agent's own GNSS/INS puts this frame (relative to the reference), when the frame's pose
    carries the node's earlier estimates (:class:`agents.pose.TrackedPose`): the track is updated with this
    independent fix rather than with its own belief sent back."""
    own_fix_sigma: PlanarSigma | None = None


class RelativeTrack:
    """A Kalman filter of one agent's pose relative to the reference, over time.

    Predicted with both agents' odometry (precise from frame to frame), updated with the relative
    pose they report (noisy but unbiased) and with each registration of their object lists. The
    error is a shift of the agent's origin and a turn about it, in the reference's axes.
    """

    def __init__(self, reference_id: int, view: AgentView, reference: AgentView, reported_cov: np.ndarray,
                 start: np.ndarray | None = None) -> None:
        self.reference_id = reference_id
        self.state = (view.ref_from_agent if start is None else start).copy()
        self.covariance = reported_cov
        self.fix_covariance = reported_cov
        """Covariance of the latest independent fix of the relative pose (reported or own GNSS): how far the track
        is reopened when fits keep disagreeing with it."""
        self.disagreements = {"scan": 0, "objects": 0}
        """Fits of each kind in a row that disagreed with the track (a coarse object fit that agrees with a track
        gone astray must not hide the precise scan fits that keep disagreeing)."""
        self.sequences = (reference.sequence, view.sequence)
        self.odometry = (reference.odom_from_agent, view.odom_from_agent)

    def can_predict(self, reference: AgentView, view: AgentView, max_gap: int) -> bool:
        gaps = (reference.sequence - self.sequences[0], view.sequence - self.sequences[1])
        return (all(o is not None for o in (*self.odometry, reference.odom_from_agent, view.odom_from_agent))
                and reference.odometry_sigma is not None and view.odometry_sigma is not None
                and all(0 <= g <= max_gap for g in gaps))

    def predict(self, reference: AgentView, view: AgentView) -> None:
        gaps = (reference.sequence - self.sequences[0], view.sequence - self.sequences[1])
        ref_motion = invert_se3(self.odometry[0]) @ reference.odom_from_agent  # old reference from new
        agent_motion = invert_se3(self.odometry[1]) @ view.odom_from_agent
        moved = self.state @ agent_motion
        jacobian = np.eye(3)
        jacobian[:2, 2] = QUARTER_TURN @ (moved[:2, 3] - self.state[:2, 3])  # a turn swings the agent's new origin
        covariance = jacobian @ self.covariance @ jacobian.T
        self.state = invert_se3(ref_motion) @ moved
        turn = np.eye(3)
        turn[:2, :2] = invert_se3(ref_motion)[:2, :2]
        step_ref = PlanarSigma(reference.odometry_sigma.xy_m * np.sqrt(gaps[0]), reference.odometry_sigma.yaw_rad * np.sqrt(gaps[0]))
        step_agent = PlanarSigma(view.odometry_sigma.xy_m * np.sqrt(gaps[1]), view.odometry_sigma.yaw_rad * np.sqrt(gaps[1]))
        self.covariance = turn @ covariance @ turn.T + relative_prior(step_ref, step_agent, self.state[:2, 3])
        self.sequences = (reference.sequence, view.sequence)
        self.odometry = (reference.odom_from_agent, view.odom_from_agent)

    def update(self, delta: np.ndarray, covariance: np.ndarray) -> np.ndarray | None:
        """Fold in a measured correction of the state (``delta`` with ``covariance``); returns the step taken,
        or None when the measurement disagrees with the state beyond both covariances (not used)."""
        total = self.covariance + covariance + 1e-12 * np.eye(3)
        if float(delta @ np.linalg.solve(total, delta)) > CHI2_3DOF_999:
            return None
        gain = self.covariance @ np.linalg.inv(total)
        step = gain @ delta
        self.state = correction_matrix(step, self.state[:2, 3]) @ self.state
        self.covariance = (np.eye(3) - gain) @ self.covariance
        return step


class PoseCorrector:
    """Corrects agents' poses relative to the reference agent, frame by frame, and learns their steady errors.

    Per agent a :class:`RelativeTrack` carries the estimate from frame to frame with both agents'
    odometry; each frame it takes in the reported relative pose, a match of the agent's registration
    scan onto the reference's when both frames carry one (:func:`register_scans`: centimetres where
    they share walls), and a registration of the agent's object list onto the reference's (and, for
    agents that share no objects with the reference, onto those of the agents already corrected).
    Call :meth:`correct` once per fused frame. Not thread-safe: one fusion thread owns it.
    """

    def __init__(self, config: CorrectionConfig, max_gap_frames: int = 20) -> None:
        self.config = config
        self.max_gap_frames = max_gap_frames
        self.counters: dict[int, CorrectorCounters] = {}
        self._window: dict[int, deque[np.ndarray]] = {}
        self._tracks: dict[int, RelativeTrack] = {}
        self._reference_cloud: tuple[np.ndarray, object] | None = None  # the reference's last scan, with normals

    def _sigma(self, sigma: PlanarSigma | None) -> PlanarSigma:
        if sigma is None:
            return PlanarSigma(self.config.default_sigma_xy_m, np.deg2rad(self.config.default_sigma_yaw_deg))
        return sigma

    def correct(self, reference: AgentView, others: list[AgentView]) -> dict[int, Correction]:
        """Corrections for ``others`` (keyed by agent id); the reference itself is never moved."""
        ref_sigma = self._sigma(reference.sigma)
        anchor = [self._usable(reference.detections)]
        out: dict[int, Correction] = {}
        tracks = {v.agent_id: self._track(reference, v, ref_sigma) for v in others}
        scanned = {v.agent_id: self._match_scan(reference, v, tracks[v.agent_id]) for v in others}
        pending = list(others)
        for _ in range(2):
            retry = []
            for view in pending:
                out[view.agent_id] = self._correct_one(view, tracks[view.agent_id], np.concatenate(anchor),
                                                       scanned[view.agent_id])
                if out[view.agent_id].reason == "too few common objects":
                    retry.append(view)
                else:
                    anchor.append(transform_boxes(tracks[view.agent_id].state, self._usable(view.detections)))
            if not retry or len(retry) == len(pending):
                break
            pending = retry
        for view in others:
            self._count(view.agent_id, out[view.agent_id])
        return out

    def _track(self, reference: AgentView, view: AgentView, ref_sigma: PlanarSigma) -> RelativeTrack | None:
        """The agent's track, moved to this frame and updated with the reported relative pose (or, when the frame
        carries one, the agent's own fix). A new track starts at that fix, with its covariance: a tracked pose
        carries this node's own earlier estimates, whose certainty a restarted track must not take on trust."""
        if not self.config.enabled:
            return None
        fix, fix_cov = view.ref_from_agent, relative_prior(ref_sigma, self._sigma(view.sigma), view.ref_from_agent[:2, 3])
        if view.own_fix is not None:
            fix, fix_cov = view.own_fix, relative_prior(ref_sigma, self._sigma(view.own_fix_sigma), view.own_fix[:2, 3])
        track = self._tracks.get(view.agent_id)
        if track is None or track.reference_id != reference.agent_id or not track.can_predict(
                reference, view, self.max_gap_frames):
            track = self._tracks[view.agent_id] = RelativeTrack(reference.agent_id, view, reference, fix_cov, fix)
            return track
        track.predict(reference, view)
        track.fix_covariance = fix_cov
        if track.update(planar_error(fix, track.state), fix_cov) is None:
            log.info("agent %d: reported pose far from its track; track restarted", view.agent_id)
            track = self._tracks[view.agent_id] = RelativeTrack(reference.agent_id, view, reference, fix_cov, fix)
        return track

    def _match_scan(self, reference: AgentView, view: AgentView, track: RelativeTrack | None) -> bool:
        """Fold a match of the agent's registration scan onto the reference's into its track (when both
        frames carry one); counted either way. Returns whether it was folded in."""
        if track is None or not self.config.scans or view.scan is None or reference.scan is None:
            return False
        counters = self.counters.setdefault(view.agent_id, CorrectorCounters())
        if self._reference_cloud is None or self._reference_cloud[0] is not reference.scan:
            self._reference_cloud = (reference.scan, scan_cloud(reference.scan))
        fit = register_scans(self._reference_cloud[1], view.scan, track.state, self.config)
        reason = ""
        if fit is None:
            reason = "too few scan points matched"
        elif not self._fold_fit(view.agent_id, track, fit, "scan"):
            reason = "scan fit disagrees with the track"
        if reason:
            counters.scans_not_used[reason] = counters.scans_not_used.get(reason, 0) + 1
            return False
        counters.scans_matched += 1
        return True

    def _fold_fit(self, agent_id: int, track: RelativeTrack, fit: Registration, kind: str) -> bool:
        """Fold a fit (``kind`` scan or objects) into the track; after :attr:`CorrectionConfig.reopen_after` fits of
        that kind in a row disagreed, reopen the track to its latest fix's uncertainty and try again (counted).
        Returns whether it was folded in."""
        if track.update(fit.delta, fit.covariance) is not None:
            track.disagreements[kind] = 0
            return True
        track.disagreements[kind] += 1
        if track.disagreements[kind] < self.config.reopen_after:
            return False
        track.covariance = track.covariance + track.fix_covariance
        track.disagreements[kind] = 0
        counters = self.counters.setdefault(agent_id, CorrectorCounters())
        counters.reopened += 1
        log.info("agent %d: %d fits in a row disagreed with its track; reopened", agent_id, self.config.reopen_after)
        return track.update(fit.delta, fit.covariance) is not None

    def _usable(self, detections: np.ndarray) -> np.ndarray:
        detections = np.asarray(detections, dtype=np.float64)
        if detections.ndim != 2 or len(detections) == 0:
            return np.zeros((0, 7))
        keep = detections[:, 7] >= self.config.min_score if detections.shape[1] > 7 else slice(None)
        return detections[keep, :7]

    def _correct_one(self, view: AgentView, track: RelativeTrack | None, anchor: np.ndarray,
                     scanned: bool) -> Correction:
        """Register the agent's object list onto ``anchor`` into its track, bound the result, and remember it
        for the steady error when this frame measured the agent (objects, or ``scanned``: its scan)."""
        reported = view.ref_from_agent
        if track is None:
            return Correction(view.agent_id, reported, False, False, "correction disabled")
        if np.trace(track.covariance) < 1e-12:
            return Correction(view.agent_id, reported, False, False, "reported pose is exact")
        origin = track.state[:2, 3]
        moved = transform_boxes(track.state, self._usable(view.detections))
        fit = register(anchor, moved, origin, track.covariance, self.config)
        reason, matches = "", 0
        if fit is None:
            reason = "too few common objects"
        else:
            matches = fit.matches
            if not self._fold_fit(view.agent_id, track, fit, "objects"):
                reason = "fit disagrees with the reported covariance"
        estimate = track.state
        delta = planar_error(estimate, reported)
        shift, turn = float(np.hypot(*delta[:2])), float(np.rad2deg(abs(delta[2])))
        if shift > self.config.max_shift_m or turn > self.config.max_turn_deg:
            log.warning("agent %d: correction of %.2f m / %.2f deg exceeds the bound of %.2f m / %.2f deg; not applied",
                        view.agent_id, shift, turn, self.config.max_shift_m, self.config.max_turn_deg)
            self._tracks.pop(view.agent_id, None)
            return Correction(view.agent_id, reported, False, True,
                              f"correction of {shift:.2f} m / {turn:.2f} deg exceeds the bound", matches, delta)
        if reason == "" or scanned:
            self._remember(view.agent_id, invert_se3(reported) @ estimate)
        # Applied whenever the track moved it: odometry carries earlier registrations even through a frame
        # that shares no objects.
        return Correction(view.agent_id, estimate.copy(), True, False, reason, matches, delta,
                          measured=reason == "" or scanned, covariance=track.covariance.copy())

    def _count(self, agent_id: int, result: Correction) -> None:
        counters = self.counters.setdefault(agent_id, CorrectorCounters())
        counters.frames += 1
        if result.applied:
            counters.applied += 1
        if result.refused:
            counters.refused += 1
        elif result.reason:
            counters.not_applied[result.reason] = counters.not_applied.get(result.reason, 0) + 1

    def _remember(self, agent_id: int, agent_correction: np.ndarray) -> None:
        window = self._window.setdefault(agent_id, deque(maxlen=self.config.window))
        window.append(planar_delta(agent_correction))

    def steady_error(self, agent_id: int) -> np.ndarray | None:
        """``[4, 4]`` the agent's steady pose error in its own frame (``corrected = reported @ it``), when the
        window shows one clearly (median beyond 3 standard errors, counting correlated frames as fewer,
        and beyond the configured minimum), else None."""
        window = self._window.get(agent_id)
        if window is None or len(window) < self.config.feedback_min_frames:
            return None
        deltas = np.stack(window)
        median = np.median(deltas, axis=0)
        spread = 1.4826 * np.median(np.abs(deltas - median), axis=0) / np.sqrt(_effective_count(deltas))
        shift, turn = float(np.hypot(*median[:2])), float(np.rad2deg(abs(median[2])))
        clear = np.abs(median) > 3.0 * spread
        if not ((shift >= self.config.feedback_min_shift_m and clear[:2].any())
                or (turn >= self.config.feedback_min_turn_deg and clear[2])):
            return None
        return correction_matrix(np.array([median[0], median[1], wrap_angle_rad(median[2])]), np.zeros(2))

    def forget(self, agent_id: int) -> None:
        """Drop the agent's window of corrections (after it was told its steady error: later frames carry it)."""
        self._window.pop(agent_id, None)


def _effective_count(deltas: np.ndarray) -> np.ndarray:
    """``[3]`` independent samples the window is worth per axis: a track's corrections follow each other
    closely (lag-1 autocorrelation rho), so n of them count as n (1 - rho) / (1 + rho)."""
    centred = deltas - deltas.mean(axis=0)
    variance = np.sum(centred ** 2, axis=0) + 1e-12
    rho = np.clip(np.sum(centred[1:] * centred[:-1], axis=0) / variance, 0.0, 0.95)
    return np.maximum(len(deltas) * (1 - rho) / (1 + rho), 1.0)


class PoseHistory:
    """An agent's recent poses by capture time, to place it at another time.

    Between two known poses the pose is interpolated (position linearly, heading along the shorter
    turn). Beyond the newest it is extrapolated, for at most ``max_extrapolation_ns``, along a straight
    line fitted to the last ``fit_poses`` poses: BEV frames sit on the feature lattice, so single poses
    step by whole cells, and a line through the last two would carry a step forward.
    """

    def __init__(self, keep: int = 32, max_extrapolation_ns: int = 300_000_000, fit_poses: int = 6) -> None:
        self.keep = keep
        self.max_extrapolation_ns = max_extrapolation_ns
        self.fit_poses = fit_poses
        self._times: list[int] = []
        self._poses: list[np.ndarray] = []

    def add(self, time_ns: int, world_from_agent: np.ndarray) -> None:
        if self._times and time_ns <= self._times[-1]:
            if time_ns in self._times:
                self._poses[self._times.index(time_ns)] = world_from_agent
            return
        self._times.append(time_ns)
        self._poses.append(world_from_agent)
        del self._times[:-self.keep], self._poses[:-self.keep]

    def at(self, time_ns: int) -> np.ndarray | None:
        """``world_from_agent`` at ``time_ns`` (None with no pose known)."""
        if not self._times:
            return None
        if len(self._times) == 1 or time_ns <= self._times[0]:
            return self._poses[0 if time_ns <= self._times[0] else -1]
        if time_ns >= self._times[-1]:
            return self._extrapolated(min(time_ns, self._times[-1] + self.max_extrapolation_ns))
        k = int(np.searchsorted(self._times, time_ns))
        t0, t1 = self._times[k - 1], self._times[k]
        return _between(self._poses[k - 1], self._poses[k], (time_ns - t0) / (t1 - t0))

    def _extrapolated(self, time_ns: int) -> np.ndarray:
        times = np.array(self._times[-self.fit_poses:], dtype=np.float64)
        last = self._poses[-1]
        planar = np.array([[p[0, 3], p[1, 3], np.arctan2(p[1, 0], p[0, 0])] for p in self._poses[-self.fit_poses:]])
        planar[:, 2] = np.unwrap(planar[:, 2])
        at = (time_ns - times[-1]) / 1e9
        design = np.stack([np.ones_like(times), (times - times[-1]) / 1e9], axis=1)  # [n, 2]
        coef, *_ = np.linalg.lstsq(design, planar, rcond=None)  # [2, 3] value now, rate
        x, y, yaw = coef[0] + coef[1] * at
        out = last.copy()
        c, s_ = np.cos(yaw - planar[-1, 2]), np.sin(yaw - planar[-1, 2])
        out[:3, :3] = np.array([[c, -s_, 0.0], [s_, c, 0.0], [0.0, 0.0, 1.0]]) @ last[:3, :3]
        out[:2, 3] = [x, y]
        return out


def _between(a: np.ndarray, b: np.ndarray, share: float) -> np.ndarray:
    """The pose ``share`` of the way from ``a`` to ``b`` in the plane."""
    step = planar_error(b, a) * share
    return correction_matrix(step, a[:2, 3]) @ a
