"""Training text for a drafter, made on this machine: the target's own answers to varied prompts
written here, and offline text (the Python standard library's source). No benchmark sets.

The prompts are built from templates; none is one of `bench/prompts.jsonl`, which stays held out.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

LANGUAGES = [
    "Python", "JavaScript", "TypeScript", "C", "C++", "Rust", "Go", "Java", "Ruby", "Bash", "Kotlin", "PHP",
    "C#", "Swift", "Lua", "Perl", "Scala", "Haskell", "R", "Dart",
]
SHARES = {"code": 0.5, "prose": 0.3, "math": 0.2}  # of the prompts answered
CODE_TASKS = [
    "computes the factorial of n", "returns the n-th Fibonacci number", "merges two sorted lists",
    "removes duplicates from a list while keeping order", "counts the vowels in a string",
    "checks whether a string is a palindrome", "finds the largest element in an array",
    "converts Celsius to Fahrenheit", "flattens a nested list", "computes the greatest common divisor",
    "sorts a list of words by length", "parses a date string in ISO format", "implements bubble sort",
    "implements quicksort", "counts word frequencies in a text", "validates an email address",
    "generates all permutations of a list", "transposes a matrix", "computes the mean and median",
    "splits a list into chunks of size n", "capitalizes the first letter of every word",
    "checks whether two strings are anagrams", "sums the digits of a number", "finds the second largest number",
    "implements a queue with two stacks", "converts a number to binary", "computes the power set of a set",
    "rotates an array by k positions", "checks whether parentheses are balanced", "implements a simple LRU cache",
    "reads a text file and prints its longest line", "builds a dictionary from two lists",
    "computes the dot product of two vectors", "finds common elements of two lists", "implements depth-first search",
    "implements breadth-first search on a graph", "returns the prime factors of n", "formats a number with commas",
    "counts the lines in a file", "generates a random password",
    "finds the longest common prefix of a list of strings", "computes the moving average of a list",
    "groups a list of records by a key", "merges two dictionaries", "reverses the words in a sentence",
    "checks whether a year is a leap year", "converts a Roman numeral to an integer", "computes a running total",
    "finds the missing number in a sequence", "retries a failing operation with exponential backoff",
    "parses command-line arguments", "writes a list of rows to a CSV file", "computes the Levenshtein distance",
    "implements a binary tree with insert and search", "implements a min-heap", "counts the nodes of a tree",
    "measures how long another function takes", "reads a JSON file and prints one field",
    "finds the k most frequent words", "validates a sudoku row", "draws a text progress bar",
    "converts a string to snake_case", "caches the results of an expensive function",
    "implements a linked list with append and delete", "shuffles a list in place",
    "downloads a web page and counts its links", "renames every file in a folder to lower case",
    "implements a bank account class with deposit and withdraw", "parses a configuration file of key=value lines",
    "implements a trie with insert and lookup", "finds the shortest path with Dijkstra's algorithm",
    "computes the number of days between two dates", "encodes and decodes a string in Base64",
    "implements matrix multiplication", "checks whether a number is a perfect square",
    "implements a rate limiter", "converts a list of dictionaries to a table", "computes the standard deviation",
    "validates a credit card number with the Luhn algorithm", "implements a simple event emitter",
    "finds all files larger than a given size", "implements merge sort", "implements insertion sort",
    "counts how often each character appears in a string", "compresses a string with run-length encoding",
    "implements a priority queue", "finds the longest increasing subsequence", "computes Pascal's triangle",
    "serializes an object to JSON and back", "implements a thread-safe counter", "computes a hash of a file",
    "implements a 2D point class with distance", "reverses a string without built-in functions",
    "checks whether a graph has a cycle", "implements a simple state machine for a traffic light",
    "reads numbers from standard input and prints their sum", "implements the game of FizzBuzz",
    "finds the intersection of two intervals", "removes all whitespace from a string",
    "implements a tokenizer for arithmetic expressions", "evaluates a postfix expression",
]
SQL_TASKS = [
    "lists the employees hired after 2020, newest first", "counts the orders placed in each month",
    "finds duplicate email addresses in a users table", "joins products with their categories",
    "deletes log rows older than 30 days", "computes the average salary per department",
    "creates a table for blog posts with an index on the author", "raises the prices of one category by 10 percent",
    "finds the students who are enrolled in no course", "returns the second highest salary",
    "lists each author with the number of books they wrote", "finds the products that were never ordered",
]
SQL_FORMS = [
    "Write a SQL query that {task}.", "Give me a SQL query that {task}.", "How do I write a SQL statement that {task}?",
    "Write a SQL query that {task}, and explain each clause.",
]
CODE_FORMS = [
    "Write a {lang} function that {task}.", "In {lang}, write code that {task}.",
    "Show me a {lang} program that {task}, with comments.", "How do I write a {lang} function that {task}?",
    "Write a {lang} function that {task}, and add a short usage example.",
    "Implement a {lang} function that {task} and explain how it works.", "I need {lang} code that {task}. Keep it short.",
    "Give me a {lang} snippet that {task}.", "Write a small {lang} module that {task}, with a test.",
    "Can you show how to write a {lang} function that {task}? Explain the edge cases.",
]
CODE_EXPLAIN = [
    "What is the time complexity of {algo}? Explain it briefly with a {lang} implementation.",
    "Implement {algo} in {lang} and explain its complexity.",
    "Compare {algo} with a simpler approach, and show {lang} code for it.",
]
ALGORITHMS = [
    "merge sort", "quicksort", "heap sort", "depth-first search", "breadth-first search",
    "dynamic programming for the knapsack problem",
    "the two-pointer technique", "a sliding window maximum", "union-find", "topological sorting", "Dijkstra's algorithm",
    "the sieve of Eratosthenes", "counting sort", "a hash table lookup", "binary tree traversal",
]
CONCEPTS = [
    "a closure", "a generator", "a decorator", "an iterator", "exception handling", "a class and an object",
    "inheritance", "a lambda function", "a regular expression", "a set", "a queue", "a binary search tree",
    "async and await", "a unit test", "string formatting", "type hints", "a context manager", "a pointer",
    "an interface", "a higher-order function", "memoization", "a hash function", "pattern matching", "an enum",
    "a stack", "a linked list", "dependency injection", "immutability", "a REST API", "a thread", "a mutex",
    "garbage collection", "a virtual environment", "an array slice", "string interpolation", "a dictionary",
]
MIXED_FORMS = [
    "What is {concept}? Explain briefly and show a {lang} example.",
    "Explain {concept} in a few sentences, then give a short {lang} example.",
    "Describe when to use {concept}, with a small {lang} code sample.",
    "Teach me {concept} in {lang}: a short explanation and one example.",
]
PROSE_TOPICS = [
    "a fox who learns to fly", "an old clockmaker", "a city after the rain", "a robot gardener",
    "the first snow of winter", "a family dinner", "a lost cat finding its way home", "a forest at dawn",
    "a musician on a train", "an abandoned castle", "a summer festival", "a girl who collects stones",
    "a bakery at midnight", "the last day of school", "a storm over the desert", "a friendship between two rivals",
    "a walk through an old library", "a dragon who is afraid of fire", "a village by a river", "a long journey by bicycle",
    "a painter who loses her colours", "two strangers stuck in an elevator", "a ship's cook", "an island without clocks",
    "the night before an exam", "a grandmother's garden", "a detective who hates rain", "a small town's first cinema",
    "a mountain hut in winter", "a harbour at sunrise", "a child's first day at school", "an astronaut coming home",
    "a fisherman and a storm", "a letter that arrives fifty years late", "a night train across Europe", "a beekeeper",
    "the old bridge in town", "a busy train station", "a street musician", "a lonely lighthouse on a cliff",
]
PROSE_FORMS = [
    "Write a short story about {topic}.", "Write a poem about {topic}.", "Describe {topic} in a few paragraphs.",
    "Write the opening paragraph of a novel about {topic}.", "Tell me a bedtime story about {topic}.",
    "Write a diary entry about {topic}.", "Write a short scene, with dialogue, about {topic}.",
    "Write a short story for children about {topic}.", "Describe {topic} using all five senses.",
]
ESSAY_TOPICS = [
    "reading every day", "living in a big city", "learning to play an instrument", "working in a team",
    "keeping a journal", "spending time in nature", "volunteering", "learning history", "eating together as a family",
    "walking instead of driving", "having a hobby", "travelling alone", "growing your own vegetables",
    "getting up early", "studying abroad", "writing letters by hand", "visiting museums", "doing sports as a child",
]
ESSAY_FORMS = [
    "Write a short essay about {topic}.", "What are the benefits of {topic}?", "What are the pros and cons of {topic}?",
    "Why do many people like {topic}?", "Write a persuasive paragraph in favour of {topic}.",
    "Give advice to someone who wants to start {topic}.", "Write a letter to a friend about {topic}.",
    "Write a blog post about {topic}.",
]
EXPLAIN_TOPICS = [
    "photosynthesis", "how vaccines work", "the water cycle", "gravity", "how the internet works",
    "inflation", "black holes", "the causes of the First World War", "machine learning", "how a car engine works",
    "recursion", "compound interest", "climate change", "the immune system", "how airplanes fly",
    "democracy", "the theory of evolution", "electricity", "how a compiler works", "the stock market",
]
EXPLAIN_FORMS = [
    "Explain {topic} in simple terms.", "What is {topic}?", "Give a short overview of {topic}.",
    "Explain {topic} to a ten-year-old.", "What are the main ideas behind {topic}?",
]
CHAT = [
    "How can I sleep better?", "What should I cook for dinner tonight?", "Give me tips for studying for exams.",
    "How do I start running?", "What are good habits for a healthy life?", "How can I be more productive at work?",
    "Suggest a weekend plan for a rainy day.", "How do I make new friends in a new city?",
    "What are some good books for beginners in programming?", "How do I prepare for a job interview?",
    "How do I take care of a houseplant?", "What is a good way to learn to cook?",
    "What are the pros and cons of working from home?", "Why do people keep pets?", "How do I save money each month?",
    "What makes a good teacher?", "How can I reduce stress before a presentation?", "Why is sleep important?",
    "What should I pack for a week of hiking?", "How do I write a polite complaint email?",
    "What are the advantages of public transport?", "How do I keep a conversation going?",
]
NAMES = ["Anna", "Ben", "Carlos", "Dina", "Emil", "Fatima", "George", "Hana", "Ivan", "Julia", "Kofi", "Lena"]
ITEMS = ["marbles", "books", "cookies", "stickers", "oranges", "pencils", "cards", "shells", "coins", "flowers"]
MATH_FORMS = [
    "{a} has {x} {item}. {b} gives {a} {y} more, then {a} loses {z}. How many {item} does {a} have now?",
    "A box holds {x} {item}. How many {item} are in {y} boxes?",
    "{a} reads {x} pages a day. How many days does it take to read a book of {p} pages?",
    "A car uses {x} liters of fuel per 100 km. How much fuel does it need for {p} km?",
    "{a} buys {y} {item} at {x} dollars each and pays with a {bill} dollar bill. How much change does {a} get?",
    "The price of a jacket is {p} dollars. It is reduced by {pct}%. What is the new price?",
    "{a} and {b} share {p} {item} in the ratio {x}:{y}. How many does each get?",
    "A garden is {x} meters long and {y} meters wide. What is its area, and how much fence is needed around it?",
    "What is {x} times {y} plus {z}? Explain the steps.",
    "Solve for x: {z}x + {x} = {p}.", "What is {pct}% of {p}? Show your work.",
    "A cyclist rides {x} km in {z} hours. What is the average speed?",
    "The average of three numbers is {x}. Two of them are {y} and {z}. What is the third?",
    "A shop sells {item} in packs of {z}. {a} needs {p}. How many packs must {a} buy?",
    "{a} spends {pct}% of {p} dollars on rent. How much is left?",
    "Convert {p} minutes to hours and minutes.", "What is {x}/{y} plus {z}/{y} as a fraction in lowest terms?",
    "A tank fills at {x} liters per minute. How long does it take to fill {p} liters?",
    "{a} runs {x} km every day for {y} days. How many kilometers is that in total?",
    "A class has {p} students. {pct}% of them walk to school. How many students walk?",
    "{a} is {x} years old. {b} is {y} years older. How old will {b} be in {z} years?",
    "A recipe needs {x} eggs for {z} people. How many eggs are needed for {y} people?",
    "A bus leaves at 8:{x:02d} and the trip takes {y} minutes. When does it arrive?",
    "The sum of two numbers is {p} and one of them is {x}. What is the other number?",
    "{a} earns {x} dollars an hour and works {y} hours. After spending {z} dollars, how much is left?",
    "A square has a perimeter of {p} cm. What is the length of one side and its area?",
]


def _code(rng: random.Random) -> list[str]:
    prompts = [rng.choice(CODE_FORMS).format(lang=lang, task=task) for lang in LANGUAGES for task in CODE_TASKS]
    prompts += [f.format(task=t) for t in SQL_TASKS for f in SQL_FORMS]
    prompts += [rng.choice(CODE_EXPLAIN).format(algo=a, lang=lang) for a in ALGORITHMS for lang in rng.sample(LANGUAGES, 4)]
    return prompts + [rng.choice(MIXED_FORMS).format(concept=c, lang=lang) for c in CONCEPTS for lang in rng.sample(LANGUAGES, 3)]


def _prose() -> list[str]:
    prompts = [f.format(topic=t) for t in PROSE_TOPICS for f in PROSE_FORMS]
    prompts += [f.format(topic=t) for t in ESSAY_TOPICS for f in ESSAY_FORMS]
    return prompts + [f.format(topic=t) for t in EXPLAIN_TOPICS for f in EXPLAIN_FORMS] + CHAT


def _math(rng: random.Random, n: int) -> list[str]:
    prompts = []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        x, y, z = rng.randint(2, 40), rng.randint(2, 30), rng.randint(1, 9)
        p = rng.choice([120, 240, 300, 360, 450, 600, 750, 900])
        prompts.append(rng.choice(MATH_FORMS).format(
            a=a, b=b, x=x, y=y, z=z, p=p, item=rng.choice(ITEMS), pct=rng.choice([10, 15, 20, 25, 30]),
            bill=rng.choice([50, 100, 200])))
    return prompts


def training_prompts(seed: int = 0) -> list[tuple[str, str]]:
    """(category, user message) pairs in a random order that keeps every prefix near `SHARES`
    (a run answers as many as its token budget allows); ends when a category runs out."""
    rng = random.Random(seed)
    pools = {"code": _code(rng), "prose": _prose(), "math": _math(rng, 800)}
    for pool in pools.values():
        rng.shuffle(pool)
    prompts = []
    while True:
        category = rng.choices(list(SHARES), weights=list(SHARES.values()))[0]
        if not pools[category]:
            return prompts
        prompts.append((category, pools[category].pop()))


def stdlib_chunks(n_chunks: int, chars: int = 1500, seed: int = 0) -> list[str]:
    """Pieces of the Python standard library's source, a few per file, from files in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 4000)
    rng = random.Random(seed)
    rng.shuffle(files)
    chunks = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="ignore")
        for start in range(0, min(len(text), 3 * chars), chars):
            chunks.append(text[start : start + chars])
        if len(chunks) >= n_chunks:
            break
    return chunks[:n_chunks]
