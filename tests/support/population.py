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
