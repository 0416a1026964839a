"""A simulated user population for ModelService tests: users call the router with the
official `openai` client (sticky by the `user` field), and rate what they got with a true
positive rate per variant, through `POST /v1/feedback`."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai

from kubetrain_api.routing import HEADER_MODEL_VERSION, HEADER_RESPONSE_ID, HEADER_VARIANT


@dataclass
class Population:
    base_url: str
    """The router's base URL, without /v1."""
    model: str
    """The service's model name."""
    rates: dict[str, float]
    """Per variant: the chance a user rates its answer positive."""
    seed: int = 0
    assigned: dict[str, str] = field(default_factory=dict)
    """user -> the variant that answered them."""
    versions: dict[str, str] = field(default_factory=dict)
    """variant -> the model version its responses carried."""
    ratings: Counter[tuple[str, int]] = field(default_factory=Counter)
    """(variant, rating) -> how many."""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.client = openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key="-", timeout=60, max_retries=0
        )

    def ask(self, user: str, prompt: str = "the cat", max_tokens: int = 2) -> tuple[str, str]:
        """One completion for `user`: (variant, response id). A user who already has a
        variant must get the same one (sticky assignment)."""
        raw = self.client.completions.with_raw_response.create(
            model=self.model, prompt=prompt, max_tokens=max_tokens, user=user, seed=0
        )
        completion = raw.parse()
        variant, response_id = raw.headers[HEADER_VARIANT], raw.headers[HEADER_RESPONSE_ID]
        assert completion.id == response_id, (completion.id, response_id)
        assert self.assigned.setdefault(user, variant) == variant, f"{user} switched variant"
        self.versions[variant] = raw.headers[HEADER_MODEL_VERSION]
        return variant, response_id

    def try_ask(self, user: str) -> int:
        """One completion for `user`; its HTTP status (a failed one raises in the client)."""
        try:
            self.ask(user)
        except openai.APIStatusError as exc:
            return exc.status_code
        return 200

    def rate(self, user: str, variant: str, response_id: str) -> None:
        rating = 1 if self.rng.random() < self.rates[variant] else -1
        answer = httpx.post(
            f"{self.base_url}/v1/feedback",
            json={"response_id": response_id, "rating": rating, "caller": user},
            timeout=30,
        )
        assert answer.status_code in (200, 201), answer.text  # 201: a new rating
        self.ratings[(variant, rating)] += 1

    def round(self, users: range | list[str], prefix: str = "user") -> None:
        """Every user asks once and rates the answer."""
        for i in users:
            user = f"{prefix}-{i}"
            variant, response_id = self.ask(user)
            self.rate(user, variant, response_id)


# A small synthetic task for the retraining loop: colours of animals the quickstart's
# instructions never mention. A user asks one question, rates the answer up when it
# names the right colour, and otherwise rates it down and sends the right answer.
TASK_FACTS = {
    "mouse": "grey",
    "goat": "white",
    "horse": "brown",
    "pig": "orange",
    "lion": "yellow",
    "seal": "black",
    "crow": "black",
    "parrot": "green",
}


def task_question(animal: str) -> str:
    return f"what color is the {animal}?"


def task_answer(animal: str) -> str:
    return f"the {animal} is {TASK_FACTS[animal]}."


@dataclass
class TaskUsers:
    """Users of the synthetic task on the chat API: right answers rated up, wrong ones
    rated down with a correction."""

    base_url: str
    model: str
    right: Counter[str] = field(default_factory=Counter)
    """variant -> answers rated up."""
    asked: Counter[str] = field(default_factory=Counter)
    """variant -> questions answered."""
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.client = openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key="-", timeout=60, max_retries=0
        )

    def ask_and_rate(self, user: str, animal: str) -> str:
        """One question and its rating; the variant that answered."""
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.model,
            messages=[{"role": "user", "content": task_question(animal)}],
            max_tokens=12,
            temperature=0,
            user=user,
        )
        text = raw.parse().choices[0].message.content or ""
        variant = raw.headers[HEADER_VARIANT]
        self.versions[variant] = raw.headers[HEADER_MODEL_VERSION]
        correct = TASK_FACTS[animal] in text.lower()
        body: dict[str, object] = {
            "response_id": raw.headers[HEADER_RESPONSE_ID],
            "rating": 1 if correct else -1,
            "caller": user,
        }
        if not correct:
            body["correction"] = task_answer(animal)
        answer = httpx.post(f"{self.base_url}/v1/feedback", json=body, timeout=30)
        assert answer.status_code in (200, 201), answer.text
        self.asked[variant] += 1
        self.right[variant] += correct
        return variant

    def round(self, users: range, prefix: str = "user") -> None:
        animals = list(TASK_FACTS)
        for i in users:
            self.ask_and_rate(f"{prefix}-{i}", animals[i % len(animals)])
