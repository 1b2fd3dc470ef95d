"""The Serve configs shipped at the repository's root: each validates against Ray's own schema and
mmembed's, names only models the registry knows, and the GPU one fits one card and autoscales."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from mmembed.config import Settings
from mmembed.encoders import resolve
from mmembed.serve.config import ServeConfig
from mmembed.serve.launch import IMPORT_PATH

ROOT = Path(__file__).resolve().parents[2]


def _config(name: str) -> ServeConfig:
    deploy = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / name).read_text()))
    [app] = deploy.applications
    assert app.import_path == IMPORT_PATH
    return ServeConfig.model_validate(app.args)


@pytest.mark.parametrize("name", ["serve.yaml", "serve-cluster.yaml", "serve-gpu.yaml"])
def test_each_shipped_config_validates_and_names_known_models(name: str) -> None:
    config = _config(name)
    settings = Settings(allow_downloads=True)
    for model in config.models:
        resolve(model.name, settings.models_config())


def test_the_gpu_config_shares_one_card_and_autoscales() -> None:
    config = _config("serve-gpu.yaml")
    assert all(0 < m.num_gpus < 1 for m in config.models), [(m.name, m.num_gpus) for m in config.models]
    assert sum(m.num_gpus * m.min_replicas for m in config.models) <= 1  # every model starts on one GPU
    scaling = [m for m in config.models if m.max_replicas > m.min_replicas]
    assert scaling, "no model autoscales"
    for model in scaling:
        options = model.deployment_options()
        assert options["autoscaling_config"]["max_replicas"] == model.max_replicas
        assert options["ray_actor_options"]["num_gpus"] == model.num_gpus
    # One ingress parses every request: it scales too, or it caps the GPUs' throughput.
    assert config.ingress_max_replicas > config.ingress_min_replicas
    assert config.ingress_replicas()["autoscaling_config"]["max_replicas"] == config.ingress_max_replicas
