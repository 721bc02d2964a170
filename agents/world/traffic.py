"""Road users of the synthetic world: spawning around the agents and motion.

Vehicles follow random routes on their right-hand lane and keep their distance
to whatever is ahead in their lane (a simple car-following rule that also
stops them for crossing traffic); parked vehicles stand at the kerb;
pedestrians walk around blocks on the pavement. Everything is decided by the
seeded generator, so one seed gives one world.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agents.frames import ObjectClass
from agents.world.config import WorldConfig
from agents.world.town import (INTERSECTION_HALF_M, LANE_OFFSET_M, PARKING_OFFSET_M, Path, Town,
                               lane_route, pavement_loop, random_walk)

FIRST_OBJECT_ID = 100
"""Ids below this are reserved for the agents (vehicle agents 0.., roadside units -1..)."""


@dataclass(frozen=True, slots=True)
class TrafficLog:
    """Every object's box at every frame.

    Attributes:
        ids: ``[O]`` object ids; vehicle agents keep their agent id.
        classes: object class per object.
        boxes: ``[F, O, 7]`` world boxes (centre x, y, z, l, w, h, yaw).
        speeds_mps: ``[F, O]``.
        rsu_poses: ``{agent_id: (x, y, yaw_rad)}`` for the roadside units.
    """

    ids: np.ndarray  # [O]
    classes: tuple[ObjectClass, ...]
    boxes: np.ndarray  # [F, O, 7]
    speeds_mps: np.ndarray  # [F, O]
    rsu_poses: dict[int, tuple[float, float, float]]

    def index_of(self, object_id: int) -> int:
        return int(np.flatnonzero(self.ids == object_id)[0])


@dataclass(slots=True)
class _Mover:
    path: Path
    s_m: float
    speed_mps: float
    desired_mps: float


@dataclass(frozen=True, slots=True)
class _LaneSpot:
    xy: np.ndarray  # [2]
    start: int
    end: int
    s_m: float


def _vehicle_size(rng: np.random.Generator, truck_share: float) -> tuple[float, float, float]:
    if rng.random() < truck_share:
        return rng.uniform(5.5, 8.5), rng.uniform(2.1, 2.5), rng.uniform(2.4, 3.4)
    return rng.uniform(3.9, 4.9), rng.uniform(1.75, 2.0), rng.uniform(1.4, 1.65)


def _lane_spots(town: Town, step_m: float) -> list[_LaneSpot]:
    spots = []
    for a in range(len(town.node_xy)):
        for b in town.neighbours(a):
            d = town.node_xy[b] - town.node_xy[a]
            d /= np.linalg.norm(d)
            right = np.array([d[1], -d[0]])
            for s in np.arange(0.0, town.pitch_m - 2 * INTERSECTION_HALF_M, step_m):
                xy = town.node_xy[a] + right * LANE_OFFSET_M + d * (INTERSECTION_HALF_M + s)
                spots.append(_LaneSpot(xy=xy, start=a, end=b, s_m=float(s)))
    return spots


def _pick(candidates: list, taken: list[np.ndarray], min_gap_m: float, count: int,
          rng: np.random.Generator, key=lambda c: c.xy) -> list:
    """Up to ``count`` random candidates at least ``min_gap_m`` from everything taken."""
    out = []
    for k in rng.permutation(len(candidates)):
        if len(out) == count:
            break
        xy = key(candidates[k])
        if all(np.linalg.norm(xy - t) >= min_gap_m for t in taken):
            out.append(candidates[k])
            taken.append(xy)
    return out


def simulate_traffic(town: Town, config: WorldConfig, rng: np.random.Generator) -> TrafficLog:
    """Spawn the agents and road users and move them for ``config.frames`` frames."""
    dt_s = 1.0 / config.rate_hz
    route_len_m = config.frames * dt_s * 14.0 + 60.0
    spots = _lane_spots(town, step_m=4.0)
    interior = [s for s in spots if np.abs(s.xy).max() < town.extent_m[1] - town.pitch_m / 2] or spots
    ego = interior[int(rng.integers(len(interior)))]
    ego_nodes = random_walk(town, ego.start, ego.end, route_len_m, rng)
    origin = ego.xy
    taken: list[np.ndarray] = [origin]
    agent_spots = [ego]
    for group in _helper_spots(spots, ego, ego_nodes, config):
        agent_spots += _pick(group, taken, 10.0, config.vehicle_agents - len(agent_spots), rng)
    if len(agent_spots) < config.vehicle_agents:
        raise ValueError(f"no room for {config.vehicle_agents} vehicle agents near the ego")
    rsu_poses = _place_rsus(town, config, ego_nodes, taken, rng)

    in_radius = [s for s in spots if np.linalg.norm(s.xy - origin) <= config.traffic.spawn_radius_m]
    traffic_spots = _pick(in_radius, taken, 9.0, config.traffic.moving_vehicles, rng)

    ids, classes, sizes, movers = [], [], [], []
    for k, spot in enumerate(agent_spots + traffic_spots):
        ids.append(k if k < len(agent_spots) else FIRST_OBJECT_ID + k)
        classes.append(ObjectClass.VEHICLE)
        # Agent vehicles are cars, so their roof-mounted sensors sit at a known height.
        sizes.append(_vehicle_size(rng, 0.0 if k < len(agent_spots) else config.traffic.truck_share))
        desired = rng.uniform(5.0, 10.0)
        nodes = ego_nodes if k == 0 else random_walk(town, spot.start, spot.end, route_len_m, rng)
        path = lane_route(town, nodes)
        movers.append(_Mover(path=path, s_m=spot.s_m, speed_mps=desired, desired_mps=desired))

    parked = _parked_boxes(town, config, origin, rng)
    walkers = _pedestrians(town, config, origin, rng)
    next_id = FIRST_OBJECT_ID + len(ids)
    static_ids = list(range(next_id, next_id + len(parked)))
    walker_ids = list(range(next_id + len(parked), next_id + len(parked) + len(walkers)))

    frames = config.frames
    n_obj = len(movers) + len(parked) + len(walkers)
    boxes = np.zeros((frames, n_obj, 7))
    speeds = np.zeros((frames, n_obj))
    size_arr = np.asarray(sizes).reshape(-1, 3)
    for f in range(frames):
        moving = _mover_boxes(movers, size_arr)
        walking = _walker_boxes(walkers)
        boxes[f] = np.concatenate([moving, parked, walking], axis=0).reshape(n_obj, 7)
        speeds[f, : len(movers)] = [m.speed_mps for m in movers]
        speeds[f, len(movers) + len(parked):] = [w.speed_mps for w in walkers]
        _step_movers(movers, moving, dt_s)
        for w in walkers:
            w.s_m += w.speed_mps * dt_s
    all_classes = tuple(classes) + (ObjectClass.VEHICLE,) * len(parked) + (ObjectClass.PEDESTRIAN,) * len(walkers)
    return TrafficLog(ids=np.asarray(ids + static_ids + walker_ids), classes=all_classes, boxes=boxes,
                      speeds_mps=speeds, rsu_poses=rsu_poses)


def _helper_spots(spots: list[_LaneSpot], ego: _LaneSpot, ego_nodes: list[int],
                  config: WorldConfig) -> list[list[_LaneSpot]]:
    """Where the other vehicle agents start, best first: on other streets, heading for the
    intersections the ego is about to cross, so that they see around the corners the ego cannot
    see past; then any other street nearby; then further away, as many agents need room."""
    lo, hi = config.agent_spacing_m
    ego_street = {ego.start, ego.end}
    distance = {id(s): float(np.linalg.norm(s.xy - ego.xy)) for s in spots}
    other = [s for s in spots if {s.start, s.end} != ego_street and distance[id(s)] >= lo]
    near = [s for s in other if distance[id(s)] <= hi]
    ahead = [s for s in near if s.end in ego_nodes[1:3]]
    rest = [s for s in near if s.end not in ego_nodes[1:3]]
    far = sorted((s for s in other if distance[id(s)] > hi), key=lambda s: distance[id(s)])
    return [ahead, rest, far]


def _place_rsus(town: Town, config: WorldConfig, ego_nodes: list[int], taken: list[np.ndarray],
                rng: np.random.Generator) -> dict[int, tuple[float, float, float]]:
    """Roadside units stand on pavement corners of the intersections the ego drives through next."""
    poses: dict[int, tuple[float, float, float]] = {}
    for node in ego_nodes[1:]:
        if len(poses) == config.roadside_unit_count:
            break
        centre = town.node_xy[node]
        corners = [centre + np.array([sx, sy]) * 8.0 for sx in (-1.0, 1.0) for sy in (-1.0, 1.0)]
        for xy in _pick(corners, taken, 10.0, 1, rng, key=lambda c: c):
            to_centre = centre - xy
            poses[-(len(poses) + 1)] = (float(xy[0]), float(xy[1]), float(np.arctan2(to_centre[1], to_centre[0])))
    if len(poses) < config.roadside_unit_count:
        raise ValueError(f"no room for {config.roadside_unit_count} roadside units along the ego's route")
    return poses


def _parked_boxes(town: Town, config: WorldConfig, origin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    spots = []
    for a in range(len(town.node_xy)):
        for b in town.neighbours(a):
            d = town.node_xy[b] - town.node_xy[a]
            d /= np.linalg.norm(d)
            right = np.array([d[1], -d[0]])
            for s in np.arange(10.0, town.pitch_m - 10.0, 3.0):
                xy = town.node_xy[a] + right * PARKING_OFFSET_M + d * s
                if np.linalg.norm(xy - origin) <= config.traffic.spawn_radius_m:
                    spots.append((xy, float(np.arctan2(d[1], d[0]))))
    chosen = _pick(spots, [], 7.5, config.traffic.parked_vehicles, rng, key=lambda c: c[0])
    out = []
    for xy, yaw in chosen:
        l, w, h = _vehicle_size(rng, config.traffic.truck_share)
        out.append([xy[0], xy[1], h / 2, l, w, h, yaw])
    return np.asarray(out, dtype=np.float64).reshape(-1, 7)


def _pedestrians(town: Town, config: WorldConfig, origin: np.ndarray, rng: np.random.Generator) -> list[_Mover]:
    blocks = []
    lo, _ = town.extent_m
    for i in range(town.grid_n - 1):
        for j in range(town.grid_n - 1):
            centre = np.array([lo + (i + 0.5) * town.pitch_m, lo + (j + 0.5) * town.pitch_m])
            if np.linalg.norm(centre - origin) <= config.traffic.spawn_radius_m:
                blocks.append((i, j))
    walkers = []
    for _ in range(config.traffic.pedestrians if blocks else 0):
        i, j = blocks[int(rng.integers(len(blocks)))]
        path = pavement_loop(town, i, j, clockwise=bool(rng.random() < 0.5))
        speed = rng.uniform(0.9, 1.6)
        walkers.append(_Mover(path=path, s_m=rng.uniform(0, path.length_m), speed_mps=speed, desired_mps=speed))
    return walkers


def _mover_boxes(movers: list[_Mover], sizes: np.ndarray) -> np.ndarray:
    out = np.zeros((len(movers), 7))
    for k, m in enumerate(movers):
        xy, yaw = m.path.pose_at(m.s_m)
        l, w, h = sizes[k]
        out[k] = [xy[0], xy[1], h / 2, l, w, h, yaw]
    return out


def _walker_boxes(walkers: list[_Mover]) -> np.ndarray:
    out = np.zeros((len(walkers), 7))
    for k, m in enumerate(walkers):
        xy, yaw = m.path.pose_at(m.s_m)
        out[k] = [xy[0], xy[1], 0.875, 0.5, 0.6, 1.75, yaw]
    return out


def _step_movers(movers: list[_Mover], boxes: np.ndarray, dt_s: float) -> None:
    """Car following: slow down for anything in the lane corridor ahead, then advance."""
    xy = boxes[:, :2]
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], axis=1)  # [V, 2]
    for i, m in enumerate(movers):
        rel = xy - xy[i]
        ahead = rel @ heading[i]
        lateral = rel[:, 0] * heading[i, 1] - rel[:, 1] * heading[i, 0]
        mask = (ahead > 0.0) & (ahead < 30.0) & (np.abs(lateral) < 1.8)
        mask[i] = False
        target = m.desired_mps
        if mask.any():
            gap = np.min(ahead[mask] - (boxes[mask, 3] + boxes[i, 3]) / 2)
            target *= float(np.clip((gap - 2.5) / 12.0, 0.0, 1.0))
        m.speed_mps = max(0.0, min(target, m.speed_mps + 2.0 * dt_s))
        m.s_m += m.speed_mps * dt_s
