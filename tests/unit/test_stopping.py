"""Stop strings and the text a stream may release."""

from handler.decoding.stopping import StopScan, find_stop, matched_stop, releasable_length


def test_find_stop_returns_the_earliest_of_several():
    assert find_stop("one. two! three", (".", "!")) == 3


def test_find_stop_none_without_a_match():
    assert find_stop("abc", ("x",)) is None


def test_scan_finds_a_stop_split_across_steps():
    scan = StopScan(("### End",))
    assert scan.scan("Answer ###") is None
    assert scan.scan("Answer ### End") == 7


def test_scan_does_not_refind_text_before_its_window():
    scan = StopScan(("ab",))
    assert scan.scan("xxab") == 2


def test_release_holds_back_a_possible_stop_prefix():
    assert releasable_length("Hello ##", ("### End",)) == len("Hello ")


def test_release_holds_back_nothing_when_no_prefix_matches():
    assert releasable_length("Hello", ("###",)) == 5


def test_release_holds_back_a_half_decoded_character():
    assert releasable_length("caf\ufffd", ()) == 3


def test_release_takes_the_longest_held_prefix_over_all_stops():
    assert releasable_length("text ab", ("b!", "abc")) == len("text ")


def test_the_stop_string_found_is_named_the_first_listed_when_two_start_there():
    assert matched_stop("The capital is Paris.", ("Paris", "nowhere"), 15) == "Paris"
    assert matched_stop("ab", ("abc", "a", "ab"), 0) == "a"
    assert matched_stop("ab", ("x",), 0) is None
