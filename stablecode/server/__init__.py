"""The completion server: `create_app(model)` gives a FastAPI app speaking TGI's, OpenAI's and
Ollama's APIs over one continuously batched model; `stablecode serve` runs it with uvicorn."""

from stablecode.server.app import create_app
from stablecode.server.engine import Engine, Limits

__all__ = ["Engine", "Limits", "create_app"]
