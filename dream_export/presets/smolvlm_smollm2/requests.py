"""Text requests for the drafter's data, written from typed templates and topic lists (recipe v5).

``instructions.jsonl`` holds 400 hand-written instructions; the held-out fifth of them is what the
benchmarks measure, and the drafter trained on the other 320 plus the small target's own requests
(``train.selfinstruct``) agrees with the target on only ~40% of held-out answer tokens against ~75-80% on
text it trained on. These requests add the same kinds of work (facts and explanations, how-tos, stories and
poems, comparisons, code, rewriting and translation, emails, arithmetic and word problems) on ~330 other
subjects: ``template_requests()`` is deterministic for a seed and never returns a held-out instruction.
"""

from __future__ import annotations

import json
import random

from . import PRESET_DIR

INSTRUCTIONS = PRESET_DIR / "instructions.jsonl"


def instructions(split: str) -> list[str]:
    """The hand-written text prompts: ``train`` (4 of every 5) or ``heldout`` (every 5th, never trained on)."""
    rows = [json.loads(line) for line in INSTRUCTIONS.read_text().splitlines() if line.strip()]
    keep = (lambda i: i % 5 == 0) if split == "heldout" else (lambda i: i % 5 != 0)
    return [r["prompt"] for i, r in enumerate(rows) if keep(i)]


CONCEPTS = """photosynthesis|gravity|evaporation|a volcano|an earthquake|the water cycle|electricity|magnetism|friction|a rainbow|an eclipse|the moon's phases|a black hole|the greenhouse effect|climate change|erosion|a tornado|a hurricane|lightning|sound waves|light|a prism|a lever|a pulley|inertia|momentum|energy|kinetic energy|potential energy|heat|temperature|a thermostat|a battery|a solar panel|a wind turbine|a nuclear reactor|an atom|a molecule|DNA|a cell|a virus|bacteria|the immune system|a vaccine|the heart|the lungs|the brain|the skeleton|muscles|digestion|the kidneys|blood|sleep|dreams|memory|habits|the internet|a computer|a CPU|RAM|a hard drive|an operating system|a web browser|email|a password|encryption|a firewall|a database|a spreadsheet|an algorithm|machine learning|a neural network|a robot|a sensor|a camera|a GPS receiver|a lidar|an accelerometer|a gyroscope|a motor|a servo|a microcontroller|Wi-Fi|Bluetooth|a smartphone|a satellite|a rocket|an airplane|a helicopter|a submarine|a bicycle|a car engine|an electric car|a train|a bridge|a skyscraper|a dam|a lighthouse|a compass|a map|a clock|a calendar|money|a bank|inflation|taxes|a budget|a loan|interest|a stock market|trade|a democracy|an election|a constitution|a court|a library|a museum|a newspaper|a vote|the Roman Empire|the Renaissance|the Industrial Revolution|the printing press|the pyramids of Egypt|the Great Wall of China|the Olympic Games|the Silk Road|the Moon landing|the steam engine|the telephone|the light bulb|a rainforest|a desert|a coral reef|the ocean|a glacier|a river delta|a mountain range|a savanna|the Arctic|the Sahara|the Amazon river|the Pacific Ocean|the Alps|a food chain|an ecosystem|pollination|migration|hibernation|camouflage|evolution|fossils|dinosaurs|whales|bees|ants|penguins|elephants|octopuses|owls|sharks|frogs|butterflies|trees|mushrooms|seeds|soil|compost|recycling|plastic|glass|steel|wood|cotton|bread|cheese|yogurt|coffee|tea|chocolate|sugar|salt|vitamins|protein|fiber|exercise|stretching|meditation|stress|friendship|kindness|patience|curiosity|teamwork|leadership|a resume|a job interview|a presentation|a deadline|a meeting|feedback|a to-do list|time management|a hobby|gardening|painting|photography|music|a guitar|a piano|a poem|a novel|a fairy tale|a museum|chess|soccer|basketball|swimming|running|yoga|camping|hiking|fishing|a picnic|a birthday party|a wedding|a holiday|a passport|a hotel|an airport|a train station|a city|a village|a farm|a market|a restaurant|a hospital|a school|a university|a zoo|a park|a beach|an island|a forest|a cave|a waterfall|the sun|Mars|Jupiter|Saturn's rings|a comet|an asteroid|the Milky Way|a star|a telescope|a microscope|a thermometer|a barometer|a scale|a ruler|a magnet|a mirror|a lens|glasses|a refrigerator|a microwave oven|a washing machine|a vacuum cleaner|an elevator|a traffic light|a road|a tunnel|a ship|a harbor|an anchor|a sail|a kite|a balloon|a parachute|an umbrella|a raincoat|a tent|a flashlight|a candle|fire|smoke|a smoke detector|a fire extinguisher|first aid|a bandage|a fever|a cold|allergies|hand washing|a toothbrush|a dentist|a doctor|a nurse|a pharmacist|a teacher|a firefighter|a pilot|a farmer|a chef|an engineer|a scientist|an astronaut|a programmer|a librarian|a mechanic|an architect|a photographer|a journalist|a judge""".split("|")

CONCEPT_T = ["What is {}?", "Explain {} in simple terms.", "Why is {} important?", "Give three interesting facts about {}.",
             "Describe how {} works.", "Explain {} to a ten-year-old.", "What are the main parts of {}?",
             "Write a short paragraph about {}.", "What would happen without {}?", "Tell me something surprising about {}.",
             "What is the history of {}?", "What are the pros and cons of {}?", "Define {} in one sentence."]

ACTIVITIES = """make a cup of tea|bake bread|cook rice|boil an egg|make pancakes|make a sandwich|plant a tree|grow tomatoes|take care of a houseplant|clean a kitchen|organize a closet|fold a shirt|wash a car|change a flat tire|ride a bicycle|learn to swim|start running|improve my sleep|drink more water|eat more vegetables|save money|make a budget|prepare for a job interview|write a cover letter|give a good presentation|study for an exam|learn a new language|learn to play the guitar|take better photos|start a journal|read more books|reduce screen time|stay focused while working|manage stress|make new friends|apologize to a friend|plan a birthday party|plan a trip to the mountains|pack for a beach vacation|travel on a budget|stay safe while hiking|set up a tent|build a campfire safely|train a puppy|care for a cat|keep a fish tank clean|recycle at home|save energy at home|reduce food waste|fix a leaking tap|hang a picture|paint a room|set up a home Wi-Fi network|back up my photos|choose a strong password|learn to code|debug a program|write clean code|calibrate a robot's camera|charge a robot's battery safely|program a line-following robot|build a simple robot arm|test a distance sensor|teach a child to read|help a friend who is sad|prepare for a storm|make a first aid kit|cross the street safely|give feedback to a coworker|run a short meeting|write a thank-you note|memorize a speech|prepare a healthy breakfast|stretch after exercise|start meditating|wake up earlier|keep a plant alive in winter|choose a good watermelon|make lemonade|make a fruit salad|make soup|roast vegetables|make a smoothie|store leftovers safely|sharpen a knife safely|clean a laptop keyboard|speed up a slow computer|take notes in class|learn multiplication tables|draw a cat|write a haiku|tell a good story|prepare for a marathon|learn to juggle""".split("|")

ACT_T = ["How do I {}?", "Give me some tips to {}.", "List the steps to {}.", "What is the easiest way to {}?",
         "What mistakes should I avoid when I {}?", "Explain how to {}, step by step.", "What do I need to {}?",
         "I want to {}. Where should I start?"]

STORY = """a robot that learns to paint|a lost kitten in a big city|a dragon who is afraid of fire|two friends who find a treasure map|a girl who can talk to birds|a boy who builds a rocket in his backyard|a talking tree|a snowman that comes to life|a pirate who cannot swim|a small village by the sea|a detective cat|a clock that runs backwards|a lonely lighthouse keeper|a dog's first day at the beach|a robot vacuum that escapes the house|an astronaut who finds a garden on Mars|a magic pencil|a baker who bakes the biggest cake|a shy owl|a rainy day at school|a fox and a crow|a king who loved socks|a river that wanted to see the ocean|a delivery drone that gets lost|a library at midnight|a garden in winter|a friendly ghost|a time traveler who visits the dinosaurs|a girl who wins a chess tournament|a turtle who wants to fly|the first day of spring|an old bicycle|a city of robots|a moon that forgot to rise|a farmer and a clever goat|a storm at sea|a school trip to the museum|a penguin who visits the desert|a secret door in a castle|a mouse who plays the violin""".split("|")

STORY_T = ["Write a short story about {}.", "Write a poem about {}.", "Write a haiku about {}.",
           "Write a bedtime story about {}.", "Write a four-line rhyming poem about {}.", "Tell a funny story about {}.",
           "Write the opening paragraph of a novel about {}."]

PAIRS = """a cat|a dog;weather|climate;a virus|bacteria;a lake|a sea;a frog|a toad;a crocodile|an alligator;a planet|a star;speed|velocity;mass|weight;a list|a tuple in Python;a function|a method;RAM|storage;hardware|software;a meteor|a meteorite;an ocean|a river;a city|a town;a democracy|a monarchy;a simile|a metaphor;an adjective|an adverb;a noun|a verb;baking|frying;tea|coffee;butter|margarine;walking|running;summer|winter;a laptop|a tablet;Wi-Fi|Bluetooth;a camera|a lidar;a motor|an engine;AC|DC electricity;a hurricane|a tornado;a rabbit|a hare;a moth|a butterfly;a violin|a cello;a novel|a short story;renting|buying a house;saving|investing;a bus|a train;email|a letter;a museum|a gallery;an insect|a spider;plants|animals;mitosis|meiosis;a fruit|a vegetable;a solid|a liquid;a conductor|an insulator;while loops|for loops;Python|JavaScript;a compiler|an interpreter""".split(";")

PAIR_T = ["What is the difference between {} and {}?", "Compare {} and {}.", "How are {} and {} alike?",
          "Which is better for a beginner to learn about first, {} or {}? Explain."]

CODE = """reverses a string|checks if a number is prime|finds the largest number in a list|counts the vowels in a word|returns the factorial of a number|checks if a word is a palindrome|sorts a list of names alphabetically|removes duplicates from a list|converts Celsius to Fahrenheit|computes the average of a list|returns the Fibonacci numbers up to n|finds the second smallest number in a list|merges two dictionaries|counts the lines in a text file|checks if a year is a leap year|returns the sum of the digits of a number|capitalizes every word in a sentence|finds the most common letter in a string|flattens a list of lists|checks whether two words are anagrams|converts a list of strings to uppercase|returns the even numbers from a list|computes the distance between two points|reads a CSV file and prints each row|measures how long a function takes|validates an email address with a simple rule|rounds a price to two decimals|generates a random password|moves a robot forward until a sensor reads less than 20 cm|averages the last five readings of a distance sensor|converts wheel rotations to distance travelled|clamps a motor speed between -100 and 100""".split("|")
CODE_T = ["Write a Python function that {}.", "Write Python code that {}, and explain it.", "How would you write a program that {}?"]

SENT = """The cat sat on the warm windowsill all afternoon.|We went to the market early to buy fresh bread.|The robot picked up the red block and placed it in the box.|My brother forgot his umbrella, so he got wet on the way home.|The meeting has been moved from Tuesday to Thursday.|She practiced the piano every evening for a month.|The train was late because of the heavy snow.|Please remember to turn off the lights when you leave.|The children built a sandcastle near the water.|Our team finished the project two days early.|The museum is free on the first Sunday of every month.|He cooked a delicious soup with vegetables from the garden.|The sensor stopped working after the battery ran out.|I like reading books about space and planets.|The dog barked loudly at the mail carrier.""".split("|")
SENT_T = ["Rewrite this sentence in a more formal way: \"{}\"", "Translate into French: \"{}\"", "Translate into Spanish: \"{}\"",
          "Translate into German: \"{}\"", "Rewrite this sentence in the past tense: \"{}\"", "Make this sentence shorter: \"{}\"",
          "Find the verbs in this sentence: \"{}\"", "Is this sentence grammatically correct? \"{}\"",
          "Turn this sentence into a question: \"{}\"", "Summarize in a few words: \"{}\""]

EMAIL = """my manager to ask for a day off next Friday|a neighbor to thank them for watering my plants|a teacher to say my child will miss school tomorrow|a customer to apologize for a late delivery|a friend to invite them to dinner on Saturday|a landlord about a broken heater|a coworker to ask for help with a report|a hotel to ask about late check-in|a company to ask about a job opening|my team to announce a new project|a client to confirm a meeting time|a shop to return a broken toaster""".split("|")
EMAIL_T = ["Write a short email to {}.", "Write a polite message to {}."]

NAMES = ["Tom", "Anna", "Sara", "Leo", "Maya", "Sam", "Nina", "Omar", "Lucy", "Ben"]
ITEMS = [("apples", "bag"), ("pencils", "box"), ("cookies", "jar"), ("marbles", "bag"), ("stickers", "sheet"), ("eggs", "carton")]


def math_items(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    out = []
    for _ in range(n):
        kind = rng.randrange(7)
        a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 12)
        name, (item, unit) = rng.choice(NAMES), rng.choice(ITEMS)
        if kind == 0:
            out.append((f"What is {a} plus {b}?", "short", "arithmetic"))
        elif kind == 1:
            out.append((f"What is {a * c} divided by {c}?", "short", "arithmetic"))
        elif kind == 2:
            out.append((f"What is {a} times {c}?", "short", "arithmetic"))
        elif kind == 3:
            out.append((f"{name} has {a} {item}. {name} gives away {min(b, a - 1)}. How many {item} are left? Explain your reasoning.", "long", "math"))
        elif kind == 4:
            out.append((f"A {unit} holds {c} {item}. How many {item} are in {b} {unit}s? Show your work.", "long", "math"))
        elif kind == 5:
            out.append((f"A robot moves {c} meters every minute. How far does it go in {b} minutes?", "short", "math"))
        else:
            out.append((f"What is {c * 10} percent of {a * 10}?", "short", "arithmetic"))
    return out


def template_requests(seed: int = 0) -> list[dict]:
    """About 2,100 requests ({prompt, kind, topic}), shuffled with ``seed``; none is a held-out instruction."""
    rng = random.Random(seed)
    long_concept = ("paragraph", "Describe", "history", "pros")
    groups = [  # subjects, templates, how many templates each (None: all), kind (None: by template), topic
        (CONCEPTS, CONCEPT_T, 4, None, "concept"), (ACTIVITIES, ACT_T, 3, "long", "howto"),
        (STORY, STORY_T, 3, "long", "creative"), ([p.split("|") for p in PAIRS], PAIR_T, 2, "long", "compare"),
        (CODE, CODE_T, 2, "long", "python"), (SENT, SENT_T, 5, "short", "language"), (EMAIL, EMAIL_T, None, "long", "email")]
    rows = []
    for subjects, templates, k, kind, topic in groups:
        for x in subjects:
            for t in (rng.sample(templates, k) if k else templates):
                text = t.format(*x) if isinstance(x, list) else t.format(x)
                rows.append((text, kind or ("long" if any(w in t for w in long_concept) else "short"), topic))
    rows += math_items(rng, 200)
    rng.shuffle(rows)
    held = set(instructions("heldout"))
    return [{"prompt": p, "kind": k, "topic": t} for p, k, t in dict.fromkeys(rows) if p not in held]


LLAMA_HINT = "pip install llama-cpp-python  (builds llama.cpp from source: several minutes)"


def llama_cpp_answers(chat_texts: list[str], path, max_new_tokens: int, workers: int = 2) -> list[list[int]]:
    """Greedy answers (token ids, the end token included when reached) to already-templated prompts, written by
    llama.cpp (``llama-cpp-python``) from the wheel's GGUF: ~110 answer tokens/s on 2 cores against ~20 for
    transformers' batched ``generate`` of the assembled target. ``workers`` processes of one thread each take
    every ``workers``-th prompt. The text is SmolLM2-Instruct's (Q4_1, no scene LoRA), not exactly the target's:
    what the drafter learns is still the target's, because its features and next-token distributions come from
    the target's own forward pass over this text (teacher forcing), as EAGLE trains on text it did not write.
    Resumable: each worker appends to PATH.partK; PATH (JSON) is written once all are done."""
    import importlib.util
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path

    from ...errors import DreamExportError

    path = Path(path)
    meta = {"max_new_tokens": max_new_tokens, "chat_texts": chat_texts}
    cached = _cached(path, meta)
    if cached is not None:
        return cached
    if importlib.util.find_spec("llama_cpp") is None:
        raise DreamExportError(f"the drafter recipe writes its extra answers with llama.cpp, which is not installed: "
                               f"{LLAMA_HINT}")
    parts = [path.with_name(f"{path.name}.part{k}") for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_llama_worker, [(chat_texts[k::workers], str(parts[k]), max_new_tokens) for k in range(workers)]))
    return _finish(path, parts, ("text",), chat_texts, meta)


def _cached(path, meta: dict) -> list | None:
    """The answers in PATH when it was written for exactly ``meta`` (prompts and settings), else None."""
    if not path.is_file():
        return None
    cached = json.loads(path.read_text())
    return cached["answers"] if all(cached.get(k) == v for k, v in meta.items()) else None


def _finish(path, parts: list, fields: tuple, keys: list, meta: dict) -> list:
    """Every worker's answers in ``keys`` order, written to PATH with ``meta`` (temp file, then rename); the workers'
    files are removed."""
    import os

    done = {}
    for part in parts:
        done.update(_read_part(part, *fields))
    answers = [done[k] for k in keys]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**meta, "answers": answers}))
    os.replace(tmp, path)
    for part in parts:
        part.unlink()
    return answers


def _read_part(part, *fields: str) -> dict:
    """The complete lines of a worker's file (a line cut short by an interruption is dropped): answer by the row's
    ``fields`` (one field: its value; several: a tuple)."""
    from pathlib import Path

    done = {}
    if Path(part).is_file():
        for line in Path(part).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row[fields[0]] if len(fields) == 1 else tuple(row[f] for f in fields)] = row["answer"]
    return done


def _resume(part, *fields: str) -> dict:
    """``_read_part``, and the file rewritten with only its complete lines, so that new ones never follow a line cut
    short."""
    import os

    done = _read_part(part, *fields)
    tmp = f"{part}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps({**dict(zip(fields, key if len(fields) > 1 else (key,))), "answer": a}) + "\n"
                     for key, a in done.items())
    os.replace(tmp, part)
    return done


def _llama_worker(job) -> int:
    from llama_cpp import Llama

    from . import gguf_path

    texts, part, max_new_tokens = job
    done = _resume(part, "text")
    llm = Llama(model_path=str(gguf_path()), n_threads=1, n_threads_batch=1, n_ctx=2048, n_batch=256, verbose=False)
    stop = {llm.token_eos(), *llm.tokenize(b"<|im_end|>", add_bos=False, special=True)}
    with open(part, "a") as f:
        for text in texts:
            if text in done:
                continue
            ids = []
            for t in llm.generate(llm.tokenize(text.encode(), add_bos=False, special=True), top_k=1, top_p=1.0,
                                  temp=0.0, repeat_penalty=1.0, reset=True):
                ids.append(int(t))
                if t in stop or len(ids) >= max_new_tokens:
                    break
            f.write(json.dumps({"text": text, "answer": ids}) + "\n")
            f.flush()
    return len(texts)


def bundle_answers(samples: list[tuple[list, str]], bundle, path, max_new_tokens: int, workers: int = 2) -> list[list[int]]:
    """Greedy answers (token ids, the stop token included when reached) of an exported bundle's plain decoding, the
    torch-free runtime on the CPU: the text the shipped target writes (int4: what the drafter meets at run time), at
    ~75 answer tokens/s per one-thread process here. ``samples``: (images, prompt); images may be PIL images.
    ``workers`` processes of one thread each take every ``workers``-th sample. Resumable like ``llama_cpp_answers``:
    each worker appends to PATH.partK; PATH (JSON) is written once all are done."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path

    path = Path(path)
    prompts = [p for _, p in samples]
    meta = {"max_new_tokens": max_new_tokens, "prompts": prompts}
    cached = _cached(path, meta)
    if cached is not None:
        return cached
    parts = [path.with_name(f"{path.name}.part{k}") for k in range(workers)]
    jobs = [(str(bundle), [(i, *samples[i]) for i in range(k, len(samples), workers)], str(parts[k]), max_new_tokens)
            for k in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:  # no fork of torch's threads
        list(pool.map(_bundle_worker, jobs))
    return _finish(path, parts, ("i", "prompt"), list(enumerate(prompts)), meta)


def _bundle_worker(job) -> int:
    from runtime.pipeline import Pipeline

    bundle, items, part, max_new_tokens = job
    done = _resume(part, "i", "prompt")
    pipe = Pipeline.from_bundle(bundle, threads=1)
    with open(part, "a") as f:
        for i, images, prompt in items:
            if (i, prompt) in done:
                continue
            r = pipe.generate(images, prompt, max_new_tokens=max_new_tokens, speculative=False)
            f.write(json.dumps({"i": i, "prompt": prompt, "answer": r.token_ids}) + "\n")
            f.flush()
    return len(items)
