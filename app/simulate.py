"""Hydra entry point: `python -m app.simulate key=value ...` (add -m for a multirun sweep).

Runs the same ServerApp and ClientApp as `flwr run .` on Flower's Ray-backed simulation engine, one SuperNode per
device, and writes the results into Hydra's run directory (`hydra.run.dir=...`).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from flwr.simulation import run_simulation
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from app.client_app import make_client_fn
from app.config import validate
from app.server_app import make_server_app
from flwr.client import ClientApp


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    run_simulation(
        server_app=make_server_app(cfg, out_dir),
        client_app=ClientApp(client_fn=make_client_fn(cfg)),
        num_supernodes=cfg.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    results = out_dir / "results.json"
    if not results.exists():  # run_simulation logs a failed ServerApp but does not raise
        raise RuntimeError(f"the simulation ended without writing {results}: see the log above for the error")
    return json.loads(results.read_text())["final"]


if __name__ == "__main__":
    main()
