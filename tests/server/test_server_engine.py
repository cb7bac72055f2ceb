"""The server and the library run one engine: the same greedy completions from Completer.complete,
Completer.complete_batch and HTTP (one at a time and concurrent), with speculation and prefix reuse
on or off; the server reuses prefixes across requests and verifies guesses for every row."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving import PROMPTS, running, slowed
from stablecode.api import Completer
from stablecode.server import create_app

BASE = ("import os\n\ndef add(a, b):\n    return a + b\n\nclass Foo:\n    def __init__(self):\n"
        "        self.x = 1\n\nfor i in range(10):\n    print(i)\n")
# Keystrokes of an editing session: typing at the end, then an edit in the middle.
SESSION = [BASE + "de", BASE + "def", BASE + "def f", BASE.replace("class Foo", "class Fo") + "def f"]
NEW_TOKENS = 24

MODES = {"plain": dict(speculative=0, prefix_cache_mb=0), "speculative": dict(speculative=True, prefix_cache_mb=0),
         "reuse": dict(speculative=0), "both": dict(speculative=True)}


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, one_torch_thread):
    """Greedy completions by the library with speculation and prefix reuse off."""
    completer = Completer(tiny_checkpoint, speculative=False, prefix_cache_mb=0)
    prompts = PROMPTS + SESSION
    return {p: completer.complete(p, max_new_tokens=NEW_TOKENS).text for p in prompts}


def generate(url, prompt):
    body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS}}
    response = httpx.post(url + "/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


@pytest.mark.parametrize("mode", MODES)
def test_library_and_server_agree(tiny_checkpoint, expected, mode):
    completer = Completer(tiny_checkpoint, **MODES[mode])
    prompts = PROMPTS + SESSION
    assert [completer.complete(p, max_new_tokens=NEW_TOKENS).text for p in prompts] == [expected[p] for p in prompts]
    batch = completer.complete_batch(prompts, max_new_tokens=NEW_TOKENS)
    assert [c.text for c in batch] == [expected[p] for p in prompts]
    with running(create_app(tiny_checkpoint, max_batch=4, max_queue=16, **MODES[mode])) as s:
        assert [generate(s.url, p) for p in prompts] == [expected[p] for p in prompts]
        with slowed(s.engine, 0.002), ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda p: generate(s.url, p), prompts))
        assert together == [expected[p] for p in prompts]
        stats = s.scheduler.stats()
    assert stats["max_rows_in_step"] > 1
    if MODES[mode].get("prefix_cache_mb", 1):
        assert stats["reused_tokens"] > 0
    else:
        assert stats["reused_tokens"] == 0
    if MODES[mode].get("speculative", True):
        assert stats["accepted_draft_tokens"] > 0
    else:
        assert stats["drafted_tokens"] == 0


def test_an_editing_session_reuses_its_earlier_keystrokes(server, expected):
    tokens = server.engine.tokenizer.encode
    before = server.scheduler.stats()["reused_tokens"]
    generate(server.url, SESSION[0])
    reused = []
    for previous, prompt in zip(SESSION, SESSION[1:]):
        start = server.scheduler.stats()["reused_tokens"]
        assert generate(server.url, prompt) == expected[prompt]
        reused.append((server.scheduler.stats()["reused_tokens"] - start, prompt, previous))
    for count, prompt, previous in reused[:2]:  # typing at the end: all but the last token or two
        assert count >= len(tokens(previous)) - 2
    count, prompt, previous = reused[2]  # the edit in the middle: everything before it
    edit = next(i for i, (a, b) in enumerate(zip(prompt, previous)) if a != b)
    assert count >= len(tokens(prompt[:edit])) - 1
    assert server.scheduler.stats()["reused_tokens"] > before
