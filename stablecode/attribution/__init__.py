"""Attribution: find which training files a text reproduces, offline and exactly.

- `fingerprint`: whitespace normalisation with a map back to original offsets; window fingerprints.
- `storage`: the index directory's layout, manifest and integrity checks.
- `build`: `build_index`, streaming a starcoderdata-layout corpus through worker processes.
- `lookup`: `Attributor(index).find(text)` → spans with their sources, confirmed against the source text.
- `server`: `add_overlap_routes(app, attributor)`, the `POST /overlap` endpoint.
- `commands`: the `stablecode index` and `stablecode attribute` subcommands.
"""

from stablecode.attribution.build import build_index
from stablecode.attribution.lookup import Attributor, Source, SourceMatch, Span, attribution_json
from stablecode.attribution.server import add_overlap_routes
from stablecode.attribution.storage import AttributionIndexError

__all__ = ["Attributor", "AttributionIndexError", "Source", "SourceMatch", "Span", "add_overlap_routes",
           "attribution_json", "build_index"]
