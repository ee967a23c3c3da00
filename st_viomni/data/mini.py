"""A built-in mini mixture: small, genuine, deterministic Vietnamese/English data for all five tasks.

``mini_mixture(n_per_task, split, seed)`` generates canonical samples (see :mod:`st_viomni.data.schema`)
from a small bilingual lexicon and synthetic images. Every answer is exactly right and depends on what it
should depend on (the words of a sentence, the colour, shape, count or position of drawn shapes, the words
rendered in an image), so a tiny model can learn it; a test split made of unseen content shows whether it
generalised. The demo, the tests and the benchmarks train and evaluate on it.

What each task holds:

* ``text_pair``: sentences "<subject> <verb> <place>" in three surface forms per language (e.g. "The cat is
  sleeping in the garden." / "Trong vườn, con mèo đang ngủ."), paired with a sentence sharing 3, 2, 1 or 0 of
  the three slots, in the same or the other language: score 0.95 (paraphrase or translation), 0.6, 0.3, 0.0.
* ``instr``: instructions with their exact responses: translation vi<->en of such sentences, arithmetic,
  numbers in words, comparing and sorting numbers, weekday offsets, legs of animals, capital cities.
* ``ocr``: signs, numbered labels and menu prices rendered in DejaVu Sans (full Vietnamese diacritics), with
  transcription queries, questions about the number or the price, image-only anchors (the positive is the
  transcription), and two-image items ("What does the second image say?").
* ``vqa_single``: scenes of one to three coloured circles, squares and triangles (left, middle, right) with
  questions on colour, shape, count, position, existence, and captions of the scene ("Describe the image."
  or, for half of them, an image-only anchor: the plain image <-> text case).
* ``vqa_multi``: dialogues of two or three turns about a scene ("What shape is on the left?" -> "What colour
  is it?"), and one- or two-turn questions comparing two scenes; one sample per turn, rendered with
  :func:`~st_viomni.data.dialogue.render_dialogue` exactly as :func:`vqa_multi_samples` renders user data.

Splits: every piece of content (a sentence's slots, an arithmetic problem, a scene's objects, a rendered text)
has a key whose hash puts it in ``"train"`` (4/5 of keys) or ``"test"`` (1/5), whatever the seed. A sample
only uses content of its split, so no sentence, instruction, scene or rendered text of the test split
appears in the train split: the test split checks generalisation to new combinations of known words,
colours, shapes and letters. The seed chooses which samples are drawn; the same arguments always produce
the same samples (images included, byte for byte).

Example:
    ::

        from st_viomni.data import build_training_dataset, mini_mixture

        train = mini_mixture(200, split="train", seed=0)   # 1,000 canonical samples, tasks shuffled
        test = mini_mixture(50, split="test", seed=0)
        train_dataset = build_training_dataset(train)
"""

from __future__ import annotations

import hashlib
import random
import unicodedata
from collections.abc import Callable
from typing import Any

from datasets import Dataset

from ..tasks import TASK_NAMES, get_task
from .dialogue import expand_turns
from .mini_render import SceneObject, draw_scene, draw_text, png_bytes
from .schema import CANONICAL_COLUMNS, CANONICAL_FEATURES, make_sample

SPLITS = ("train", "test")
TEST_FRACTION = 5  # one key in five is a test key

# ---------------------------------------------------------------------------------------------------------
# Lexicon: (English, Vietnamese)
# ---------------------------------------------------------------------------------------------------------

SUBJECTS = [
    ("the cat", "con mèo"),
    ("the dog", "con chó"),
    ("the bird", "con chim"),
    ("the child", "đứa trẻ"),
    ("my mother", "mẹ tôi"),
    ("the teacher", "cô giáo"),
    ("the farmer", "người nông dân"),
    ("the student", "cậu học sinh"),
    ("my grandfather", "ông tôi"),
    ("the doctor", "bác sĩ"),
]
# (English progressive, English simple, Vietnamese progressive, Vietnamese simple)
VERBS = [
    ("is sleeping", "sleeps", "đang ngủ", "ngủ"),
    ("is eating", "eats", "đang ăn", "ăn"),
    ("is running", "runs", "đang chạy", "chạy"),
    ("is singing", "sings", "đang hát", "hát"),
    ("is reading", "reads", "đang đọc sách", "đọc sách"),
    ("is playing", "plays", "đang chơi", "chơi"),
    ("is waiting", "waits", "đang đợi", "đợi"),
    ("is sitting", "sits", "đang ngồi", "ngồi"),
    ("is working", "works", "đang làm việc", "làm việc"),
    ("is resting", "rests", "đang nghỉ ngơi", "nghỉ ngơi"),
]
PLACES = [
    ("in the garden", "trong vườn"),
    ("at the market", "ở chợ"),
    ("on the roof", "trên mái nhà"),
    ("in the kitchen", "trong bếp"),
    ("by the river", "bên bờ sông"),
    ("at school", "ở trường"),
    ("in the park", "trong công viên"),
    ("on the bus", "trên xe buýt"),
    ("at the station", "ở nhà ga"),
    ("under the tree", "dưới gốc cây"),
]
# Score of a sentence pair by the number of (subject, verb, place) slots the two sentences share.
PAIR_SCORES = {3: 0.95, 2: 0.6, 1: 0.3, 0: 0.0}
_PAIR_LEVEL_WEIGHTS = {3: 35, 2: 25, 1: 20, 0: 20}

# key: (English, Vietnamese, RGB)
COLOURS = {
    "red": ("red", "đỏ", (215, 40, 40)),
    "green": ("green", "xanh lá", (40, 160, 60)),
    "blue": ("blue", "xanh dương", (40, 90, 215)),
    "yellow": ("yellow", "vàng", (235, 195, 25)),
    "purple": ("purple", "tím", (140, 60, 180)),
    "orange": ("orange", "cam", (240, 125, 25)),
}
SHAPES = {
    "circle": ("circle", "hình tròn"),
    "square": ("square", "hình vuông"),
    "triangle": ("triangle", "hình tam giác"),
}
POSITIONS = [("on the left", "bên trái"), ("in the middle", "ở giữa"), ("on the right", "bên phải")]

NUMBER_WORDS_EN = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
TENS_EN = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
DIGITS_VI = "không một hai ba bốn năm sáu bảy tám chín".split()

WEEKDAYS = [
    ("Monday", "thứ Hai"),
    ("Tuesday", "thứ Ba"),
    ("Wednesday", "thứ Tư"),
    ("Thursday", "thứ Năm"),
    ("Friday", "thứ Sáu"),
    ("Saturday", "thứ Bảy"),
    ("Sunday", "Chủ nhật"),
]
ANIMAL_LEGS = [
    ("cat", "mèo", 4),
    ("dog", "chó", 4),
    ("horse", "ngựa", 4),
    ("cow", "bò", 4),
    ("bird", "chim", 2),
    ("chicken", "gà", 2),
    ("duck", "vịt", 2),
    ("ant", "kiến", 6),
    ("bee", "ong", 6),
    ("spider", "nhện", 8),
    ("crab", "cua", 10),
    ("fish", "cá", 0),
    ("snake", "rắn", 0),
]
CAPITALS = [
    ("Vietnam", "Việt Nam", "Hanoi", "Hà Nội"),
    ("France", "Pháp", "Paris", "Paris"),
    ("Japan", "Nhật Bản", "Tokyo", "Tokyo"),
    ("Thailand", "Thái Lan", "Bangkok", "Băng Cốc"),
    ("Laos", "Lào", "Vientiane", "Viêng Chăn"),
    ("Cambodia", "Campuchia", "Phnom Penh", "Phnôm Pênh"),
    ("China", "Trung Quốc", "Beijing", "Bắc Kinh"),
    ("South Korea", "Hàn Quốc", "Seoul", "Seoul"),
    ("the United Kingdom", "Anh", "London", "Luân Đôn"),
    ("Italy", "Ý", "Rome", "Rô-ma"),
    ("Germany", "Đức", "Berlin", "Béc-lin"),
    ("Spain", "Tây Ban Nha", "Madrid", "Madrid"),
    ("Russia", "Nga", "Moscow", "Mát-xcơ-va"),
    ("Egypt", "Ai Cập", "Cairo", "Cai-rô"),
]

SIGNS_VI = [
    "lối ra", "lối vào", "cấm đỗ xe", "nhà thuốc", "bệnh viện", "trường học", "ngân hàng", "bưu điện",
    "khách sạn", "thư viện", "siêu thị", "chợ đêm", "giảm giá", "mở cửa", "đóng cửa", "nhà ga", "sân bay",
    "công viên", "quầy vé", "tiệm bánh", "cấm hút thuốc", "nhà vệ sinh", "phòng chờ", "bến xe", "hiệu sách",
    "tiệm cà phê", "trạm xăng", "cửa hàng hoa", "xin chào", "cảm ơn", "đường một chiều", "khu vực cấm",
]  # fmt: skip
SIGNS_EN = [
    "exit", "entrance", "no parking", "pharmacy", "hospital", "school", "bank", "post office", "hotel",
    "library", "supermarket", "night market", "sale", "open", "closed", "train station", "airport", "park",
    "ticket office", "bakery", "no smoking", "toilets", "waiting room", "bus station", "bookshop",
    "coffee shop", "gas station", "flower shop", "welcome", "thank you", "one way", "keep out",
]  # fmt: skip
LABELS = [
    ("Room", "Phòng"),
    ("Gate", "Cổng"),
    ("Counter", "Quầy"),
    ("Floor", "Tầng"),
    ("Table", "Bàn"),
    ("Bus", "Xe buýt"),
]
FOODS = [
    ("noodle soup", "phở bò"),
    ("bread roll", "bánh mì"),
    ("iced coffee", "cà phê đá"),
    ("iced tea", "trà đá"),
    ("grilled pork", "bún chả"),
    ("broken rice", "cơm tấm"),
    ("sticky rice", "xôi gà"),
    ("sugarcane juice", "nước mía"),
    ("sweet soup", "chè đậu"),
    ("spring rolls", "nem rán"),
    ("fried rice", "cơm rang"),
    ("crab soup", "bánh canh cua"),
]


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def mini_mixture(n_per_task: int, split: str = "train", seed: int = 0) -> Dataset:
    """``n_per_task`` canonical samples of each of the five tasks, in a seeded random order.

    Args:
        n_per_task: Samples per task (``vqa_multi`` counts dialogue turns).
        split: ``"train"`` or ``"test"``: disjoint content (see the module docstring).
        seed: Which samples are drawn; the same arguments always give the same dataset.

    Returns:
        A ``Dataset`` with :data:`~st_viomni.data.schema.CANONICAL_FEATURES`, ``5 * n_per_task`` rows, images
        stored as PNG bytes (decoded when read).
    """
    samples = []
    for task in TASK_NAMES:
        samples.extend(_generate(task, n_per_task, split, seed))
    random.Random(_rng_name("mixture", split, seed)).shuffle(samples)
    return _to_dataset([sample for sample, _ in samples])


def mini_samples(task: str, n: int, split: str = "train", seed: int = 0) -> Dataset:
    """``n`` canonical samples of one task (see :func:`mini_mixture`), in generation order."""
    return _to_dataset([sample for sample, _ in _generate(task, n, split, seed)])


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def _generate(task: str, n: int, split: str, seed: int) -> list[tuple[dict[str, Any], tuple]]:
    """``n`` samples of ``task`` with, for each, the content keys it was made from (for split tests)."""
    get_task(task)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(_rng_name(task, split, seed))
    make_item = _ITEM_MAKERS[task]
    samples: list[tuple[dict[str, Any], tuple]] = []
    while len(samples) < n:
        # An item is one sample, or for vqa_multi all turns of one dialogue.
        samples.extend(make_item(rng, split))
    return samples[:n]


def _rng_name(task: str, split: str, seed: int) -> str:
    # String seeds are hashed with SHA-512 by random.Random: stable across runs and platforms.
    return f"st-viomni-mini/{task}/{split}/{seed}"


def split_of(key: tuple) -> str:
    """The split a piece of content belongs to: a stable hash of its key, one key in five is ``"test"``."""
    digest = hashlib.blake2b(repr(key).encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % TEST_FRACTION == 0 else "train"


def _draw_in_split(rng: random.Random, split: str, draw: Callable[[], tuple[tuple, Any]]) -> tuple[tuple, Any]:
    # Rejection sampling: about 5 draws per test item, 1.25 per train item.
    for _ in range(10_000):
        key, value = draw()
        if split_of(key) == split:
            return key, value
    raise RuntimeError("no content of the requested split found")  # unreachable with these lexicons


def _to_dataset(samples: list[dict[str, Any]]) -> Dataset:
    columns = {column: [sample[column] for sample in samples] for column in CANONICAL_COLUMNS}
    return Dataset.from_dict(columns, features=CANONICAL_FEATURES)


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _sample(
    task: str, anchor: str | None, images: list, positive: str, keys: tuple, score: float | None = None
) -> tuple[dict[str, Any], tuple]:
    return make_sample(task, _nfc(anchor) if anchor else None, images, _nfc(positive), [], score), keys


def _a(phrase: str) -> str:
    """English indefinite article: 'a red circle', 'an orange circle', 'an ant'."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _other(language: str) -> str:
    return "vi" if language == "en" else "en"


# --- text_pair -------------------------------------------------------------------------------------------


def _sentence(triple: tuple[int, int, int], language: str, form: int) -> str:
    subject_index, verb_index, place_index = triple
    subject_en, subject_vi = SUBJECTS[subject_index]
    progressive_en, simple_en, progressive_vi, simple_vi = VERBS[verb_index]
    place_en, place_vi = PLACES[place_index]
    subject, place = (subject_en, place_en) if language == "en" else (subject_vi, place_vi)
    progressive, simple = (progressive_en, simple_en) if language == "en" else (progressive_vi, simple_vi)
    if form == 0:
        return f"{_cap(subject)} {progressive} {place}."
    if form == 1:
        return f"{_cap(place)}, {subject} {progressive}."
    return f"{_cap(subject)} {simple} {place}."


def _sentence_key(triple: tuple[int, int, int]) -> tuple:
    return ("sentence", *triple)


def _random_triple(rng: random.Random) -> tuple[tuple, tuple[int, int, int]]:
    triple = (rng.randrange(len(SUBJECTS)), rng.randrange(len(VERBS)), rng.randrange(len(PLACES)))
    return _sentence_key(triple), triple


def _related_triple(rng: random.Random, triple: tuple[int, int, int], shared: int) -> tuple[tuple, tuple]:
    sizes = (len(SUBJECTS), len(VERBS), len(PLACES))
    kept = set(rng.sample(range(3), shared))
    related = tuple(
        value if slot in kept else rng.choice([other for other in range(sizes[slot]) if other != value])
        for slot, value in enumerate(triple)
    )
    return _sentence_key(related), related


def _text_pair_item(rng: random.Random, split: str) -> list[tuple[dict[str, Any], tuple]]:
    anchor_key, anchor_triple = _draw_in_split(rng, split, lambda: _random_triple(rng))
    levels = list(_PAIR_LEVEL_WEIGHTS)
    shared = rng.choices(levels, weights=[_PAIR_LEVEL_WEIGHTS[level] for level in levels])[0]
    partner_key, partner_triple = _draw_in_split(rng, split, lambda: _related_triple(rng, anchor_triple, shared))
    anchor_language = rng.choice(["en", "vi"])
    partner_language = anchor_language if rng.random() < 0.5 else _other(anchor_language)
    anchor_form = rng.randrange(3)
    partner_form = rng.randrange(3)
    if shared == 3 and partner_language == anchor_language and partner_form == anchor_form:
        # A paraphrase, not a copy: same meaning, another surface form.
        partner_form = (anchor_form + rng.randint(1, 2)) % 3
    return [
        _sample(
            "text_pair",
            _sentence(anchor_triple, anchor_language, anchor_form),
            [],
            _sentence(partner_triple, partner_language, partner_form),
            (anchor_key, partner_key),
            score=PAIR_SCORES[shared],
        )
    ]


# --- instr -----------------------------------------------------------------------------------------------


def number_in_words(number: int, language: str) -> str:
    """0..99 in English or Vietnamese words ("twenty-one", "hai mươi mốt")."""
    if not 0 <= number <= 99:
        raise ValueError(f"number_in_words covers 0..99, got {number}")
    tens, units = divmod(number, 10)
    if language == "en":
        if number < 20:
            return NUMBER_WORDS_EN[number]
        return TENS_EN[tens] + ("" if units == 0 else "-" + NUMBER_WORDS_EN[units])
    if number < 10:
        return DIGITS_VI[number]
    head = "mười" if tens == 1 else f"{DIGITS_VI[tens]} mươi"
    if units == 0:
        return head
    if units == 5:
        unit = "lăm"
    elif units == 1 and tens >= 2:
        unit = "mốt"
    elif units == 4 and tens >= 2:
        unit = "tư"
    else:
        unit = DIGITS_VI[units]
    return f"{head} {unit}"


def _instr_translation(rng: random.Random, split: str, language: str) -> tuple[tuple, str, str]:
    key, triple = _draw_in_split(rng, split, lambda: _random_triple(rng))
    form = rng.randrange(3)
    source, target = ("en", "vi") if language == "en" else ("vi", "en")
    instruction = (
        f"Translate into Vietnamese: {_sentence(triple, source, form)}"
        if language == "en"
        else f"Dịch sang tiếng Anh: {_sentence(triple, source, form)}"
    )
    return key, instruction, _sentence(triple, target, form)


def _instr_arithmetic(rng: random.Random, split: str, language: str) -> tuple[tuple, str, str]:
    def draw():
        operator = rng.choice("+-×")
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if operator == "-" and a < b:
            a, b = b, a
        return ("arithmetic", a, operator, b), (a, operator, b)

    key, (a, operator, b) = _draw_in_split(rng, split, draw)
    result = a + b if operator == "+" else a - b if operator == "-" else a * b
    question = f"What is {a} {operator} {b}?" if language == "en" else f"{a} {operator} {b} bằng bao nhiêu?"
    return key, question, f"{a} {operator} {b} = {result}"


def _instr_words(rng: random.Random, split: str, language: str) -> tuple[tuple, str, str]:
    def draw():
        number = rng.randint(1, 99)
        return ("words", number), number

    key, number = _draw_in_split(rng, split, draw)
    question = f"Write {number} in words." if language == "en" else f"Viết số {number} bằng chữ."
    return key, question, number_in_words(number, language)


def _instr_compare(rng: random.Random, split: str, language: str) -> tuple[tuple, str, str]:
    def draw():
        a, b = rng.sample(range(1, 100), 2)
        return ("compare", min(a, b), max(a, b)), (a, b)

    key, (a, b) = _draw_in_split(rng, split, draw)
    high, low = max(a, b), min(a, b)
    if language == "en":
        return key, f"Which is larger, {a} or {b}?", f"{high} is larger than {low}."
    return key, f"Số nào lớn hơn, {a} hay {b}?", f"{high} lớn hơn {low}."


def _instr_sort(rng: random.Random, split: str, language: str) -> tuple[tuple, str, str]:
    def draw():
        numbers = rng.sample(range(1, 50), rng.randint(3, 4))
        return ("sort", *sorted(numbers)), numbers

    key, numbers = _draw_in_split(rng, split, draw)
    listed = ", ".join(map(str, numbers))
    if language == "en":
        question = f"Sort in ascending order: {listed}"
    else:
        question = f"Sắp xếp theo thứ tự tăng dần: {listed}"
    return key, question, ", ".join(map(str, sorted(numbers)))


def _instr_weekday(rng: random.Random, split: str, language: str) -> tuple[tuple, str, str]:
    def draw():
        day, offset = rng.randrange(7), rng.randint(1, 6)
        return ("weekday", day, offset), (day, offset)

    key, (day, offset) = _draw_in_split(rng, split, draw)
    target = WEEKDAYS[(day + offset) % 7]
    if language == "en":
        unit = "day" if offset == 1 else "days"
        return (
            key,
            f"What day is {offset} {unit} after {WEEKDAYS[day][0]}?",
            f"{offset} {unit} after {WEEKDAYS[day][0]} is {target[0]}.",
        )
    day_vi = WEEKDAYS[day][1]
    return key, f"{offset} ngày sau {day_vi} là thứ mấy?", f"{offset} ngày sau {day_vi} là {target[1]}."


def _instr_fact(rng: random.Random, split: str, language: str) -> tuple[tuple, str, str]:
    def draw():
        if rng.random() < 0.5:
            index = rng.randrange(len(ANIMAL_LEGS))
            return ("legs", index), ("legs", index)
        index = rng.randrange(len(CAPITALS))
        return ("capital", index), ("capital", index)

    key, (kind, index) = _draw_in_split(rng, split, draw)
    if kind == "legs":
        animal_en, animal_vi, legs = ANIMAL_LEGS[index]
        if language == "en":
            legs_en = "no" if legs == 0 else NUMBER_WORDS_EN[legs]
            return key, f"How many legs does {_a(animal_en)} have?", f"{_cap(_a(animal_en))} has {legs_en} legs."
        if legs == 0:
            return key, f"Con {animal_vi} có mấy chân?", f"Con {animal_vi} không có chân."
        return key, f"Con {animal_vi} có mấy chân?", f"Con {animal_vi} có {number_in_words(legs, 'vi')} chân."
    country_en, country_vi, capital_en, capital_vi = CAPITALS[index]
    if language == "en":
        return key, f"What is the capital of {country_en}?", f"The capital of {country_en} is {capital_en}."
    return key, f"Thủ đô của {country_vi} là gì?", f"Thủ đô của {country_vi} là {capital_vi}."


_INSTR_KINDS = [
    _instr_translation,
    _instr_arithmetic,
    _instr_words,
    _instr_compare,
    _instr_sort,
    _instr_weekday,
    _instr_fact,
]


def _instr_item(rng: random.Random, split: str) -> list[tuple[dict[str, Any], tuple]]:
    make = rng.choice(_INSTR_KINDS)
    key, instruction, response = make(rng, split, rng.choice(["en", "vi"]))
    return [_sample("instr", instruction, [], response, (key,))]


# --- scenes (vqa_single, vqa_multi) ----------------------------------------------------------------------

Scene = tuple[tuple[int, str, str], ...]  # ((column, shape, colour), ...) sorted by column


def _random_scene(rng: random.Random) -> tuple[tuple, Scene]:
    count = rng.choice([1, 2, 2, 3, 3])
    columns = sorted(rng.sample(range(3), count))
    scene = tuple((column, rng.choice(list(SHAPES)), rng.choice(list(COLOURS))) for column in columns)
    return ("scene", *scene), scene


def _scene_image(scene: Scene, rng: random.Random) -> dict:
    objects = [SceneObject(shape, COLOURS[colour][2], column) for column, shape, colour in scene]
    return png_bytes(draw_scene(objects, rng))


def _thing(shape: str, colour: str, language: str) -> str:
    """'red circle' / 'hình tròn màu đỏ'."""
    if language == "en":
        return f"{COLOURS[colour][0]} {SHAPES[shape][0]}"
    return f"{SHAPES[shape][1]} màu {COLOURS[colour][1]}"


def _count_phrase(count: int, language: str, what_en: str = "shape") -> str:
    if language == "en":
        if count == 1:
            return f"one {what_en}"
        return f"{NUMBER_WORDS_EN[count]} {what_en}s"
    return f"{number_in_words(count, 'vi')} hình"


def _describe(scene: Scene, language: str) -> str:
    if language == "en":
        parts = [f"{_a(_thing(shape, colour, 'en'))} {POSITIONS[column][0]}" for column, shape, colour in scene]
        joiner = " and "
    else:
        parts = [f"một {_thing(shape, colour, 'vi')} {POSITIONS[column][1]}" for column, shape, colour in scene]
        joiner = " và "
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + joiner + parts[-1]
    return _cap(text) + "."


def _unique_objects(scene: Scene) -> list[tuple[int, str, str]]:
    # Objects whose (shape, colour) occurs once: "the red circle" names exactly one of them.
    pairs = [(shape, colour) for _, shape, colour in scene]
    return [item for item in scene if pairs.count((item[1], item[2])) == 1]


def _random_thing(rng: random.Random, scene: Scene, present: bool) -> tuple[str, str]:
    if present:
        _, shape, colour = rng.choice(scene)
        return shape, colour
    present_things = {item[1:] for item in scene}
    absent = [(shape, colour) for shape in SHAPES for colour in COLOURS if (shape, colour) not in present_things]
    return rng.choice(absent)


def _qa_colour_at(scene: Scene, rng: random.Random, language: str) -> tuple[str, str]:
    column, _, colour = rng.choice(scene)
    position_en, position_vi = POSITIONS[column]
    if language == "en":
        return f"What colour is the shape {position_en}?", f"The shape {position_en} is {COLOURS[colour][0]}."
    return f"Hình {position_vi} màu gì?", f"Hình {position_vi} màu {COLOURS[colour][1]}."


def _qa_shape_at(scene: Scene, rng: random.Random, language: str, item=None) -> tuple[str, str]:
    column, shape, _ = item or rng.choice(scene)
    position_en, position_vi = POSITIONS[column]
    if language == "en":
        return f"What shape is {position_en}?", f"There is {_a(SHAPES[shape][0])} {position_en}."
    return f"Hình gì nằm {position_vi}?", f"{_cap(SHAPES[shape][1])} nằm {position_vi}."


def _qa_count(scene: Scene, rng: random.Random, language: str) -> tuple[str, str]:
    count = len(scene)
    if language == "en":
        verb = "is" if count == 1 else "are"
        return "How many shapes are there?", f"There {verb} {_count_phrase(count, 'en')}."
    return "Có bao nhiêu hình?", f"Có {_count_phrase(count, 'vi')}."


def _qa_count_colour(scene: Scene, rng: random.Random, language: str) -> tuple[str, str]:
    colour = rng.choice(scene)[2] if rng.random() < 0.7 else rng.choice(list(COLOURS))
    count = sum(1 for _, _, other in scene if other == colour)
    colour_en, colour_vi, _ = COLOURS[colour]
    if language == "en":
        question = f"How many {colour_en} shapes are there?"
        if count == 0:
            return question, f"There are no {colour_en} shapes."
        verb = "is" if count == 1 else "are"
        return question, f"There {verb} {_count_phrase(count, 'en', f'{colour_en} shape')}."
    question = f"Có bao nhiêu hình màu {colour_vi}?"
    if count == 0:
        return question, f"Không có hình màu {colour_vi} nào."
    return question, f"Có {number_in_words(count, 'vi')} hình màu {colour_vi}."


def _qa_where(scene: Scene, rng: random.Random, language: str, item=None) -> tuple[str, str]:
    candidates = _unique_objects(scene)
    if not candidates:
        return _qa_count(scene, rng, language)
    column, shape, colour = item or rng.choice(candidates)
    thing = _thing(shape, colour, language)
    position_en, position_vi = POSITIONS[column]
    if language == "en":
        return f"Where is the {thing}?", f"The {thing} is {position_en}."
    return f"{_cap(thing)} nằm ở đâu?", f"{_cap(thing)} nằm {position_vi}."


def _qa_exists(scene: Scene, rng: random.Random, language: str, shape=None, colour=None) -> tuple[str, str]:
    if shape is None:
        shape, colour = _random_thing(rng, scene, present=rng.random() < 0.5)
    present = any(item[1:] == (shape, colour) for item in scene)
    thing = _thing(shape, colour, language)
    if language == "en":
        return f"Is there {_a(thing)}?", (f"Yes, there is {_a(thing)}." if present else f"No, there is no {thing}.")
    return f"Có {thing} không?", (f"Có, có một {thing}." if present else f"Không, không có {thing}.")


def _qa_describe(scene: Scene, rng: random.Random, language: str) -> tuple[str | None, str]:
    # Half the captions have an image-only anchor: plain image <-> caption pairs, the cross-modal case.
    if rng.random() < 0.5:
        return None, _describe(scene, language)
    if language == "en":
        return rng.choice(["Describe the image.", "What is in the picture?"]), _describe(scene, "en")
    return rng.choice(["Mô tả bức ảnh.", "Trong ảnh có gì?"]), _describe(scene, "vi")


# Captions count twice: they are the only answers that depend on the whole scene.
_SINGLE_QUESTIONS = [_qa_colour_at, _qa_shape_at, _qa_count, _qa_count_colour, _qa_where, _qa_exists, _qa_describe]
_SINGLE_QUESTION_WEIGHTS = [1, 1, 1, 1, 1, 1, 2]


def _vqa_single_item(rng: random.Random, split: str) -> list[tuple[dict[str, Any], tuple]]:
    key, scene = _draw_in_split(rng, split, lambda: _random_scene(rng))
    ask = rng.choices(_SINGLE_QUESTIONS, weights=_SINGLE_QUESTION_WEIGHTS)[0]
    question, answer = ask(scene, rng, rng.choice(["en", "vi"]))
    return [_sample("vqa_single", question, [_scene_image(scene, rng)], answer, (key,))]


def _dialogue_about_scene(scene: Scene, rng: random.Random, language: str) -> list[tuple[str, str]]:
    en = language == "en"
    kind = rng.randrange(3)
    if kind == 0:
        # "What shape is on the left?" -> "What colour is it?" -> "How many other shapes are there?"
        item = rng.choice(scene)
        _, shape, colour = item
        others = len(scene) - 1
        turns = [_qa_shape_at(scene, rng, language, item=item)]
        if en:
            turns.append(("What colour is it?", f"The {SHAPES[shape][0]} is {COLOURS[colour][0]}."))
            if others == 0:
                other_answer = "There are no other shapes."
            elif others == 1:
                other_answer = "There is one other shape."
            else:
                other_answer = f"There are {NUMBER_WORDS_EN[others]} other shapes."
            turns.append(("How many other shapes are there?", other_answer))
        else:
            turns.append(("Nó màu gì?", f"{_cap(SHAPES[shape][1])} màu {COLOURS[colour][1]}."))
            other_answer = (
                "Không còn hình nào khác." if others == 0 else f"Còn {number_in_words(others, 'vi')} hình khác."
            )
            turns.append(("Còn bao nhiêu hình khác?", other_answer))
        return turns[: rng.choice([2, 3])]
    if kind == 1:
        # "Is there a red circle?" -> "Where is it?" (yes) or "Which shapes are there?" (no)
        candidates = _unique_objects(scene)
        present = bool(candidates) and rng.random() < 0.5
        if present:
            item = rng.choice(candidates)
            shape, colour = item[1], item[2]
        else:
            shape, colour = _random_thing(rng, scene, present=False)
        turns = [_qa_exists(scene, rng, language, shape=shape, colour=colour)]
        if present:
            thing = _thing(shape, colour, language)
            position_en, position_vi = POSITIONS[item[0]]
            turns.append(
                ("Where is it?", f"The {thing} is {position_en}.")
                if en
                else ("Nó nằm ở đâu?", f"{_cap(thing)} nằm {position_vi}.")
            )
        else:
            turns.append(
                ("Which shapes are there?", _describe(scene, "en"))
                if en
                else ("Vậy có những hình nào?", _describe(scene, "vi"))
            )
        return turns
    # "How many shapes are there?" -> "What is on the right?"
    column, shape, colour = rng.choice(scene)
    thing = _thing(shape, colour, language)
    position_en, position_vi = POSITIONS[column]
    second = (
        (f"What is {position_en}?", f"There is {_a(thing)} {position_en}.")
        if en
        else (f"{_cap(position_vi)} là hình gì?", f"{_cap(position_vi)} là {thing}.")
    )
    return [_qa_count(scene, rng, language), second]


def _comparison(first: Scene, second: Scene, rng: random.Random, language: str) -> list[tuple[str, str]]:
    en = language == "en"

    def more() -> tuple[str, str]:
        a, b = len(first), len(second)
        if en:
            answer = (
                "The first image has more shapes."
                if a > b
                else "The second image has more shapes."
                if b > a
                else "Both images have the same number of shapes."
            )
            return "Which image has more shapes?", answer
        answer = (
            "Ảnh thứ nhất có nhiều hình hơn."
            if a > b
            else "Ảnh thứ hai có nhiều hình hơn."
            if b > a
            else "Hai ảnh có số hình bằng nhau."
        )
        return "Ảnh nào có nhiều hình hơn?", answer

    def which_has() -> tuple[str, str]:
        union = first + second
        shape, colour = _random_thing(rng, union, present=rng.random() < 0.7)
        in_first = any(item[1:] == (shape, colour) for item in first)
        in_second = any(item[1:] == (shape, colour) for item in second)
        thing = _thing(shape, colour, language)
        if en:
            answer = (
                f"Both images have {_a(thing)}."
                if in_first and in_second
                else f"Only the first image has {_a(thing)}."
                if in_first
                else f"Only the second image has {_a(thing)}."
                if in_second
                else f"Neither image has {_a(thing)}."
            )
            return f"Which image has {_a(thing)}?", answer
        answer = (
            f"Cả hai ảnh đều có {thing}."
            if in_first and in_second
            else f"Chỉ ảnh thứ nhất có {thing}."
            if in_first
            else f"Chỉ ảnh thứ hai có {thing}."
            if in_second
            else f"Không ảnh nào có {thing}."
        )
        return f"Ảnh nào có {thing}?", answer

    def counts() -> list[tuple[str, str]]:
        a, b = len(first), len(second)
        if en:
            return [
                ("How many shapes are in the first image?", f"The first image has {_count_phrase(a, 'en')}."),
                ("And in the second image?", f"The second image has {_count_phrase(b, 'en')}."),
            ]
        return [
            ("Ảnh thứ nhất có bao nhiêu hình?", f"Ảnh thứ nhất có {_count_phrase(a, 'vi')}."),
            ("Còn ảnh thứ hai?", f"Ảnh thứ hai có {_count_phrase(b, 'vi')}."),
        ]

    kind = rng.randrange(4)
    if kind == 0:
        return [more()]
    if kind == 1:
        return [which_has()]
    if kind == 2:
        return [which_has(), more()]
    return counts()


def _vqa_multi_item(rng: random.Random, split: str) -> list[tuple[dict[str, Any], tuple]]:
    language = rng.choice(["en", "vi"])
    if rng.random() < 0.6:
        key, scene = _draw_in_split(rng, split, lambda: _random_scene(rng))
        keys = (key,)
        turns = _dialogue_about_scene(scene, rng, language)
        images = [_scene_image(scene, rng)]
    else:
        first_key, first = _draw_in_split(rng, split, lambda: _random_scene(rng))
        second_key, second = _draw_in_split(rng, split, lambda: _random_scene(rng))
        keys = (first_key, second_key)
        turns = _comparison(first, second, rng, language)
        images = [_scene_image(first, rng), _scene_image(second, rng)]
    turns = [(_nfc(question), _nfc(answer)) for question, answer in turns]
    return [_sample("vqa_multi", anchor, images, answer, keys) for anchor, answer in expand_turns(turns)]


# --- ocr -------------------------------------------------------------------------------------------------


def _random_text(rng: random.Random) -> tuple[tuple, tuple[str, str, dict]]:
    """A text to render: (key, (shown text, language, facts for questions))."""
    kind = rng.choice(["sign", "sign", "label", "price"])
    language = rng.choice(["en", "vi"])
    if kind == "sign":
        phrase = rng.choice(SIGNS_EN if language == "en" else SIGNS_VI)
        shown = phrase.upper() if rng.random() < 0.5 else _cap(phrase)
        return ("sign", phrase), (shown, language, {"kind": "sign"})
    if kind == "label":
        index, number = rng.randrange(len(LABELS)), rng.randint(1, 99)
        word = LABELS[index][0 if language == "en" else 1]
        return ("label", index, number, language), (f"{word} {number}", language, {"kind": "label", "number": number})
    index = rng.randrange(len(FOODS))
    food = FOODS[index][0 if language == "en" else 1]
    price = f"${rng.randint(1, 20)}" if language == "en" else f"{rng.randrange(10, 100, 5)}.000đ"
    facts = {"kind": "price", "food": food, "price": price}
    return ("price", index, price), (f"{_cap(food)}: {price}", language, facts)


def _transcription_query(rng: random.Random, language: str) -> str | None:
    # A quarter of single-image items have no query: the anchor is the image alone (plain OCR).
    if rng.random() < 0.25:
        return None
    if language == "en":
        return rng.choice(["What does the text in the image say?", "Read the text in the image."])
    return rng.choice(["Văn bản trong ảnh viết gì?", "Đọc chữ trong ảnh."])


def _ocr_item(rng: random.Random, split: str) -> list[tuple[dict[str, Any], tuple]]:
    query_language = rng.choice(["en", "vi"])
    if rng.random() < 0.25:
        first_key, (first, _, _) = _draw_in_split(rng, split, lambda: _random_text(rng))
        second_key, (second, _, _) = _draw_in_split(rng, split, lambda: _random_text(rng))
        images = [png_bytes(draw_text(first, rng)), png_bytes(draw_text(second, rng))]
        which = rng.randrange(3)
        queries = {
            "en": ["What does the first image say?", "What does the second image say?", "Read both images in order."],
            "vi": ["Ảnh thứ nhất viết gì?", "Ảnh thứ hai viết gì?", "Đọc lần lượt hai ảnh."],
        }
        query = queries[query_language][which]
        answer = [first, second, f"{first}; {second}"][which]
        return [_sample("ocr", query, images, answer, (first_key, second_key))]

    key, (shown, language, facts) = _draw_in_split(rng, split, lambda: _random_text(rng))
    image = png_bytes(draw_text(shown, rng))
    query, answer = _transcription_query(rng, query_language), shown
    if facts["kind"] == "label" and rng.random() < 0.5:
        number = facts["number"]
        query, answer = (
            ("What number is shown?", f"The number is {number}.")
            if query_language == "en"
            else ("Số trong ảnh là bao nhiêu?", f"Số trong ảnh là {number}.")
        )
    elif facts["kind"] == "price" and rng.random() < 0.5:
        # The question names the food in the language of the menu.
        food, price = facts["food"], facts["price"]
        query, answer = (
            (f"How much is the {food}?", f"The {food} costs {price}.")
            if language == "en"
            else (f"{_cap(food)} giá bao nhiêu?", f"{_cap(food)} giá {price}.")
        )
    return [_sample("ocr", query, [image], answer, (key,))]


_ITEM_MAKERS: dict[str, Callable[[random.Random, str], list[tuple[dict[str, Any], tuple]]]] = {
    "text_pair": _text_pair_item,
    "instr": _instr_item,
    "ocr": _ocr_item,
    "vqa_single": _vqa_single_item,
    "vqa_multi": _vqa_multi_item,
}
