// A backend that connects late: uses the README's client (client.mjs) to follow a job that already has
// events, then submits. Prints READY once subscribed, caught up and submitted, then one JSON line per event,
// then DONE when the job is final. Run by tests/test_bridge_node.py and tests/test_node_client.py (which kills
// its Pub/Sub connection), which publish the events.
import { submit, close } from "./client.mjs";

const jobId = process.env.JOB_ID;
const timeout = setTimeout(() => {
  console.error("timeout");
  process.exit(2);
}, Number(process.env.TIMEOUT_MS || 30000));

const final = new Promise((resolve) => {
  submit({ jobId, type: "train_lora", params: { epochs: 1 }, gpus: 1 }, (event) => {
    console.log(JSON.stringify(event));
    if (["succeeded", "failed", "cancelled", "rejected"].includes(event.status)) resolve(event);
  }).then(() => console.log("READY"));
});

await final;
clearTimeout(timeout);
await close();
console.log("DONE");
