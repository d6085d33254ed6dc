"""The official `openai` Python client against a running `kvlink serve` (argv[1]: its
base URL, e.g. http://127.0.0.1:8080/v1): document registration (the client's generic
POST), chat completions whole and streamed with the `documents` extension through
`extra_body`, completions, a multi-turn chat, and an error as the client raises it;
then the README's Server examples (curl and Python) as written there.
Exits non-zero on the first failed check."""

import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)

DOC = "The Zorblax lighthouse stands on Kelp Island. Its keeper paints it green every spring."
QUESTION = "What color is the Zorblax lighthouse painted?"


def check(cond, what):
    if not cond:
        sys.exit(f"openai-client-test: FAILED: {what}")
    print(f"ok: {what.split(':')[0]}")


# Documents are kvlink's own endpoint: the client's generic POST reaches it.
doc = client.post("/documents", body={"text": DOC, "title": "lighthouse"}, cast_to=object)
check(isinstance(doc, dict) and len(doc.get("id", "")) == 32, f"register a document: {doc}")
doc_id = doc["id"]

models = client.models.list()
check(len(models.data) == 1, f"models.list: {models}")
model = models.data[0].id

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": QUESTION}],
    max_tokens=16,
    temperature=0,
    extra_body={"documents": [doc_id]},
)
answer = chat.choices[0].message.content
check(chat.object == "chat.completion" and answer.strip(), f"chat completion: {chat}")
check("green" in answer.lower(), f"the answer uses the document: {answer!r}")
check(chat.usage.completion_tokens >= 1, f"usage: {chat.usage}")
hits = chat.model_extra["kvlink"]["cache_hits"]
check(hits["computed"] == 0 and hits["gpu"] == 1, f"the document's cache was reused: {hits}")

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": QUESTION}],
    max_tokens=16,
    temperature=0,
    stream=True,
    extra_body={"documents": [doc_id]},
)
parts, finish = [], None
for chunk in stream:
    if chunk.choices:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
check("".join(parts) == answer, f"streamed chat equals the whole one: {''.join(parts)!r} vs {answer!r}")
check(finish in ("stop", "length"), f"stream finish_reason: {finish}")

comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4)
check(comp.object == "text_completion" and comp.choices[0].text, f"completion: {comp}")

multi = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "user", "content": "My name is Zed. Please remember my name."},
        {"role": "assistant", "content": "Nice to meet you, Zed! I will remember your name."},
        {"role": "user", "content": "What is my name?"},
    ],
    max_tokens=12,
)
check("Zed" in multi.choices[0].message.content, f"multi-turn chat: {multi.choices[0].message.content!r}")

try:
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"documents": ["no-such-document"]},
    )
    check(False, "an unknown document is refused")
except openai.BadRequestError as e:
    check(e.code == "document_not_found", f"an unknown document is a 400 the client raises: {e}")

# The README's Server examples, as written there, against this server: the curl block
# (the `$B serve` lines left out; curl -f, so an HTTP error fails it) and the Python one.
import re
import subprocess

readme = open("README.md").read()
section = readme[readme.index("## Server\n") : readme.index("## Adapters (LoRA)")]
blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
shell = [b for lang, b in blocks if lang == "sh"][0]
python = [b for lang, b in blocks if lang == "python"][0]
host = base.split("//")[1].split("/")[0]
eiffel = client.post("/documents", body={"text": "The Eiffel Tower was completed in 1889."}, cast_to=object)
script = "\n".join(l for l in shell.splitlines() if not l.startswith("$B"))
script = script.replace("localhost:8080", host).replace("8b3f...", eiffel["id"]).replace("curl -s ", "curl -sf ")
out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=600)
check(out.returncode == 0 and "\"object\":\"chat.completion\"" in out.stdout, f"README curl examples: {out.returncode} {out.stdout} {out.stderr}")
check("kvlink_requests_total" in out.stdout, "README curl examples reach /metrics")
python = python.replace("http://127.0.0.1:8080/v1", base)
exec(compile(python, "README.md (Server, python)", "exec"), {})
print()
check(True, "README python example ran")

print("openai-client-test: all checks passed")
