"""The KubeRay manifest in docker/kuberay: it parses, its Serve config validates against Ray's
own schema and mmembed's, and every replica it asks for has nodes that can hold it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from mmembed.config import Settings
from mmembed.encoders import resolve
from mmembed.serve.config import ServeConfig
from mmembed.serve.launch import IMPORT_PATH

MANIFEST = Path(__file__).resolve().parents[2] / "docker" / "kuberay" / "rayservice.yaml"


def _documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def _group_resources(group: dict) -> dict[str, float]:
    """What `ray start` declares for a group's pods: GPUs and custom resources."""
    params = group["rayStartParams"]
    declared = json.loads(json.loads(params["resources"])) if "resources" in params else {}
    return declared | ({"GPU": float(params["num-gpus"])} if "num-gpus" in params else {})


def test_the_serve_config_validates_against_rays_schema_and_ours() -> None:
    service = _documents()["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    deploy = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    [app] = deploy.applications
    assert app.import_path == IMPORT_PATH
    config = ServeConfig.model_validate(app.args)
    settings = Settings(allow_downloads=True)
    for model in config.models:
        resolve(model.name, settings.models_config())  # every model is one the registry knows
    assert config.ingress_resources == {"node:__internal_head__": 0.01}


def test_every_encoder_replica_fits_on_a_worker_group_and_not_on_the_head() -> None:
    service = _documents()["RayService"]
    config = ServeConfig.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"])
    groups = {g["groupName"]: _group_resources(g) for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    head = _group_resources(service["spec"]["rayClusterConfig"]["headGroupSpec"])
    for model in config.models:
        needs = model.resources | ({"GPU": model.num_gpus} if model.num_gpus else {})
        assert needs, f"{model.name} would run anywhere, the head included"
        fits = [name for name, has in groups.items() if all(has.get(k, 0) >= v for k, v in needs.items())]
        assert fits == ["gpu-encoders"], (model.name, fits)
        assert not all(head.get(k, 0) >= v for k, v in needs.items())
        options = model.deployment_options()["ray_actor_options"]
        assert options["resources"] == model.resources and options["num_gpus"] == model.num_gpus


def test_the_secret_holds_settings_mmembed_reads() -> None:
    secret = _documents()["Secret"]["stringData"]
    fields = set(Settings.model_fields)
    for key in secret:
        if key.startswith("MMEMBED_"):
            assert key.removeprefix("MMEMBED_").lower() in fields, key
    assert {"MMEMBED_QDRANT_URL", "MMEMBED_CACHE_URL", "MMEMBED_S3_BUCKET"} <= set(secret)
