"""``cpstream replay FILE.mcap``: play a recorded session's feature streams into a fusion node and score again.

The recording (``cpstream launch FILE --record OUT.mcap``, see :mod:`launch.record`) holds each
agent's ``FeatureFrame``s as the fusion node received them, the ground truth per frame index and
the fusion settings of the session. Replay starts a fusion node in this process (on
``127.0.0.1:0``, any agent accepted, the recorded rate, the recorded settings overlaid with
``--fusion-config``), streams every agent's frames through its own ``FeatureUplink`` with the
recorded capture times moved onto the current clock by a whole number of slots (so the node's
slotting, deadlines and substitution see the session as it was), subscribes to the fused frames
and scores them exactly as ``cpstream launch`` does.

- ``--realtime`` (default): the sensor clock. Each frame goes out at its (re-based) capture time
  plus the delay the agent had recorded (capture to send), so arrival order and lateness are
  replayed too.
- ``--as-fast-as-possible``: slot by slot on a virtual clock: a slot's frames go out as soon as the
  previous slot is fused. A slot in which a connected agent has no frame is fused at its deadline,
  as in the live session, so a recording with such gaps replays no faster than real time from there.

Only frames the live node fused fresh are in a recording; a frame that arrived after its slot's
deadline and later stood in for a missing one is not. The result counts such stand-ins
(``recording.substitutes_not_recorded``): where it is not 0, replayed AP can differ from live AP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError
from mcap.exceptions import McapError
from mcap.reader import make_reader

from fusion.node import FusionConfig, load_fusion_node
from launch.config_files import load_config_file
from launch.console import console, progress, write_json
from launch.launcher import GroundTruth, Progress, _last_slot, percentiles, _score
from launch.record import FEATURES_TOPIC, FUSED_TOPIC, GROUND_TRUTH_TOPIC, SESSION_TOPIC
from protos import ContributionStatus, FeatureFrame, FusedFrame
from transport import FeatureUplink, subscribe

REPO_ROOT = Path(__file__).resolve().parent.parent
MCAP_MAGIC = b"\x89MCAP0\r\n"
START_MARGIN_NS = 300_000_000
"""The first replayed slot's capture time is at least this far ahead of the moment streaming starts."""
MAX_SEND_DELAY_NS = 10_000_000_000
NOT_USED = (ContributionStatus.CONTRIBUTION_STATUS_UNSPECIFIED, ContributionStatus.CONTRIBUTION_STATUS_MISSING)
END_GRACE_S = 5.0
"""After a slot's deadline, how long to wait for it to be fused before going on."""


class RecordingError(ValueError):
    """A file that is not a readable cpstream recording; the message says why."""


@dataclass
class Recording:
    path: Path
    session: dict
    frames: dict[int, list[FeatureFrame]]
    """Per agent, its frames in capture order."""
    truth: GroundTruth | None
    fused: list[FusedFrame] = field(default_factory=list)
    """The fused frames of the live session (for comparison)."""

    @property
    def period_ns(self) -> int:
        return int(self.session["period_ns"])

    @property
    def start_slot(self) -> int:
        return int(self.session["start_slot"])

    def slot_of(self, frame: FeatureFrame) -> int:
        return round(frame.capture_time_ns / self.period_ns)


def read_recording(path: Path) -> Recording:
    """Read what replay needs from an MCAP recording. Raises :class:`RecordingError` naming the problem."""
    if path.is_dir():
        raise RecordingError(f"{path} is a folder; replay reads an MCAP recording "
                             "(make one with: cpstream launch FILE --record OUT.mcap)")
    try:
        stream = path.open("rb")
    except OSError as err:
        raise RecordingError(f"{path}: cannot read: {err.strerror}") from err
    session, truth_rows, fused = None, {}, []
    frames: dict[int, dict[int, FeatureFrame]] = {}
    with stream:
        try:
            size = stream.seek(0, 2)
            stream.seek(0)
            if stream.read(len(MCAP_MAGIC)) != MCAP_MAGIC:
                raise RecordingError(f"{path}: not an MCAP file ({'empty' if size == 0 else 'no MCAP magic'})")
            stream.seek(max(size - len(MCAP_MAGIC), 0))
            if size < 2 * len(MCAP_MAGIC) or stream.read(len(MCAP_MAGIC)) != MCAP_MAGIC:
                raise RecordingError(f"{path}: truncated MCAP file ({size} bytes, no closing magic): the recording "
                                     "did not finish")
            stream.seek(0)
            reader = make_reader(stream, validate_crcs=True)
            if reader.get_summary() is None:
                raise RecordingError(f"{path}: the MCAP file has no summary (was the recorder killed before "
                                     "it finished?)")
            for _, channel, message in reader.iter_messages():
                topic = channel.topic
                if topic == SESSION_TOPIC:
                    session = json.loads(message.data)
                elif topic == GROUND_TRUTH_TOPIC:
                    row = json.loads(message.data)
                    truth_rows[int(row["index"])] = row
                elif topic == FUSED_TOPIC:
                    fused.append(FusedFrame.FromString(message.data))
                elif (match := FEATURES_TOPIC.match(topic)) is not None:
                    frame = FeatureFrame.FromString(message.data)
                    frames.setdefault(int(match.group(1)), {})[frame.sequence] = frame
        except RecordingError:
            raise
        except (McapError, DecodeError, EOFError, OSError, struct.error, ValueError, KeyError, TypeError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RecordingError(f"{path}: not a readable MCAP recording (truncated or corrupt?): "
                                 f"{type(err).__name__}: {detail}") from err
        except Exception as err:  # the decompressors and the record parser raise their own types
            raise RecordingError(f"{path}: not a readable MCAP recording (truncated or corrupt?): "
                                 f"{type(err).__name__}: {err}") from err
    if session is None:
        raise RecordingError(f"{path}: not a cpstream recording (no {SESSION_TOPIC} message)")
    if not frames:
        raise RecordingError(f"{path}: the recording holds no agent feature frames: nothing to replay")
    truth = None
    if truth_rows:
        truth = GroundTruth()
        for index in range(max(truth_rows) + 1):
            if index not in truth_rows:
                break  # scored frames are those up to the first gap
            boxes = np.asarray(truth_rows[index]["boxes"], dtype=np.float64)
            truth.boxes.append(boxes if boxes.size else np.zeros((0, 7)))
            truth.world_from_ego.append(np.asarray(truth_rows[index]["world_from_ego"], dtype=np.float64))
    by_agent = {a: sorted(f.values(), key=lambda f: f.capture_time_ns) for a, f in sorted(frames.items())}
    fused.sort(key=lambda f: f.sequence)
    return Recording(path, session, by_agent, truth, fused)


def fusion_config(recording: Recording, override: Path | None) -> FusionConfig:
    """The recorded fusion settings, overlaid with ``override`` (a fusion config or a launch file), at the
    recorded rate, on 127.0.0.1:0, accepting any agent."""
    settings = dict(recording.session.get("fusion") or {})
    if override is not None:
        settings.update(load_config_file(override, [], section="fusion"))
    settings.update(listen="127.0.0.1:0", allow_any_agent=True, tokens={}, rate_hz=1e9 / recording.period_ns)
    settings.pop("tls", None)
    return FusionConfig.model_validate(settings)


def _recorded_summary(recording: Recording) -> dict:
    """Live AP and counts recomputed from the recorded fused frames, and the stand-ins the file lacks."""
    live = Progress()
    for fused in recording.fused:
        _score(live, fused, recording.truth, recording.start_slot)
    have = {(a, f.sequence) for a, frames in recording.frames.items() for f in frames}
    missing = {(c.agent_id, c.sequence) for f in recording.fused for c in f.contributions
               if c.status not in (*NOT_USED, ContributionStatus.CONTRIBUTION_STATUS_FRESH)
               and (c.agent_id, c.sequence) not in have}
    return {"ap": _ap(live), "frames_fused": _fused_count(live.fused),
            "frames_scored": live.scored, "substitutes_not_recorded": len(missing)}


def _fused_count(frames: list[FusedFrame]) -> int:
    """Fused frames with some agent's evidence in them (as the launch report counts them)."""
    return sum(any(c.status not in NOT_USED for c in f.contributions) for f in frames)


def _ap(progress_: Progress) -> dict:
    ap = progress_.ap.result() if progress_.scored else {}
    return {k: (None if np.isnan(v) else round(v, 4)) for k, v in ap.items()}


def _rebased(frame: FeatureFrame, offset_ns: int) -> FeatureFrame:
    out = FeatureFrame()
    out.CopyFrom(frame)
    out.capture_time_ns = frame.capture_time_ns + offset_ns
    out.send_time_ns = 0
    return out


async def replay(recording: Recording, config: FusionConfig, realtime: bool = True) -> dict:
    """Stream the recording into a fresh in-process fusion node; returns the scored result."""
    period_ns = recording.period_ns
    node = load_fusion_node(config, REPO_ROOT)
    server = await node.start()
    address = f"127.0.0.1:{server.port}"
    progress_ = Progress()
    subscribed = asyncio.Event()
    uplinks = {a: FeatureUplink(address, a) for a in recording.frames}
    links = [asyncio.create_task(u.run()) for u in uplinks.values()]
    subscriber = None
    started = time.monotonic()
    stop = asyncio.Event()  # never set: Ctrl-C cancels the whole run
    slots = len({recording.slot_of(f) for frames in recording.frames.values() for f in frames})
    bar = progress()
    bar_task = bar.add_task(f"replaying {recording.path.name}", total=slots)
    bar.start()
    try:
        # The frame index of a replayed slot: set below, once the clock offset is known.
        rebase = {"start_slot": 0}

        async def collect() -> None:
            async for fused in subscribe(address, subscribed=subscribed):
                _score(progress_, fused, recording.truth, rebase["start_slot"])
                progress_.updated.set()
                bar.update(bar_task, completed=len(progress_.fused))

        subscriber = asyncio.create_task(collect())
        ready = asyncio.ensure_future(asyncio.gather(subscribed.wait(),
                                                     *(u.connected.wait() for u in uplinks.values())))
        done, _ = await asyncio.wait([ready, *links], timeout=30.0, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            for link in done:
                link.result()  # an uplink that gave up raises its LinkError here
            raise RuntimeError(f"the replay's fusion node at {address} did not take the streams within 30 s")

        items = sorted(((recording.slot_of(f), f.send_time_ns - f.capture_time_ns, a, f)
                        for a, frames in recording.frames.items() for f in frames), key=lambda t: (t[0], t[1]))
        first_slot, last_slot = items[0][0], items[-1][0]
        shift = (time.time_ns() + START_MARGIN_NS) // period_ns + 1 - first_slot  # whole slots
        offset_ns = shift * period_ns
        rebase["start_slot"] = recording.start_slot + shift
        deadline_ns = int(config.deadline_ms * 1e6)
        if realtime:
            for slot, delay_ns, agent, frame in sorted(items, key=lambda t: t[3].capture_time_ns + _delay(t[1])):
                at_ns = frame.capture_time_ns + offset_ns + _delay(delay_ns)
                wait_s = (at_ns - time.time_ns()) / 1e9
                if wait_s > 0:
                    await asyncio.sleep(wait_s)  # the sensor clock
                uplinks[agent].offer(_rebased(frame, offset_ns))
            grace = (last_slot * period_ns + offset_ns + deadline_ns - time.time_ns()) / 1e9 + END_GRACE_S
            await _last_slot(progress_, last_slot + shift, max(grace, END_GRACE_S), stop)
        else:
            index = 0
            while index < len(items):
                slot = items[index][0]
                while index < len(items) and items[index][0] == slot:
                    _, _, agent, frame = items[index]
                    uplinks[agent].offer(_rebased(frame, offset_ns))
                    index += 1
                # the next slot goes out once this one is fused (at its deadline if an agent has no frame in it)
                grace = (slot * period_ns + offset_ns + deadline_ns - time.time_ns()) / 1e9 + END_GRACE_S
                await _last_slot(progress_, slot + shift, max(grace, END_GRACE_S), stop)
    finally:
        bar.stop()
        for uplink in uplinks.values():
            uplink.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*links, return_exceptions=True), timeout=5.0)
        for link in links:
            link.cancel()
        await node.stop()
        if subscriber is not None:
            subscriber.cancel()
            await asyncio.gather(subscriber, return_exceptions=True)
    offered = {str(a): u.counters.offered for a, u in uplinks.items()}
    return {
        "ap": _ap(progress_),
        "frames_fused": _fused_count(progress_.fused),
        "frames_scored": progress_.scored,
        "latency_ms": percentiles(progress_.latency_ms if realtime else []),  # capture times are virtual in AFAP
        "mode": "realtime" if realtime else "as-fast-as-possible",
        "frames_offered": offered,
        "frames_dropped_stale": {str(a): u.counters.dropped_stale for a, u in uplinks.items()},
        "wall_s": round(time.monotonic() - started, 2),
        "fusion": node.counters(),
    }


def _delay(delay_ns: int) -> int:
    """The recorded capture-to-send delay of a frame (0 when the frame has no send time)."""
    return delay_ns if 0 <= delay_ns <= MAX_SEND_DELAY_NS else 0


def run_replay(path: Path, override: Path | None = None, realtime: bool = True) -> dict:
    recording = read_recording(path)
    config = fusion_config(recording, override)
    result = asyncio.run(replay(recording, config, realtime))
    result["recorded"] = _recorded_summary(recording)
    result["recording"] = {"path": str(path), "bytes": path.stat().st_size,
                           "frames": {str(a): len(f) for a, f in recording.frames.items()},
                           "substitutes_not_recorded": result["recorded"].pop("substitutes_not_recorded")}
    return result


def replay_folder(args: argparse.Namespace) -> int:
    """An OPV2V-layout scenario folder through the live pipeline: the demo's fusion node and agent
    settings, one agent process per agent folder at the recorded rate, scored against the labels."""
    from launch.launcher import load_launch_config, run_launch

    if args.as_fast_as_possible:
        raise ValueError("a scenario folder is played at its recorded rate (--as-fast-as-possible is for MCAP)")
    demo = load_launch_config(Path(__file__).resolve().parent / "demo.yaml", [])
    config = demo.model_copy(update={"world": None, "data": args.file.resolve(), "frames": None})
    if args.rate_hz is not None:
        if args.rate_hz <= 0:
            raise ValueError(f"--rate-hz must be above 0, got {args.rate_hz:g}")
        config = config.model_copy(update={"rate_hz": args.rate_hz})
    if args.fusion_config is not None:
        from launch.config_files import load_config_file

        config = config.model_copy(update={"fusion": {**config.fusion, **load_config_file(
            args.fusion_config, section="fusion")}})
    report = asyncio.run(run_launch(config, args.report))
    console.print_json(json.dumps({k: report.get(k) for k in ("ap", "frames_fused", "frames_scored", "latency_ms")}))
    return 130 if report["interrupted"] else 0


def cmd_replay(args: argparse.Namespace) -> int:
    if args.file.is_dir():
        return replay_folder(args)
    if args.rate_hz is not None:
        raise ValueError("--rate-hz is for a scenario folder; a recording plays at its recorded rate")
    result = run_replay(args.file, args.fusion_config, realtime=not args.as_fast_as_possible)
    write_json(args.report, result)
    console.print_json(json.dumps({k: result[k] for k in ("ap", "frames_fused", "frames_scored", "latency_ms",
                                                          "recorded", "wall_s")}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("replay", help="play a recorded session (MCAP) or an OPV2V scenario folder through "
                                           "a fusion node and score it")
    parser.add_argument("file", type=Path, help="a recording made by: cpstream launch FILE --record OUT.mcap; or "
                                                "an OPV2V-layout scenario folder (played by agent processes)")
    parser.add_argument("--fusion-config", type=Path, metavar="YAML",
                        help="fusion settings over the recorded ones (a fusion config or a launch file), "
                             "e.g. another detector or deadline_ms")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true",
                      help="at the recorded rate, with the recorded send delays (the default)")
    pace.add_argument("--as-fast-as-possible", action="store_true",
                      help="each slot as soon as the previous one is fused")
    parser.add_argument("--rate-hz", type=float,
                        help="a scenario folder: play it at this rate instead of the demo's 10 Hz (agents that "
                             "fall behind skip to the newest frame, so a slow machine scores fewer frames)")
    parser.add_argument("--report", type=Path, help="write the JSON result here")
    parser.set_defaults(func=cmd_replay)


__all__ = ["Recording", "RecordingError", "cmd_replay", "fusion_config", "read_recording", "register",
           "replay", "run_replay"]
