"""``flower-supernode`` with Flower's shortest heartbeat, for the deployment tests only.

Run as ``python tests/supernode_quick_heartbeat.py <flower-supernode arguments>``. A SuperNode
beats every 30 s by default and the SuperLink gives up on it after two missed beats, so a
killed node is declared lost about a minute later; at Flower's minimum interval (10 s), about
20 s later. Flower 1.42 has no option for it: the two modules that read the interval get the
minimum before the SuperNode starts. Where they no longer hold the default, this stops
rather than test a SuperNode it did not configure.
"""

import sys

from flwr.common import constant
from flwr.supercore import heartbeat
from flwr.supernode import fleet_http_connection
from flwr.supernode.cli import flower_supernode

for module in (fleet_http_connection, heartbeat):
    if getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None) != constant.HEARTBEAT_DEFAULT_INTERVAL:
        sys.exit(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL: update "
                 f"{__file__} for this Flower version")
    module.HEARTBEAT_DEFAULT_INTERVAL = constant.HEARTBEAT_MIN_INTERVAL

sys.exit(flower_supernode())
