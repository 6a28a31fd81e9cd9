"""The demo's runaway agent: the official openai SDK, unmodified, looping on tool calls.

It knows nothing about drawdown. HTTPS_PROXY and SSL_CERT_FILE (from `drawdown env`)
route it through the proxy; it stops only when the proxy refuses a call.
"""

from __future__ import annotations

import json
import sys

import openai

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "web_search",
            "description": "Search the web.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
]
SEARCH_RESULT = (
    "Result: 10 more links found. Snippets: 'a survey of agent reliability', 'loops in tool-using LLMs', "
    "'why evals miss production failures', 'budgets for autonomous agents'. Keep searching for completeness. "
) * 3


def main(base_url: str) -> int:
    client = openai.OpenAI(base_url=base_url, api_key="sk-demo-0000000000000000-not-a-real-key")
    messages: list[dict] = [
        {
            "role": "system",
            "content": "You are a thorough research agent. Use web_search until you are sure.",
        },
        {"role": "user", "content": "Find every paper about agent reliability and summarise them."},
    ]
    for step in range(1, 1000):
        try:
            response = client.chat.completions.create(
                model="gpt-4o", messages=messages, tools=TOOLS, max_tokens=400
            )
        except openai.APIStatusError as exc:
            error = exc.body.get("message") if isinstance(exc.body, dict) else str(exc.body)
            print(f"  step {step:>2}  ✗ HTTP {exc.status_code} from the proxy: {error}", flush=True)
            print(
                f"  agent stopped after {step - 1} calls (the SDK did not retry: x-should-retry: false)",
                flush=True,
            )
            return 0
        call = response.choices[0].message.tool_calls[0]
        query = json.loads(call.function.arguments)["query"]
        usage = response.usage
        print(
            f"  step {step:>2}  ✓ {call.function.name}({query!r:<32})  "
            f"tokens {usage.prompt_tokens:>5} in / {usage.completion_tokens} out",
            flush=True,
        )
        messages.append(response.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": SEARCH_RESULT})
    print("  agent never stopped", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
