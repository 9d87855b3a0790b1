from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

# The suite runs on two workers (pytest-xdist, --dist loadgroup). Files marked xdist_group share a
# worker: "netns" for the network-namespace labs (one at a time: each starts many processes), and a
# file's own group where its module-scoped fixture is a whole swarm run (computed once, not per worker).


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="also run the scenarios marked long (about 25 more minutes on 2 cores)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """CI runs the suite in under 15 minutes on 2 cores: every mechanism keeps an end-to-end test there,
    and the multi-minute variants (churn, joiners, more moments to interrupt) run with --long."""
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="a long scenario: scripts/check.sh --long runs it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


_WORDS = [
    "the",
    "a",
    "swarm",
    "node",
    "stage",
    "layer",
    "trains",
    "sends",
    "gradient",
    "basis",
    "token",
    "peer",
    "model",
    "loss",
    "step",
    "runs",
    "fast",
    "slow",
    "link",
    "over",
    "under",
    "with",
    "without",
    "every",
    "one",
    "two",
    "many",
    "compressed",
    "dense",
    "subspace",
    "learns",
    "and",
    "or",
    "but",
]


def synthetic_text(seed: int, n_words: int) -> str:
    """A deterministic toy language (a seeded Markov chain over words): same text on every Python 3."""
    rng = random.Random(seed)
    nxt = {w: rng.sample(_WORDS, 4) for w in _WORDS}
    w, out = _WORDS[0], []
    for i in range(n_words):
        w = rng.choice(nxt[w])
        out.append(w + (".\n" if i % 11 == 10 else " "))
    return "".join(out)


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of 40 small text files, so the by-file train/held-out split has both sides."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (d / f"doc{i:02d}.txt").write_text(synthetic_text(i, 3000))
    return d
