#!/usr/bin/env node
// An independent cp.v1.Fusion subscriber written with @grpc/grpc-js and @grpc/proto-loader.
//
//   node subscribe.js --address 127.0.0.1:50051 --proto protos/cpstream.proto [--count 5]
//                     [--min-score 0] [--timeout-s 60]
//
// Prints one JSON line per event on stdout:
//   {"event":"subscribed"}                 once the Subscribe call has been started
//   {"event":"frame", ...}                 one per FusedFrame received (fields below)
//   {"event":"done","frames":N}            after --count frames; exit code 0
// Errors go to stderr as {"event":"error",...} with a non-zero exit code (stream ended
// early, deadline passed, server unreachable).
//
// The proto is loaded with keepCase (field names as in the .proto), int64/uint64 as
// decimal strings (nanosecond times do not fit a double) and enums as their names.
'use strict';

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function parseArgs(argv) {
  const args = { address: null, proto: null, count: 5, minScore: 0, timeoutS: 60 };
  for (let i = 0; i < argv.length; i += 1) {
    const key = argv[i];
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`${key} needs a value`);
    if (key === '--address') args.address = value;
    else if (key === '--proto') args.proto = value;
    else if (key === '--count') args.count = Number.parseInt(value, 10);
    else if (key === '--min-score') args.minScore = Number.parseFloat(value);
    else if (key === '--timeout-s') args.timeoutS = Number.parseFloat(value);
    else throw new Error(`unknown argument ${key}`);
    i += 1;
  }
  if (!args.address || !args.proto) throw new Error('--address and --proto are required');
  if (!(args.count >= 1)) throw new Error('--count must be a positive integer');
  if (!(args.timeoutS > 0)) throw new Error('--timeout-s must be positive');
  return args;
}

function emit(event) {
  process.stdout.write(`${JSON.stringify(event)}\n`);
}

function fail(what, err) {
  const detail = err ? { code: err.code, details: err.details || String(err.message || err) } : {};
  process.stderr.write(`${JSON.stringify({ event: 'error', what, ...detail })}\n`);
  process.exit(1);
}

function box(b) {
  return {
    x_m: b.x_m, y_m: b.y_m, z_m: b.z_m,
    length_m: b.length_m, width_m: b.width_m, height_m: b.height_m,
    yaw_rad: b.yaw_rad, label: b.label, score: b.score,
  };
}

function frameEvent(f) {
  return {
    event: 'frame',
    sequence: f.sequence,
    fusion_time_ns: f.fusion_time_ns,
    capture_time_ns: f.capture_time_ns,
    publish_time_ns: f.publish_time_ns,
    latency_ms: f.latency_ms,
    ego_agent_id: f.ego_agent_id,
    reference_pose: f.reference_pose && {
      x_m: f.reference_pose.x_m, y_m: f.reference_pose.y_m, z_m: f.reference_pose.z_m,
      roll_rad: f.reference_pose.roll_rad, pitch_rad: f.reference_pose.pitch_rad, yaw_rad: f.reference_pose.yaw_rad,
    },
    box_count: f.boxes.length,
    boxes: f.boxes.map(box),
    contributions: f.contributions.map((c) => ({
      agent_id: c.agent_id, status: c.status, sequence: c.sequence, age_ms: c.age_ms,
      tiles_fresh: c.tiles_fresh, tiles_substituted: c.tiles_substituted, tiles_dropped: c.tiles_dropped,
    })),
    link_stats: f.link_stats.map((s) => ({
      agent_id: s.agent_id, transport: s.transport, frames_received: s.frames_received,
      frames_refused: s.frames_refused, last_sequence: s.last_sequence,
    })),
    stage_timings: f.stage_timings.map((s) => ({ stage: s.stage, duration_ms: s.duration_ms })),
  };
}

function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    fail('usage', err);
  }
  const definition = protoLoader.loadSync(args.proto, {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  const cp = grpc.loadPackageDefinition(definition).cp.v1;
  const client = new cp.Fusion(args.address, grpc.credentials.createInsecure());
  const deadline = new Date(Date.now() + args.timeoutS * 1000);

  client.waitForReady(deadline, (readyErr) => {
    if (readyErr) fail(`cannot reach ${args.address}`, readyErr);
    let frames = 0;
    let finished = false;
    const call = client.Subscribe({ min_score: args.minScore }, { deadline });
    emit({ event: 'subscribed' });
    call.on('data', (frame) => {
      if (finished) return;
      frames += 1;
      emit(frameEvent(frame));
      if (frames >= args.count) {
        finished = true;
        emit({ event: 'done', frames });
        call.cancel();
        client.close();
        process.exit(0);
      }
    });
    call.on('error', (err) => {
      if (!finished) fail(`stream failed after ${frames} frame(s)`, err);
    });
    call.on('end', () => {
      if (!finished) fail(`stream ended after ${frames} of ${args.count} frame(s)`);
    });
  });
}

main();
