// The official OpenAI JavaScript SDK against EasyBackend's background responses (SPEC §18): a
// streamed background response dropped after a few events, reattached with starting_after,
// then polled, and a cancel.
//
// Run by tests/test_resume_openai.py against a live server:
//   EASYBACKEND_BASE_URL=http://127.0.0.1:8000/v1 EASYBACKEND_KEY=… EASYBACKEND_MODEL=… \
//   EASYBACKEND_PROMPT=… node background.mjs
// Prints one JSON object with what it got; exits non-zero (with the error) on any failure.
import assert from "node:assert/strict";
import { client, model } from "./client.mjs";

const input = process.env.EASYBACKEND_PROMPT;
const result = {};

// 1. a streamed background response, left after its third delta (the connection closed)
const stream = await client.responses.create({ model, input, background: true, stream: true });
const before = [];
let id;
for await (const event of stream) {
  if (event.type === "response.created") id = event.response.id;
  before.push({ seq: event.sequence_number, type: event.type, delta: event.delta ?? null });
  if (before.filter((e) => e.type === "response.output_text.delta").length === 3) break;
}
const last = before.at(-1).seq;

// 2. reattached after the last event seen: the rest, live until the end
const again = await client.responses.retrieve(id, { stream: true, starting_after: last });
const after = [];
for await (const event of again) {
  after.push({ seq: event.sequence_number, type: event.type, delta: event.delta ?? null });
}
const polled = await client.responses.retrieve(id);
assert.equal(polled.status, "completed");
result.stream = { id, before, after, status: polled.status, text: polled.output_text, background: polled.background };

// 3. a background response created without streaming is in progress, then cancelled
const created = await client.responses.create({ model, input, background: true });
const cancelled = await client.responses.cancel(created.id);
result.cancel = { created: created.status, cancelled: cancelled.status };

console.log(JSON.stringify(result));
