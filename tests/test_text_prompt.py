"""The text prompt search: screening, the policy gradient, seeding and the query budget."""

import numpy as np
import pytest

from skcarrot.backends import OpenCLIPTextBackend, QueryCounter
from skcarrot.backends._base import log_probabilities
from skcarrot.datasets import DIGIT_WORDS
from skcarrot.images import to_pil_images
from skcarrot.search import TextPromptSearch, tokenizer_words

from helpers import digits_split, same_global_state, search_alone


class SoftmaxDoor:
    """The in-process door returning probabilities, as a hosted endpoint does; records calls."""

    returns = "probabilities"

    def __init__(self):
        self.inner = OpenCLIPTextBackend()
        self.sent = []

    def text_scores(self, images, prompts):
        self.sent.append(len(prompts))
        return np.exp(log_probabilities(self.inner.text_scores(images, prompts), "logits"))


class Likes:
    """A door whose logits favour prompts naming each class's 'good' word: a known optimum."""

    returns = "logits"

    def __init__(self, good):
        self.good = good
        self.sent = []

    def text_scores(self, images, prompts):
        self.sent.append(len(prompts))
        n = len(images)
        y = np.arange(n) % len(self.good)
        out = np.zeros((len(prompts), n, len(prompts[0])))
        for p, prompt_set in enumerate(prompts):
            for j, s in enumerate(prompt_set):
                out[p, :, j] = [2.0 if self.good[c] in s else 0.5 for c in y]
        return out


@pytest.fixture(scope="module")
def split():
    Xtr, ytr, Xte, yte = digits_split(n_shots=8, n_test=300, seed=0)
    return to_pil_images(Xtr), ytr, to_pil_images(Xte), yte


@pytest.fixture(scope="module")
def words():
    return tokenizer_words()[::10]  # a fixed tenth of the vocabulary: fast to screen


def held_out(prompts, images, y):
    return float((OpenCLIPTextBackend().text_scores(images, [prompts])[0].argmax(1) == y).mean())


def test_tokenizer_words_are_single_lowercase_words():
    words = tokenizer_words(min_length=4, max_length=6)
    assert len(words) > 5000 and words == sorted(words)
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 6 for w in words)


@pytest.mark.slow
def test_search_learns_wordings_that_beat_zero_shot_on_held_out_digits(split, words):
    train, ytr, test, yte = split
    names = list(DIGIT_WORDS)
    search = TextPromptSearch(names, vocabulary=words, popsize=10, random_state=np.random.RandomState(0))
    counter = search_alone(OpenCLIPTextBackend(), train, ytr, search, budget=101)
    zero_shot = held_out(search.class_prompts(), test, yte)
    learned = held_out(search.current(), test, yte)
    assert counter.n_queries == 101 and counter.by_purpose == {"screen": 1, "prompt": 100}
    assert learned > zero_shot + 0.04, (zero_shot, learned, search.current())


def test_search_is_seeded_and_leaves_numpy_global_state_alone(split, words):
    train, ytr, _, _ = split
    state = np.random.get_state()
    runs = []
    for _ in range(2):
        search = TextPromptSearch(list(DIGIT_WORDS), vocabulary=words, n_words=500, popsize=10,
                                  random_state=np.random.RandomState(7))
        search_alone(OpenCLIPTextBackend(), train, ytr, search, budget=31)
        runs.append((search.candidates_, search.current()))
    assert runs[0] == runs[1]
    assert same_global_state(state, np.random.get_state())  # key and position: not one draw


def test_never_sends_an_over_budget_query():
    door = Likes(["kitten", "puppy"])
    search = TextPromptSearch(["cat", "dog"], vocabulary=["kitten", "puppy", "box", "tree"],
                              popsize=10, random_state=0)
    counter = search_alone(door, ["img"] * 8, np.arange(8) % 2, search, budget=25, n_steps=100)
    assert search.candidates_ == [["cat", "kitten"], ["dog", "puppy"]]
    assert door.sent == [1, 10, 10]  # screening, then as many whole steps as fit
    assert counter.n_queries == sum(door.sent) <= 25  # every prompt sent is counted, within the budget


def test_policy_gradient_finds_the_known_best_wording():
    door = Likes(["kitten", "puppy"])
    search = TextPromptSearch(["cat", "dog"], candidates=[["tabby", "kitten", "box"], ["puppy", "hound", "tree"]],
                              popsize=8, random_state=0)
    before = search.current()
    search_alone(door, ["img"] * 4, np.array([0, 1, 0, 1]), search, n_steps=30)
    assert before == ["a photo of a cat.", "a photo of a dog."]  # the classes' own names start on top
    assert search.current() == ["a photo of a kitten.", "a photo of a puppy."]
    assert search.candidates_[0][0] == "cat"  # the own name stays a candidate


def test_screening_on_probabilities_in_chunks_matches_logits_in_one_query(split, words):
    # A softmax keeps log-ratios, and every chunk repeats the classes' own prompts: same scale.
    train, ytr, _, _ = split
    vocabulary = words[:300]
    kwargs = dict(vocabulary=vocabulary, n_candidates=4, random_state=0)
    one = TextPromptSearch(list(DIGIT_WORDS), **kwargs)
    one_counter = QueryCounter(OpenCLIPTextBackend())
    one.screen(one_counter, train, ytr)
    door = SoftmaxDoor()
    chunked = TextPromptSearch(list(DIGIT_WORDS), strings_per_query=50, **kwargs)
    chunked_counter = QueryCounter(door)
    chunked.screen(chunked_counter, train, ytr)
    assert one_counter.n_queries == 1
    assert chunked_counter.n_queries == chunked.n_screening_queries() == 8 == len(door.sent)  # ceil(300 / 40)
    assert chunked.candidates_ == one.candidates_
    assert chunked_counter.n_pairs_scored == 8 * len(train)


def test_screening_keeps_each_word_for_one_class_and_the_own_name_first(split, words):
    train, ytr, _, _ = split
    search = TextPromptSearch(list(DIGIT_WORDS), vocabulary=words[:500] + ["seven"], n_candidates=5,
                              random_state=0)
    candidates = search.screen(QueryCounter(OpenCLIPTextBackend()), train, ytr)
    assert [c[0] for c in candidates] == list(DIGIT_WORDS)
    extra = [w for c in candidates for w in c[1:]]
    assert len(extra) == len(set(extra)) and "seven" not in extra
    assert all(len(c) <= 6 for c in candidates)


def test_templates_are_searched_when_several_are_given():
    search = TextPromptSearch(["cat", "dog"], templates=("a photo of a {}.", "a {} drawing."),
                              candidates=[["kitten"], ["puppy"]], popsize=5, random_state=0)
    choices, sets = search.ask()
    assert choices.shape == (5, 3) and sets == search.prompt_sets(choices)
    assert all(s[0].endswith(".") and ("photo" in s[0]) == ("photo" in s[1]) for s in sets)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_names=["cat"]), "at least two"),
        (dict(class_names=["cat", "cat"]), "distinct"),
        (dict(templates=("a photo",)), "exactly once"),
        (dict(popsize=1), "popsize must be >= 2"),
        (dict(strings_per_query=2), "leaves no room.*at least 3"),
        (dict(candidates=[["kitten"]]), "1 lists but there are 2 classes"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    kwargs = {"class_names": ["cat", "dog"], **kwargs}
    with pytest.raises(ValueError, match=message):
        TextPromptSearch(kwargs.pop("class_names"), **kwargs)


def test_tell_checks_the_fitness_shape():
    search = TextPromptSearch(["cat", "dog"], candidates=[["kitten"], ["puppy"]], popsize=4, random_state=0)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        search.tell(search.ask()[0], np.zeros(3))
