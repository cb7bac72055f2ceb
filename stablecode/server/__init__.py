"""The completion server: `create_app(model)` gives a FastAPI app speaking TGI's, OpenAI's and
Ollama's APIs over one continuously batched model; `stablecode serve` runs it with uvicorn."""

from stablecode.lazy import lazy_exports

# Imported on first use: `stablecode serve --help` imports stablecode.server.cli, hence this
# package, and must not pay for torch (the app and the engine import it).
_EXPORTS = {"Engine": "stablecode.server.engine", "Limits": "stablecode.server.engine",
            "create_app": "stablecode.server.app"}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
