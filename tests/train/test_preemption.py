import os
import signal

from lrm_train.train.preemption import StopSignals


def test_a_signal_recorded_inside_reaches_the_one_around_it_and_a_second_acts_as_usual():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as outer:
        with StopSignals() as inner:
            os.kill(os.getpid(), signal.SIGTERM)
            assert inner.received == outer.received == signal.SIGTERM
            assert signal.getsignal(signal.SIGTERM) is before  # a second signal is not deferred
        assert signal.getsignal(signal.SIGTERM) is before
    assert StopSignals._entered == []


def test_one_entered_after_the_outer_received_a_signal_starts_with_it():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as outer:
        os.kill(os.getpid(), signal.SIGUSR1)
        with StopSignals() as inner:
            assert inner.received == outer.received == signal.SIGUSR1
            assert signal.getsignal(signal.SIGUSR1) is before
    assert StopSignals._entered == []


def test_without_a_signal_each_restores_the_handler_it_replaced():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as outer:
        outer_handler = signal.getsignal(signal.SIGTERM)
        with StopSignals() as inner:
            assert signal.getsignal(signal.SIGTERM) != outer_handler
        assert signal.getsignal(signal.SIGTERM) == outer_handler
        assert inner.received == outer.received == 0
    assert signal.getsignal(signal.SIGTERM) is before
