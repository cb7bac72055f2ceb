"""`POST /overlap`: which parts of a document are in the training data (llm-vscode's attribution).

llm-vscode's attribution command posts {"document": text} (up to a few hundred characters around
the cursor) and highlights the returned {"spans": [[start, end], ...]}, offsets relative to that
text in JavaScript (UTF-16) units. We add "sources": who wrote each span, under which licence.
Mounted only when the server has an attribution index; the document goes through the same
validation stage as completion prompts, and errors are TGI-style {"error", "error_type"}.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from stablecode.attribution.storage import AttributionIndexError
from stablecode.server.engine import Engine
from stablecode.server.validation import ApiError

router = APIRouter(tags=["attribution"])


class OverlapRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients merge their own keys into requests

    document: str = Field(description="the text to look up")
    offset_unit: Literal["utf-16", "codepoint"] = Field(
        "utf-16", description="unit of the returned document offsets: UTF-16 code units (what editors use) or "
                              "Unicode code points (Python string indices); they differ only after characters "
                              "beyond U+FFFF")
    min_length: int | None = Field(None, ge=1, description="shortest match reported, in normalised characters "
                                                            "(default and minimum: the index's window)")
    max_sources: int = Field(5, ge=1, le=100, description="sources listed per span")


@router.post("/overlap", summary="Spans of a document found in the training data (needs an attribution index)")
async def overlap(request: Request, body: OverlapRequest) -> dict:
    engine: Engine = request.app.state.engine
    document = engine.validator.document(body.document)

    def lookup() -> dict:
        try:
            return engine.attributor.overlap(document, min_length=body.min_length, max_sources=body.max_sources,
                                             offset_unit=body.offset_unit)
        except AttributionIndexError as e:  # a corrupted index found while reading a source text
            raise ApiError(500, f"attribution failed: {e}", "attribution") from None

    return await run_in_threadpool(lookup)
