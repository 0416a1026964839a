"""The model server: an exported model behind an OpenAI-compatible HTTP API.

`create_app(model_dir, **limits)` builds the FastAPI app, `serve(model_dir, host, port,
**limits)` runs it under uvicorn (`python -m kubetrain_trainer.serve MODEL_DIR`). Modules:
`app` (routes, middleware, lifecycle), `schemas` (OpenAI request/response shapes), `engine`
(generation with transformers, concurrent requests batched), `batching` (the decode
batch's KV cache), `sampling` (logit adjustments), `limits` (admission queue, body size,
context budget), `feedback` (ratings to JSONL), `metrics` (`kubetrain_serve_*`), `errors`
(OpenAI error bodies).

Generation runs on Hugging Face transformers with continuous batching (requests join and
leave the decode batch between steps), right for CPUs and small models. On a GPU with vLLM
installed, a vLLM engine (paged attention, chunked prefill) can be plugged in behind the
same engine interface (`encode_prompt`, `encode_chat`, `stream`, `close`,
`context_length`); it is not implemented here.
"""

from typing import Any

__all__ = ["build_server", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # Lazy: the router (kubetrain_trainer.route) reuses `errors` and `schemas` without
    # importing torch and transformers with the app.
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
