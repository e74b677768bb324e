"""builtin:*-paired: every calibration prompt as written, then the same request in another phrasing."""
from __future__ import annotations

from collections import Counter

from qrealign_gguf.prompts import PAIRED_REQUESTS, load_prompts


def test_paired_sources_give_each_request_twice_in_two_phrasings():
    for name, label in (("builtin:harmful-paired", 1), ("builtin:benign-paired", 0)):
        base = load_prompts(name.replace("-paired", ""), limit=PAIRED_REQUESTS, expect_label=label)
        ps = load_prompts(name, expect_label=label)
        assert len(ps) == 2 * PAIRED_REQUESTS == 2 * len(base)
        assert len(load_prompts(name, limit=10_000)) == len(ps)  # more than there are: all of them
        assert [p.text for p in ps[0::2]] == [p.text for p in base]  # the originals, in order
        assert all(a.text.strip() != b.text.strip() for a, b in zip(ps[0::2], ps[1::2]))  # never a duplicate
        styles = Counter(p.style for p in ps[1::2])
        assert "imperative" not in styles and {"question", "request", "role-play", "system-prompt"} <= set(styles)
        assert all(p.label == label for p in ps)
        # a limit takes whole pairs from the front (odd: the last original alone) and is deterministic
        assert [p.text for p in load_prompts(name, limit=7)] == [p.text for p in ps[:7]]
        assert [p.text for p in load_prompts(name, expect_label=label)] == [p.text for p in ps]
