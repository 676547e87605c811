// The official OpenAI JavaScript SDK against EasyBackend's /v1: chat completions streamed
// through the relay, and a conversation the server remembers (body field and header).
//
// Run by tests/test_openai_js.py against a live server:
//   EASYBACKEND_BASE_URL=http://127.0.0.1:8000/v1 EASYBACKEND_KEY=… EASYBACKEND_MODEL=… node chat.mjs
// Prints one JSON object with what it got; exits non-zero (with the error) on any failure.
import assert from "node:assert/strict";
import OpenAI from "openai";
import { client, model } from "./client.mjs";

async function streamed(params, options) {
  const stream = await client.chat.completions.create({ model, stream: true, ...params }, options);
  let text = "";
  let finish = null;
  let usage = null;
  const ids = new Set();
  for await (const chunk of stream) {
    ids.add(chunk.id);
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      text += choice.delta?.content ?? "";
      finish = choice.finish_reason ?? finish;
    }
  }
  return { text, finish, usage, ids: [...ids] };
}

const result = {};

// 1. the stateless relay, streaming, usage asked for
result.relay = await streamed({
  messages: [{ role: "user", content: "hello from js" }],
  stream_options: { include_usage: true },
});
assert.equal(result.relay.text, "echo(1): hello from js");
assert.equal(result.relay.finish, "stop");
assert.ok(result.relay.usage.total_tokens > 0);

// 2. a conversation named in the body: the second answer is asked with the first turn
const first = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "my colour is green" }],
  conversation: "js-body",
});
const second = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "what is my colour?" }],
  conversation: "js-body",
});
result.body = {
  first: first.choices[0].message.content,
  second: second.choices[0].message.content,
  ids: [first.id, second.id],
  turn_ids: [first.turn_id, second.turn_id],
};
assert.equal(result.body.second, "echo(3): what is my colour?");

// 3. a conversation named by the header, streamed
const headers = { headers: { "X-Conversation-Id": "js-header" } };
result.header = [
  await streamed({ messages: [{ role: "user", content: "one" }] }, headers),
  await streamed({ messages: [{ role: "user", content: "two" }] }, headers),
];
assert.equal(result.header[1].text, "echo(3): two");

// 4. errors are the SDK's own classes
try {
  await client.models.retrieve("no-such-model");
  assert.fail("retrieve of an unknown model succeeded");
} catch (error) {
  assert.ok(error instanceof OpenAI.NotFoundError, String(error));
  result.not_found = error.error;
}
try {
  await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "x" } }] }],
    conversation: "js-body",
  });
  assert.fail("an image part was stored");
} catch (error) {
  assert.ok(error instanceof OpenAI.BadRequestError, String(error));
  result.bad_request = error.error;
}

result.models = (await client.models.list()).data.map((m) => m.id);
console.log(JSON.stringify(result));
