// An unmodified TypeScript-SDK agent: nothing in it knows of drawdown. Two chat calls with the
// official openai SDK; prints "ok" per answer and "denied STATUS" when refused.
import OpenAI from "openai";

const client = new OpenAI({ apiKey: "sk-test-node-agent", maxRetries: 0 });
try {
  for (let i = 0; i < 2; i++) {
    await client.chat.completions.create({
      model: "gpt-4o-mini",
      messages: [{ role: "user", content: "hi" }],
    });
    console.log("ok");
  }
} catch (error) {
  if (error instanceof OpenAI.APIError && error.status) {
    console.log(`denied ${error.status}`);
  } else {
    console.log(`failed ${error}`);
    process.exitCode = 1;
  }
}
