"""Where frames come from for train, eval and bench: a synthetic world or an OPV2V folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from agents import DatasetError, OPV2VDataset, SceneFrame, SyntheticWorld, WorldConfig

HELD_OUT_SEED = 0
"""The default evaluation world; training worlds use seeds from 1000 on (see launch/configs)."""


def scene_frames(data: Path | None, world: WorldConfig | None, *, load_images: bool = False,
                 frame_stride: int = 1) -> tuple[int, Iterator[SceneFrame]]:
    """Count and iterator of frames from ``data`` (OPV2V layout) or else the synthetic ``world``."""
    if data is not None:
        dataset = OPV2VDataset(data, load_images=load_images)
        indices = [(s, i) for s in dataset.scenarios for i in range(0, len(s), frame_stride)]
        return len(indices), (s.frame(i) for s, i in indices)
    if world is None:
        raise DatasetError("no data folder and no world config given")
    synthetic = SyntheticWorld(world)
    indices = list(range(0, len(synthetic), frame_stride))
    return len(indices), (synthetic.frame(i) for i in indices)
