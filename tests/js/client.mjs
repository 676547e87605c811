// The OpenAI client every script here uses: the server under test from the environment
// (EASYBACKEND_BASE_URL, EASYBACKEND_KEY, EASYBACKEND_MODEL), no retries, a 10 s timeout.
import OpenAI from "openai";

export const client = new OpenAI({
  baseURL: process.env.EASYBACKEND_BASE_URL,
  apiKey: process.env.EASYBACKEND_KEY,
  maxRetries: 0,
  timeout: 10_000,
});
export const model = process.env.EASYBACKEND_MODEL;
