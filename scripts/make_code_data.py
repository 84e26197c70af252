"""Write data/code/train.jsonl: small Python functions in the HumanEval layout (signature + docstring -> body).

Hand-written for this project (not taken from HumanEval), so evaluating on
HumanEval stays clean. Each function is checked by running its examples.
Run: python scripts/make_code_data.py
"""

from __future__ import annotations

import json
from pathlib import Path

FUNCTIONS = [
    (
        "def square_all(values: list) -> list:",
        "Return a list with every number squared.\n    >>> square_all([1, 2, 3])\n    [1, 4, 9]",
        "return [v * v for v in values]",
    ),
    (
        "def count_vowels(text: str) -> int:",
        "Count the vowels (a, e, i, o, u) in text, ignoring case.\n    >>> count_vowels('Hello')\n    2",
        "return sum(1 for ch in text.lower() if ch in 'aeiou')",
    ),
    ("def is_even(n: int) -> bool:", "Return True when n is even.\n    >>> is_even(4)\n    True", "return n % 2 == 0"),
    (
        "def reverse_words(sentence: str) -> str:",
        "Reverse the order of the words in a sentence.\n    >>> reverse_words('a b c')\n    'c b a'",
        "return ' '.join(reversed(sentence.split()))",
    ),
    (
        "def max_of_three(a: int, b: int, c: int) -> int:",
        "Return the largest of three numbers.\n    >>> max_of_three(1, 5, 3)\n    5",
        "return max(a, b, c)",
    ),
    (
        "def factorial(n: int) -> int:",
        "Return n! for n >= 0.\n    >>> factorial(5)\n    120",
        "result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
    ),
    (
        "def fizzbuzz(n: int) -> str:",
        "Return 'Fizz' for multiples of 3, 'Buzz' for 5, 'FizzBuzz' for both, else the number as text.\n    >>> fizzbuzz(15)\n    'FizzBuzz'",
        "if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)",
    ),
    (
        "def mean(values: list) -> float:",
        "Return the arithmetic mean of a non-empty list.\n    >>> mean([1, 2, 3, 4])\n    2.5",
        "return sum(values) / len(values)",
    ),
    (
        "def unique_sorted(values: list) -> list:",
        "Return the distinct values in increasing order.\n    >>> unique_sorted([3, 1, 3, 2])\n    [1, 2, 3]",
        "return sorted(set(values))",
    ),
    (
        "def capitalize_words(text: str) -> str:",
        "Capitalize the first letter of every word.\n    >>> capitalize_words('hello big world')\n    'Hello Big World'",
        "return ' '.join(word[:1].upper() + word[1:] for word in text.split(' '))",
    ),
    (
        "def sum_digits(n: int) -> int:",
        "Return the sum of the decimal digits of a non-negative integer.\n    >>> sum_digits(1234)\n    10",
        "return sum(int(d) for d in str(n))",
    ),
    (
        "def is_palindrome(text: str) -> bool:",
        "Return True when text reads the same backwards.\n    >>> is_palindrome('level')\n    True",
        "return text == text[::-1]",
    ),
    (
        "def flatten(nested: list) -> list:",
        "Flatten a list of lists by one level.\n    >>> flatten([[1, 2], [3], []])\n    [1, 2, 3]",
        "return [item for part in nested for item in part]",
    ),
    (
        "def count_words(text: str) -> dict:",
        "Map each word to how often it occurs.\n    >>> count_words('a b a')\n    {'a': 2, 'b': 1}",
        "counts = {}\n    for word in text.split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts",
    ),
    (
        "def fibonacci(n: int) -> int:",
        "Return the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1.\n    >>> fibonacci(10)\n    55",
        "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    ),
    (
        "def is_prime(n: int) -> bool:",
        "Return True when n is a prime number.\n    >>> is_prime(7)\n    True",
        "if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n            return False\n        i += 1\n    return True",
    ),
    (
        "def clamp(x: float, low: float, high: float) -> float:",
        "Limit x to the range [low, high].\n    >>> clamp(12, 0, 10)\n    10",
        "return max(low, min(x, high))",
    ),
    (
        "def second_largest(values: list) -> int:",
        "Return the second largest distinct value, or None when there is none.\n    >>> second_largest([4, 1, 4, 3])\n    3",
        "distinct = sorted(set(values))\n    return distinct[-2] if len(distinct) > 1 else None",
    ),
    (
        "def remove_duplicates(values: list) -> list:",
        "Remove repeated values, keeping the first occurrence of each.\n    >>> remove_duplicates([1, 2, 1, 3, 2])\n    [1, 2, 3]",
        "seen = set()\n    result = []\n    for v in values:\n        if v not in seen:\n            seen.add(v)\n            result.append(v)\n    return result",
    ),
    (
        "def chunk(values: list, size: int) -> list:",
        "Split values into consecutive chunks of the given size.\n    >>> chunk([1, 2, 3, 4, 5], 2)\n    [[1, 2], [3, 4], [5]]",
        "return [values[i:i + size] for i in range(0, len(values), size)]",
    ),
    (
        "def celsius_to_fahrenheit(c: float) -> float:",
        "Convert a temperature from Celsius to Fahrenheit.\n    >>> celsius_to_fahrenheit(100)\n    212.0",
        "return c * 9 / 5 + 32",
    ),
    (
        "def gcd(a: int, b: int) -> int:",
        "Return the greatest common divisor of two positive integers.\n    >>> gcd(12, 18)\n    6",
        "while b:\n        a, b = b, a % b\n    return a",
    ),
    (
        "def product(values: list) -> int:",
        "Return the product of all numbers (1 for an empty list).\n    >>> product([2, 3, 4])\n    24",
        "result = 1\n    for v in values:\n        result *= v\n    return result",
    ),
    (
        "def only_positive(values: list) -> list:",
        "Keep the numbers greater than zero, in order.\n    >>> only_positive([-1, 2, 0, 5])\n    [2, 5]",
        "return [v for v in values if v > 0]",
    ),
    (
        "def longest_word(text: str) -> str:",
        "Return the longest word; the first one wins a tie.\n    >>> longest_word('a bbb cc')\n    'bbb'",
        "best = ''\n    for word in text.split():\n        if len(word) > len(best):\n            best = word\n    return best",
    ),
    (
        "def count_char(text: str, ch: str) -> int:",
        "Count how many times the character ch appears in text.\n    >>> count_char('banana', 'a')\n    3",
        "return sum(1 for c in text if c == ch)",
    ),
    (
        "def running_sum(values: list) -> list:",
        "Return the cumulative sums of the list.\n    >>> running_sum([1, 2, 3])\n    [1, 3, 6]",
        "total = 0\n    result = []\n    for v in values:\n        total += v\n        result.append(total)\n    return result",
    ),
    (
        "def is_sorted(values: list) -> bool:",
        "Return True when the list is in non-decreasing order.\n    >>> is_sorted([1, 2, 2, 5])\n    True",
        "return all(values[i] <= values[i + 1] for i in range(len(values) - 1))",
    ),
    (
        "def swap_case(text: str) -> str:",
        "Make lower-case letters upper-case and upper-case letters lower-case.\n    >>> swap_case('aBc')\n    'AbC'",
        "return ''.join(c.lower() if c.isupper() else c.upper() for c in text)",
    ),
    (
        "def digits_of(n: int) -> list:",
        "Return the decimal digits of a non-negative integer, most significant first.\n    >>> digits_of(409)\n    [4, 0, 9]",
        "return [int(d) for d in str(n)]",
    ),
    (
        "def power_set_size(n: int) -> int:",
        "Return how many subsets a set of n elements has.\n    >>> power_set_size(3)\n    8",
        "return 2 ** n",
    ),
    (
        "def average_word_length(text: str) -> float:",
        "Return the mean number of letters per word (0.0 for no words).\n    >>> average_word_length('ab abcd')\n    3.0",
        "words = text.split()\n    if not words:\n        return 0.0\n    return sum(len(w) for w in words) / len(words)",
    ),
    (
        "def merge_sorted(a: list, b: list) -> list:",
        "Merge two sorted lists into one sorted list.\n    >>> merge_sorted([1, 4], [2, 3, 5])\n    [1, 2, 3, 4, 5]",
        "result = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            result.append(a[i])\n            i += 1\n        else:\n            result.append(b[j])\n            j += 1\n    return result + a[i:] + b[j:]",
    ),
    (
        "def index_of_max(values: list) -> int:",
        "Return the index of the largest value (the first one on a tie).\n    >>> index_of_max([3, 9, 2, 9])\n    1",
        "best = 0\n    for i, v in enumerate(values):\n        if v > values[best]:\n            best = i\n    return best",
    ),
    (
        "def rotate_left(values: list, k: int) -> list:",
        "Rotate the list k places to the left.\n    >>> rotate_left([1, 2, 3, 4], 1)\n    [2, 3, 4, 1]",
        "if not values:\n        return []\n    k %= len(values)\n    return values[k:] + values[:k]",
    ),
    (
        "def strip_punctuation(text: str) -> str:",
        "Remove every character that is not a letter, a digit or a space.\n    >>> strip_punctuation('hi, you!')\n    'hi you'",
        "return ''.join(c for c in text if c.isalnum() or c == ' ')",
    ),
    (
        "def pairs_summing_to(values: list, target: int) -> int:",
        "Count the index pairs i < j with values[i] + values[j] == target.\n    >>> pairs_summing_to([1, 2, 3, 4], 5)\n    2",
        "count = 0\n    for i in range(len(values)):\n        for j in range(i + 1, len(values)):\n            if values[i] + values[j] == target:\n                count += 1\n    return count",
    ),
    (
        "def to_binary(n: int) -> str:",
        "Return the binary representation of a non-negative integer without the 0b prefix.\n    >>> to_binary(5)\n    '101'",
        "return bin(n)[2:]",
    ),
    (
        "def vowel_positions(text: str) -> list:",
        "Return the indices of the vowels in text.\n    >>> vowel_positions('banana')\n    [1, 3, 5]",
        "return [i for i, c in enumerate(text) if c.lower() in 'aeiou']",
    ),
    (
        "def common_elements(a: list, b: list) -> list:",
        "Return the values found in both lists, sorted and without repeats.\n    >>> common_elements([1, 2, 3], [2, 3, 4])\n    [2, 3]",
        "return sorted(set(a) & set(b))",
    ),
]


def main() -> None:
    import doctest

    rows = []
    for signature, doc, body in FUNCTIONS:
        prompt = f'{signature}\n    """{doc}\n    """\n'
        completion = f"    {body}\n"
        namespace: dict = {}
        exec(prompt + completion, namespace)  # our own code: check that the examples hold
        name = signature[4 : signature.index("(")]
        checker = doctest.DocTestRunner()
        for test in doctest.DocTestFinder().find(namespace[name], name, globs=namespace):
            checker.run(test)
        assert checker.failures == 0 and checker.tries > 0, f"{name}: its examples fail"
        rows.append({"prompt": prompt, "completion": completion})
    out = Path(__file__).resolve().parents[1] / "data" / "code" / "train.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
