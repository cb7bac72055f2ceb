"""The completion server: `create_app(model)` gives a FastAPI app speaking TGI's, OpenAI's and
Ollama's APIs over one continuously batched model; `stablecode serve` runs it with uvicorn."""

from importlib import import_module

# Imported on first use: `stablecode serve --help` imports stablecode.server.cli, hence this
# package, and must not pay for torch (the app and the engine import it).
_EXPORTS = {"Engine": "stablecode.server.engine", "Limits": "stablecode.server.engine",
            "create_app": "stablecode.server.app"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stablecode.server' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
