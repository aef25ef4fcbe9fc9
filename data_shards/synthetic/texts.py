"""The words of the synthetic benchmark: vocabulary lists, sentence and description templates, and the
full word list its tokenizer covers.

Topic words are the text cues (each entity of a name group has a distinct one); the filler lists
(when, verb, place, adjective words and the templates' own words) never hold a topic word, so a
sentence without the gold's topic word tells nothing about which group member is meant.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

TOPIC_WORDS = (
    "painter sculptor poet novelist composer pianist violinist singer drummer guitarist actor dancer director "
    "architect photographer journalist historian philosopher mathematician physicist chemist biologist astronomer "
    "geologist botanist economist lawyer judge senator governor diplomat general admiral soldier pilot sailor "
    "explorer inventor engineer surgeon nurse pharmacist teacher librarian priest monk bishop rabbi footballer "
    "cricketer boxer wrestler swimmer cyclist sprinter skier golfer jockey goalkeeper coach referee chef baker "
    "farmer fisherman blacksmith carpenter tailor merchant banker publisher editor cartoonist comedian magician "
    "rapper river mountain lake island volcano glacier desert forest valley canyon waterfall village town city "
    "castle cathedral church temple mosque monastery bridge tower lighthouse airport railway highway canal dam "
    "museum university school hospital prison palace fortress stadium theatre cinema band orchestra choir club "
    "company newspaper magazine party army navy airline brewery bakery album song film novel opera ballet "
    "painting statue poem symphony sitcom documentary game horse dog cat eagle falcon whale dolphin shark tiger "
    "lion wolf bear snake beetle butterfly orchid rose oak cactus mushroom ship submarine locomotive car truck "
    "rocket satellite telescope computer robot language dialect festival battle treaty storm hurricane earthquake "
    "comet asteroid planet galaxy mineral crystal dish cheese wine beer sauce dessert typeface software algorithm "
    "protein gene disease virus vaccine medicine currency coin stamp flag anthem dynasty empire kingdom province "
    "county district municipality park garden zoo farm mine quarry cave reef peninsula bay strait cape plateau "
    "hill swamp"
).split()
WHEN_WORDS = "yesterday today recently earlier tonight again lately once twice afterwards".split()
VERB_WORDS = "visited opened left praised toured greeted entered crossed passed reached".split()
PLACE_WORDS = "market station square harbour plaza hall courtyard terrace gate avenue corner crossroads".split()
ADJ_WORDS = "famous renowned little obscure celebrated early modern ancient notable popular historic young old major".split()
YEARS = [str(y) for y in range(1850, 2020)]

# Sentence templates. {name}, {topic}, {when}, {verb}, {place}, {adj}, {an} ("a"/"an" before {adj}).
TEXT_TEMPLATES = (
    "{When}, the {topic} {name} {verb} the {place}.",
    "{name}, {an} {adj} {topic}, {verb} the {place} {when}.",
    "Photo: {name} ({topic}) at the {place}.",
    "The {place} was {verb} by {name}, the {topic}, {when}.",
    "Here the {topic} {name} is seen near the {place}.",
)
IMAGE_TEMPLATES = (
    "{When}, {name} {verb} the {place}.",
    "{name} at the {place} {when}.",
    "A picture of {name} near the {place}.",
    "{name} was seen at the {place} {when}.",
    "Photo: {name} in this picture, {when}.",
)
DESC_TEMPLATE = "{name} is {an} {adj} {topic} from {region}, active since {year}."
CAND_TEMPLATE = "{adj} {topic} from {region}"

TEMPLATE_WORDS = sorted(
    {w.lower() for t in (*TEXT_TEMPLATES, *IMAGE_TEMPLATES, DESC_TEMPLATE, CAND_TEMPLATE)
     for w in re.findall(r"\w+", re.sub(r"\{\w+\}", " ", t))} | {"a", "an"}
)
FIXED_WORDS = set(TOPIC_WORDS) | set(WHEN_WORDS) | set(VERB_WORDS) | set(PLACE_WORDS) | set(ADJ_WORDS) | set(TEMPLATE_WORDS)
assert len(set(TOPIC_WORDS)) == len(TOPIC_WORDS)
assert not set(TOPIC_WORDS) & (FIXED_WORDS - set(TOPIC_WORDS) - set(ADJ_WORDS)), "a filler word is a topic word"
assert not set(TOPIC_WORDS) & set(ADJ_WORDS)


def article(word: str) -> str:
    """The article before `word`: "an" before a vowel, else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def fill_template(template: str, name: str, topic: str, rng_vals: tuple[int, int, int, int]) -> str:
    """A sentence template filled in; `rng_vals` index WHEN_WORDS, VERB_WORDS, PLACE_WORDS, ADJ_WORDS."""
    when, verb, place, adj = rng_vals
    adj_w = ADJ_WORDS[adj]
    when_w = WHEN_WORDS[when]
    return template.format(name=name, topic=topic, when=when_w, When=when_w.capitalize(), verb=VERB_WORDS[verb],
                           place=PLACE_WORDS[place], adj=adj_w, an=article(adj_w))


def vocabulary(pseudo_words: Iterable[str]) -> list[str]:
    """Every word a generated text can hold (fixed lists, years, single characters and the world's
    lower-cased pseudo-words), sorted: the tokenizer's vocabulary."""
    words = set(FIXED_WORDS) | set(YEARS) | set(string.ascii_lowercase) | set(string.digits) | set(string.punctuation)
    words |= set(pseudo_words)
    return sorted(words)
