"""Pose correction maths: registration of object lists, relative tracks, steady errors, pose history (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from agents.pose import CorrectionRefused, PoseCorrectionConfig, ReportedPose
from fusion.alignment import (AgentView, CorrectionConfig, FilterConfig, PlanarSigma, PoseCorrector, PoseFilter,
                              PoseHistory, _best_hypothesis, _candidates, _hypotheses, _score, correction_matrix,
                              fit_se2, planar_delta, register, relative_prior)
from models.geometry import invert_se3, se3_from_xyz_rpy, transform_boxes

SIGMA = PlanarSigma(0.6, np.deg2rad(0.6))


def _pose(x: float, y: float, yaw_deg: float) -> np.ndarray:
    return se3_from_xyz_rpy(x, y, 0.0, 0.0, 0.0, np.deg2rad(yaw_deg))


def _scene(rng: np.random.Generator, count: int = 10) -> np.ndarray:
    """``[count, 8]`` car boxes (x, y, z, l, w, h, yaw, score) around the reference, 10-45 m away."""
    angle, radius = rng.uniform(-np.pi, np.pi, count), rng.uniform(10.0, 45.0, count)
    boxes = np.zeros((count, 8))
    boxes[:, 0], boxes[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
    boxes[:, 2:6] = [0.8, 4.5, 1.9, 1.6]
    boxes[:, 6], boxes[:, 7] = rng.uniform(-np.pi, np.pi, count), 0.9
    return boxes


def _error(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    d = planar_delta(invert_se3(truth) @ estimate)
    return float(np.hypot(d[0], d[1])), float(np.degrees(abs(d[2])))


def test_fit_se2_recovers_a_known_motion() -> None:
    rng = np.random.default_rng(0)
    source = rng.uniform(-20, 20, (6, 2))
    angle = np.deg2rad(7.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    r, t = fit_se2(source, source @ rotation.T + [1.5, -2.0])
    assert np.allclose(r, rotation) and np.allclose(t, [1.5, -2.0])


def test_correction_matrix_turns_about_the_given_origin() -> None:
    m = correction_matrix(np.array([0.0, 0.0, np.pi / 2]), np.array([10.0, 0.0]))
    assert np.allclose(m @ [10.0, 0.0, 0.0, 1.0], [10.0, 0.0, 0.0, 1.0])  # the origin stays
    assert np.allclose(m @ [11.0, 0.0, 0.0, 1.0], [10.0, 1.0, 0.0, 1.0])


@pytest.mark.parametrize("clutter", [0, 3])
def test_register_finds_the_true_relative_pose_despite_a_wrong_report_and_clutter(clutter: int) -> None:
    rng = np.random.default_rng(1 + clutter)
    world = _scene(rng)
    truth = _pose(30.0, 5.0, 40.0)  # ref_from_agent
    reported = correction_matrix(np.array([0.9, -0.7, np.deg2rad(0.8)]), truth[:2, 3]) @ truth
    agent_boxes = transform_boxes(invert_se3(truth), world[2:])  # the agent sees 8 of the 10 objects
    if clutter:
        agent_boxes = np.concatenate([agent_boxes, _scene(rng, clutter)])  # and some the reference does not
    origin = reported[:2, 3]
    fit = register(world[:, :7], transform_boxes(reported, agent_boxes)[:, :7], origin,
                   relative_prior(SIGMA, SIGMA, origin), CorrectionConfig())
    assert fit is not None and fit.matches == 8
    corrected = correction_matrix(fit.delta, origin) @ reported
    metres, degrees = _error(corrected, truth)
    assert metres < 1e-6 and degrees < 1e-6


def test_too_few_common_objects_leave_the_report_as_it_is() -> None:
    world = _scene(np.random.default_rng(3))
    truth = _pose(30.0, 5.0, 40.0)
    agent = AgentView(1, truth, transform_boxes(invert_se3(truth), world[:2]), SIGMA)
    result = PoseCorrector(CorrectionConfig())
    out = result.correct(AgentView(0, np.eye(4), world, SIGMA), [agent])[1]
    assert out.reason == "too few common objects" and out.matches == 0
    assert np.allclose(out.ref_from_agent, truth)
    assert result.counters[1].not_applied == {"too few common objects": 1}


def test_an_exact_report_is_never_moved() -> None:
    world = _scene(np.random.default_rng(4))
    truth = _pose(30.0, 5.0, 40.0)
    exact = PlanarSigma(0.0, 0.0)
    shifted = correction_matrix(np.array([0.5, 0.0, 0.0]), truth[:2, 3]) @ truth  # claims exact, is not
    agent = AgentView(1, shifted, transform_boxes(invert_se3(truth), world), exact)
    out = PoseCorrector(CorrectionConfig()).correct(AgentView(0, np.eye(4), world, exact), [agent])[1]
    assert not out.applied and out.reason == "reported pose is exact"
    assert np.array_equal(out.ref_from_agent, shifted)


def test_a_correction_beyond_the_bound_is_refused_and_counted() -> None:
    world = _scene(np.random.default_rng(5))
    truth = _pose(30.0, 5.0, 40.0)
    far = correction_matrix(np.array([2.5, 0.0, 0.0]), truth[:2, 3]) @ truth
    corrector = PoseCorrector(CorrectionConfig(max_shift_m=1.0))
    agent = AgentView(1, far, transform_boxes(invert_se3(truth), world), PlanarSigma(2.0, np.deg2rad(1.0)))
    out = corrector.correct(AgentView(0, np.eye(4), world, PlanarSigma(0.1, 0.001)), [agent])[1]
    assert out.refused and not out.applied and "exceeds the bound" in out.reason
    assert np.array_equal(out.ref_from_agent, far)  # fused as reported
    assert corrector.counters[1].refused == 1


def _noisy(truth: np.ndarray, rng: np.random.Generator, sigma: PlanarSigma) -> np.ndarray:
    d = np.array([*rng.normal(0, sigma.xy_m, 2), rng.normal(0, sigma.yaw_rad)])
    return correction_matrix(d, truth[:2, 3]) @ truth


def test_a_track_with_odometry_beats_each_report_and_each_registration() -> None:
    """Both agents drive; the reported relative pose is noisy each frame, odometry is exact: over 30 frames
    the track's error falls well below the reports' and the single-frame registrations'."""
    rng = np.random.default_rng(6)
    corrector = PoseCorrector(CorrectionConfig())
    single = PoseCorrector(CorrectionConfig())
    world_from_ego, world_from_agent = _pose(0, 0, 10), _pose(25, 10, 100)
    ego_step, agent_step = _pose(1.0, 0.0, 1.0), _pose(0.8, 0.0, -0.5)
    objects_world = transform_boxes(world_from_ego, _scene(rng, 12))
    errors = {"reported": [], "single": [], "track": []}
    odom_ego, odom_agent = np.eye(4), np.eye(4)
    step_sigma = PlanarSigma(0.01, np.deg2rad(0.01))
    for k in range(30):
        reported_ego, reported_agent = _noisy(world_from_ego, rng, SIGMA), _noisy(world_from_agent, rng, SIGMA)
        ref_from_agent = invert_se3(reported_ego) @ reported_agent
        truth = invert_se3(world_from_ego) @ world_from_agent
        jitter = lambda b: b + np.r_[rng.normal(0, 0.2, 2), np.zeros(6)]  # noqa: E731 - detection scatter
        ego_boxes = jitter(transform_boxes(invert_se3(world_from_ego), objects_world))
        agent_boxes = jitter(transform_boxes(invert_se3(world_from_agent), objects_world)[:6])
        views = (AgentView(0, np.eye(4), ego_boxes, SIGMA, k, odom_ego, step_sigma),
                 AgentView(1, ref_from_agent, agent_boxes, SIGMA, k, odom_agent, step_sigma))
        tracked = corrector.correct(views[0], [views[1]])[1].ref_from_agent
        alone = single.correct(AgentView(0, np.eye(4), ego_boxes, SIGMA, k),
                               [AgentView(1, ref_from_agent, agent_boxes, SIGMA, k)])[1].ref_from_agent
        if k >= 10:
            errors["reported"].append(_error(ref_from_agent, truth)[0])
            errors["single"].append(_error(alone, truth)[0])
            errors["track"].append(_error(tracked, truth)[0])
        world_from_ego, world_from_agent = world_from_ego @ ego_step, world_from_agent @ agent_step
        odom_ego, odom_agent = odom_ego @ ego_step, odom_agent @ agent_step
    median = {k: float(np.median(v)) for k, v in errors.items()}
    assert median["track"] < 0.5 * median["single"] < 0.5 * median["reported"], median


def test_a_steady_mount_error_shows_in_the_window() -> None:
    rng = np.random.default_rng(7)
    world = _scene(rng, 12)
    truth = _pose(20.0, -8.0, 30.0)
    bias = correction_matrix(np.array([0.0, 0.8, np.deg2rad(0.5)]), np.zeros(2))  # reported = truth @ bias^-1
    corrector = PoseCorrector(CorrectionConfig(feedback_min_frames=8))
    steady = None
    for k in range(12):
        reported = truth @ invert_se3(bias)
        agent_boxes = transform_boxes(invert_se3(truth), world) + np.r_[rng.normal(0, 0.1, 2), np.zeros(6)]
        corrector.correct(AgentView(0, np.eye(4), world, SIGMA, k),
                          [AgentView(1, reported, agent_boxes, SIGMA, k)])
        steady = corrector.steady_error(1)
        if k < 7:
            assert steady is None  # not before the window holds enough frames
    assert steady is not None
    metres, degrees = _error(steady, bias)
    assert metres < 0.15 and degrees < 0.1


def test_reported_pose_applies_a_correction_in_its_own_frame_and_refuses_beyond_the_bound() -> None:
    reporter = ReportedPose(PoseCorrectionConfig(max_shift_m=2.0, max_turn_deg=2.0))
    own = _pose(100.0, 50.0, 90.0)
    sent, carried = reporter.report(4, own)
    assert np.array_equal(sent, own) and carried == 0
    estimate = own @ _pose(0.5, 0.0, 0.0)  # the fusion node found the agent 0.5 m further ahead
    reporter.on_correction(4, estimate)
    later_own = own @ _pose(10.0, 0.0, 30.0)  # the agent drove on and turned
    corrected, carried = reporter.report(5, later_own)
    assert carried == 4 and np.allclose(corrected, later_own @ _pose(0.5, 0.0, 0.0))
    with pytest.raises(CorrectionRefused, match="exceeds the bound"):
        reporter.on_correction(5, corrected @ _pose(0.0, 3.0, 0.0))
    with pytest.raises(CorrectionRefused, match="no longer remembers"):
        reporter.on_correction(99, corrected)
    assert reporter.applied == 1 and reporter.refused == 2 and reporter.sequence == 4


def test_pose_filter_with_odometry_shrinks_the_noise() -> None:
    rng = np.random.default_rng(8)
    pose_filter = PoseFilter(FilterConfig())
    truth, odom, step = _pose(0, 0, 0), np.eye(4), _pose(1.0, 0.0, 2.0)
    errors = []
    for k in range(40):
        out = pose_filter.update(k, _noisy(truth, rng, SIGMA), SIGMA, odom, PlanarSigma(0.01, np.deg2rad(0.01)))
        if k >= 15:
            errors.append(_error(out.world_from_agent, truth)[0])
            assert out.sigma.xy_m < 0.3
        truth, odom = truth @ step, odom @ step
    assert np.median(errors) < 0.25  # reports alone: median ~0.7 m


def test_pose_history_interpolates_and_extrapolates_within_a_limit() -> None:
    history = PoseHistory(max_extrapolation_ns=150_000_000)
    history.add(0, _pose(0, 0, 0))
    history.add(100_000_000, _pose(1.0, 0, 10))
    middle = history.at(50_000_000)
    assert np.allclose(planar_delta(middle), [0.5, 0.0, np.deg2rad(5)], atol=1e-2)
    ahead = history.at(200_000_000)
    assert ahead[0, 3] > 1.5 and np.degrees(planar_delta(ahead)[2]) == pytest.approx(20.0, abs=0.5)
    capped = history.at(10_000_000_000)  # far beyond: no further than the limit
    assert np.degrees(planar_delta(capped)[2]) == pytest.approx(25.0, abs=0.5)
    assert history.at(-5) is not None and PoseHistory().at(0) is None


def test_the_pruned_hypothesis_search_finds_what_scoring_every_hypothesis_finds() -> None:
    """Hypotheses are counted loosely at once and scored exactly only while they can still win: the
    result must be the exhaustive search's (most one-to-one matches, then least residual)."""
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        world = _scene(rng, int(rng.integers(4, 20)))
        truth = _pose(*rng.uniform(-40, 40, 2), rng.uniform(-180, 180))
        seen = int(rng.integers(3, len(world) + 1))
        agent = transform_boxes(invert_se3(truth), world[:seen]) + np.c_[rng.normal(0, 0.3, (seen, 2)), np.zeros((seen, 6))]
        agent = np.concatenate([agent, _scene(rng, 3)])
        reported = correction_matrix(np.array([*rng.normal(0, 0.8, 2), rng.normal(0, 0.015)]), truth[:2, 3]) @ truth
        ref_xy, agent_xy = world[:, :2], transform_boxes(reported, agent)[:, :2]
        pairs = _candidates(ref_xy, agent_xy, relative_prior(SIGMA, SIGMA, reported[:2, 3]), reported[:2, 3], 3.0)
        rotations, shifts = _hypotheses(ref_xy, agent_xy, pairs)
        exhaustive = max(_score(ref_xy, agent_xy @ r.T + t, 0.6) for r, t in zip(rotations, shifts))
        best, count = _best_hypothesis(ref_xy, agent_xy, rotations, shifts, 0.6)
        assert count == exhaustive[0]
        assert _score(ref_xy, agent_xy @ best[0].T + best[1], 0.6) == exhaustive


def _view(agent_id: int, ref_from_agent: np.ndarray, sequence: int, own_fix: np.ndarray | None = None) -> AgentView:
    """A view with exact, still odometry and no detections."""
    return AgentView(agent_id, ref_from_agent, np.zeros((0, 8)), PlanarSigma(0.05, np.deg2rad(0.05)), sequence,
                     np.eye(4), PlanarSigma(0.01, np.deg2rad(0.01)), own_fix=own_fix, own_fix_sigma=SIGMA)


def test_a_confident_track_gone_astray_is_reopened_by_fits_that_keep_disagreeing() -> None:
    """The track holds the agent 1 m off with centimetre confidence; precise fits keep saying so. One
    disagreeing fit is refused (it may be the wrong one); the second in a row reopens the track to its fix's
    uncertainty and is taken. A coarse object fit that agrees in between does not reset the scans' count."""
    from fusion.alignment import Registration

    corrector = PoseCorrector(CorrectionConfig(reopen_after=2))
    truth = _pose(20.0, 5.0, 0.0)
    believed = _pose(21.0, 5.0, 0.0)
    reference = _view(0, np.eye(4), 0)
    corrector.correct(reference, [_view(1, believed, 0, own_fix=believed)])
    track = corrector._tracks[1]
    track.covariance = np.diag([0.02 ** 2, 0.02 ** 2, np.deg2rad(0.02) ** 2])
    scan_fit = Registration(delta=np.array([-1.0, 0.0, 0.0]), covariance=np.diag([0.03 ** 2, 0.03 ** 2, 1e-6]),
                            matches=200, rms_m=0.03)
    agreeing = Registration(delta=np.zeros(3), covariance=np.diag([0.5, 0.5, 0.01]), matches=4, rms_m=0.5)
    assert not corrector._fold_fit(1, track, scan_fit, "scan")
    assert corrector._fold_fit(1, track, agreeing, "objects")
    assert corrector._fold_fit(1, track, scan_fit, "scan")
    assert _error(track.state, truth)[0] < 0.1
    assert corrector.counters[1].as_dict()["reopened"] == 1


def test_a_tracked_agent_s_track_follows_its_own_fix_and_restarts_there() -> None:
    """An agent whose frames carry the node's own estimates (``own_fix`` set): a new track starts at its own
    GNSS fix with that fix's uncertainty, not at the tracked pose with the tracked pose's."""
    corrector = PoseCorrector(CorrectionConfig())
    tracked, own = _pose(20.0, 5.0, 0.0), _pose(20.4, 5.3, 0.3)
    corrector.correct(_view(0, np.eye(4), 0), [_view(1, tracked, 0, own_fix=own)])
    track = corrector._tracks[1]
    assert _error(track.state, own) == pytest.approx((0.0, 0.0), abs=1e-9)
    assert np.sqrt(track.covariance[0, 0]) > 0.5  # the fix's 0.6 m, not the tracked pose's 0.05 m
