"""Proposers: from the study's history, the next architecture to train.

One interface, `propose(history, rng) -> code`, whose answer is always a network not yet in the
history (canonical keys compared), so no worker trains a network twice:
    random     uniform over the codes of untried networks
    evolution  regularized (aging) evolution, Real et al., AAAI 2019
    llm        an OpenAI-compatible chat-completions endpoint, prompted with the space and the
               results so far (as GenNAS and GENIUS did); bad answers are retried, then evolution
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from chexnet_hvd.cli import InputError
from chexnet_hvd.nas import space

NUM_NETWORKS = len({space.canonical(c) for c in space.all_codes()})  # 3,969
LLM_ENV = {"base_url": "CHEXNET_LLM_BASE_URL", "model": "CHEXNET_LLM_MODEL",
           "api_key": "CHEXNET_LLM_API_KEY"}


@dataclass(frozen=True)
class Tried:
    """One architecture of the history; `value` (mean validation AUROC) is None while it trains
    or when it failed. Completed ones come in the order they completed."""
    code: str
    value: float | None = None
    params: int | None = None


class SpaceExhausted(Exception):
    """Every network of the space is in the history."""


class Proposer(Protocol):
    name: str

    def propose(self, history: Sequence[Tried], rng: random.Random) -> str: ...


def tried_keys(history: Sequence[Tried]) -> set[str]:
    return {space.canonical(t.code) for t in history}


def random_untried(history: Sequence[Tried], rng: random.Random) -> str:
    """A uniformly drawn code whose network is not in the history."""
    taken = tried_keys(history)
    if len(taken) >= NUM_NETWORKS:
        raise SpaceExhausted("all 3,969 networks of the space have been tried")
    if len(taken) < NUM_NETWORKS // 2:  # rejection is cheap while most networks are new
        while True:
            code = "".join(rng.choice("012") for _ in range(space.NUM_LAYERS))
            if space.canonical(code) not in taken:
                return code
    return rng.choice([c for c in space.all_codes() if space.canonical(c) not in taken])


class RandomProposer:
    name = "random"

    def propose(self, history: Sequence[Tried], rng: random.Random) -> str:
        return random_untried(history, rng)


@dataclass
class EvolutionProposer:
    """Regularized evolution (Real et al. 2019): until `population` architectures have completed,
    random ones; then draw `sample` of the newest `population` completed (the oldest age out),
    mutate the best of them in one layer, and propose the first mutation not yet tried.
    The defaults took the fewest trials to a top-1% network of NAS-Bench-Macro over oracle
    seeds 1000-1099 (22-33 for populations of 5-20; the benchmark reports seeds 0-49)."""
    population: int = 10
    sample: int = 5
    name: str = "evolution"

    def propose(self, history: Sequence[Tried], rng: random.Random) -> str:
        done = [t for t in history if t.value is not None]
        if len(done) < self.population:
            return random_untried(history, rng)
        alive = done[-self.population:]
        parent = max(rng.sample(alive, min(self.sample, len(alive))), key=lambda t: t.value)
        taken = tried_keys(history)
        children = [parent.code[:i] + op + parent.code[i + 1:]
                    for i in range(space.NUM_LAYERS) for op in "012" if op != parent.code[i]]
        rng.shuffle(children)
        for child in children:
            if space.canonical(child) not in taken:
                return child
        return random_untried(history, rng)  # every neighbour tried: jump elsewhere


# ---------------------------------------------------------------- LLM proposer ---------------
ANSWER_RE = re.compile(r"(?<!\d)(?<!\d\.)\d{8}(?!\.?\d)")  # 8 digits, not part of a longer number


def check_answer(answer: str, taken: set[str]) -> tuple[str | None, str]:
    """The code in an answer (the last standalone 8-digit number) and a verdict: "ok",
    "malformed" (no 8-digit number), "out of space" (a digit other than 0, 1, 2) or "duplicate"
    (its network was tried already)."""
    found = ANSWER_RE.findall(answer)
    if not found:
        return None, "malformed"
    code = found[-1]
    if not space.is_code(code):
        return None, "out of space"
    if space.canonical(code) in taken:
        return None, "duplicate"
    return code, "ok"


FEEDBACK = {
    "malformed": "Your reply did not end with an 8-digit architecture code.",
    "out of space": "Every digit must be 0, 1 or 2.",
    "duplicate": "That network was already trained (identities on stride-1 layers move to the "
                 "end of their stage, so it is the same network as one in the list).",
}


def prompt(history: Sequence[Tried], task: str, max_history: int) -> list[dict]:
    """The chat messages: the space, the task, and the results so far, best first."""
    done = sorted((t for t in history if t.value is not None), key=lambda t: -t.value)
    lines = [f"{t.code}: AUROC {t.value:.4f}, {t.params or 0:,} parameters" for t in done[:max_history]]
    lines += [f"{t.code}: being trained or failed" for t in history if t.value is None]
    results = "\n".join(lines) if lines else "(none yet)"
    return [
        {"role": "system", "content": "You are an expert in neural architecture search for "
                                      "chest X-ray classification. " + space.describe()},
        {"role": "user", "content": f"Task: {task}. The objective is the mean validation AUROC."
                                    f"\nArchitectures trained so far ({len(done)} completed):\n"
                                    f"{results}\n\nPropose one new architecture likely to score "
                                    "higher than all of these. End your reply with its 8-digit "
                                    "code alone on the last line."},
    ]


@dataclass
class LLMProposer:
    """Asks the endpoint; a malformed, out-of-space or duplicate answer (or a failed request) is
    told what was wrong and asked again, up to `retries` times, then `fallback` proposes. Every
    prompt and answer is appended to `log_path` (JSON lines)."""
    base_url: str
    model: str
    log_path: Path
    api_key: str = ""
    task: str = "multi-label chest X-ray classification"
    retries: int = 3
    timeout: float = 120.0
    max_history: int = 200
    fallback: Proposer = field(default_factory=EvolutionProposer)
    name: str = "llm"
    last_source: str = "llm"  # who made the latest proposal: the LLM or the fallback

    @classmethod
    def from_env(cls, **kwargs) -> LLMProposer:
        """Endpoint, model and key from CHEXNET_LLM_BASE_URL, _MODEL and _API_KEY."""
        env = {key: os.environ.get(var, "") for key, var in LLM_ENV.items()}
        for key in ("base_url", "model"):
            if not env[key]:
                raise InputError(LLM_ENV[key], "not set (--proposer llm needs an OpenAI-compatible "
                                 "endpoint, e.g. http://host:8000/v1, and a model name)")
        return cls(**env, **kwargs)

    def chat(self, messages: list[dict]) -> str:
        """One chat-completions request; the reply's text."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.7}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", body, headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.load(response)["choices"][0]["message"]["content"]

    def log(self, **record) -> None:
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def propose(self, history: Sequence[Tried], rng: random.Random) -> str:
        taken = tried_keys(history)
        messages = prompt(history, self.task, self.max_history)
        for attempt in range(1, self.retries + 1):
            try:
                answer = self.chat(messages)
            except (OSError, urllib.error.URLError, ValueError, KeyError, IndexError, TypeError) as err:
                self.log(attempt=attempt, messages=messages, answer=None, verdict=f"request failed: {err}")
                continue
            code, verdict = check_answer(answer, taken)
            self.log(attempt=attempt, messages=messages, answer=answer, verdict=verdict, code=code)
            if code:
                self.last_source = self.name
                return code
            messages = messages + [{"role": "assistant", "content": answer},
                                   {"role": "user", "content": FEEDBACK[verdict] + " Try again."}]
        code = self.fallback.propose(history, rng)
        self.last_source = f"{self.fallback.name} (llm fallback)"
        self.log(attempt=None, verdict=f"fallback to {self.fallback.name}", code=code)
        return code


def make_proposer(name: str, population: int = 10, sample: int = 5, **llm) -> Proposer:
    """The proposer chosen by --proposer; `llm` (log_path, retries, ...) is for the LLM only,
    whose endpoint comes from the environment (LLM_ENV)."""
    evolution = EvolutionProposer(population, sample)
    if name == "evolution":
        return evolution
    if name == "random":
        return RandomProposer()
    if name == "llm":
        return LLMProposer.from_env(fallback=evolution, **llm)
    raise InputError("--proposer", f"unknown proposer {name!r} (random, evolution or llm)")


# ---------------------------------------------------------------- oracle runs ----------------
def trials_to_target(proposer: Proposer, oracle: dict[str, float], target: float, seed: int,
                     budget: int = NUM_NETWORKS) -> int:
    """Architectures a proposer trains, one at a time, until one scores >= target, with a table
    of known scores (NAS-Bench-Macro's mean accuracies) standing in for training."""
    rng = random.Random(seed)
    history: list[Tried] = []
    for n in range(1, budget + 1):
        code = proposer.propose(history, rng)
        history.append(Tried(code, oracle[code]))
        if oracle[code] >= target:
            return n
    return budget + 1


def top_threshold(oracle: dict[str, float], fraction: float = 0.01) -> float:
    """The score of the last architecture in the top `fraction` (top 1% of NAS-Bench-Macro: the
    66th best code, 92.81%; 69 codes reach it, ties included)."""
    ranked = sorted(oracle.values(), reverse=True)
    return ranked[max(1, round(fraction * len(ranked))) - 1]
