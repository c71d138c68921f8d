"""A kv-node whose ``join_done`` reply is lost and whose primary crashes right after.

Used by test_lost_join_reply.py as the command prefix of a node process:
``python lost_join_reply_node.py PRIMARY_PID python -m kvstore node ARGS...``. The node is
the real one; only two things are injected, once each, in this process:
- the ``join_done`` call reaches the primary (which lists this node in the in-sync set and
  answers), then the primary is killed (-9, by the PID the test started it with) and the
  answer is dropped: the call fails as if the reply were lost on the way;
- the next ZooKeeper ``sync`` after it fails (as it does when ZooKeeper does not answer
  within the request timeout), so the node cannot tell at once whether it was listed.
A restart of the node (EXIT_RESTART re-executes ``-m kvstore node``) runs without them.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from kvstore import errors
from kvstore.cli import node as node_program
from kvstore.coordination import ClusterView
from kvstore.rpc import Connection


def main() -> int:
    primary_pid = int(sys.argv[1])
    node_args = sys.argv[sys.argv.index("node") + 1 :]
    real_call, real_sync = Connection.call, ClusterView.sync
    pending = {"lost_reply": 1, "failed_sync": 0}

    def call(self: Connection, method: str, *args: Any) -> Any:
        result = real_call(self, method, *args)
        if method == "join_done" and pending["lost_reply"]:
            pending["lost_reply"] = 0
            os.kill(primary_pid, signal.SIGKILL)
            pending["failed_sync"] = 1
            raise errors.ConnectionLostError("join_done: reply lost (injected)")
        return result

    def sync(self: ClusterView) -> None:
        if pending["failed_sync"]:
            pending["failed_sync"] = 0
            raise errors.CoordinationError("ZooKeeper sync timed out (injected)")
        real_sync(self)

    Connection.call = call  # type: ignore[method-assign]
    ClusterView.sync = sync  # type: ignore[method-assign]
    return node_program.main(node_args)


if __name__ == "__main__":
    sys.exit(main())
