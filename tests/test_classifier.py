from data.content_samples import CODE, PROSE

from policies.classifier import CODE as C
from policies.classifier import PROSE as P
from policies.classifier import STRUCTURED as S
from policies.classifier import ContentTracker, classify


def test_accuracy_on_the_labelled_set():
    samples = [(t, C) for t in CODE] + [(t, P) for t in PROSE]
    wrong = [(t, label) for t, label in samples if classify(t) != label]
    accuracy = 1 - len(wrong) / len(samples)
    assert accuracy >= 0.95, wrong


def test_switches_at_code_fences_and_back():
    tracker = ContentTracker("Write a function that adds numbers.")
    assert tracker.current == P
    assert tracker.feed("Sure! Here is a small function that does it:\n\n") == P
    assert tracker.feed("``") == P
    assert tracker.feed("`python\n") == C  # the fence arrived in two pieces
    assert tracker.feed("x = 1") == C  # inside a fence even when the text alone looks like prose
    assert tracker.feed("\n```\n") == P
    assert tracker.feed("This adds the two numbers and returns the result to the caller.") == P


def test_unfenced_code_is_detected():
    tracker = ContentTracker()
    tracker.feed("def area(w, h):\n    return w * h\n\nprint(area(2, 3))\n")
    assert tracker.current == C


def test_tool_calls_and_json_blocks_are_structured():
    tracker = ContentTracker("Use <tool_call></tool_call> tags to call a tool.")
    assert tracker.current == P  # the instructions' balanced tags open nothing
    assert tracker.feed("Let me look that up.\n<tool_") == P
    assert tracker.feed('call>\n{"name": "get_weather", ') == S  # the opening tag in two pieces
    assert tracker.feed('"arguments": {"city": "Paris"}}\n</tool_call>') != S  # the window still reads JSON
    assert tracker.feed("\n```json\n") == S and tracker.feed('{"a": 1}') == S
    assert tracker.feed("\n```\nThat is the object you asked for, with one key.") == P
    assert tracker.feed("\n```python\nx = 1") == C
    forced = ContentTracker('assistant\n<tool_call>\n{"name": "f", "arguments": ')  # a forced call's prompt
    assert forced.current == S and forced.feed('{"x": 2}}') == S
    held = ContentTracker("Describe a cat as JSON.", structured=True)  # response_format: a grammar
    assert held.current == S and held.feed("The cat is a small animal that sleeps.") == S


def test_feed_cost(benchmark):
    """`pytest --benchmark-enable -k feed_cost` reports the cost of one step's update."""
    tracker = ContentTracker(PROSE[0] * 3)
    assert benchmark(tracker.feed, " x") == P  # a short word keeps prose prose
