// Acts as the Node backend with the README's client (client.mjs) against a real operator: submits JOB_ID (a
// valid request: expects running, then succeeded, seq increasing) and BAD_JOB_ID (gpus: -1: expects one
// `rejected` event with the reason), each followed to its end (the client then unsubscribes).
import { submit, close } from "./client.mjs";

const jobId = process.env.JOB_ID;
const badJobId = process.env.BAD_JOB_ID;
const timer = setTimeout(() => {
  console.error(`timeout; events seen: ${JSON.stringify(seen)}`);
  process.exit(2);
}, Number(process.env.TIMEOUT_MS || 60000));

const seen = { [jobId]: [], [badJobId]: [] };
const ended = (request) =>
  new Promise((resolve, reject) => {
    submit(request, (event) => {
      for (const key of ["jobId", "status", "progress", "message", "timestamp", "seq"]) {
        if (!(key in event)) reject(new Error(`event without ${key}: ${JSON.stringify(event)}`));
      }
      if (event.jobId !== request.jobId) reject(new Error(`event for another job: ${JSON.stringify(event)}`));
      seen[request.jobId].push(event);
      if (["succeeded", "failed", "cancelled", "rejected"].includes(event.status)) resolve(event);
    }).catch(reject);
  });

const [last, rejected] = await Promise.all([
  ended({ jobId, type: "train_lora", gpus: 1, params: { baseModel: "tiny-llama", dataset: { text: ["hi"] }, epochs: 1 } }),
  ended({ jobId: badJobId, type: "train_lora", gpus: -1 }),
]);
console.log(`submitted ${jobId} ${badJobId}`);
clearTimeout(timer);
await close();

const statuses = seen[jobId].map((e) => e.status);
const seqs = seen[jobId].map((e) => e.seq);
if (last.status !== "succeeded") throw new Error(`ended ${last.status}`);
if (!statuses.includes("running")) throw new Error(`no running event: ${statuses}`);
for (let i = 1; i < seqs.length; i++) {
  if (!(seqs[i] > seqs[i - 1])) throw new Error(`seq not increasing: ${seqs}`);
}
if (seen[badJobId].length !== 1) throw new Error(`not one rejected event: ${JSON.stringify(seen[badJobId])}`);
console.log(`OK ${statuses.join(",")}`);
console.log(`REJECTED ${rejected.reason}`);
