"""The pose an agent reports: its own (GNSS/INS) pose with the fusion node's corrections applied.

The fusion node sends back, on ``Control``, its estimate of where the agent really was at one of its
frames. Two ways to use it:

* :class:`ReportedPose` (an agent without odometry): the agent keeps the difference as a correction
  in its own frame (a steady mount or calibration error stays put in the agent's frame as it turns),
  applies it to every later frame, and says in each frame which correction it carries, so the node
  does not count it twice. The node sends only steady errors: a fresh GNSS error every frame cannot
  be fixed by an offset learnt from an earlier one.
* :class:`TrackedPose` (an agent with odometry): the agent tracks its own pose with a Kalman filter,
  moved from frame to frame by its odometry and fixed by its GNSS/INS reports and by every estimate
  the node sends, carried forward from its frame to the present with the odometry. The node sends
  every estimate (with its covariance). The agent then builds its BEV frame where the node places
  it, so the node warps its features by whole cells, with no turn, and nothing is blurred by
  resampling; its reported covariance is the filter's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.geometry import invert_se3, planar
from models.pose_filter import (QUARTER_TURN, FilteredPose, FilterConfig, PlanarSigma, PoseFilter, orthonormal,
                                planar_error)

log = logging.getLogger(__name__)


class PoseCorrectionConfig(BaseModel):
    """Whether and how far an agent follows the fusion node's pose corrections."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    apply: bool = True
    max_shift_m: float = Field(2.0, gt=0.0)
    """A correction that would move the agent farther than this from its own pose is refused (and counted)."""
    max_turn_deg: float = Field(2.0, gt=0.0)
    """A correction that would turn the agent more than this is refused (and counted)."""
    track: bool = True
    """With odometry: track the agent's pose with it and fold in every estimate from the fusion node
    (:class:`TrackedPose`) instead of keeping one steady offset (:class:`ReportedPose`)."""
    default_sigma_xy_m: float = Field(0.2, gt=0.0)
    """Uncertainty assumed for an estimate from the node that comes without a covariance."""
    default_sigma_yaw_deg: float = Field(0.2, gt=0.0)
    own_sigma_xy_m: float = Field(1.0, gt=0.0)
    """Uncertainty assumed for the agent's own pose when its source states none (a tracked pose needs one)."""
    own_sigma_yaw_deg: float = Field(1.0, gt=0.0)


class CorrectionRefused(ValueError):
    """A pose correction the agent will not apply; the message says why."""


@dataclass(frozen=True, slots=True)
class _Correction:
    agent_from_corrected: np.ndarray  # [4, 4] corrected = own @ this (planar)
    sequence: int
    """The Control's pose_correction_sequence (0: none)."""


class ReportedPose:
    """Applies the fusion node's corrections to an agent's own poses (see the module docstring).

    :meth:`report` runs in the agent's compute thread and :meth:`on_correction` on its event loop; the
    current correction is swapped in as one immutable object, so neither sees half of an update.
    """

    KEEP = 256
    """Frames remembered for matching a correction to the frame it refers to."""

    def __init__(self, config: PoseCorrectionConfig) -> None:
        self.config = config
        self._current = _Correction(np.eye(4), 0)
        self._sent: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.applied = 0
        self.refused = 0
        self.last_error = ""

    @property
    def agent_from_corrected(self) -> np.ndarray:
        """``[4, 4]`` the correction applied now, in the agent's own frame (``reported = own @ it``)."""
        return self._current.agent_from_corrected.copy()

    @property
    def sequence(self) -> int:
        """The correction carried by frames reported from now on (0: none)."""
        return self._current.sequence

    def report(self, sequence: int, world_from_own: np.ndarray) -> tuple[np.ndarray, int]:
        """The pose to report for frame ``sequence`` (own pose, corrected) and the correction it carries."""
        current = self._current
        corrected = world_from_own @ current.agent_from_corrected
        self._sent[sequence] = (world_from_own, current.agent_from_corrected, corrected)
        while len(self._sent) > self.KEEP:
            del self._sent[min(self._sent)]
        return corrected, current.sequence

    def remember_frame(self, sequence: int, world_from_frame: np.ndarray) -> None:
        """The pose actually sent for ``sequence`` when it differs from :meth:`report`'s (e.g. a BEV frame on a
        lattice): corrections from the fusion node refer to it."""
        own, correction, _ = self._sent[sequence]
        self._sent[sequence] = (own, correction, world_from_frame)

    def on_correction(self, sequence: int, world_from_frame: np.ndarray) -> None:
        """Take the fusion node's estimate of the pose of frame ``sequence`` (the pose it was sent with, corrected).

        Raises:
            CorrectionRefused: unknown frame, or a correction beyond the configured bound (counted).
        """
        try:
            self._current = self._checked(sequence, world_from_frame)
            self.applied += 1
        except CorrectionRefused as err:
            self.refused += 1
            self.last_error = str(err)
            raise

    def _checked(self, sequence: int, world_from_frame: np.ndarray) -> _Correction:
        if not self.config.apply:
            raise CorrectionRefused("pose corrections are switched off")
        if sequence not in self._sent:
            raise CorrectionRefused(f"correction for frame {sequence}, which this agent no longer remembers")
        own, old, sent = self._sent[sequence]
        world_correction = world_from_frame @ invert_se3(sent)  # moves the sent frame onto the estimate
        corrected_own = world_correction @ own @ old
        total = planar(invert_se3(own) @ corrected_own)
        shift, turn = float(np.hypot(*total[:2, 3])), float(np.degrees(abs(np.arctan2(total[1, 0], total[0, 0]))))
        if shift > self.config.max_shift_m or turn > self.config.max_turn_deg:
            raise CorrectionRefused(f"correction of {shift:.2f} m / {turn:.2f} deg exceeds the bound of "
                                    f"{self.config.max_shift_m} m / {self.config.max_turn_deg} deg")
        log.info("pose correction from frame %d: %.2f m / %.3f deg in all", sequence, shift, turn)
        return _Correction(total, sequence)


@dataclass(frozen=True, slots=True)
class _Fix:
    sequence: int
    world_from_own: np.ndarray  # [4, 4] the node's estimate of the agent's own frame at that frame
    covariance: np.ndarray  # [3, 3]


class TrackedPose:
    """An agent's own pose, tracked with its odometry and fixed by its reports and the fusion node's estimates.

    :meth:`report` runs in the agent's compute thread and :meth:`on_correction` on its event loop; the
    estimates received wait in a list swapped out whole, so neither sees half of an update.
    """

    KEEP = 256
    """Frames remembered for carrying an estimate from its frame to the present."""

    def __init__(self, config: PoseCorrectionConfig, filter_config: FilterConfig = FilterConfig()) -> None:
        self.config = config
        self.filter = PoseFilter(filter_config)
        self._sent: dict[int, tuple[np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray]] = {}
        # sequence -> (odom_from_own, own_from_frame sent or None, world_from_own as reported, its covariance)
        self._pending: list[_Fix] = []
        self._last_used = 0
        self.applied = 0
        self.refused = 0
        self.last_error = ""

    @property
    def sequence(self) -> int:
        """The newest frame whose estimate has been folded in (0: none)."""
        return self._last_used

    def report(self, sequence: int, world_from_own: np.ndarray, sigma: PlanarSigma,
               odom_from_own: np.ndarray | None, odometry_sigma: PlanarSigma | None
               ) -> tuple[np.ndarray, PlanarSigma, int]:
        """The pose to report for frame ``sequence`` (``world_from_own`` as the GNSS/INS gives it, with
        ``sigma``; the odometry's pose and its step's uncertainty), its uncertainty, and the newest frame
        whose estimate it carries."""
        filtered = self.filter.update(sequence, world_from_own, sigma, odom_from_own, odometry_sigma)
        self._sent[sequence] = (odom_from_own, None, world_from_own, np.diag([sigma.xy_m ** 2, sigma.xy_m ** 2,
                                                                              sigma.yaw_rad ** 2]))
        while len(self._sent) > self.KEEP:
            del self._sent[min(self._sent)]
        pending, self._pending = self._pending, []
        for fix in sorted(pending, key=lambda f: f.sequence, reverse=True):  # the newest usable one replaces the rest
            try:
                filtered = self._fold(sequence, fix, odom_from_own, odometry_sigma)
                break
            except CorrectionRefused as err:
                self.refused += 1
                self.last_error = str(err)
                log.warning("pose estimate for frame %d not used: %s", fix.sequence, err)
        return filtered.world_from_agent, filtered.sigma, self._last_used

    def remember_frame(self, sequence: int, world_from_frame: np.ndarray, world_from_own: np.ndarray) -> None:
        """The frame actually sent for ``sequence`` (e.g. a BEV frame on a lattice) and the own pose it was built
        from: the node's estimates refer to it."""
        odom, _, reported, covariance = self._sent[sequence]
        self._sent[sequence] = (odom, orthonormal(invert_se3(world_from_own) @ world_from_frame), reported, covariance)

    def on_correction(self, sequence: int, world_from_frame: np.ndarray, covariance: np.ndarray | None) -> None:
        """Take the node's estimate of where frame ``sequence`` was (``covariance`` ``[3, 3]`` of x, y, heading;
        None: the configured default); folded in with the next frame.

        Raises:
            CorrectionRefused: switched off, an unknown frame or one sent without odometry, a covariance that is
                not one (counted).
        """
        try:
            if not self.config.apply:
                raise CorrectionRefused("pose corrections are switched off")
            sent = self._sent.get(sequence)
            if sent is None or sent[1] is None:
                raise CorrectionRefused(f"estimate for frame {sequence}, which this agent no longer remembers")
            if sent[0] is None:
                raise CorrectionRefused(f"estimate for frame {sequence}, which had no odometry to carry it forward")
            if covariance is None:
                covariance = np.diag([self.config.default_sigma_xy_m ** 2] * 2
                                     + [np.deg2rad(self.config.default_sigma_yaw_deg) ** 2])
            covariance = np.asarray(covariance, dtype=np.float64)
            if (covariance.shape != (3, 3) or not np.all(np.isfinite(covariance))
                    or not np.allclose(covariance, covariance.T, atol=1e-9)
                    or np.linalg.eigvalsh(covariance).min() < -1e-12):
                raise CorrectionRefused(f"estimate for frame {sequence} has no valid 3x3 covariance")
            fix = _Fix(sequence, orthonormal(world_from_frame @ invert_se3(sent[1])), covariance)
            self._pending = [*self._pending, fix]
        except CorrectionRefused as err:
            self.refused += 1
            self.last_error = str(err)
            raise

    def _fold(self, sequence: int, fix: _Fix, odom_from_own: np.ndarray | None,
              odometry_sigma: PlanarSigma | None) -> FilteredPose:
        then = self._sent.get(fix.sequence)
        if then is None or odom_from_own is None or odometry_sigma is None:
            raise CorrectionRefused(f"no odometry from frame {fix.sequence} to frame {sequence}")
        carried = orthonormal(fix.world_from_own @ invert_se3(then[0]) @ odom_from_own)
        delta = planar_error(fix.world_from_own, then[2])  # how far the node moves it from its own report
        shift, turn = float(np.hypot(*delta[:2])), float(np.degrees(abs(delta[2])))
        if shift > self.config.max_shift_m or turn > self.config.max_turn_deg:
            raise CorrectionRefused(f"correction of {shift:.2f} m / {turn:.2f} deg exceeds the bound of "
                                    f"{self.config.max_shift_m} m / {self.config.max_turn_deg} deg")
        gap = max(sequence - fix.sequence, 0)
        lever = carried[:2, 3] - fix.world_from_own[:2, 3]
        jacobian = np.eye(3)
        jacobian[:2, 2] = QUARTER_TURN @ lever  # a turn at that frame swings this one's origin
        steps = gap * np.diag([odometry_sigma.xy_m ** 2, odometry_sigma.xy_m ** 2, odometry_sigma.yaw_rad ** 2])
        # The node's estimate already holds what the agent reported up to that frame (and where the fusion frame
        # is): it replaces the track, and this frame's own fix is folded in again (a small gain next to it).
        folded = self.filter.restart(carried, jacobian @ fix.covariance @ jacobian.T + steps)
        own = self._sent.get(sequence)
        if own is not None:
            folded = self.filter.fold(own[2], own[3], gate=False) or folded
        self.applied += 1
        self._last_used = max(self._last_used, fix.sequence)
        return folded
