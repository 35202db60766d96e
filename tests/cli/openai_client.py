# `pipeline serve` as a client nobody here wrote sees it: the official OpenAI Python SDK
# (installed by scripts/test). Prints one JSON object of what it saw; tests/cli/http.rs checks it.
#
#   python openai_client.py BASE_URL MODEL
import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
seen = {"models": [m.id for m in client.models.list().data]}

requests = {
    "stop": dict(messages=[{"role": "system", "content": "You answer in one short sentence."}, {"role": "user", "content": "What is a river?"}], max_tokens=24, stop=[".", "ing "]),
    "length": dict(messages=[{"role": "user", "content": "Count from one to twenty in words."}], max_tokens=7),
    "json_schema": dict(
        messages=[{"role": "user", "content": "Return the numbers 3 and 4 as JSON with keys a and b."}],
        max_tokens=32,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pair", "schema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "additionalProperties": False}},
        },
    ),
}
for name, request in requests.items():
    whole = client.chat.completions.create(model=model, temperature=0, **request)
    chunks = list(client.chat.completions.create(model=model, temperature=0, stream=True, stream_options={"include_usage": True}, **request))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage]
    seen[name] = {
        "whole": {"text": whole.choices[0].message.content, "finish_reason": whole.choices[0].finish_reason, "usage": [whole.usage.prompt_tokens, whole.usage.completion_tokens]},
        "streamed": {"text": "".join(pieces), "finish_reason": finish, "usage": [[u.prompt_tokens, u.completion_tokens] for u in usage]},
        "chunks": len(chunks),
        "role": chunks[0].choices[0].delta.role if chunks and chunks[0].choices else None,
        "fingerprint": whole.system_fingerprint,
    }

# Streamed without `include_usage`: no usage chunk.
chunks = list(client.chat.completions.create(model=model, stream=True, max_tokens=3, messages=[{"role": "user", "content": "Hi"}]))
seen["no_usage"] = {"chunks": len(chunks), "usage": [c.usage is not None for c in chunks]}

# Errors, as the SDK raises them.
def error(call):
    try:
        call()
    except openai.APIStatusError as e:
        return {"status": e.status_code, "message": e.message}
    return None

user = [{"role": "user", "content": "Hi"}]
seen["errors"] = {
    "unknown_model": error(lambda: client.chat.completions.create(model="gpt-4", messages=user)),
    "max_tokens_0": error(lambda: client.chat.completions.create(model=model, messages=user, max_tokens=0)),
    "no_messages": error(lambda: client.chat.completions.create(model=model, messages=[])),
    "stream_options_unstreamed": error(lambda: client.chat.completions.create(model=model, messages=user, stream_options={"include_usage": True})),
    "completions": error(lambda: client.completions.create(model=model, prompt="Hi")),
    "oversized": error(lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 12000}], max_tokens=2)),
}
# The server is still up after them.
seen["after_errors"] = client.chat.completions.create(model=model, messages=user, max_tokens=2).choices[0].finish_reason
print(json.dumps(seen))
