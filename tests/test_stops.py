from daemon.engine.stops import StopText


def feed_all(stop: StopText, pieces):
    out = []
    for piece in pieces:
        text, hit = stop.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + stop.flush(), False


def test_stop_inside_one_piece():
    assert feed_all(StopText(["END"]), ["abcENDdef"]) == ("abc", True)


def test_stop_across_pieces_is_never_emitted():
    stop = StopText(["</s>"])
    assert stop.feed("hello <") == ("hello ", False)
    assert stop.feed("/") == ("", False)
    assert stop.feed("s>more") == ("", True)


def test_false_start_is_released():
    stop = StopText(["STOP"])
    assert stop.feed("ST") == ("", False)
    assert stop.feed("ART") == ("START", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(StopText(["bb", "a"]), ["xxbba"]) == ("xx", True)


def test_held_text_is_flushed_at_the_end():
    assert feed_all(StopText(["abc"]), ["xy", "ab"]) == ("xyab", False)


def test_no_stops_passes_everything():
    assert feed_all(StopText([]), ["a", "b"]) == ("ab", False)
    assert feed_all(StopText([""]), ["a"]) == ("a", False)
