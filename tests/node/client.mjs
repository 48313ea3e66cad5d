// The README's backend example (README.md and operator/gpujob/bridge/README.md), verbatim: tests check all three.
import { createClient } from "redis";

const FINAL = ["succeeded", "failed", "cancelled", "rejected"]; // nothing comes after these
const redis = createClient({
  url: process.env.REDIS_URL, // rediss://user:pass@host:6380 for TLS
  socket: { reconnectStrategy: (retries) => Math.min(100 * 2 ** retries, 5000) }, // for ever, at most 5 s apart
});
const sub = redis.duplicate(); // Pub/Sub needs a connection of its own
for (const client of [redis, sub]) client.on("error", (err) => console.error(`redis: ${err.message}`));
await Promise.all([redis.connect(), sub.connect()]);

const following = new Map(); // jobId -> { lastSeq, onEvent }

function deliver(jobId, event) {
  const job = following.get(jobId);
  if (!job || !(event.seq > job.lastSeq)) return; // not followed (any more), or already seen
  job.lastSeq = event.seq;
  job.onEvent(event);
  if (FINAL.includes(event.status)) {
    following.delete(jobId);
    sub.unsubscribe(`gpujobs:progress:${jobId}`).catch(() => {});
  }
}

async function catchUp(jobId) {
  const state = await redis.get(`gpujobs:state:${jobId}`); // the job's latest event (kept 7 days)
  if (state) deliver(jobId, JSON.parse(state));
}

// After a reconnect node-redis subscribes again by itself; what was published in between is in the state.
sub.on("ready", () => following.forEach((_, jobId) => catchUp(jobId).catch(() => {})));

// Follows the job, then submits it; onEvent gets each event once, in order, up to a final one (a request the
// operator refused ends with `rejected`, its `reason` says why).
export async function submit(request, onEvent) {
  const { jobId } = request;
  following.set(jobId, { lastSeq: 0, onEvent });
  // 1. Subscribe first, so no event falls between the catch-up and the live ones.
  await sub.subscribe(`gpujobs:progress:${jobId}`, (message) => {
    let event;
    try {
      event = JSON.parse(message);
    } catch {
      return; // not an event (anyone who can PUBLISH can send anything)
    }
    deliver(jobId, event);
  });
  // 2. Catch up: a resend after a restart finds the job's latest state here, maybe final already.
  await catchUp(jobId);
  // 3. Submit, unless it has ended. Safe to repeat: the jobId makes it idempotent.
  if (following.has(jobId)) await redis.xAdd("gpujobs:requests", "*", { job: JSON.stringify(request) });
}

export const cancel = (jobId) =>
  redis.xAdd("gpujobs:requests", "*", { action: "cancel", job: JSON.stringify({ jobId }) });

export const close = () => Promise.all([redis.quit(), sub.quit()]);
