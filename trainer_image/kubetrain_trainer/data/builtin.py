"""Built-in datasets, generated in code: no download, the same rows on every machine.

- `quickstart-corpus`: short stories from a small grammar over a fixed little world (each
  animal has one colour, home and food; each weekday one successor), so a tiny model's loss
  falls quickly. Planted noise shows what preprocessing removes: HTML markup and entities,
  control characters, compatibility characters, exact duplicates (some only equal after
  cleaning), near duplicates, symbol junk, repeated-line spam, markup-only and too-short
  documents.
- `quickstart-instructions`: unique prompt/response pairs of learnable tasks (facts of the
  same world, small sums, weekday order, word reversal); rows also carry `messages`.
- `quickstart-sentiment`: reviews with `prompt` and `label` (positive / negative), balanced;
  split `test` holds reviews that never appear in `train`.
- `quickstart-preferences`: short questions (sums, differences, next numbers, doubles) with
  a known preference, a house style: answers start with `answer: `. `response` is in the
  style for differences and next numbers only (a base that follows it on half the
  prompts), `chosen`/`rejected` the styled and the plain answer (dpo), `completion`
  either with `desirable` true when styled (kto), `answer` the styled reference (grpo).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

# The little world. Facts are fixed so that they can be learned.
ANIMALS = {
    "fox": ("red", "forest", "berries"),
    "owl": ("brown", "barn", "mice"),
    "frog": ("green", "pond", "flies"),
    "bear": ("black", "cave", "honey"),
    "rabbit": ("white", "meadow", "carrots"),
    "duck": ("yellow", "lake", "bread"),
    "wolf": ("grey", "mountains", "meat"),
    "cat": ("orange", "house", "fish"),
    "horse": ("chestnut", "stable", "hay"),
    "goat": ("spotted", "hills", "grass"),
    "seal": ("silver", "beach", "shrimp"),
    "crow": ("dark", "field", "seeds"),
}
PEOPLE = {
    "anna": ("baker", "she"),
    "ben": ("farmer", "he"),
    "clara": ("doctor", "she"),
    "david": ("teacher", "he"),
    "emma": ("painter", "she"),
    "felix": ("fisher", "he"),
    "grace": ("pilot", "she"),
    "hugo": ("builder", "he"),
    "iris": ("singer", "she"),
    "jack": ("sailor", "he"),
}
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
WEATHER = {
    "sunny": "played in the park",
    "rainy": "stayed at home and read books",
    "snowy": "built a snowman",
    "windy": "flew their kites",
    "foggy": "told stories by the fire",
}
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PLACES = ("village", "town", "harbour", "market", "garden", "school", "bridge", "river")
FEELINGS = ("happy", "tired", "curious", "calm", "hungry", "proud", "sleepy", "brave")
ITEMS = ("basket", "lantern", "map", "blanket", "drum", "kettle", "ladder", "rope")

_CORPUS_DOCS = 3000
# Rows per split; `test` never repeats a `train` row.
_INSTRUCTION_SPLITS = {"train": 2000, "test": 200}
_SENTIMENT_SPLITS = {"train": 1000, "test": 200}


def rows(name: str, split: str = "train") -> Iterator[dict[str, Any]]:
    """The rows of a built-in dataset: dicts, as a JSON Lines file would hold them."""
    generators: dict[str, Callable[[], dict[str, list[dict[str, Any]]]]] = {
        "quickstart-corpus": lambda: {"train": quickstart_corpus()},
        "quickstart-instructions": quickstart_instructions,
        "quickstart-sentiment": quickstart_sentiment,
        "quickstart-preferences": quickstart_preferences,
    }
    if name not in generators:
        raise ValueError(f"unknown built-in dataset {name!r} (known: {', '.join(generators)})")
    splits = generators[name]()
    if split not in splits:
        raise ValueError(f"built-in dataset {name!r} has splits {sorted(splits)}, not {split!r}")
    return iter(splits[split])


# --------------------------------------------------------------------------------------
# quickstart-corpus
# --------------------------------------------------------------------------------------


def _animal_sentence(rng: random.Random) -> str:
    animal = rng.choice(list(ANIMALS))
    color, home, food = ANIMALS[animal]
    person = rng.choice(list(PEOPLE))
    templates = (
        f"the {color} {animal} lives in the {home} and eats {food}.",
        f"on {rng.choice(DAYS)} {person} saw the {color} {animal} near the {home}.",
        f"the {animal} was {rng.choice(FEELINGS)}, so it went back to the {home} to find {food}.",
        f"{person} gave the {animal} some {food} by the {rng.choice(PLACES)}.",
        f"in the {home} the {animal} hid a {rng.choice(ITEMS)} under a {color} leaf.",
    )
    return rng.choice(templates)


def _person_sentence(rng: random.Random) -> str:
    person = rng.choice(list(PEOPLE))
    job, pronoun = PEOPLE[person]
    templates = (
        f"{person} is a {job} and works in the {rng.choice(PLACES)}.",
        f"every {rng.choice(DAYS)} {person} the {job} carries a {rng.choice(ITEMS)} to the "
        f"{rng.choice(PLACES)}.",
        f"{person} felt {rng.choice(FEELINGS)} because {pronoun} lost a {rng.choice(ITEMS)}.",
        f"the {job} {person} met {rng.choice(list(PEOPLE))} at the {rng.choice(PLACES)}.",
    )
    return rng.choice(templates)


def _day_sentence(rng: random.Random) -> str:
    i = rng.randrange(len(DAYS))
    weather = rng.choice(list(WEATHER))
    templates = (
        f"after {DAYS[i]} comes {DAYS[(i + 1) % 7]}.",
        f"on {DAYS[i]} it was {weather}, so the children {WEATHER[weather]}.",
        f"it was {weather} on {DAYS[i]} and {rng.choice(list(PEOPLE))} {WEATHER[weather]}.",
    )
    return rng.choice(templates)


def _count_sentence(rng: random.Random) -> str:
    start = rng.randrange(0, 6)
    run = ", ".join(NUMBERS[start : start + rng.randrange(3, 5)])
    return f"{rng.choice(list(PEOPLE))} counted the {rng.choice(list(ANIMALS))}s: {run}."


_SENTENCES: tuple[Callable[[random.Random], str], ...] = (
    _animal_sentence,
    _animal_sentence,
    _person_sentence,
    _day_sentence,
    _count_sentence,
)


def _story(rng: random.Random) -> str:
    return " ".join(rng.choice(_SENTENCES)(rng) for _ in range(rng.randrange(4, 9)))


def _html(text: str, rng: random.Random) -> str:
    title = rng.choice(ITEMS)
    body = text.replace(" and ", " &amp; ", 1)
    return (
        f'<html><head><style>p {{color: red}}</style></head><body><h1>{title}</h1>\n<p class="a">'
        f"{body}</p><br/><p>&copy; {rng.choice(PLACES)} news</p></body></html>"
    )


def _with_control_characters(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    i = rng.randrange(1, len(words))
    return " ".join([*words[:i], rng.choice(("\x00", "\x07", "\x1b[0m", "\x0c")), *words[i:]])


def _with_compatibility_characters(text: str) -> str:
    # NFKC maps fullwidth letters and ligatures back to plain ASCII.
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in text[:12])
    return fullwidth + text[12:].replace("fi", "\ufb01")


def _cleaned_duplicate(text: str, rng: random.Random) -> str:
    """A copy that differs only in what cleaning removes (spacing, markup)."""
    return rng.choice((f"  {text.replace(' ', '   ', 3)}\n\n", f"<p>{text}</p>"))


def _near_copy(text: str, rng: random.Random) -> str:
    """A near copy: one of the last words replaced (so that word 5-grams stay similar in
    these short stories), plus case and punctuation edits."""
    words = text.split(" ")
    words[-rng.randrange(1, 4)] = rng.choice(FEELINGS + ITEMS)
    return " ".join(words).replace(".", "!", 2).capitalize()


_JUNK = ("$$$", "###", "***", "%%%", "@@@", "+++", "===", "~~~", "|||", "^^^", "!!!")
_SPAM = ("buy now!", "best prices in town!", "click here!", "free shipping today!")
_SHORT = ("ok.", "hello there.", "yes", "see above.", "thanks!", "more soon.")


def _noise(rng: random.Random, story: Callable[[], str]) -> list[str]:
    junk = [
        " ".join(
            rng.choice(_JUNK) + (rng.choice(list(ANIMALS)) if k % 4 == 0 else "") for k in range(20)
        )
        for _ in range(60)
    ]
    spam = ["\n".join([rng.choice(_SPAM)] * 8 + [story()]) for _ in range(40)]
    markup_only = [f'<div><img src="p{i}.png"/><br/></div>' for i in range(20)]
    short = [rng.choice(_SHORT) for _ in range(60)]
    return junk + spam + markup_only + short


def quickstart_corpus(n_docs: int = _CORPUS_DOCS, seed: int = 11) -> list[dict[str, Any]]:
    """`n_docs` clean stories, some dressed in markup or odd characters, plus planted noise
    (about 12% of rows) in a fixed shuffled order."""
    rng = random.Random(seed)
    stories = [_story(rng) for _ in range(n_docs)]
    docs = list(stories)
    for i in range(0, n_docs, 20):  # 5%: wrapped in HTML
        docs[i] = _html(stories[i], rng)
    for i in range(7, n_docs, 50):  # 2%: control characters
        docs[i] = _with_control_characters(stories[i], rng)
    for i in range(13, n_docs, 100):  # 1%: fullwidth letters and ligatures
        docs[i] = _with_compatibility_characters(stories[i])
    plain = [i for i in range(n_docs) if docs[i] is stories[i]]
    exact = [  # ~3%
        stories[i] if k % 2 else _cleaned_duplicate(stories[i], rng)
        for k, i in enumerate(rng.sample(plain, n_docs // 30))
    ]
    near = [_near_copy(stories[i], rng) for i in rng.sample(plain, n_docs // 30)]  # ~3%
    noise = _noise(rng, lambda: _story(rng))
    # Copies go after all originals so that dedup keeps the original.
    tail = exact + near + noise
    rng.shuffle(tail)
    return [{"text": t} for t in docs + tail]


# --------------------------------------------------------------------------------------
# quickstart-instructions
# --------------------------------------------------------------------------------------


def _instruction(rng: random.Random) -> tuple[str, str]:
    task = rng.randrange(6)
    if task < 3:
        animal = rng.choice(list(ANIMALS))
        color, home, food = ANIMALS[animal]
        prompt, answer = (
            (f"what color is the {animal}?", f"the {animal} is {color}."),
            (f"where does the {animal} live?", f"the {animal} lives in the {home}."),
            (f"what does the {animal} eat?", f"the {animal} eats {food}."),
        )[task]
        return rng.choice(("", "please tell me: ", "question: ")) + prompt, answer
    if task == 3:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"what is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if task == 4:
        i = rng.randrange(len(DAYS))
        return f"which day comes after {DAYS[i]}?", f"after {DAYS[i]} comes {DAYS[(i + 1) % 7]}."
    words = rng.sample(list(ANIMALS) + list(ITEMS) + list(PLACES), rng.randrange(3, 6))
    return f"reverse the words: {' '.join(words)}", " ".join(reversed(words))


def quickstart_instructions(seed: int = 12) -> dict[str, list[dict[str, Any]]]:
    """Unique prompt/response pairs by split."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for split, size in _INSTRUCTION_SPLITS.items():
        out[split] = []
        while len(out[split]) < size:
            prompt, response = _instruction(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            out[split].append({"prompt": prompt, "response": response, "messages": messages})
    return out


# --------------------------------------------------------------------------------------
# quickstart-sentiment
# --------------------------------------------------------------------------------------

_SUBJECTS = (
    "the soup",
    "the service",
    "the room",
    "the film",
    "the book",
    "the coffee",
    "the staff",
    "the music",
    "the bed",
    "the bread",
    "the view",
    "the game",
)
_POSITIVE = (
    "wonderful",
    "delicious",
    "friendly",
    "lovely",
    "excellent",
    "great",
    "perfect",
    "charming",
)
_NEGATIVE = ("awful", "bland", "rude", "dirty", "terrible", "boring", "broken", "cold")
_POSITIVE_END = ("i would come back.", "highly recommended.", "we loved it.", "five stars.")
_NEGATIVE_END = ("never again.", "not recommended.", "we left early.", "one star.")


def _review(rng: random.Random, positive: bool) -> str:
    adjectives, ends = (_POSITIVE, _POSITIVE_END) if positive else (_NEGATIVE, _NEGATIVE_END)
    first, second = rng.sample(_SUBJECTS, 2)
    a, b = rng.sample(adjectives, 2)
    return f"{first} was {a} and {second} was {b}. {rng.choice(ends)}"


def quickstart_sentiment(seed: int = 13) -> dict[str, list[dict[str, Any]]]:
    """Balanced labelled reviews by split."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for split, size in _SENTIMENT_SPLITS.items():
        out[split] = []
        while len(out[split]) < size:
            positive = len(out[split]) % 2 == 0
            review = _review(rng, positive)
            if review in seen:
                continue
            seen.add(review)
            label = "positive" if positive else "negative"
            prompt = f"review: {review}\nsentiment:"
            out[split].append({"prompt": prompt, "label": label, "response": label})
    return out


# --------------------------------------------------------------------------------------
# quickstart-preferences
# --------------------------------------------------------------------------------------

STYLE = "answer: "
_PREFERENCE_SPLITS = {"train": 1500, "test": 200}


def _question(rng: random.Random) -> tuple[str, str, bool]:
    """(prompt, plain answer, whether the base answers it in the house style) of one of
    four kinds of question, each with hundreds of distinct prompts (so every split has all
    kinds). The base uses the style for two kinds only: it follows the preference on about
    half of the prompts, by kind, and must learn that it holds for all."""
    kind, n = rng.randrange(4), rng.randrange(100)
    prefix = rng.choice(("", "please tell me: ", "question: "))
    if kind == 0:
        m = rng.randrange(50)
        return f"{prefix}what is {n} plus {m}?", f"{n} plus {m} is {n + m}.", False
    if kind == 1:
        m = rng.randrange(n + 1)
        return f"{prefix}what is {n} minus {m}?", f"{n} minus {m} is {n - m}.", True
    if kind == 2:
        return f"{prefix}which number comes after {n}?", f"after {n} comes {n + 1}.", True
    return f"{prefix}what is double {n}?", f"double {n} is {2 * n}.", False


def quickstart_preferences(seed: int = 14) -> dict[str, list[dict[str, Any]]]:
    """Unique prompts with answers in the preferred style and without it, by split."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for split, size in _PREFERENCE_SPLITS.items():
        out[split] = []
        while len(out[split]) < size:
            prompt, plain, base_styled = _question(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            styled = STYLE + plain
            desirable = rng.random() < 0.5
            out[split].append(
                {
                    "prompt": prompt,
                    "response": styled if base_styled else plain,
                    "chosen": styled,
                    "rejected": plain,
                    "completion": styled if desirable else plain,
                    "desirable": desirable,
                    "answer": styled,
                }
            )
    return out


# --------------------------------------------------------------------------------------
# A corpus with known near duplicates, for dedup tests and benchmarks
# --------------------------------------------------------------------------------------


def near_duplicate_corpus(
    n_docs: int, n_copies: int, *, words: int = 150, changed: int = 2, seed: int = 0
) -> tuple[list[str], list[int]]:
    """`n_docs` distinct documents of `words` to `2 * words` random words, then `n_copies`
    near copies of random originals with `changed` words replaced (word 5-gram Jaccard
    similarity >= 0.87 to the original for the defaults). Returns the texts and, per text,
    the index of the document it copies (-1 for originals)."""
    rng = random.Random(seed)
    vocab = [
        f"{a}{b}"
        for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti", "va", "ze")
        for b in ("ba", "de", "fi", "go", "hu", "ja", "ke", "li", "mo", "ne", "po", "qu")
    ]
    vocab = [f"{w}{c}" for w in vocab for c in ("", "n", "s", "r", "l", "t", "m")]
    docs = [
        [rng.choice(vocab) for _ in range(rng.randrange(words, 2 * words))] for _ in range(n_docs)
    ]
    texts = [" ".join(d) for d in docs]
    source = [-1] * n_docs
    for _ in range(n_copies):
        original = rng.randrange(n_docs)
        copy = list(docs[original])
        for i in rng.sample(range(len(copy)), changed):
            copy[i] = rng.choice(vocab)
        texts.append(" ".join(copy))
        source.append(original)
    return texts, source
