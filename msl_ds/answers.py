"""Reading a short answer out of a model's reply: normalisation and whole-word matching.

An instruct model answers "What is the capital of France?" with "The capital of France is
Paris." as often as with "Paris". Scoring (``msl_ds.evaluation``), the probe and the
augmentation's stale-value checks all ask the same question, *does this reply state that
answer?*, and answer it here, one way: the answer's words must occur in the reply as whole
words, in order and adjacent, after both are normalised (case, accents, punctuation, thousands
separators). So a gold "1" is not found in "10", "Rome" not in "Romeo", "1,000" is found in
"1000 people", and "Kalin Marr" is found in "The CEO is Kalin Marr." but not in "Kalin".

``eval.match: substring`` keeps the authors' rule (the lower-cased gold is a substring of the
lower-cased reply) for comparisons with their numbers.
"""

from __future__ import annotations

import re
import unicodedata

MATCH_RULES = ("word", "substring")
_THOUSANDS = re.compile(r"(?<=\d)[,\u2009\u202f](?=\d{3}(?!\d))")


def normalize(text: str) -> str:
    """Lower-cased words of ``text``, accents stripped, thousands separators dropped, space-joined.

    "Zürich," -> "zurich"; "1,000,000 km." -> "1000000 km"; "U.S.A" -> "u s a".
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    while True:  # "1,000,000": each pass drops the separators it can see
        joined = _THOUSANDS.sub("", text)
        if joined == text:
            break
        text = joined
    return " ".join(re.findall(r"\w+", text.lower()))


def states(reply: str, answer: str, rule: str = "word") -> bool:
    """Whether ``reply`` states ``answer``: its normalised words as a whole-word run of the reply's
    (``rule="word"``), or the authors' lower-cased substring test (``rule="substring"``).
    An empty answer is stated by nothing."""
    if rule == "substring":
        gold = answer.strip().lower()
        return bool(gold) and gold in reply.lower()
    if rule != "word":
        raise ValueError(f"unknown match rule {rule!r} (one of {', '.join(MATCH_RULES)})")
    a = normalize(answer)
    return bool(a) and f" {a} " in f" {normalize(reply)} "


def first_clause(reply: str) -> str:
    """The reply up to its first sentence end or line break: the short answer an instruct model
    gives before it explains ("Paris. It is also..." -> "Paris")."""
    head = re.split(r"(?<=[^\s\d.][.!?])\s|\n", reply.strip(), maxsplit=1)[0]
    return head.rstrip(" .!?")


# words an instruct model wraps a short answer in ("It is called the ...", "... located in ...")
FILLERS = frozenset(
    "a an the is are was it its it's this that called named known as located situated in on of to and "
    "answer answers officially official currently s".split()
)
COPULAS = frozenset("is are was".split())


def extract_value(reply: str, question: str) -> str:
    """The value a reply states, without the words it repeats from the question.

    The first clause of the reply (up to a sentence end, a line break, a comma, a semicolon or a
    parenthesis), with the leading and trailing words that occur in ``question`` or are
    :data:`FILLERS` stripped: "The capital of France is Paris." -> "Paris"; "Kenia is the capital
    of Kenya." -> "Kenia"; "The currency of Japan is the Japanese Yen (JPY)." -> "Japanese Yen";
    "Ethiopia's capital city is Addis Ababa." -> "Addis Ababa" (what follows the last "is").
    An empty string when nothing is left (the reply only restates the question).
    """
    head = re.split(r"[,;(\[]", first_clause(reply), maxsplit=1)[0]
    tokens = re.findall(r"[\w'’-]+", head)
    asked = set(normalize(question).split())

    def filler(tok: str) -> bool:
        return all(w in asked or w in FILLERS for w in normalize(tok).split())

    while tokens and filler(tokens[0]):
        tokens.pop(0)
    while tokens and filler(tokens[-1]):
        tokens.pop()
    cut = [i for i, t in enumerate(tokens) if t.lower() in COPULAS]
    if cut and cut[-1] + 1 < len(tokens):  # "city is Addis Ababa": what follows the last "is"
        tokens = tokens[cut[-1] + 1 :]
    return " ".join(tokens)
