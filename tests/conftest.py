"""Shared fixtures: one real engine (the packaged MiniLM encoder, on CPU) for the whole session."""

from __future__ import annotations

import pytest

from semtoken_rag import SemToken, SemTokenConfig


@pytest.fixture(scope="session")
def engine() -> SemToken:
    return SemToken(SemTokenConfig(device="cpu"))


NOBEL = [
    ("List of Nobel laureates in Physics\nThe first Nobel Prize in Physics was awarded in 1901 to Wilhelm "
     "Conrad Röntgen, of Germany, who received 150,782 SEK. John Bardeen is the only laureate to win the "
     "prize twice, in 1956 and 1972. Maria Skłodowska-Curie also won two Nobel Prizes, for physics in 1903 "
     "and chemistry in 1911."),
    ("Nobel Prize\nThe Nobel Prizes are five separate prizes that, according to Alfred Nobel's will of 1895, "
     "are awarded to those who, during the preceding year, have conferred the greatest benefit to humankind. "
     "The prizes are awarded in Stockholm, Sweden, except for the peace prize, which is awarded in Oslo."),
    ("Banana\nA banana is an elongated, edible fruit produced by several kinds of large herbaceous flowering "
     "plants in the genus Musa. In some countries, bananas used for cooking may be called plantains. The "
     "fruit is variable in size, color, and firmness, but is usually elongated and curved."),
    ("Physics\nPhysics is the natural science that studies matter, its fundamental constituents, its motion "
     "and behavior through space and time, and the related entities of energy and force. Physics is one of "
     "the most fundamental scientific disciplines."),
]


@pytest.fixture()
def nobel() -> list[str]:
    return list(NOBEL)
