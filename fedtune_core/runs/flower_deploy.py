"""The Flower apps that ``flwr run flower/`` starts on a SuperLink and its SuperNodes.

The components named in ``flower/pyproject.toml``. The run's config and fedtune's settings
come in Flower's run config (``flwr run --run-config``, keys in
:data:`fedtune_core.fl.flower_server.DEFAULTS`); the ServerApp computes the run under its lock
and writes its record atomically, like ``fedtune run``.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid

from fedtune_core.fl import flower_server
from fedtune_core.fl.flower_app import client_app_for, config_of, server_app_for
from fedtune_core.fl.flower_server import DEFAULTS, RESULTS, WEIGHTS
from fedtune_core.proxy import pretrain
from fedtune_core.runs import claims, store


def _weights(cfg) -> str | None:
    """The checkpoint a config's recipe weights name, on this node (built on first use)."""
    return pretrain.weights_file(cfg.model, cfg.weights)


def _deployed(grid: Grid, context: Context) -> None:
    """``flwr run``: run the config the run config carries and write its record."""
    settings = DEFAULTS | dict(context.run_config)
    cfg = config_of(settings)
    record = claims.run(cfg, settings[RESULTS], progress=False, execute=lambda c: (
        flower_server.serve(grid, c, settings | {WEIGHTS: _weights(c) or ""})))
    path = store.record_path(settings[RESULTS], cfg)
    print(f"fedtune: {record['status']} record {path}", flush=True)


client_app = client_app_for(resolve=_weights)  # each run's settings from its run config
server_app = server_app_for(_deployed)
