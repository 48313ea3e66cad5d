// Acts as the Node backend: XADD a job request, SUBSCRIBE to its progress channel, and expect
// `running` then `succeeded` events for it (node-redis, the client the Fastify backend uses).
import { createClient } from "redis";

const url = process.env.REDIS_URL;
const jobId = process.env.JOB_ID;
const deadline = Number(process.env.TIMEOUT_MS || 60000);

const publisher = createClient({ url });
const subscriber = publisher.duplicate();
await publisher.connect();
await subscriber.connect();

const seen = [];
const done = new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`timeout; events seen: ${JSON.stringify(seen)}`)), deadline);
  subscriber.subscribe(`gpujobs:progress:${jobId}`, (message) => {
    const event = JSON.parse(message);
    for (const key of ["jobId", "status", "progress", "message", "timestamp"]) {
      if (!(key in event)) reject(new Error(`event without ${key}: ${message}`));
    }
    if (event.jobId !== jobId) reject(new Error(`event for another job: ${message}`));
    seen.push(event);
    if (["succeeded", "failed", "cancelled"].includes(event.status)) {
      clearTimeout(timer);
      resolve(event);
    }
  });
});

// Subscribed first, then submit (as the backend does): no event can be missed.
await new Promise((r) => setTimeout(r, 100));
await publisher.xAdd("gpujobs:requests", "*", {
  job: JSON.stringify({ jobId, type: "train_lora", gpus: 1, params: { epochs: 1 } }),
});
console.log(`submitted ${jobId}`);

const last = await done;
const statuses = seen.map((e) => e.status);
const seqs = seen.map((e) => e.seq);
await subscriber.quit();
await publisher.quit();

if (last.status !== "succeeded") throw new Error(`ended ${last.status}`);
if (!statuses.includes("running")) throw new Error(`no running event: ${statuses}`);
for (let i = 1; i < seqs.length; i++) {
  if (!(seqs[i] > seqs[i - 1])) throw new Error(`seq not increasing: ${seqs}`);
}
console.log(`OK ${statuses.join(",")}`);
