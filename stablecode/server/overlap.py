"""`POST /overlap` for the completion server: which parts of a document are in the training data.

llm-vscode's attribution command posts {"document": text} (up to a few hundred characters around
the cursor) and highlights the returned {"spans": [[start, end], ...]}, offsets relative to that
text in JavaScript (UTF-16) units. We add "sources": who wrote each span, under which licence.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stablecode.attribution.lookup import Attributor
from stablecode.attribution.storage import AttributionIndexError

MAX_DOCUMENT_CHARS = 1_000_000


class OverlapRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients merge their own keys into requests

    document: str = Field(max_length=MAX_DOCUMENT_CHARS, description="the text to look up")
    offset_unit: Literal["utf-16", "codepoint"] = Field(
        "utf-16", description="unit of the returned document offsets: UTF-16 code units (what editors use) or "
                              "Unicode code points (Python string indices); they differ only after characters "
                              "beyond U+FFFF")
    min_length: int | None = Field(None, ge=1, description="shortest match reported, in normalised characters "
                                                            "(default and minimum: the index's window)")
    max_sources: int = Field(5, ge=1, le=100, description="sources listed per span")


def add_overlap_routes(app, attributor: Attributor) -> None:
    """Add `POST /overlap` to a FastAPI app, answering from `attributor`."""
    from fastapi import HTTPException

    @app.post("/overlap", tags=["attribution"])
    def overlap(request: OverlapRequest) -> dict:
        # A plain (not async) endpoint: FastAPI runs it in its thread pool, off the event loop.
        try:
            return attributor.overlap(request.document, min_length=request.min_length,
                                      max_sources=request.max_sources, offset_unit=request.offset_unit)
        except AttributionIndexError as e:
            raise HTTPException(status_code=500, detail=str(e)) from None
