"""A failed collective turned into one line naming the lost node (core/watchdog.py); the
heartbeat itself is exercised on emulated nodes (tests/test_multinode.py)."""
import pytest

from core.distributed import Parallel
from core.watchdog import lost_peer_message

GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[10.77.0.2]:20111. This is typically caused by a remote worker crashing. Check the logs of the "
               "remote worker before reporting an error. GLHF!")
GLOO_RESET = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.77.0.2]:16057: Connection reset "
              "by peer. This is typically caused by a remote worker hanging or bugs in the application.")


def two_nodes(rank: int) -> Parallel:
    return Parallel(rank=rank, world_size=4, local_rank=rank % 2, tp=1, dp=4, tp_rank=0, dp_rank=rank, tp_group=None,
                    dp_group=None, mp_group=None, ctrl_group=None, device=None,
                    hosts=["node1", "node1", "node2", "node2"], addresses=["10.77.0.1"] * 2 + ["10.77.0.2"] * 2)


@pytest.mark.parametrize("text, cause", [
    (GLOO_CLOSED, "Connection closed by peer [10.77.0.2]:20111"),
    (GLOO_RESET, "Read error [10.77.0.2]:16057: Connection reset by peer"),
])
def test_a_lost_peer_is_one_line_naming_its_node(text, cause):
    line = lost_peer_message(RuntimeError(text), two_nodes(1))
    assert line == f"rank 1 on node1 lost contact with ranks 2-3 on node2 ({cause}); the same command resumes " \
                   f"from the last checkpoint"


def test_other_errors_are_left_alone():
    par = two_nodes(0)
    assert lost_peer_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), par) is None
    assert lost_peer_message(ValueError(GLOO_CLOSED), par) is None  # not a collective's error
    unknown = lost_peer_message(RuntimeError("Connection reset by peer"), par)
    assert unknown.startswith("rank 0 on node1 lost contact with a peer (Connection reset by peer)")
