"""The pose an agent reports: its own (GNSS/INS) pose with the fusion node's corrections applied.

The fusion node sends back, on ``Control``, its estimate of where the agent really was at one of its
frames. The agent keeps the difference as a correction in its own frame (a steady mount or
calibration error stays put in the agent's frame as it turns), applies it to every later frame, and
says in each frame which correction it carries, so the node does not count it twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.geometry import invert_se3, planar

log = logging.getLogger(__name__)


class PoseCorrectionConfig(BaseModel):
    """Whether and how far an agent follows the fusion node's pose corrections."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    apply: bool = True
    max_shift_m: float = Field(2.0, gt=0.0)
    """A correction that would move the agent farther than this from its own pose is refused (and counted)."""
    max_turn_deg: float = Field(2.0, gt=0.0)
    """A correction that would turn the agent more than this is refused (and counted)."""


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
