"""Attribution: find which training files a text reproduces, offline and exactly.

- `fingerprint`: whitespace normalisation with a map back to original offsets; window fingerprints.
- `storage`: the index directory's layout, manifest and integrity checks.
- `build`: `build_index`, streaming a starcoderdata-layout corpus through worker processes.
- `lookup`: `Attributor(index).find(text)` → spans with their sources, confirmed against the source text.
- `commands`: the `stablecode index` and `stablecode attribute` subcommands.

The `POST /overlap` route is part of the completion server (stablecode.server.overlap).
"""

from stablecode.attribution.build import build_index
from stablecode.attribution.lookup import Attributor, Source, SourceMatch, Span, attribution_json
from stablecode.attribution.storage import AttributionIndexError

__all__ = ["Attributor", "AttributionIndexError", "Source", "SourceMatch", "Span", "attribution_json",
           "build_index"]
