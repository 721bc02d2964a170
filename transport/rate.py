"""Sender-side rate control from the receiver's link reports (``Control.link``).

The fusion node reports, per agent and about twice a second, the share of chunks lost, the
bitrate delivered and the *queueing delay* (the one-way delay above the smallest seen: a queue
building up on the path). :class:`RateController` turns those into a bitrate to send at, and
from it a byte budget per frame and a frame rate:

- **Random loss is not congestion.** A radio that loses 30 % of packets at random delivers
  70 % of whatever is sent, with no queue; sending less would only lose more evidence. So
  loss alone never lowers the rate (the receiver substitutes what is lost).
- **A growing queue is.** When the queueing delay passes ``congested_ms`` the target drops
  to a share of what was actually delivered (multiplicative decrease to the link's measured
  capacity); while the queue stays under ``clear_ms`` it grows by ``increase`` per report
  (probing), up to ``max_bitrate_bps``.
- **Frame rate before uselessness.** The per-frame budget is ``target / frame_rate``; when it
  falls below ``min_frame_bytes`` (a frame that small carries too few tiles to matter) the
  frame rate drops instead, down to ``min_frame_rate_hz``: fewer whole frames that arrive in
  time beat many starved ones, and frames that would only queue are never sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from protos import LinkReport


class RateConfig(BaseModel):
    """Rate control settings (an agent's ``rate_control:`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Adapt the byte budget and frame rate to the link; off: every frame at the configured rate level."""
    start_bitrate_bps: int = Field(1_000_000, gt=0)
    max_bitrate_bps: int = Field(8_000_000, gt=0)
    min_bitrate_bps: int = Field(16_000, gt=0)
    congested_ms: float = Field(40.0, gt=0.0)
    """Queueing delay above which the link counts as congested."""
    clear_ms: float = Field(10.0, ge=0.0)
    """Queueing delay below which the rate may grow."""
    decrease: float = Field(0.8, gt=0.0, lt=1.0)
    """On congestion the target becomes this share of the delivered bitrate."""
    increase: float = Field(1.05, gt=1.0)
    """Growth of the target per clear report."""
    min_frame_bytes: int = Field(1200, gt=0)
    """Below this budget per frame, the frame rate drops instead."""
    min_frame_rate_hz: float = Field(1.0, gt=0.0)


@dataclass(slots=True)
class RateController:
    """The sender's current target (see the module docstring)."""

    config: RateConfig
    sensor_rate_hz: float
    target_bps: float = 0.0
    reports: int = 0
    congested_reports: int = 0
    history: list[tuple[float, float, float]] = field(default_factory=list)
    """(target bps, frame rate Hz, queueing delay ms) after each report."""

    def __post_init__(self) -> None:
        self.target_bps = float(min(self.config.start_bitrate_bps, self.config.max_bitrate_bps))

    def update(self, link: LinkReport) -> None:
        """Take in one receiver report."""
        self.reports += 1
        cfg = self.config
        if link.queueing_delay_ms > cfg.congested_ms and link.delivered_bitrate_bps > 0:
            self.congested_reports += 1
            self.target_bps = min(self.target_bps, cfg.decrease * link.delivered_bitrate_bps)
        elif link.queueing_delay_ms < cfg.clear_ms:
            self.target_bps *= cfg.increase
        self.target_bps = min(max(self.target_bps, cfg.min_bitrate_bps), cfg.max_bitrate_bps)
        self.history.append((self.target_bps, self.frame_rate_hz, link.queueing_delay_ms))
        del self.history[:-1000]

    @property
    def frame_rate_hz(self) -> float:
        """Frames per second to send: the sensor rate while a frame's budget is at least
        ``min_frame_bytes``, else as many as the target pays for (at least ``min_frame_rate_hz``)."""
        affordable = self.target_bps / 8.0 / self.config.min_frame_bytes
        return max(self.config.min_frame_rate_hz, min(self.sensor_rate_hz, affordable))

    @property
    def frame_budget_bytes(self) -> int:
        """Bytes one frame may take on the wire at the current target and frame rate."""
        return int(self.target_bps / 8.0 / self.frame_rate_hz)
