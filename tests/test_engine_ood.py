"""Which frames of a session the engine's turn check takes (engine.ood.TurnCheck)."""

from engine.ood import TurnCheck


def test_every_nth_frame_from_the_first_and_again_after_a_restart():
    check = TurnCheck(every=3)
    assert [s for s in range(10, 18) if check.due(s)] == [10, 13, 16]
    assert not check.due(16)  # the same frame again (a resend) is not checked twice
    assert check.due(2)  # seq went backwards: a restarted source starts over
    assert [s for s in range(3, 6) if check.due(s)] == [5]


def test_zero_never_checks():
    check = TurnCheck(every=0)
    assert not any(check.due(s) for s in range(20))
