"""Events from state, value by value."""

from edge_agent.connectors.triggers import Watch


def run(w: Watch, values):
    return [w.observe(v) for v in values]


def test_counter_fires_per_increment_reports_gaps_and_wraps():
    w = Watch("counter", modulus=65536)
    assert run(w, [10, 10, 11, 14, 65535, 0]) == [
        (False, 0), (False, 0), (True, 0), (True, 2), (True, 65520), (True, 0)]
    assert w.missed_total == 2 + 65520


def test_first_value_is_only_a_baseline_even_after_a_reconnect():
    w = Watch("counter")
    w.observe(5)
    assert w.observe(5) == (False, 0)  # the server re-sent its current value


def test_handshake_fires_once_per_set_flag_until_cleared():
    w = Watch("handshake")
    assert run(w, [False, True, True, True, False, True]) == [
        (False, 0), (True, 0), (False, 0), (False, 0), (False, 0), (True, 0)]


def test_a_flag_already_set_at_start_is_new_data():
    assert Watch("handshake").observe(True) == (True, 0)


def test_edges():
    assert [f for f, _ in run(Watch("rising"), [False, True, True, False, True])] == [
        False, True, False, False, True]
    assert [f for f, _ in run(Watch("falling"), [True, False, False, True, False])] == [
        False, True, False, False, True]
    assert [f for f, _ in run(Watch("rising"), [True])] == [False]  # no edge seen


def test_deadband_compares_with_the_last_event_not_the_last_value():
    w = Watch("deadband", deadband=5.0)
    fires = [f for f, _ in run(w, [100.0, 103.0, 104.0, 105.5, 106.0, 99.0])]
    assert fires == [False, False, False, True, False, True]


def test_change():
    assert [f for f, _ in run(Watch("change"), ["a", "a", "b", "b", "c"])] == [
        False, False, True, False, True]


def test_handshake_is_not_re_armed_by_the_ack_only_by_a_seen_clear():
    w = Watch("handshake")
    assert w.observe(True) == (True, 0)
    # acknowledged; the device still shows the flag for a few polls: the same data
    assert run(w, [True, True, True]) == [(False, 0)] * 3
    w.armed = True  # what the connector does after a *failed* ack: read it again
    assert w.observe(True) == (True, 0)


def test_handshake_with_a_sequence_sees_a_new_press_while_the_flag_stays_set():
    w = Watch("handshake")
    seen = [w.observe(flag, seq)[0] for flag, seq in
            [(False, 4), (True, 5), (True, 5), (True, 6), (True, 6), (False, 6), (True, 7)]]
    assert seen == [False, True, False, True, False, False, True]


def test_handshake_with_a_sequence_read_again_after_a_failed_ack_is_the_same_press():
    w = Watch("handshake")
    assert w.observe(True, 9) == (True, 0)
    w.armed = True  # the ack failed
    assert w.observe(True, 9) == (True, 0)  # made again: the connector gives it the same id
    assert w.observe(True, 9) == (False, 0)
