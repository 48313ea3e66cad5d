// The README's backend example (operator/gpujob/bridge/README.md), verbatim: tests/test_bridge_node.py checks it.
import { createClient } from "redis";

const redis = createClient({ url: process.env.REDIS_URL }); // rediss://user:pass@host:6380 for TLS
const sub = redis.duplicate();
await Promise.all([redis.connect(), sub.connect()]);

export async function submit(jobId, type, params, onEvent) {
  let lastSeq = 0;
  const FINAL = ["succeeded", "failed", "cancelled"];
  // 1. Subscribe first, so no event is missed between the catch-up and the live stream.
  await sub.subscribe(`gpujobs:progress:${jobId}`, (message) => {
    const event = JSON.parse(message);
    if (event.seq <= lastSeq) return; // already seen in the catch-up
    lastSeq = event.seq;
    onEvent(event);
    if (FINAL.includes(event.status)) sub.unsubscribe(`gpujobs:progress:${jobId}`);
  });
  // 2. Catch up (a resend after a restart finds the job's latest state here).
  const state = await redis.get(`gpujobs:state:${jobId}`);
  if (state) {
    const event = JSON.parse(state);
    lastSeq = event.seq;
    onEvent(event);
    if (FINAL.includes(event.status)) return sub.unsubscribe(`gpujobs:progress:${jobId}`);
  }
  // 3. Submit. Safe to repeat: the jobId makes it idempotent.
  await redis.xAdd("gpujobs:requests", "*", { job: JSON.stringify({ jobId, type, params, gpus: 1 }) });
}

export const cancel = (jobId) =>
  redis.xAdd("gpujobs:requests", "*", { action: "cancel", job: JSON.stringify({ jobId }) });

export const close = () => Promise.all([redis.quit(), sub.quit()]);
