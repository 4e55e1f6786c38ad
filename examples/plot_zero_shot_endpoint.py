"""
Tuning on a paid zero-shot endpoint
===================================

Hosted CLIP endpoints take an image and candidate labels and return one probability per
label, and bill each call. :class:`skcarrot.ZeroShotHTTPBackend` speaks that contract, so
:class:`~skcarrot.CarrotClassifier` tunes a text prompt per class on it (the text door).

A stand-in for the paid endpoint runs here on this machine: ``skcarrot serve``'s app on the
loopback interface, with an API key and a budget, serving the embedded model. Against a real
one, only the URL and the token's variable change, e.g.
``ZeroShotHTTPBackend("https://<your-endpoint>", token_env="HF_TOKEN")``.

The ``url`` is the endpoint's full URL, the one each image is POSTed to: for ``skcarrot serve``,
``<server>/v1/zero-shot-image-classification``.

Three counts say what a fit cost: ``n_queries_`` (prompt sets scored, capped by
``query_budget``), ``n_images_scored_`` (images handed to the backend, summed over its calls;
one call may score many prompt sets on the same images) and the backend's ``n_calls_`` (HTTP
requests, retries included). An endpoint like this one takes one image and one prompt set per
request, so it is called, and bills, once per query and image.
"""

import os
import socket
import tempfile
import threading
import time

import uvicorn

from skcarrot import CarrotClassifier, ZeroShotHTTPBackend
from skcarrot.datasets import DIGIT_WORDS, few_shot_split, load_digit_images
from skcarrot.serve import Settings, create_app

# %%
# A metered endpoint on the loopback interface
# --------------------------------------------
# A throwaway ledger with one key, allowed 2000 calls.
app = create_app(Settings(db_url=f"sqlite:///{tempfile.mkdtemp()}/ledger.db"))
_, key = app.state.server.ledger.create_key("example", budget=2000)
os.environ["SKCARROT_API_KEY"] = key  # where the backend reads the token: never in its parameters

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
while not server.started:
    time.sleep(0.05)
url = f"http://127.0.0.1:{port}"

# %%
# Few shots, a small budget
# -------------------------
# Four digits, five shots each; the class names are the words of the digits. The prompt
# search is asked for (``prompt_tuning=True``) with a cap of 30 queries: first one query
# screens candidate words, then generations of ten prompt sets each search among the words
# kept. With the refiner behind it, a word is kept only when it beats chance over every word
# tried; when none does (as here, on the embedded model), there is nothing to search, the
# class names stay, and one more query scores the views the refiner trains on.
X, y = load_digit_images()
keep = y < 4
X_train, y_train, X_test, y_test = few_shot_split(X[keep], y[keep], n_shots=5, seed=0)
X_test, y_test = X_test[:100], y_test[:100]
class_names = [DIGIT_WORDS[d] for d in range(4)]

backend = ZeroShotHTTPBackend(
    url + "/v1/zero-shot-image-classification", token_env="SKCARROT_API_KEY", max_concurrency=4
)
clf = CarrotClassifier(
    backend=backend, class_names=class_names, query_budget=30, prompt_tuning=True, random_state=0
)
clf.fit(X_train, y_train)
calls_to_fit = backend.n_calls_

print(f"learned prompts: {clf.prompt_}")
print(f"held-out accuracy: {clf.score(X_test, y_test):.3f}")

# %%
# What it cost
# ------------
print(f"fit: {clf.n_queries_} queries of {clf.query_budget} ({clf.n_queries_by_purpose_})")
print(f"fit: {clf.n_images_scored_} images scored, in {calls_to_fit} HTTP calls")
print(f"predict: {backend.n_calls_ - calls_to_fit} HTTP calls for {len(X_test)} images")
used = app.state.server.ledger.find_key("example")
print(f"billed by the endpoint: {used.prompts_used} calls of the key's {used.budget}")

server.should_exit = True
thread.join(timeout=10)
