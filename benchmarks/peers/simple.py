"""Peers we implement here: no compression, truncation, length-only, MiniLM passage rerank and a
plain global MiniLM sentence selector (the bar the engine must beat)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import encoder
from ..metrics import TokenCounter
from ..text import fit_greedy, join_spans, sentence_spans, truncate_tokens
from .base import Method, Output


class NoCompression(Method):
    name, label = "none", "no compression"
    description = "All passages, unchanged (ratio 1.0, always over budget by design)."

    def compress(self, chunks, query, rate, budget):
        return Output(list(chunks))


class Truncation(Method):
    name, label = "truncation", "truncation"
    description = ("Prefix of the concatenated context up to the budget: whole passages in order, the "
                   "last one cut at a token boundary.")

    def __init__(self, counter: TokenCounter):
        self.counter = counter

    def compress(self, chunks, query, rate, budget):
        out, left = [], budget
        for c in chunks:
            n = self.counter(c)
            if n <= left:
                out.append(c)
                left -= n
            else:
                out.append(truncate_tokens(c, left, self.counter) if left > 0 else "")
                left = 0
        return Output(out)


class LengthOnly(Method):
    name, label = "length_only", "length-only (warning)"
    description = ("Shortest passages first while they fit, original order. Not a method: a warning, since "
                   "the NQ gold passage is shorter than the 100-word distractors.")

    def __init__(self, counter: TokenCounter):
        self.counter = counter

    def compress(self, chunks, query, rate, budget):
        costs = [self.counter(c) for c in chunks]
        keep = fit_greedy([(-costs[i], i) for i in range(len(chunks))], lambda i: costs[i], budget)
        keep = set(keep)
        return Output([c if i in keep else "" for i, c in enumerate(chunks)])


class PassageRerank(Method):
    name, label = "rerank", "passage rerank (MiniLM)"
    description = ("Whole passages ranked by MiniLM cosine to the query; top passages kept in original order "
                   "while they fit; the first passage that does not fit is added truncated at a word "
                   "boundary to fill the rest of the budget.")

    def __init__(self, counter: TokenCounter, fill_partial: bool = True):
        self.counter = counter
        self.fill_partial = fill_partial

    def setup(self):
        encoder.minilm()

    def prepare(self, chunks, query):
        emb = encoder.embed([query, *chunks])
        return emb[1:] @ emb[0], encoder.encoder_tokens([query, *chunks])

    def select(self, state, chunks, query, rate, budget):
        sims, enc_tok = state
        order = np.argsort(-sims, kind="stable")
        out = [""] * len(chunks)
        left = budget
        for i in order:
            n = self.counter(chunks[i])
            if n <= left:
                out[i] = chunks[i]
                left -= n
            else:
                if self.fill_partial and left > 0:
                    out[i] = truncate_tokens(chunks[i], left, self.counter, word_boundary=True)
                break
        return Output(out, encoder_tokens=enc_tok)

    def config(self):
        return {**super().config(), "fill_partial": self.fill_partial}


class SentenceSelector(Method):
    name, label = "sentence_select", "global sentence selector (MiniLM)"
    description = ("Every sentence (the title line counts as one) scored by 0.5*cos(query, sentence) + "
                   "0.5*cos(query, its passage), MiniLM; greedy in score order under the budget, skipping "
                   "sentences that no longer fit; output in document order.")

    def __init__(self, counter: TokenCounter, weight: float = 0.5):
        self.counter = counter
        self.weight = weight

    def setup(self):
        encoder.minilm()

    def prepare(self, chunks: Sequence[str], query: str):
        spans = [sentence_spans(c) for c in chunks]
        sents = [(ci, s, e) for ci, sp in enumerate(spans) for s, e in sp]
        texts = [chunks[ci][s:e] for ci, s, e in sents]
        emb = encoder.embed([query, *chunks, *texts])
        q, p, s_emb = emb[0], emb[1:1 + len(chunks)], emb[1 + len(chunks):]
        p_sim = p @ q
        s_sim = s_emb @ q
        scores = [(self.weight * s_sim[k] + (1 - self.weight) * p_sim[ci], k) for k, (ci, _, _) in enumerate(sents)]
        # a sentence joined to its neighbours costs at most its own count + 1 (the separator can
        # change tokenisation by one); the exact total is checked in select().
        cost = [self.counter(t) + 1 for t in texts]
        return sents, scores, cost, encoder.encoder_tokens([query, *chunks, *texts])

    def select(self, state, chunks: Sequence[str], query: str, rate: float, budget: int) -> Output:
        sents, scores, cost, enc_tok = state
        chosen = fit_greedy(scores, lambda k: cost[k], budget)
        rank = {k: r for r, k in enumerate(chosen)}
        while True:
            out = []
            for ci, c in enumerate(chunks):
                kept = [(s, e) for k, (cj, s, e) in enumerate(sents) if cj == ci and k in rank]
                out.append(join_spans(c, kept))
            if self.counter.context_tokens(out) <= budget or not rank:
                break
            del rank[max(rank, key=rank.get)]      # drop the lowest-scored kept sentence
        return Output(out, encoder_tokens=enc_tok)

    def config(self):
        return {**super().config(), "sentence_weight": self.weight}
