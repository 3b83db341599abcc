"""What the generated prompts are made of: the word list keys and extraction tasks draw
from, the needles' values (numbers, words, UUID-like strings), and RULER's noise sentences.

RULER draws words from ``wonderwords``; a fixed list here keeps the suite free of
downloads and extra dependencies, and the same across installations.
"""

from __future__ import annotations

import random
import string

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again.")
"""RULER's noise haystack sentence (also passkey's filler)."""

WORDS = tuple("""
apple badge basin beach berry blade bloom board boat bonus bottle brain brick bridge brush
bucket button cabin cable camel candle canoe canvas carpet castle cattle cellar chain chalk
cherry circle cliff clock cloud coast collar copper coral cotton cradle crane crystal
curtain dagger desert diamond dinner dragon drawer eagle engine fabric falcon feather fence
fiddle finger flame flute forest fossil fountain garden garlic ginger glove granite harbor
helmet hammer honey island jacket jungle kettle ladder lantern lemon lizard magnet maple
marble meadow mirror monkey needle oyster paddle palace parrot pebble pepper pillow planet
pocket potato puzzle rabbit radish ribbon river rocket saddle salmon shadow shelter silver
spider spoon statue stream sugar summit tablet temple thunder ticket tiger timber tomato
tower trumpet tunnel turtle velvet violin wagon walnut window winter wizard
""".split())

ADJECTIVES = tuple("""
amber ancient bitter brave bright calm clever cosmic crimson curious dusty eager fancy
fierce gentle giant golden hollow humble icy jolly lazy loud lucky mellow misty noble
orange patient polite proud quiet rapid rustic sandy silent sleepy smooth solar steady
stormy sunny swift tidy tiny violet wicked wild wooden
""".split())


def number(rng: random.Random) -> str:
    """A 7-digit number (RULER's numeric values)."""
    return str(rng.randrange(1_000_000, 10_000_000))


def word(rng: random.Random) -> str:
    """An adjective-noun pair, as RULER's word keys and values."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(WORDS)}"


def uuid(rng: random.Random) -> str:
    """A UUID-shaped string of random hex digits (8-4-4-4-12)."""
    hexes = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return "-".join(hexes[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))


def variable(rng: random.Random) -> str:
    """A variable name of five capital letters (RULER's variable tracking)."""
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


VALUES = {"number": number, "word": word, "uuid": uuid}


def distinct(make, rng: random.Random, n: int) -> list[str]:
    """``n`` different draws of ``make``."""
    out: list[str] = []
    while len(out) < n:
        value = make(rng)
        if value not in out:
            out.append(value)
    return out
