// The official OpenAI JavaScript SDK against EasyBackend's Responses and Conversations APIs: a
// previous_response_id chain (streamed at its end), a branch, a conversation with items, and
// typed errors.
//
// Run by tests/test_openai_js.py against a live server:
//   EASYBACKEND_BASE_URL=http://127.0.0.1:8000/v1 EASYBACKEND_KEY=… EASYBACKEND_MODEL=… node responses.mjs
// Prints one JSON object with what it got; exits non-zero (with the error) on any failure.
import assert from "node:assert/strict";
import OpenAI from "openai";
import { client, model } from "./client.mjs";

const result = {};

// 1. a chain: each response continues from the previous one; the last one streamed
const one = await client.responses.create({ model, input: "my name is Ada" });
const two = await client.responses.create({
  model,
  input: [{ role: "user", content: [{ type: "input_text", text: "what is my name?" }] }],
  previous_response_id: one.id,
});
const stream = client.responses.stream({ model, input: "and again?", previous_response_id: two.id });
const kinds = [];
for await (const event of stream) kinds.push(event.type);
const three = await stream.finalResponse();
result.chain = {
  ids: [one.id, two.id, three.id],
  texts: [one.output_text, two.output_text, three.output_text],
  conversation: [one.conversation?.id, two.conversation?.id, three.conversation?.id],
  previous: three.previous_response_id,
  kinds,
  status: three.status,
  usage: three.usage,
};
assert.equal(three.status, "completed");

// 2. a branch from the first response: its context is the first turn only
const branch = await client.responses.create({
  model,
  input: "a branch",
  previous_response_id: one.id,
});
result.branch = branch.output_text;
const retrieved = await client.responses.retrieve(two.id);
result.retrieved = retrieved.output_text;
const inputs = [];
for await (const item of client.responses.inputItems.list(two.id)) inputs.push(item.content[0].text);
result.input_items = inputs;

// 3. a conversation: made with items, continued by a response, its items listed page by page
const conversation = await client.conversations.create({
  metadata: { from: "js" },
  items: [
    { role: "system", content: "Be kind." },
    { role: "user", content: "hi" },
    { role: "assistant", content: "hello" },
  ],
});
const answered = await client.conversations.items.create(conversation.id, {
  items: [{ role: "user", content: "one more" }],
});
const reply = await client.responses.create({ model, conversation: conversation.id, input: "bye" });
const items = [];
for await (const item of client.conversations.items.list(conversation.id, { order: "asc", limit: 2 })) {
  items.push([item.role, item.content[0].text]);
}
result.conversation = {
  id: conversation.id,
  metadata: (await client.conversations.retrieve(conversation.id)).metadata,
  added: answered.data.map((item) => item.id),
  reply: reply.output_text,
  reply_conversation: reply.conversation?.id,
  items,
};
const deleted = await client.conversations.delete(conversation.id);
assert.equal(deleted.deleted, true);

// 4. errors are the SDK's own classes
try {
  await client.conversations.retrieve(conversation.id);
  assert.fail("a deleted conversation was found");
} catch (error) {
  assert.ok(error instanceof OpenAI.NotFoundError, String(error));
  result.not_found = error.error;
}
try {
  await client.responses.create({
    model,
    input: [{ role: "user", content: [{ type: "input_image", image_url: "https://x/a.png" }] }],
  });
  assert.fail("an image part was accepted");
} catch (error) {
  assert.ok(error instanceof OpenAI.BadRequestError, String(error));
  result.bad_request = error.error;
}
console.log(JSON.stringify(result));
