"""Where a judge's verdicts come from: a local model folder, or an OpenAI-compatible endpoint.

Both are a ``generate(chats) -> texts`` callable (`posttrain.rewards.judge.Generate`), greedy.

- `local_generate`: the model folder in our HF rollout engine (batched, KV cache), the chat
  template of its tokenizer.
- `openai_generate`: ``POST {base_url}/chat/completions`` with ``{"model", "messages",
  "max_tokens", "temperature": 0}``, the reply's ``choices[0].message.content``. Each request has
  a timeout; a connection error, a timeout, a 429 or a 5xx is retried ``retries`` times with
  exponential back-off (0.5 s, 1 s, 2 s ...); then `BackendUnavailable` names the URL, the
  timeout and the last error. A 4xx other than 429 is not retried. ``concurrency`` requests run
  at once (threads). The client is ``httpx2`` (the maintained httpx successor that
  huggingface_hub already installs), else ``httpx``; an API key is read from the environment
  variable ``api_key_env`` when set, never from the recipe.

`serve_openai` is the other side: a minimal OpenAI-compatible chat-completions server (stdlib
``http.server``, threads) over any ``generate``, bound to 127.0.0.1 by default -- to serve a
local judge to other tools, and what the tests talk to.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from posttrain.errors import BackendUnavailable, DataError

Generate = Callable[[list[list[dict]]], list[str]]


def local_generate(
    path: str, max_new_tokens: int = 128, max_batch_rows: int = 64, precision: str = "auto"
) -> Generate:
    """Greedy chat completions of the model folder ``path`` (``default``: the embedded model)."""
    from posttrain.models.load import load_model, load_tokenizer
    from posttrain.rollout.engine import get_engine
    from posttrain.rollout.sampling import SamplingParams
    from posttrain.train.loop import resolve_model_path

    folder = resolve_model_path(path)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, tokenizer=tokenizer)
    engine = get_engine(
        "hf", model=model, tokenizer=tokenizer, max_batch_rows=max_batch_rows, precision=precision
    )
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)

    def generate(chats: list[list[dict]]) -> list[str]:
        return [c.text for c in engine.generate(chats, params)] if chats else []

    return generate


def _client_module() -> Any:
    try:
        import httpx2 as client
    except ImportError:
        try:
            import httpx as client
        except ImportError:
            raise BackendUnavailable(
                "an OpenAI-compatible judge endpoint needs an HTTP client (httpx2 or httpx)",
                where="judge.endpoint",
                fix="pip install httpx2 (huggingface_hub installs it), or use a local judge: judge.model=PATH",
            ) from None
    return client


def openai_generate(
    base_url: str,
    model: str = "judge",
    max_tokens: int = 128,
    timeout_s: float = 30.0,
    retries: int = 2,
    concurrency: int = 4,
    api_key_env: str = "OPENAI_API_KEY",
) -> Generate:
    """Greedy chat completions from an OpenAI-compatible server (module docstring)."""
    http = _client_module()
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"

    def one(client: Any, chat: list[dict]) -> str:
        body = {"model": model, "messages": chat, "max_tokens": max_tokens, "temperature": 0}
        last = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                r = client.post(url, json=body, headers=headers)
            except http.TransportError as exc:  # connect / read timeouts, refused connections
                last = f"{type(exc).__name__}: {exc}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code >= 400:
                raise BackendUnavailable(f"the judge endpoint refused the request: HTTP {r.status_code}: "
                                         f"{r.text[:300]}", where=url, fix="check judge.endpoint_model and the API key")  # fmt: skip
            return _content(r, url)
        raise BackendUnavailable(
            f"no answer from the judge endpoint after {retries + 1} tries of {timeout_s:g} s: {last}",
            where=url,
            fix="start the server (or check judge.endpoint), raise judge.timeout_s / judge.retries",
        )

    def generate(chats: list[list[dict]]) -> list[str]:
        with http.Client(timeout=http.Timeout(timeout_s)) as client:
            if concurrency <= 1 or len(chats) <= 1:
                return [one(client, c) for c in chats]
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                return list(pool.map(lambda c: one(client, c), chats))

    return generate


def _content(response: Any, url: str) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise DataError(f"the judge endpoint's reply is not a chat completion ({exc!r}): {response.text[:200]}",
                        where=url, fix="point judge.endpoint at an OpenAI-compatible /v1 base URL") from None  # fmt: skip
    return content if isinstance(content, str) else ""


class _ChatHandler(BaseHTTPRequestHandler):
    generate: Generate
    model_name: str
    lock: threading.Lock

    def log_message(self, *args: Any) -> None:  # quiet: no access log on stderr
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": self.model_name, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            messages = body["messages"]
        except (ValueError, KeyError) as exc:
            self._send(400, {"error": {"message": f"bad request: {exc!r}"}})
            return
        with self.lock:  # one generation at a time: the model is not thread-safe
            text = self.generate([messages])[0]
        self._send(200, {
            "id": "chatcmpl-posttrain", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", self.model_name),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        })  # fmt: skip


def serve_openai(
    generate: Generate, host: str = "127.0.0.1", port: int = 0, model_name: str = "posttrain"
) -> tuple[ThreadingHTTPServer, str]:
    """Start an OpenAI-compatible server over ``generate`` in a daemon thread; returns the server
    (``server.shutdown()`` stops it) and its base URL (``http://HOST:PORT/v1``). Port 0: a free one."""
    handler = type("ChatHandler", (_ChatHandler,), {"generate": staticmethod(generate),
                                                    "model_name": model_name, "lock": threading.Lock()})  # fmt: skip
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/v1"
