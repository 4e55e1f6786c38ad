"""
Tuning a chat model through the openai client
=============================================

Chat vision-language models (GPT-4o-class models on OpenAI, Qwen-VL or LLaVA behind vLLM,
SGLang, llama.cpp or Ollama) speak OpenAI's ``/v1/chat/completions`` and return the top
log-probabilities of the answer's tokens. :class:`skcarrot.ChatVLMBackend` asks such a model a
multiple-choice question per image and reads each class's score from its option letter's
log-probability; :class:`~skcarrot.CarrotClassifier` then tunes the instruction and the class
descriptions (the prompt module) and a refiner on the scores (the refinement module).

Here the chat model is our own: ``skcarrot serve``'s micro chat model, on the loopback
interface, with an API key and a budget, reached through the official ``openai`` client. Against
a hosted model only the URL, the model id and the key's variable change, e.g.
``ChatVLMBackend(model="gpt-4o", api_key_env="OPENAI_API_KEY")``.
"""

import base64
import io
import os
import socket
import tempfile
import threading
import time

import matplotlib.pyplot as plt
import numpy as np
import openai
import uvicorn

from skcarrot import CarrotClassifier, ChatVLMBackend
from skcarrot.datasets import few_shot_split, load_digit_images
from skcarrot.images import to_pil_images
from skcarrot.serve import Settings, create_app

# %%
# A metered chat endpoint on the loopback interface
# -------------------------------------------------
# A throwaway ledger with one key, allowed 20,000 calls (one call is one query).
app = create_app(Settings(db_url=f"sqlite:///{tempfile.mkdtemp()}/ledger.db"))
_, key = app.state.server.ledger.create_key("example", budget=20_000)
os.environ["SKCARROT_CHAT_KEY"] = key  # where the backend reads the key: never in its parameters

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
while not server.started:
    time.sleep(0.05)
base_url = f"http://127.0.0.1:{port}/v1"

# %%
# One call, as the chat door sends it
# -----------------------------------
# The instruction and the lettered options, then the image; one answer token, its top 20
# alternatives. The letters' log-probabilities are the class scores.
X, y = load_digit_images()
png = io.BytesIO()
to_pil_images(X[:1])[0].save(png, format="PNG")
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
answer = client.chat.completions.create(
    model="skcarrot-micro-chat", max_completion_tokens=1, logprobs=True, top_logprobs=5,
    messages=[{"role": "user", "content": [
        {"type": "text", "text": "Which option describes the image? Answer with the letter. A. 0 B. 1 C. 2"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
                                            "detail": "low"}}]}])
for alternative in answer.choices[0].logprobs.content[0].top_logprobs:
    print(f"{alternative.token!r:>8} {np.exp(alternative.logprob):.3f}")
print("usage:", answer.usage.prompt_tokens, "prompt tokens (85 of them the image),",
      answer.usage.completion_tokens, "completion token")

# %%
# Zero-shot, refine-only and the default on ten digits
# ----------------------------------------------------
# Eight shots a class; 300 held-out digits. ``estimate_cost`` says what a fit will spend before
# it spends it (a dry run: no call), here at gpt-4o's prices per million tokens.
X_train, y_train, X_test, y_test = few_shot_split(X, y, n_shots=8, seed=0)
X_test, y_test = X_test[:300], y_test[:300]
names = [str(d) for d in range(10)]

methods = {
    "zero-shot": dict(prompt_tuning=False, refinement=False),
    "refine-only": dict(prompt_tuning=False, early_stopping=False),
    "default": dict(),
}
results = {}
for name, params in methods.items():
    backend = ChatVLMBackend(base_url=base_url, api_key_env="SKCARROT_CHAT_KEY", cache=None)
    clf = CarrotClassifier(backend=backend, class_names=names, random_state=0, **params)
    estimate = clf.estimate_cost(X_train, y_train, prices={"input": 2.50, "output": 10.00})
    clf.fit(X_train, y_train)
    results[name] = 100 * clf.score(X_test, y_test)
    print(f"{name:>12}: {results[name]:.1f}% held out; {clf.n_calls_} calls "
          f"(estimated {estimate['calls']}), {clf.n_input_tokens_:,} input tokens "
          f"(estimated {estimate['input_tokens']:,}), ${estimate['usd']:.2f} at gpt-4o prices")
print("the default chose:", clf.selection_["choice"])

used = app.state.server.ledger.find_key("example")
print(f"billed by the server: {used.prompts_used} calls")

fig, ax = plt.subplots(figsize=(5, 2.4))
ax.barh(list(results)[::-1], list(results.values())[::-1], color="#4c72b0")
ax.set_xlabel("held-out accuracy (%), 8 shots a class")
ax.set_xlim(0, 100)
fig.tight_layout()

server.should_exit = True
thread.join(timeout=10)
